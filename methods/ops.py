"""Token-reduction operations as small pure functions on tensors, separate from any model plumbing.

Shapes: ``x`` (B, N, C); ``size`` (B, N, 1); ``metric`` (B, N, d); ``p`` = number of prefix tokens
(class token first, then distillation / register tokens), which are never merged and never pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from methods.base import Rows, TokenState, add_at, take


# --------------------------------------------------------------------------------------------------
# ToMe: bipartite soft matching (Bolya et al., ICLR 2023)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergePlan:
    """Which A tokens (even positions) merge into which B tokens (odd positions), as positions.

    ``order`` (B, N - r): the positions of the output tokens, in output order: the ``num_prefix`` protected
    prefix tokens in their original order, the A tokens kept (in matching order, or by position when there
    is a prefix), then the B tokens. ``merged`` (B, r): the positions of the A tokens merged away, best
    match first; ``into`` (B, r): the output slot (index into ``order``) each of them merges into.
    """

    order: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor

    @property
    def r(self) -> int:
        return self.merged.shape[1]

    rows: tuple[Rows, Rows, Rows] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # ``order``, ``merged`` and ``into`` as ``Rows``: flattened once for every tensor the plan moves
        order = Rows(self.order)
        object.__setattr__(self, "rows", (order, order.sharing(self.merged), order.sharing(self.into)))

    def merge(self, t: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """Apply the plan to any (B, N, D) tensor: the merged tokens are reduced into their target with
        ``mode`` (``sum``: added in ``merged`` order; ``amax``)."""
        order, merged, into = self.rows
        kept, moved = take(t, order), take(t, merged)
        if mode == "sum":
            return add_at(kept, into, moved)
        return kept.scatter_reduce(1, self.into[..., None].expand_as(moved), moved, reduce=mode)


def _prefix_split(num_prefix: int) -> tuple[int, int]:
    """How many prefix tokens fall on the A side (even positions) and on the B side (odd positions)."""
    return (num_prefix + 1) // 2, num_prefix // 2


def max_merge(num_tokens: int, num_prefix: int) -> int:
    """The largest r bipartite matching allows: half of the non-prefix tokens."""
    return max(num_tokens - num_prefix, 0) // 2


def survivors(order: torch.Tensor, r: int) -> torch.Tensor:
    """``order[:, r:].sort(dim=1).values`` for a permutation ``order`` of ``[0, T)`` per row (B, T): the tokens a
    matching keeps (all but its first ``r``) back in their original order. Compiled for the CPU by counting from the
    ``r`` removed ones, which inductor fuses with its neighbours where ATen's sort is a call of its own: with
    ``rank_i`` the number of removed values below removed value ``m_i``, ``m_i - rank_i`` kept values lie below
    it, so the k-th kept value is ``k`` plus the number of removed values with ``m_i - rank_i <= k``. The same
    integers (exact), from (B, r, r) and (B, T - r, r) comparisons; compiled, alternating in one process, against
    counting the kept values themselves ((B, T, T) comparisons): ToMe 2.0-2.2 % faster, ToFu 2.3-2.9 %,
    pooling 0.9-1.4 %, PPT 0.5-0.7 %, MCTF 0-0.8 %. Before that, against the sort:
    PPT r=12 1.6 % faster, ToFu 0.9-1.1 %, ToMe 0.3-0.6 % (both measured in an order that favoured the new variant
    by 1.5-2.6 % eager: docs/benchmark.md)."""
    kept = order[:, r:]
    if not (order.device.type == "cpu" and torch.compiler.is_compiling()):
        return kept.sort(dim=1).values
    removed = order[:, :r]
    rank = (removed[:, None, :] < removed[:, :, None]).sum(dim=-1)  # (B, r): removed values below each
    free_below = removed - rank  # kept values below each removed value
    slots = torch.arange(kept.shape[1], device=order.device)
    return slots + (free_below[:, None, :] <= slots[None, :, None]).sum(dim=-1)


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> MergePlan:
    """Match each A token to its most similar B token (cosine of ``metric``) and pick the ``r`` best
    matches. ``r`` must already be capped (``max_merge``)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2, :], metric[:, 1::2, :]
    scores = a @ b.transpose(-1, -2)
    a_prefix, b_prefix = _prefix_split(num_prefix)
    if a_prefix:
        scores[:, :a_prefix].fill_(-math.inf)  # fill_: no scalar tensor to lift (one dispatch fewer)
    if b_prefix:
        scores[:, :, :b_prefix].fill_(-math.inf)
    best_value, best_target = scores.max(dim=-1)
    order = best_value.argsort(dim=-1, descending=True)
    merged = order[:, :r]
    targets = best_target.gather(1, merged)
    # The A tokens kept: in matching order, or by position when there is a prefix (its A tokens, never merged,
    # then come first, the class token first of all).
    unmerged = survivors(order, r) if num_prefix else order[:, r:]
    # Positions: A token i sits at 2i, B token j at 2j + 1. Prefix tokens go first, interleaved as they were.
    batch, num_tokens = metric.shape[:2]
    kept_b = torch.arange(1 + 2 * b_prefix, num_tokens, 2, device=metric.device).expand(batch, -1)
    if b_prefix:  # prefix tokens on both sides (class and distillation tokens): their positions, then the rest
        prefix = torch.arange(num_prefix, device=metric.device).expand(batch, -1)
        out = torch.cat([prefix, unmerged[:, a_prefix:] * 2, kept_b], dim=1)
    else:  # a prefix on the A side only (a class token) already leads ``unmerged``, at its own positions
        out = torch.cat([unmerged * 2, kept_b], dim=1)
    into = targets + (out.shape[1] - kept_b.shape[1] - b_prefix)  # B token j's slot among the output tokens
    return MergePlan(order=out, merged=merged * 2, into=into)


def merge_tokens(tokens: TokenState, plan: MergePlan) -> TokenState:
    """Size-weighted average merge of x; sizes add up; sources are united.

    ``plan.merge(x * size) / plan.merge(size)``, with the rows taken before they are weighted (the same
    products, fewer of them) and the sum added in place into the fresh rows: two passes over the tokens fewer."""
    order, merged, into = plan.rows
    kept, moved = take(tokens.x, order), take(tokens.x, merged)
    if tokens.size is None:  # every size is 1: x * 1 is x, and the sizes are 1 plus the rows merged in
        size = add_at(kept.new_ones(*kept.shape[:2], 1), into, moved.new_ones(*moved.shape[:2], 1), inplace=True)
    else:
        kept_size, moved_size = take(tokens.size, order), take(tokens.size, merged)
        kept, moved = kept * kept_size, moved * moved_size
        size = add_at(kept_size, into, moved_size)
    x = add_at(kept, into, moved, inplace=True) / size
    source = None if tokens.source is None else plan.merge(tokens.source, "amax")
    return TokenState(x=x, size=size, source=source)


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
    return tokens.gather(prune_order(patch_scores, r, num_prefix))


def prune_order(patch_scores: torch.Tensor, r: int, num_prefix: int) -> torch.Tensor:
    """The positions (B, N - r) ``prune_by_score`` keeps, in its output order."""
    batch, num_tokens = patch_scores.shape[0], patch_scores.shape[1] + num_prefix
    prefix_scores = 2.0 + torch.arange(num_prefix - 1, -1, -1, device=patch_scores.device, dtype=patch_scores.dtype)
    scores = torch.cat([prefix_scores.expand(batch, num_prefix), patch_scores], dim=1)
    return torch.sort(scores, dim=1, descending=True)[1][:, : num_tokens - r]


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
