"""Random pruning (registered as ``random``): the trivial baseline that keeps a random subset of the patch
tokens. It is TokenReduction's Top-K (Haurum et al., ICCVW 2023, arXiv 2308.04657) with the class-attention
score replaced by seeded noise; there is no official code (the project's own definition). Semantics:
``docs/methods.md#random``.

Between the attention residual and the MLP of each block of ``layers``, keep ``K_i = int(P0 * keep_rate **
(i + 1))`` patch tokens chosen uniformly without replacement, independently per image, in ascending original
order after the prefix tokens. The noise comes from a CPU ``torch.Generator`` seeded with ``seed`` at the start
of every forward: at each reducing layer, in order, ``torch.rand(B, Np)``; the ``K_i`` largest are kept. The
pattern depends only on (seed, batch size, position in the batch, layer), never on the images or the device.
"""

from __future__ import annotations

from typing import Any

import torch

from methods.base import MID, BudgetKnob, Method, ReductionContext, Step, register
from methods.dpcknn import keep_rate_value, layer_target

GENERATOR = "random.generator"  # key of the per-forward generator in ctx.scratch


@register("random")
class RandomPrune(Method):
    """docs/methods.md#random"""

    defaults = {"keep_rate": 0.7, "layers": [3, 6, 9], "seed": 0}
    budget_knob = BudgetKnob("keep_rate", kind="float", cheaper="lower")

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"keep_rate": keep_rate_value(self, params["keep_rate"]), "layers": self._layers(params["layers"]),
                "seed": self._count("seed", params["seed"])}

    def check(self, ctx: ReductionContext) -> None:
        self._check_layers(ctx)

    def step(self, layer: int, ctx: ReductionContext) -> Step | None:
        return Step(MID) if layer in self.params["layers"] else None

    def reduce(self, layer, tokens, signals, ctx):
        generator = ctx.scratch.get(GENERATOR)
        if generator is None:  # first reducing layer of this forward
            generator = ctx.scratch[GENERATOR] = torch.Generator().manual_seed(self.params["seed"])
        batch, count = tokens.x.shape[0], tokens.x.shape[1] - ctx.num_prefix
        # drawn at every listed layer, even one that keeps everything, so later layers' draws do not move
        noise = torch.rand(batch, count, generator=generator)
        keep = layer_target(self, layer, ctx)
        if keep >= count:
            return tokens, None
        chosen = noise.topk(keep, dim=1).indices.sort(dim=1).values.to(tokens.x.device) + ctx.num_prefix
        prefix = torch.arange(ctx.num_prefix, device=chosen.device).expand(batch, -1)
        return tokens.gather(torch.cat([prefix, chosen], dim=1)), None
