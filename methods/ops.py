"""Token-reduction operations as small pure functions on tensors, separate from any model plumbing.

Shapes: ``x`` (B, N, C); ``size`` (B, N, 1); ``metric`` (B, N, d); ``p`` = number of prefix tokens
(class token first, then distillation / register tokens), which are never merged and never pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.base import TokenState


# --------------------------------------------------------------------------------------------------
# ToMe: bipartite soft matching (Bolya et al., ICLR 2023)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergePlan:
    """Which A tokens (even positions) merge into which B tokens (odd positions).

    ``unmerged`` (B, Na - r, 1): A positions kept; ``merged`` (B, r, 1): A positions merged away;
    ``targets`` (B, r, 1): the B position each of them merges into. ``num_prefix`` prefix tokens are
    protected and come first in the output, in their original order.
    """

    unmerged: torch.Tensor
    merged: torch.Tensor
    targets: torch.Tensor
    num_prefix: int

    @property
    def r(self) -> int:
        return self.merged.shape[1]

    def merge(self, t: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """Apply the plan to any (B, N, D) tensor: A tokens in ``merged`` are reduced into their target
        with ``mode`` (``sum``, ``mean``, ``amax``, ...)."""
        a, b = t[:, ::2, :], t[:, 1::2, :]
        batch, _, dim = a.shape
        kept = a.gather(1, self.unmerged.expand(batch, self.unmerged.shape[1], dim))
        sources = a.gather(1, self.merged.expand(batch, self.r, dim))
        b = b.scatter_reduce(1, self.targets.expand(batch, self.r, dim), sources, reduce=mode)
        a_prefix, b_prefix = _prefix_split(self.num_prefix)
        if b_prefix == 0:
            return torch.cat([kept, b], dim=1)
        # Prefix tokens sit on both sides (cls at A0, distillation token at B0, ...): put them back first,
        # interleaved as they were, then the remaining A tokens, then the remaining B tokens.
        prefix = [kept[:, i // 2 : i // 2 + 1] if i % 2 == 0 else b[:, i // 2 : i // 2 + 1] for i in range(self.num_prefix)]
        return torch.cat([*prefix, kept[:, a_prefix:], b[:, b_prefix:]], dim=1)


def _prefix_split(num_prefix: int) -> tuple[int, int]:
    """How many prefix tokens fall on the A side (even positions) and on the B side (odd positions)."""
    return (num_prefix + 1) // 2, num_prefix // 2


def max_merge(num_tokens: int, num_prefix: int) -> int:
    """The largest r bipartite matching allows: half of the non-prefix tokens."""
    return max(num_tokens - num_prefix, 0) // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> MergePlan:
    """Match each A token to its most similar B token (cosine of ``metric``) and pick the ``r`` best
    matches. ``r`` must already be capped (``max_merge``)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2, :], metric[:, 1::2, :]
    scores = a @ b.transpose(-1, -2)
    a_prefix, b_prefix = _prefix_split(num_prefix)
    if a_prefix:
        scores[:, :a_prefix, :] = -math.inf
    if b_prefix:
        scores[:, :, :b_prefix] = -math.inf
    best_value, best_target = scores.max(dim=-1)
    order = best_value.argsort(dim=-1, descending=True)[..., None]
    unmerged, merged = order[:, r:, :], order[:, :r, :]
    targets = best_target[..., None].gather(1, merged)
    if num_prefix:
        # Keep the surviving A tokens in their original order, so the class token stays first.
        unmerged = unmerged.sort(dim=1)[0]
    return MergePlan(unmerged=unmerged, merged=merged, targets=targets, num_prefix=num_prefix)


def merge_tokens(tokens: TokenState, plan: MergePlan) -> TokenState:
    """Size-weighted average merge of x; sizes add up; sources are united."""
    size = tokens.sizes()
    x = plan.merge(tokens.x * size, "sum")
    size = plan.merge(size, "sum")
    source = None if tokens.source is None else plan.merge(tokens.source, "amax")
    return TokenState(x=x / size, size=size, source=source)


def tome_reduce(tokens: TokenState, metric: torch.Tensor, r: int, num_prefix: int) -> TokenState:
    """One ToMe step: cap r, match, merge."""
    r = min(r, max_merge(tokens.x.shape[1], num_prefix))
    if r <= 0:
        return tokens
    return merge_tokens(tokens, bipartite_soft_matching(metric, r, num_prefix))


# --------------------------------------------------------------------------------------------------
# Pruning by score (PPT's pruning branch) and EViT's top-k with fusion
# --------------------------------------------------------------------------------------------------
def prune_by_score(tokens: TokenState, patch_scores: torch.Tensor, r: int, num_prefix: int) -> TokenState:
    """Drop the ``r`` patch tokens with the lowest score; the survivors are ordered by descending score.

    Prefix tokens get scores above any patch score (PPT gives the class token 2; patch scores sum to 1),
    so they survive and come first, in their original order.
    """
    batch, num_tokens = tokens.x.shape[:2]
    prefix_scores = 2.0 + torch.arange(num_prefix - 1, -1, -1, device=patch_scores.device, dtype=patch_scores.dtype)
    scores = torch.cat([prefix_scores.expand(batch, num_prefix), patch_scores], dim=1)
    keep = torch.sort(scores, dim=1, descending=True)[1][:, : num_tokens - r]
    return tokens.gather(keep)


def keep_top_attentive(tokens: TokenState, cls_attn: torch.Tensor, keep: int, num_prefix: int, fuse: bool) -> TokenState:
    """EViT: keep the ``keep`` patch tokens with the largest class attention (descending), after the
    prefix tokens; with ``fuse``, append one token: the attention-weighted sum of the dropped ones."""
    patch_attn = cls_attn[:, num_prefix:]
    top_attn, top = patch_attn.topk(keep, dim=1, largest=True, sorted=True)
    prefix = torch.arange(num_prefix, device=top.device).expand(top.shape[0], num_prefix)
    kept = tokens.gather(torch.cat([prefix, top + num_prefix], dim=1))
    if not fuse:
        return kept
    dropped_mask = torch.ones_like(patch_attn).scatter(1, top, 0.0)  # 1 for the dropped tokens
    weights = (patch_attn * dropped_mask)[..., None]
    patches = tokens.x[:, num_prefix:]
    fused_x = (patches * weights).sum(dim=1, keepdim=True)
    patch_sizes = tokens.sizes()[:, num_prefix:]
    fused_size = (patch_sizes * dropped_mask[..., None]).sum(dim=1, keepdim=True)
    fused_source = None
    if tokens.source is not None:
        fused_source = (tokens.source[:, num_prefix:] * dropped_mask[..., None]).amax(dim=1, keepdim=True)
        fused_source = torch.cat([kept.source, fused_source], dim=1)
    return TokenState(
        x=torch.cat([kept.x, fused_x], dim=1),
        size=torch.cat([kept.size, fused_size], dim=1),
        source=fused_source,
    )
