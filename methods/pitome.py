"""PiToMe: Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024
(arXiv 2405.16148); reference code hchautran/PiToMe (``algo/pitome``), reproduced as coded.

At every block, between the attention and the MLP, ``r = floor(T - T*ratio)`` of the ``T`` patch tokens are
merged (size-weighted). Tokens are ranked by an energy score (mean of ``elu(cos - margin)`` against all patch
tokens, margin ``0.75 - 0.75 i / L``). The first ``ceil(L/2)`` blocks match the energy-ranked tokens
alternately (A = ranks 0, 2, 4, ..., B = ranks 1, 3, ...) and merge the r best-matched A tokens; later blocks
keep the ``T - 2r`` lowest-energy tokens and merge each of the r highest-ranked even-rank tokens into its most
similar odd-rank token among the 2r highest. Sizes weight the merges only: no proportional attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from methods.base import METRIC, BudgetKnob, Method, ReductionContext, TokenState, register, take
from methods.ops import MergePlan, merge_tokens


def ratio_value(method: Method, value: Any) -> float:
    """A number in (0.5, 1]: the fraction of tokens kept per block (PiToMe / ToFu)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 < value <= 1:
        raise method._error(f"parameter 'ratio' must be a number in (0.5, 1], got {value!r}")
    return float(value)


def merged_count(count: int, ratio: float) -> int:
    """``floor(T - T*ratio)`` in double arithmetic, exactly that form (not ``(1 - ratio) * T``)."""
    return math.floor(count - count * ratio)


def energy_order(metric: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (B, T, T) of the unit-normalised ``metric`` (B, T, d) and the tokens ordered by
    energy ``mean_t elu(sim[j, t] - margin)``, highest first (B, T)."""
    unit = F.normalize(metric, p=2, dim=-1)
    sim = unit @ unit.transpose(-1, -2)
    energy = elu(sim - margin).mean(dim=-1)
    return sim, torch.argsort(energy, dim=-1, descending=True)


def elu(t: torch.Tensor) -> torch.Tensor:
    """``F.elu`` evaluated in float64 and rounded to ``t``'s dtype: the correctly rounded ELU (float32
    ``F.elu`` is within 1 ulp of it). PyTorch's float32 ``expm1`` on CPU is not vectorised: on (64, 49, 49) it
    takes 0.79 ms, the float64 round trip 0.15 ms (docs/methods.md#pitome)."""
    if t.dtype == torch.float64:
        return F.elu(t)
    return F.elu(t.double()).to(t.dtype)


def _rows_cols(sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``sim[b, rows[b]][:, cols[b]]`` for every image: (B, len(rows), len(cols))."""
    picked = take(sim, rows)  # (B, R, T)
    return take(picked.transpose(1, 2), cols).transpose(1, 2)


def pitome_plan(metric: torch.Tensor, r: int, margin: float, split_all: bool):
    """Which patch tokens (indices into the T patch tokens, (B, .)) are kept as they are, which are
    destinations, and which merge into which destination. ``split_all``: the first half's energy-split
    bipartite matching over all T tokens; otherwise the energy-protected merge of the 2r highest.

    Returns ``(kept, dst, src, target)``: output = [kept, dst]; ``src[:, k]`` merges into ``dst[:, target[:, k]]``.
    """
    sim, order = energy_order(metric, margin)
    if split_all:
        a_idx, b_idx = order[:, ::2], order[:, 1::2]
        best, best_b = _rows_cols(sim, a_idx, b_idx).max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)
        src_rows = ranked[:, :r]
        kept = a_idx.gather(1, ranked[:, r:])
        return kept, b_idx, a_idx.gather(1, src_rows), best_b.gather(1, src_rows)
    candidates, kept = order[:, : 2 * r], order[:, 2 * r :]
    a_idx, b_idx = candidates[:, ::2], candidates[:, 1::2]
    target = _rows_cols(sim, a_idx, b_idx).argmax(dim=-1)
    return kept, b_idx, a_idx, target


def merge_weighted(tokens: TokenState, num_prefix: int, kept, dst, src, target) -> TokenState:
    """Merge the patch tokens ``src`` into ``dst[target]`` (size-weighted mean, sizes add, sources unite:
    ToMe's ``merge_tokens``); output [prefix tokens, kept, dst]. Indices are into the patch tokens (B, .)."""
    prefix = torch.arange(num_prefix, device=kept.device).expand(kept.shape[0], -1)
    plan = MergePlan(order=torch.cat([prefix, kept + num_prefix, dst + num_prefix], dim=1), merged=src + num_prefix,
                     into=target + (num_prefix + kept.shape[1]))  # the output slot of each source's destination
    return merge_tokens(tokens, plan)


class RatioMerging(Method):
    """What PiToMe and ToFu share: one ``ratio`` of tokens kept at every block (their budget knob), keys as the
    similarity metric. Not registered: a base class."""

    defaults = {"ratio": 0.9125}
    budget_knob = BudgetKnob("ratio", kind="float", cheaper="lower", low=0.5, high=1.0)

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ratio": ratio_value(self, params["ratio"])}

    def signals(self, layer: int, ctx: ReductionContext) -> frozenset[str]:
        return frozenset({METRIC}) if self.params["ratio"] < 1 else frozenset()


@register("pitome")
class PiToMe(RatioMerging):
    """docs/methods.md#pitome"""

    def reduce(self, layer, tokens, signals, ctx):
        p = ctx.num_prefix
        r = merged_count(tokens.x.shape[1] - p, self.params["ratio"])
        if r <= 0:
            return tokens, None
        margin = 0.75 - 0.75 * (layer / ctx.depth)
        plan = pitome_plan(signals[METRIC][:, p:], r, margin, split_all=layer < math.ceil(ctx.depth * 0.5))
        return merge_weighted(tokens, p, *plan), None
