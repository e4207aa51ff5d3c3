"""EViT: Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022.

At each of ``layers``, keep ``ceil(keep_rate * (N - 1))`` patch tokens with the largest class-token
attention (descending), and fuse the others into one extra token appended at the end: their sum weighted
by their class attention. The fused token is an ordinary token in later layers.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from methods.base import CLS_ATTN, BudgetKnob, Method, ReductionContext, register
from methods.ops import keep_top_attentive


@register("evit")
class EViT(Method):
    """docs/methods.md#evit"""

    defaults = {"keep_rate": 0.7, "layers": [3, 6, 9]}
    budget_knob = BudgetKnob("keep_rate", kind="float", cheaper="lower")
    paper_params = {"keep_rate": 0.7}  # EViT, DeiT-S: 3.0 GMACs
    fuse: ClassVar[bool] = True

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        keep_rate = params["keep_rate"]
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
            raise self._error(f"parameter 'keep_rate' must be a number in (0, 1], got {keep_rate!r}")
        return {"keep_rate": float(keep_rate), "layers": self._layers(params["layers"])}

    def check(self, ctx: ReductionContext) -> None:
        self._check_layers(ctx)

    def signals(self, layer: int, ctx: ReductionContext) -> frozenset[str]:
        return frozenset({CLS_ATTN}) if layer in self.params["layers"] and self.params["keep_rate"] < 1 else frozenset()

    def reduce(self, layer, tokens, signals, ctx):
        candidates = tokens.x.shape[1] - ctx.num_prefix
        keep = math.ceil(self.params["keep_rate"] * candidates)
        if keep >= candidates:
            return tokens, None
        return keep_top_attentive(tokens, signals[CLS_ATTN], keep, ctx.num_prefix, self.fuse), None
