"""ToFu: Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and Token Merging", WACV 2024
(arXiv 2312.01026). The authors published no code; reproduced as the PiToMe repository implements it
(hchautran/PiToMe ``algo/tofu``), the baseline of the PiToMe paper.

At every block, between the attention and the MLP, ToMe's bipartite matching selects ``r = floor(N - N*ratio)``
A tokens (N counts the prefix tokens). Blocks ``i <= L // 2`` drop them (pruning); later blocks fuse them into
their B token with "MLERP" as coded: the plain mean of the group, rescaled by ``max norm in the group / norm of
the destination before merging``. No sizes, no proportional attention.
"""

from __future__ import annotations

import torch

from methods.base import METRIC, Rows, TokenState, add_at, register, take
from methods.ops import bipartite_soft_matching, max_merge
from methods.pitome import RatioMerging, merged_count


def tofu_reduce(tokens: TokenState, metric: torch.Tensor, r: int, num_prefix: int, fuse: bool) -> TokenState:
    """One ToFu step with ``r`` (already capped): prune (``fuse`` False) or MLERP-merge the selected A tokens.
    Output: ToMe's order (``MergePlan.order``)."""
    plan = bipartite_soft_matching(metric, r, num_prefix)
    x, source = tokens.x, tokens.source
    order, merged, _ = plan.rows  # order: prefix, kept A (by position when there is a prefix, else in matching
    # order), B; merged: the A tokens merged away
    if fuse:
        src, dst = plan.merged, plan.order.gather(1, plan.into)  # (B, r) positions: merged A, their B
        moved, dst_rows = take(x, merged), Rows(dst)
        count = add_at(torch.ones_like(x[..., :1]), dst_rows, torch.ones_like(moved[..., :1]), inplace=True)
        mean = add_at(x, dst_rows, moved) / count  # scatter_reduce "mean" with the destination included
        norm = x.norm(dim=-1)
        largest = norm.scatter_reduce(1, dst, norm.gather(1, src), reduce="amax")
        x = mean / norm[..., None] * largest[..., None]  # divided by the destination's norm before merging
        if source is not None:
            source = source.scatter_reduce(1, dst[..., None].expand(-1, -1, source.shape[-1]), take(source, merged),
                                           reduce="amax")
    return TokenState(x=take(x, order), size=None, source=None if source is None else take(source, order))


@register("tofu")
class ToFu(RatioMerging):
    """docs/methods.md#tofu"""

    def reduce(self, layer, tokens, signals, ctx):
        num_tokens = tokens.x.shape[1]
        r = min(merged_count(num_tokens, self.params["ratio"]), max_merge(num_tokens, ctx.num_prefix))
        if r <= 0:
            return tokens, None
        return tofu_reduce(tokens, signals[METRIC], r, ctx.num_prefix, fuse=layer > ctx.depth // 2), None
