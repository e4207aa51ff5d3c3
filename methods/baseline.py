"""The dense model: no reduction. Gives the same logits as the untouched timm model."""

from methods.base import Method, register


@register("baseline")
class Baseline(Method):
    defaults = {}
