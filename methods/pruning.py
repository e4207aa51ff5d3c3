"""Pruning-only: PPT's pruning policy for every image (the "pruning-only" row of the PPT ablation,
arXiv 2310.01812): at each of ``layers`` drop the ``r`` patch tokens with the lowest PPT score."""

from methods.base import REQUIRED, register
from methods.ppt import PPT


@register("pruning")
class Pruning(PPT):
    defaults = {"r": REQUIRED, "layers": [3, 6, 9], "prop_attn": True}
    branch = "prune"

    @property
    def prop_attn(self) -> bool:
        """Pruning never merges: every size stays 1 and log(1) = 0, so the proportional-attention bias is left
        out (the same attention logits, without an additive mask: one pass and the log fewer per block)."""
        return False
