"""Resize: the trivial baseline of a lower input resolution. The dense model runs on the images resized to
``img_size`` (bicubic with antialiasing, inside the forward) with its position embeddings resampled as timm
does for other resolutions; nothing is reduced inside the blocks. ``docs/methods.md#resize``"""

from __future__ import annotations

from typing import Any

from methods.base import REQUIRED, BudgetKnob, Method, ReductionContext, register


@register("resize")
class Resize(Method):
    defaults = {"img_size": REQUIRED}
    budget_knob = BudgetKnob("img_size", kind="choice", cheaper="lower")
    paper_params = {"img_size": 160}

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        size = params["img_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise self._error(f"parameter 'img_size' must be an integer >= 1 (pixels), got {size!r}")
        return {"img_size": size}

    def check(self, ctx: ReductionContext) -> None:
        size, patch = self.params["img_size"], ctx.patch_size
        choices = self.budget_choices(ctx)  # refuses a non-square input
        if size % patch[0] or size % patch[1] or size > min(ctx.img_size):
            why = "is larger than the model's input size" if size > min(ctx.img_size) else \
                f"is not a multiple of the patch size {patch[0]}"
            shown = ", ".join(str(v) for v in choices[-4:])
            raise self._error(f"img_size={size} {why} (allowed: {'..., ' if len(choices) > 4 else ''}{shown})")

    def input_size(self, ctx: ReductionContext) -> tuple[int, int]:
        return (self.params["img_size"], self.params["img_size"])

    def budget_choices(self, ctx: ReductionContext) -> list[int]:
        """Every multiple of the patch size up to the model's own input size, smallest first. A non-square input
        is refused: squashing it to ``img_size`` x ``img_size`` would change its aspect ratio, not only its
        resolution (a MAC budget is then unreachable, with this reason); so is a hybrid embedding (a CNN backbone
        before the projection), which the harness feeds only its own input size."""
        height, width = ctx.img_size
        if not ctx.resizable:
            raise self._error(f"needs an embedding that takes other input sizes; this model's runs a CNN backbone "
                              f"before its patch projection (a hybrid ViT) and takes {height}x{width} only")
        if height != width:
            raise self._error(f"needs a square input (this model's: {height}x{width}); it resizes to img_size x img_size")
        patch = max(ctx.patch_size)
        return [patch * k for k in range(1, min(ctx.img_size) // patch + 1)]
