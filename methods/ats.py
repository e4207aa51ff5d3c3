"""ATS: Adaptive Token Sampling, Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers",
ECCV 2022 (arXiv 2111.15667); reference code github.com/adaptivetokensampling/ATS. docs/methods.md#ats.

At each block of ``layers`` (between the attention residual and the MLP), every image keeps its own number of
patch tokens: the patches' significance (class attention summed over heads times the norm of the value,
normalised: the harness's ``ppt_score`` of the policy-softmax attention) is sorted ascending, its normalised
cumulative sum ``G`` is inverted at ``K`` evenly spaced points (``K`` = patch tokens entering block 0, 196 at
224/16, whatever the current count) and the distinct picked positions are kept: prefix tokens first, then the kept
patches in ascending significance (most significant last). Sizes stay 1.

Semantics are those of the reference code at batch size 1, for every image (the reference's zero padding, which
makes an image depend on its batch, is not reproduced): images of a batch keep different counts, the batch is
padded to its largest count and ``TokenState.mask`` marks the real tokens (padded keys get probability exactly 0
in the harness's ``policy`` attention; padded slots hold zeros and cover no source). One host synchronisation per
ATS block, to size the padded batch (``int(counts.max())``); none elsewhere.

Numerics (the sampling is discontinuous in the scores): every block runs the harness's ``policy`` attention
(ATS's fp32 softmax with its epsilon). The sampling follows the reference's arithmetic and order of operations in
the scores' dtype promoted to at least float32: float32 for float32 models, float64 for float64 models (the
reference's arithmetic also follows the model's dtype, with ``linspace`` and the step indices in float32). Under
autocast the queries, keys and values come from half-precision projections; the policy softmax and the scores stay
float32.

Quirks of the reference kept: position 0 (the least significant patch) is never picked, so every ATS block drops
at least one patch; when the only picked position is 1 (two patches left) the reference's duplicate removal drops
it too, so a block with at most two real patches keeps none of them (with one patch the reference crashes; we drop
it, consistently with "position 0 is never picked").

MACs: the harness computes ``attn @ V`` and the output projection for every row before this reduction picks the
kept rows, so each ATS block costs ``(N - n)(N C + C^2)`` more than the reference's
``3 N C^2 + N^2 C + n N C + n C^2 + 8 n C^2`` (about 0.03 GMACs on DeiT-S); the counters report that larger count.
Per-image kept counts are recorded per ATS block as ``kept_mean`` (mean over the batch's images of the real tokens
kept, prefix included; a 0-d tensor), since ``ForwardInfo`` counts are the padded ones.
"""

from __future__ import annotations

from typing import Any

import torch

from methods.base import PPT_SCORE, BudgetKnob, Method, ReductionContext, TokenState, register


@register("ats")
class ATS(Method):
    """docs/methods.md#ats"""

    defaults = {"layers": [3, 4, 5, 6, 7, 8, 9, 10, 11]}
    data_dependent = True
    attention = "policy"
    # Swept through its first block s: layers = [s, ..., L-1]. A lower s samples in more blocks, so it is
    # cheaper; budget_choices lists the schedules by ascending s (most reduction first).
    budget_knob = BudgetKnob("layers", kind="choice", cheaper="lower")

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"layers": self._layers(params["layers"])}

    def check(self, ctx: ReductionContext) -> None:
        self._check_layers(ctx)

    def budget_choices(self, ctx: ReductionContext) -> list[list[int]]:
        """``[[s, ..., L-1] for s = 0 .. L-1]``: from the most reduction (sampling in every block) to the least
        (the last block only)."""
        return [list(range(start, ctx.depth)) for start in range(ctx.depth)]

    def signals(self, layer: int, ctx: ReductionContext) -> frozenset[str]:
        return frozenset({PPT_SCORE}) if layer in self.params["layers"] else frozenset()

    def reduce(self, layer, tokens, signals, ctx):
        p = ctx.num_prefix
        if tokens.x.shape[1] <= p:  # no patch token left in any image
            return tokens, None
        real = tokens.mask[:, p:] if tokens.mask is not None else None
        picked, order = sample_positions(signals[PPT_SCORE], real, ctx.num_tokens - p)
        reduced = keep_picked(tokens, picked, order, p)
        kept = reduced.mask.sum(dim=1).to(torch.float32).mean()  # a tensor: no second host sync
        return reduced, {"kept_mean": kept}


def sample_positions(
    scores: torch.Tensor, real: torch.Tensor | None, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATS's inverse transform sampling, per image. ``scores`` (B, P): normalised significance of the patch
    tokens (padded ones ignored); ``real`` (B, P) bool or None (all real); ``num_samples``: K.

    Returns ``picked`` (B, P) bool, indexed by sorted position (ascending score), and ``order`` (B, P): the
    token index (among the patches) at each sorted position."""
    batch, patches = scores.shape
    dtype = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.detach().to(dtype)
    if real is None:
        real = torch.ones(batch, patches, dtype=torch.bool, device=scores.device)
    count = real.sum(dim=1, keepdim=True)  # real patches per image, (B, 1)
    # Ascending sort of the real scores; padded patches last (+inf), then given score 0 so that the cumulative
    # sums of the real positions are those of the image alone (a sequential cumsum: adding 0 changes nothing).
    key = scores.masked_fill(~real, float("inf"))
    sorted_scores, order = torch.sort(key, dim=1, stable=True)
    position = torch.arange(patches, device=scores.device)
    in_image = position < count  # (B, P): sorted position holds a real patch
    cdf = torch.cumsum(sorted_scores.masked_fill(~in_image, 0.0), dim=1)
    first, last = cdf[:, :1], cdf[:, -1:]  # F_0 and F_last (the cumsum is non-decreasing)
    normalised = (cdf - first) / (last - first)
    # y0: the smallest positive G of the image (the reference adds 1e8 where G == 0 and takes the minimum)
    y0 = normalised.masked_fill(~in_image | (normalised == 0), float("inf")).amin(dim=1, keepdim=True)
    u = torch.linspace(0, 1, num_samples, device=scores.device, dtype=torch.float32)
    steps = torch.arange(num_samples, device=scores.device, dtype=torch.float32)
    ys = y0 + ((u * (num_samples - 1)) - y0 * steps) / (num_samples - 1)  # (B, K), the reference's order
    distance = (ys[:, :, None] - normalised.masked_fill(~in_image, float("inf"))[:, None, :]).abs()
    choice = distance.argmin(dim=2)  # (B, K): lowest position on ties
    picked = torch.zeros(batch, patches, dtype=torch.bool, device=scores.device)
    picked = picked.scatter(1, choice, torch.ones_like(choice, dtype=torch.bool))  # tensor src: traceable
    picked &= in_image & (count >= 2)  # one real patch: G is 0/0 (the reference crashes): keep none
    if patches >= 2:
        # The reference's duplicate removal compares the largest pick with 1: a lone pick of position 1 is dropped.
        lone = picked[:, 1] & ~picked[:, 2:].any(dim=1)
        picked[:, 1] &= ~lone
    return picked, order


def keep_picked(tokens: TokenState, picked: torch.Tensor, order: torch.Tensor, num_prefix: int) -> TokenState:
    """Prefix tokens, then the picked patches in ascending sorted position; padded to the batch's largest count
    (the one host synchronisation), padded slots zeroed and masked out."""
    batch, patches = picked.shape
    kept = picked.sum(dim=1, keepdim=True)  # (B, 1)
    width = int(kept.max())  # host sync: the padded batch's size
    position = torch.arange(patches, device=picked.device)
    ranked = torch.sort(torch.where(picked, position, position + patches), dim=1)[1][:, :width]  # picked first
    patch_index = order.gather(1, ranked) + num_prefix
    prefix = torch.arange(num_prefix, device=picked.device).expand(batch, num_prefix)
    out = tokens.gather(torch.cat([prefix, patch_index], dim=1))
    prefix_real = (
        torch.ones(batch, num_prefix, dtype=torch.bool, device=picked.device)
        if tokens.mask is None else tokens.mask[:, :num_prefix]
    )
    mask = torch.cat([prefix_real, torch.arange(width, device=picked.device) < kept], dim=1)
    keep = mask[:, :, None]
    return TokenState(
        x=torch.where(keep, out.x, torch.zeros((), dtype=out.x.dtype, device=out.x.device)),
        size=keep.to(out.x.dtype),
        source=None if out.source is None else torch.where(keep, out.source, torch.zeros((), dtype=out.source.dtype,
                                                                                           device=out.source.device)),
        mask=mask,
    )
