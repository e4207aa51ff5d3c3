"""tokenbench's harness: one timm ViT block loop for every method, and the measurements.

    model = bench.apply(timm.create_model("deit_small_patch16_224"), "tome", r=13)
    logits = model(images)
    info = bench.forward_stats(model)       # tokens per block, per-layer statistics of the last forward
    macs = bench.count_macs(model)          # torchprofile, one image
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from bench.vit import ForwardInfo, ReducedViT
    from methods.base import Method

# Imported on first use, so that light modules (bench.pipeline.records for report.py) load without the model stack.
_LAZY = {
    "analytic_macs": "bench.macs",
    "count_image": "bench.macs",
    "count_macs": "bench.macs",
    "data_macs": "bench.macs",
    "ThroughputResult": "bench.throughput",
    "measure_throughput": "bench.throughput",
    "compare_throughput": "bench.throughput",
    "ForwardInfo": "bench.vit",
    "ReducedViT": "bench.vit",
    "check_supported": "bench.vit",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")


def apply(model: nn.Module, method: str | Method = "baseline", track_source: bool = False, **params: Any) -> ReducedViT:
    """A model whose forward applies ``method`` to the timm ViT ``model`` (its weights are shared, not copied).

    ``method`` is a registered name (``params`` are its parameters) or a method built with
    ``methods.build``. A model that already carries a method is re-wrapped around its ViT.
    Raises ``ValueError`` for unknown methods or parameters, or parameters impossible for the model.
    """
    import methods
    from bench.vit import ReducedViT

    if isinstance(model, ReducedViT):
        model = model.vit
    if isinstance(method, str):
        method = methods.build(method, **params)
    elif params:
        raise ValueError(f"parameters {sorted(params)} given with an already built method {method.describe()}")
    return ReducedViT(model, method, track_source=track_source)


def forward_stats(model: nn.Module) -> ForwardInfo:
    """What the last forward pass of ``model`` (a ``bench.apply`` result) did: tokens entering and leaving
    each block, the method's per-layer statistics (PPT: ``{"pooled_fraction": ...}`` at each PPT layer),
    and the final token sizes / sources (sources only with ``track_source=True``)."""
    from bench.vit import ReducedViT

    if not isinstance(model, ReducedViT):
        raise ValueError(f"forward_stats needs a model returned by bench.apply, got {type(model).__name__}")
    if model.last_forward is None:
        raise ValueError("forward_stats: the model has not run a forward pass yet")
    return model.last_forward


__all__ = [
    "ForwardInfo",
    "ReducedViT",
    "ThroughputResult",
    "analytic_macs",
    "apply",
    "check_supported",
    "compare_throughput",
    "count_image",
    "count_macs",
    "data_macs",
    "forward_stats",
    "measure_throughput",
]
