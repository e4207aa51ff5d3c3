"""PPT: token Pruning and Pooling, Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision
Transformers", arXiv 2310.01812.

At each layer of ``layers``, per image: the unbiased variance of its normalised patch scores
(class attention x value norm) decides the branch. Low variance (``< threshold``: attention is spread, the
tokens are alike) pools ``r`` tokens with ToMe's matching; otherwise the ``r`` least important tokens are
pruned. Both branches remove exactly ``r`` tokens, so a batch keeps one token count.
"""

from __future__ import annotations

from typing import Any

import torch

from methods.base import (
    METRIC,
    PPT_SCORE,
    REQUIRED,
    Method,
    ReductionContext,
    TokenState,
    register,
    threshold_value,
)
from methods.ops import bipartite_soft_matching, max_merge, merge_tokens, prune_by_score


@register("ppt")
class PPT(Method):
    defaults = {"r": REQUIRED, "layers": [3, 6, 9], "threshold": 7e-5, "prop_attn": True}
    data_dependent = True

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        valid = {"r": self._count("r", params["r"]), "layers": self._layers(params["layers"])}
        if "threshold" in params:
            valid["threshold"] = threshold_value(self, params["threshold"])
        valid["prop_attn"] = self._bool("prop_attn", params["prop_attn"])
        return valid

    @property
    def threshold(self) -> float:
        """Images whose score variance is below this are pooled, the others pruned."""
        return self.params["threshold"]

    def check(self, ctx: ReductionContext) -> None:
        self._check_layers(ctx)

    def check_budget(self, ctx: ReductionContext) -> None:
        self._check_r(self.params["r"], ctx)

    def signals(self, layer: int, ctx: ReductionContext) -> frozenset[str]:
        return frozenset({METRIC, PPT_SCORE}) if layer in self.params["layers"] and self.params["r"] > 0 else frozenset()

    def reduce(self, layer, tokens, signals, ctx):
        r = min(self.params["r"], max_merge(tokens.x.shape[1], ctx.num_prefix))
        scores = signals[PPT_SCORE]
        pool = scores.var(dim=-1) < self.threshold  # unbiased variance, per image
        stats = {"pooled_fraction": pool.float().mean().item()}
        if r <= 0:
            return tokens, stats
        return ppt_step(tokens, signals[METRIC], scores, pool, r, ctx.num_prefix), stats


def ppt_step(tokens: TokenState, metric, scores, pool: torch.Tensor, r: int, num_prefix: int) -> TokenState:
    """Pool the images flagged in ``pool``, prune the others; every image loses exactly ``r`` tokens and
    is reduced only with its own tensors, so an image's result does not depend on its batch."""
    if bool(pool.all()):
        return merge_tokens(tokens, bipartite_soft_matching(metric, r, num_prefix))
    if not bool(pool.any()):
        return prune_by_score(tokens, scores, r, num_prefix)
    pooled_idx, pruned_idx = pool.nonzero()[:, 0], (~pool).nonzero()[:, 0]
    pooled = merge_tokens(_subset(tokens, pooled_idx), bipartite_soft_matching(metric[pooled_idx], r, num_prefix))
    pruned = prune_by_score(_subset(tokens, pruned_idx), scores[pruned_idx], r, num_prefix)
    return TokenState(
        x=_combine(pooled.x, pruned.x, pooled_idx, pruned_idx),
        size=_combine(pooled.size, pruned.size, pooled_idx, pruned_idx),
        source=None if tokens.source is None else _combine(pooled.source, pruned.source, pooled_idx, pruned_idx),
    )


def _subset(tokens: TokenState, index: torch.Tensor) -> TokenState:
    return TokenState(
        x=tokens.x[index],
        size=tokens.sizes()[index],
        source=None if tokens.source is None else tokens.source[index],
    )


def _combine(a: torch.Tensor, b: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
    out = a.new_empty((a.shape[0] + b.shape[0], *a.shape[1:]))
    out[a_idx] = a
    out[b_idx] = b
    return out
