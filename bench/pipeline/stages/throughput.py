"""``throughput``: images/s of the method and of the dense model, timed alternately in this process on
the first eval images (data-dependent methods are timed on the inputs they are evaluated on)."""

from __future__ import annotations

from typing import Any

import torch

import bench
from bench.pipeline.context import StageContext
from bench.throughput import compare_throughput


def real_batch(ctx: StageContext, batch_size: int) -> torch.Tensor:
    """The first ``batch_size`` eval images (cycled if the set is smaller)."""
    val = ctx.val_set()
    return torch.stack([val[i % len(val)][0] for i in range(batch_size)]).to(ctx.device)


def run(ctx: StageContext) -> list[dict[str, Any]]:
    settings = ctx.run.throughput
    dense = bench.apply(ctx.model.vit, "baseline")
    entries = []
    for batch_size in settings["batch_sizes"]:
        measured, baseline = compare_throughput(ctx.model, dense, real_batch(ctx, batch_size), ctx.run.dtype,
                                                settings["warmup"], settings["runs"])
        entry = measured.to_dict()
        entry.update(baseline_images_per_s=baseline.images_per_s, baseline_times_s=baseline.times_s,
                     speedup=measured.images_per_s / baseline.images_per_s)
        entries.append(entry)
    return entries
