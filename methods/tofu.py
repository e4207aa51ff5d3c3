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

from methods.base import METRIC, TokenState, register
from methods.ops import _prefix_split, bipartite_soft_matching, max_merge
from methods.pitome import RatioMerging, merged_count


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


def tofu_reduce(tokens: TokenState, metric: torch.Tensor, r: int, num_prefix: int, fuse: bool) -> TokenState:
    """One ToFu step with ``r`` (already capped): prune (``fuse`` False) or MLERP-merge the selected A tokens.
    Output: prefix tokens, surviving A tokens in position order, B tokens in position order."""
    plan = bipartite_soft_matching(metric, r, num_prefix)
    x, source = tokens.x, tokens.source
    batch, num_tokens, _ = x.shape
    positions = torch.arange(num_tokens, device=x.device)
    a_pos, b_pos = positions[::2], positions[1::2]
    kept = a_pos[plan.unmerged[..., 0]]  # (B, Na - r), position order, prefix A tokens first
    if fuse:
        src = a_pos[plan.merged[..., 0]]  # (B, r) positions of the merged A tokens
        dst = b_pos[plan.targets[..., 0]]  # (B, r) positions of their B tokens
        norm = x.norm(dim=-1)
        mean = x.scatter_reduce(1, dst[..., None].expand_as(_take(x, src)), _take(x, src), reduce="mean")
        largest = norm.scatter_reduce(1, dst, norm.gather(1, src), reduce="amax")
        x = mean / norm[..., None] * largest[..., None]  # divided by the destination's norm before merging
        if source is not None:
            source = source.scatter_reduce(1, dst[..., None].expand_as(_take(source, src)), _take(source, src),
                                           reduce="amax")
    a_prefix, b_prefix = _prefix_split(num_prefix)
    prefix = positions[:num_prefix].expand(batch, num_prefix)
    index = torch.cat([prefix, kept[:, a_prefix:], b_pos[b_prefix:].expand(batch, -1)], dim=1)
    return TokenState(x=_take(x, index), size=None, source=None if source is None else _take(source, index))


@register("tofu")
class ToFu(RatioMerging):
    """docs/methods.md#tofu"""

    def reduce(self, layer, tokens, signals, ctx):
        num_tokens = tokens.x.shape[1]
        r = min(merged_count(num_tokens, self.params["ratio"]), max_merge(num_tokens, ctx.num_prefix))
        if r <= 0:
            return tokens, None
        return tofu_reduce(tokens, signals[METRIC], r, ctx.num_prefix, fuse=layer > ctx.depth // 2), None
