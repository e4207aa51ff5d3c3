"""Random pruning (registered as ``random``): the trivial baseline that keeps a random subset of the patch
tokens. It is TokenReduction's Top-K (Haurum et al., ICCVW 2023, arXiv 2308.04657) with the class-attention
score replaced by noise; there is no official code (the project's own definition). Semantics:
``docs/methods.md#random``.

Between the attention residual and the MLP of each block of ``layers``, keep ``K_i = int(P0 * keep_rate **
(i + 1))`` patch tokens (at least one), independently per image, in ascending original order after the prefix
tokens: those with the ``K_i`` largest keys. The key of patch position ``j`` of image ``b`` at block ``l`` is an
integer hash (``mix32``, a bijection of 32-bit integers) of ``(seed, l, b, j)``, computed with integer tensor
operations on the tokens' device: no generator, no copy from the host, the same tokens on every device, and a
pattern that depends only on (seed, block, position in the batch, position among the block's patch tokens), never
on the images, the batch size or what ran before.
"""

from __future__ import annotations

from typing import Any

import torch

from methods.base import MID, BudgetKnob, Method, ReductionContext, Step, register
from methods.dpcknn import keep_rate_value, layer_target

MASK = 0xFFFFFFFF


def mix32(x):
    """An integer hash of 32-bit values (an int, or an int64 tensor of values in [0, 2^32)): two rounds of
    ``x = ((x >> 16) ^ x) * 0x45D9F3B mod 2^32``, then ``(x >> 16) ^ x``. Each step is invertible, so distinct
    inputs give distinct keys; the products stay below 2^59 (no int64 overflow)."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK
    return (x >> 16) ^ x


@register("random")
class RandomPrune(Method):
    """docs/methods.md#random"""

    revision = 2  # 1 (2026-11-26): keys from an integer hash on the device; 2: at least one patch token stays

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
        batch, count = tokens.x.shape[0], tokens.x.shape[1] - ctx.num_prefix
        keep = max(layer_target(self, layer, ctx), 1)  # K_i = 0: one stays (a model may have no prefix token)
        if keep >= count:
            return tokens, None
        device = tokens.x.device
        block = mix32((mix32(self.params["seed"] & MASK) + layer) & MASK)  # a Python int: no tensor work
        rows = mix32((torch.arange(batch, device=device) + block) & MASK)  # one key stream per image
        keys = mix32((rows[:, None] + torch.arange(count, device=device)) & MASK)  # (B, count), distinct per row
        chosen = keys.topk(keep, dim=1).indices.sort(dim=1).values + ctx.num_prefix
        prefix = torch.arange(ctx.num_prefix, device=device).expand(batch, -1)
        return tokens.gather(torch.cat([prefix, chosen], dim=1)), None
