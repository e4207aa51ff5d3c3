"""ToMe: Token Merging, Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023.

At every block with ``r > 0``, bipartite soft matching merges ``r`` tokens (size-weighted mean), between
the attention and the MLP. ``r`` is one int for every layer, or a per-layer list (zero-padded to the
depth); with an int, ``inflection`` bends the schedule (``-1``: 2r at the first layer down to 0).
"""

from __future__ import annotations

from typing import Any

from methods.base import METRIC, REQUIRED, BudgetKnob, Method, ReductionContext, register
from methods.ops import tome_reduce


def tome_schedule(r: int | list[int], depth: int, inflection: float = 0.0) -> list[int]:
    """r per layer. ``lo = int(r(1 - inflection))``, ``hi = 2r - lo``, layer i gets ``int(lo + i(hi-lo)/(L-1))``."""
    if isinstance(r, list):
        return list(r) + [0] * (depth - len(r))
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
    return [int(lo + step * i) for i in range(depth)]


@register("tome")
class ToMe(Method):
    """docs/methods.md#tome"""

    defaults = {"r": REQUIRED, "inflection": 0, "prop_attn": True}
    budget_knob = BudgetKnob("r", kind="int", cheaper="higher")
    paper_params = {"r": 13}  # ToMe, DeiT-S: 2.70 GMACs

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        r = params["r"]
        if isinstance(r, tuple):  # ToMe's code reads a tuple as (r, inflection), never as one r per block
            raise self._error(f"parameter 'r' must be an int or a list of ints (one per block), got the tuple {r!r} "
                              "(ToMe's (r, inflection) pair is written r: R, inflection: I)")
        if isinstance(r, list):
            if not r:
                raise self._error("parameter 'r' is an empty list: give one int, or one per block from the first")
            r = [self._count("r", v) for v in r]
            if params["inflection"] not in (0, 0.0):
                raise self._error("parameter 'inflection' is used only with an int r, not a per-layer list")
        else:
            r = self._count("r", r)
        inflection = params["inflection"]
        if isinstance(inflection, bool) or not isinstance(inflection, (int, float)) or not -1 <= inflection <= 1:
            raise self._error(f"parameter 'inflection' must be a number in [-1, 1], got {inflection!r}")
        return {"r": r, "inflection": inflection, "prop_attn": self._bool("prop_attn", params["prop_attn"])}

    def schedule(self, depth: int) -> list[int]:
        return tome_schedule(self.params["r"], depth, self.params["inflection"])

    def check(self, ctx: ReductionContext) -> None:
        r = self.params["r"]
        if isinstance(r, list) and len(r) > ctx.depth:
            raise self._error(f"r lists {len(r)} layers, but the model has {ctx.depth} blocks")

    def check_budget(self, ctx: ReductionContext) -> None:
        most = max(self.schedule(ctx.depth), default=0)
        patches = ctx.num_tokens - ctx.num_prefix
        if most >= patches and self.params["inflection"] not in (0, 0.0):
            raise self._error(f"r={self.params['r']} with inflection {self.params['inflection']} merges {most} tokens "
                              f"at one block, which would remove all {patches} patch tokens of this model (allowed: "
                              f"at most {patches - 1} at any block)")
        self._check_r(most, ctx)

    def signals(self, layer: int, ctx: ReductionContext) -> frozenset[str]:
        return frozenset({METRIC}) if self.schedule(ctx.depth)[layer] > 0 else frozenset()

    def reduce(self, layer, tokens, signals, ctx):
        return tome_reduce(tokens, signals[METRIC], self.schedule(ctx.depth)[layer], ctx.num_prefix), None
