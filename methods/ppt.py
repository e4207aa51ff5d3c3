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
    add_at,
    register,
    take,
    threshold_value,
)
from methods.ops import bipartite_soft_matching, max_merge, merge_tokens, prune_by_score, prune_order


@register("ppt")
class PPT(Method):
    """docs/methods.md#ppt"""

    defaults = {"r": REQUIRED, "layers": [3, 6, 9], "threshold": 7e-5, "prop_attn": True}
    # Which tokens go depends on the image, but every image does the same work (both branches are planned and
    # applied as one merge, to keep the forward free of host synchronisation): MACs do not vary.
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
    """Pool the images flagged in ``pool``, prune the others. Both branches are planned for the whole batch and
    applied as one merge (no data-dependent branch, so no host synchronisation); every image loses exactly
    ``r`` tokens and is reduced only with its own tensors, so its result does not depend on its batch.

    A pooled image keeps the matching's rows and adds its merged rows into their targets (``merge_tokens``); a
    pruned image keeps the rows ``prune_by_score`` keeps, and its merged rows are added as exact zeros with
    weight 1, so its rows come out unchanged (a NaN or an infinity in a dropped row stays dropped). The same
    values as computing each branch in full and selecting per image, with one pass over the tokens for both
    instead of one per branch and one for the selection."""
    plan = bipartite_soft_matching(metric, r, num_prefix)
    flag = pool.view(-1, 1, 1)
    merged, into = plan.rows[1:]
    order = merged.sharing(torch.where(pool[:, None], plan.order, prune_order(scores, r, num_prefix)))
    kept, moved = take(tokens.x, order), take(tokens.x, merged)
    if tokens.size is None:  # every size is 1: the merged rows weigh 1 where the image pools, 0 where it prunes
        size = add_at(kept.new_ones(*kept.shape[:2], 1), into, flag.to(kept.dtype).expand(-1, r, 1), inplace=True)
        x = add_at(kept, into, torch.where(flag, moved, 0.0), inplace=True) / size
        out_size = size
    else:
        kept_size, moved_size = take(tokens.size, order), take(tokens.size, merged)
        size = add_at(torch.where(flag, kept_size, 1.0), into, torch.where(flag, moved_size, 0.0))
        x = add_at(kept * torch.where(flag, kept_size, 1.0), into, torch.where(flag, moved * moved_size, 0.0),
                   inplace=True) / size
        out_size = torch.where(flag, size, kept_size)
    source = None
    if tokens.source is not None:  # sources are 0 or 1: a pruned image's zeros leave its rows as they are
        moved_source = torch.where(flag, take(tokens.source, merged), 0.0)
        source = take(tokens.source, order).scatter_reduce(1, plan.into[..., None].expand_as(moved_source),
                                                           moved_source, reduce="amax")
    return TokenState(x=x, size=out_size, source=source)
