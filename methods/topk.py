"""Top-k: EViT's attentive-token selection without the fused token (keep the ``ceil(keep_rate*(N-1))``
patch tokens with the largest class attention at each of ``layers``; drop the rest)."""

from methods.base import register
from methods.evit import EViT


@register("topk")
class TopK(EViT):
    fuse = False
