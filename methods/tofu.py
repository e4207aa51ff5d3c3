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

from methods.base import METRIC, TokenState, add_at, register, take
from methods.ops import bipartite_soft_matching, max_merge
from methods.pitome import RatioMerging, merged_count


def tofu_reduce(tokens: TokenState, metric: torch.Tensor, r: int, num_prefix: int, fuse: bool) -> TokenState:
    """One ToFu step with ``r`` (already capped): prune (``fuse`` False) or MLERP-merge the selected A tokens.
    Output: ToMe's order (``MergePlan.order``)."""
    plan = bipartite_soft_matching(metric, r, num_prefix)
    order, merged, into = plan.rows  # order: prefix, kept A (by position when there is a prefix, else in matching
    # order), B; merged: the A tokens merged away; into: each one's output row
    x = take(tokens.x, order)
    if not fuse:
        return TokenState(x=x, size=None, source=None if tokens.source is None else take(tokens.source, order))
    # The output rows first, then the fusion on them alone: the same values per row as fusing all N rows and
    # keeping N - r of them, with fewer rows to pass over.
    moved = take(tokens.x, merged)
    count = add_at(torch.ones_like(x[..., :1]), into, torch.ones_like(moved[..., :1]), inplace=True)
    norm = x.norm(dim=-1)  # each destination's norm before merging
    largest = norm.scatter_reduce(1, plan.into, moved.norm(dim=-1), reduce="amax")
    x = add_at(x, into, moved) / count / norm[..., None] * largest[..., None]  # the mean, destination included
    source = None if tokens.source is None else plan.merge(tokens.source, "amax")  # sources are united
    return TokenState(x=x, size=None, source=source)


@register("tofu")
class ToFu(RatioMerging):
    """docs/methods.md#tofu"""

    def reduce(self, layer, tokens, signals, ctx):
        num_tokens = tokens.x.shape[1]
        r = min(merged_count(num_tokens, self.params["ratio"]), max_merge(num_tokens, ctx.num_prefix))
        if r <= 0:
            return tokens, None
        return tofu_reduce(tokens, signals[METRIC], r, ctx.num_prefix, fuse=layer > ctx.depth // 2), None
