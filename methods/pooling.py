"""Pooling-only: PPT's pooling policy for every image (arXiv 2310.01812 ablation): ToMe's bipartite soft
matching applied only at ``layers``, removing ``r`` tokens there."""

from methods.base import REQUIRED, register
from methods.ppt import PPT


@register("pooling")
class Pooling(PPT):
    defaults = {"r": REQUIRED, "layers": [3, 6, 9], "prop_attn": True}
    branch = "pool"
