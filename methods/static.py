"""Static pattern pruning: the fixed radial patterns of Haurum et al., "Which Tokens to Use? Investigating
Token Reduction in Vision Transformers" (ICCVW 2023, arXiv 2308.04657; TokenReduction ``models/heuristic.py``),
a trivial baseline. Semantics: ``docs/methods.md#static``.

Patches lie on a P x P grid with coordinates ``linspace(floor(-P/2), floor(P/2), P)``; each has a distance
``z`` from the centre (``heuristic_pattern`` l1 / l2 / linf). Before the attention of a reducing block, only the
patches with ``z <= T`` stay (prefix tokens always; original order kept; a pruned patch never returns):

* ``not_contiguous: false`` (reference default): every block from min(layers) to max(layers) reduces, the
  radius T falling linearly from the corner's distance towards ``min_radius``;
* ``not_contiguous: true``: only the listed layers reduce, T the distance whose patch count is closest to
  ``K_i = int(P0 * keep_rate ** (i + 1))``. ``keep_rate`` is the budget knob, in this mode only.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from methods.base import START, BudgetKnob, Method, ReductionContext, Step, register
from methods.dpcknn import keep_rate_value, schedule

PATTERNS = ("l1", "l2", "linf")


def grid_distances(side: int, pattern: str) -> torch.Tensor:
    """(side * side,) fp32 distance of each patch (row-major) from the grid centre."""
    coords = torch.linspace(-side // 2, side // 2, steps=side, dtype=torch.float32)
    rows, cols = coords[:, None].expand(side, side), coords[None, :].expand(side, side)
    if pattern == "l1":
        z = rows.abs() + cols.abs()
    elif pattern == "l2":
        z = torch.sqrt(rows * rows + cols * cols)
    else:
        z = torch.maximum(rows.abs(), cols.abs())
    return z.reshape(-1)


def radii(side: int, pattern: str, layers: tuple[int, ...], not_contiguous: bool, keep_rate: float,
          min_radius: float | None) -> dict[int, torch.Tensor]:
    """The radius (fp32 0-d tensor) of every reducing block on a ``side`` x ``side`` grid."""
    patches = side * side
    z = grid_distances(side, pattern)
    if not_contiguous:
        values = torch.unique(z)  # ascending
        counts = [int((z <= value).sum()) for value in values]
        chosen = {}
        for layer, target in zip(layers, schedule(keep_rate, patches, len(layers)), strict=True):
            best = min(range(len(values)), key=lambda i: (abs(target - counts[i]), i))  # smallest on ties
            chosen[layer] = values[best]
        return chosen
    first, last = min(layers), max(layers)
    corner = z[0]
    inner = z[(side // 2) * side + side // 2] if min_radius is None or min_radius <= 0 else min_radius
    steps = torch.linspace(float(corner), float(inner), last - first + 3, dtype=torch.float32)
    offset = 0 if first == 0 else 1 - first  # reference quirk: steps[b] when the first block is 0
    return {block: steps[block + offset] for block in range(first, last + 1)}


@lru_cache(maxsize=64)
def keep_plan(side: int, pattern: str, layers: tuple[int, ...], not_contiguous: bool, keep_rate: float,
              min_radius: float | None) -> dict[int, tuple[int, ...]]:
    """Per reducing block, the positions (among the patch tokens entering it) of the patches it keeps on a
    ``side`` x ``side`` grid; blocks that keep all their patches are left out. Kept sets only shrink: a patch
    pruned once never returns."""
    z = grid_distances(side, pattern)
    present = list(range(side * side))  # original indices of the patch tokens, ascending
    plan = {}
    for block, radius in sorted(radii(side, pattern, layers, not_contiguous, keep_rate, min_radius).items()):
        inside = (z <= radius).tolist()
        positions = tuple(pos for pos, original in enumerate(present) if inside[original])
        if len(positions) < len(present):
            plan[block] = positions
            present = [present[pos] for pos in positions]
    return plan


def grid_name(ctx: ReductionContext) -> str:
    """The grid of patch tokens in a constant's name: a kept set holds for that grid only."""
    return f"{ctx.grid[0]}x{ctx.grid[1]}"


@register("static")
class Static(Method):
    """docs/methods.md#static"""

    defaults = {"heuristic_pattern": "l1", "layers": [3, 6, 9], "not_contiguous": False, "keep_rate": 0.7,
                "min_radius": 1.0}
    budget_knob = BudgetKnob("keep_rate", kind="float", cheaper="lower")  # with not_contiguous: true

    @classmethod
    def knob_acts(cls, params: dict[str, Any]) -> bool:
        return bool(params.get("not_contiguous"))

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        pattern = params["heuristic_pattern"]
        if pattern not in PATTERNS:
            raise self._error(f"parameter 'heuristic_pattern' must be one of {', '.join(PATTERNS)}, got {pattern!r}")
        radius = params["min_radius"]
        if radius is not None and (isinstance(radius, bool) or not isinstance(radius, (int, float))
                                   or not math.isfinite(radius)):
            raise self._error(f"parameter 'min_radius' must be a number (<= 0 or null: the grid centre's distance), "
                              f"got {radius!r}")
        return {"heuristic_pattern": pattern, "layers": self._layers(params["layers"]),
                "not_contiguous": self._bool("not_contiguous", params["not_contiguous"]),
                "keep_rate": keep_rate_value(self, params["keep_rate"]),
                "min_radius": None if radius is None else float(radius)}

    def check(self, ctx: ReductionContext) -> None:
        self._check_layers(ctx)
        self._side(ctx)

    def check_budget(self, ctx: ReductionContext) -> None:
        # The reference ignores the other mode's knob; in an experiment file that is a silent no-op.
        mode = self.params["not_contiguous"]
        if not mode and self.params["keep_rate"] != self.defaults["keep_rate"]:
            raise self._error("parameter 'keep_rate' acts only with not_contiguous: true (the contiguous mode's "
                              "radius is min_radius)")
        if mode and self.params["min_radius"] != self.defaults["min_radius"]:
            raise self._error("parameter 'min_radius' acts only with not_contiguous: false (with true, use keep_rate)")

    def _side(self, ctx: ReductionContext) -> int:
        """The side of the square grid of patch tokens (the model's, or in a forward its input's)."""
        rows, cols = ctx.grid
        if rows != cols:
            raise self._error(f"needs a square grid of patch tokens, got {rows}x{cols} (rows x columns)")
        return rows

    def _plan(self, ctx: ReductionContext) -> dict[int, tuple[int, ...]]:
        p = self.params
        return keep_plan(self._side(ctx), p["heuristic_pattern"], tuple(p["layers"]), p["not_contiguous"],
                         p["keep_rate"], p["min_radius"])

    def constants(self, ctx: ReductionContext) -> dict[str, torch.Tensor]:
        """Per reducing block, the token indices it keeps (prefix first), for the model's own grid."""
        return {f"keep{layer}_{grid_name(ctx)}": self._keep(layer, ctx) for layer in self._plan(ctx)}

    def _keep(self, layer: int, ctx: ReductionContext) -> torch.Tensor:
        positions = torch.tensor(self._plan(ctx)[layer], dtype=torch.long) + ctx.num_prefix
        return torch.cat([torch.arange(ctx.num_prefix), positions])

    def step(self, layer: int, ctx: ReductionContext) -> Step | None:
        suffix = f"_{grid_name(ctx)}"
        if any(name.endswith(suffix) for name in ctx.constants):
            # in a forward at the model's size: the reducing blocks are those with a kept set among the constants
            # (the plan itself is built with tensor operations that torch.compile would break its graph on)
            return Step(START) if f"keep{layer}{suffix}" in ctx.constants else None
        return Step(START) if layer in self._plan(ctx) else None

    def reduce(self, layer, tokens, signals, ctx):
        keep = ctx.constants.get(f"keep{layer}_{grid_name(ctx)}")
        if keep is None:  # images of another size than the model's: built here, a copy from the host
            keep = self._keep(layer, ctx).to(tokens.x.device)
        return tokens.gather(keep.expand(tokens.x.shape[0], -1)), None
