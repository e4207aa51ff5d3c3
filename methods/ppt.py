"""PPT: token Pruning and Pooling, Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision
Transformers", arXiv 2310.01812.

At each layer of ``layers``, per image: the unbiased variance of its normalised patch scores
(class attention x value norm) decides the branch. Low variance (``< threshold``: attention is spread, the
tokens are alike) pools ``r`` tokens with ToMe's matching; otherwise the ``r`` least important tokens are
pruned. Both branches remove exactly ``r`` tokens, so a batch keeps one token count.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from methods.base import (
    METRIC,
    PPT_SCORE,
    REQUIRED,
    BudgetKnob,
    Method,
    ReductionContext,
    TokenState,
    register,
    threshold_value,
)
from methods.ops import bipartite_soft_matching, max_merge, merge_tokens, prune_by_score


@register("ppt")
class PPT(Method):
    """docs/methods.md#ppt"""

    defaults = {"r": REQUIRED, "layers": [3, 6, 9], "threshold": 7e-5, "prop_attn": True}
    # Which tokens go depends on the image, but every image does the same work (both branches are computed
    # and selected per image, to keep the forward free of host synchronisation): MACs do not vary.
    data_dependent = False
    budget_knob = BudgetKnob("r", kind="int", cheaper="higher")
    paper_params = {"r": 50}  # PPT, DeiT-S at [3, 6, 9]: 2.944 GMACs
    # "choose": per image by the variance of its scores; "prune" / "pool": every image (the ablations).
    branch: ClassVar[str] = "choose"

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        valid = {"r": self._count("r", params["r"]), "layers": self._layers(params["layers"])}
        if "threshold" in params:
            valid["threshold"] = threshold_value(self, params["threshold"])
        valid["prop_attn"] = self._bool("prop_attn", params["prop_attn"])
        return valid

    def check(self, ctx: ReductionContext) -> None:
        self._check_layers(ctx)

    def check_budget(self, ctx: ReductionContext) -> None:
        self._check_r(self.params["r"], ctx)

    def signals(self, layer: int, ctx: ReductionContext) -> frozenset[str]:
        if layer not in self.params["layers"] or self.params["r"] <= 0:
            return frozenset()
        return {"choose": frozenset({METRIC, PPT_SCORE}), "prune": frozenset({PPT_SCORE}),
                "pool": frozenset({METRIC})}[self.branch]

    def reduce(self, layer, tokens, signals, ctx):
        r = min(self.params["r"], max_merge(tokens.x.shape[1], ctx.num_prefix))
        if self.branch == "prune":
            return (prune_by_score(tokens, signals[PPT_SCORE], r, ctx.num_prefix) if r > 0 else tokens,
                    {"pooled_fraction": 0.0})
        if self.branch == "pool":
            plan = bipartite_soft_matching(signals[METRIC], r, ctx.num_prefix) if r > 0 else None
            # PPT's rule with an infinite threshold: pooled, unless the variance of a single patch score is
            # undefined (NaN < inf is false)
            pooled = 1.0 if tokens.x.shape[1] - ctx.num_prefix >= 2 else 0.0
            return (merge_tokens(tokens, plan) if plan else tokens), {"pooled_fraction": pooled}
        scores = signals[PPT_SCORE]
        pool = scores.var(dim=-1) < self.params["threshold"]  # unbiased variance, per image
        stats = {"pooled_fraction": pool.to(scores.dtype).mean()}  # a tensor: no host sync in the forward
        if r <= 0:
            return tokens, stats
        return ppt_step(tokens, signals[METRIC], scores, pool, r, ctx.num_prefix), stats


def ppt_step(tokens: TokenState, metric, scores, pool: torch.Tensor, r: int, num_prefix: int) -> TokenState:
    """Pool the images flagged in ``pool``, prune the others. Both branches are computed for the whole batch
    and selected per image (no data-dependent branch, so no host synchronisation); every image loses exactly
    ``r`` tokens and is reduced only with its own tensors, so its result does not depend on its batch."""
    pooled = merge_tokens(tokens, bipartite_soft_matching(metric, r, num_prefix))
    pruned = prune_by_score(tokens, scores, r, num_prefix)

    def choose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(pool.view(-1, *([1] * (a.dim() - 1))), a, b)

    return TokenState(
        x=choose(pooled.x, pruned.x),
        size=choose(pooled.size, pruned.size),
        source=None if tokens.source is None else choose(pooled.source, pruned.source),
    )
