"""``throughput``: per batch size, the method and its dense baseline timed alternately in this process on
eval images drawn across classes (``bench.pipeline.samples``; data-dependent methods are timed on the
inputs they are evaluated on).

Each entry: images/s, latency of one forward (p50 / p90 over the timed rounds, ms), peak memory of one
forward (``bench.memory``; ``peak_mem_kind`` says which), the dense baseline's own numbers beside them
(``baseline_...``) and the speed-up: the median of the paired per-round ratios (dense time / method time)
with a seeded bootstrap 95% interval (``bench.stats``), and ``slow_rounds`` / ``baseline_slow_rounds``: timed
forwards that took over 3x their median (slowed from outside: a warning line, and a note in the report). With ``compile: true`` both models run under
``torch.compile`` (compiled afresh per batch size, before the warm-up: ``compile_s``, both models'), and the method's
graph breaks are counted once (``torch._dynamo.explain``). ``throughput.auto`` (CUDA): after the listed
sizes, the batch size doubles until the GPU runs out of memory (``bench.throughput.out_of_memory``); those
entries carry ``auto: true`` and time the largest listed size's images repeated on the device (the host holds
no more images than for that size), and the size that did not fit an entry ``out_of_memory: true`` without
numbers. ``throughput.cuda_graphs`` (CUDA):
both models are captured into CUDA graphs on the batch and the replays are timed (``bench.throughput.capture``:
kernel time without Python's per-operation dispatch, which dominates small batches on a fast GPU); a method
whose forward synchronises with the host (ATS) cannot be captured: its entry says ``cuda_graphs: false``
with the reason (``cuda_graphs_error``) and both models are timed eagerly. Peak memory is always that of an
eager (or compiled) forward.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import bench
from bench import stats
from bench.memory import peak_memory_mb
from bench.pipeline.context import StageContext
from bench.pipeline.samples import sample_indices
from bench.sdpa import inductor
from bench.throughput import CaptureError, autocast, capture, compare_throughput, out_of_memory, sync

AUTO_LIMIT = 1 << 16  # the doubling stops here even if memory never runs out


def real_batch(ctx: StageContext, batch_size: int, distinct: int | None = None) -> torch.Tensor:
    """``batch_size`` eval images drawn across classes with the run's seed (cycled if the set is smaller). The host
    decodes the draw's first ``distinct`` (default: all) and at most the set's size; the device repeats them in
    order up to ``batch_size``: the whole draw itself when ``batch_size`` is within ``distinct`` or the set."""
    val = ctx.val_set()
    count = min(batch_size, len(val), distinct or batch_size)
    images = torch.stack([val[i][0] for i in sample_indices(val, count, ctx.run.seed)]).to(ctx.device)
    if count == batch_size:
        return images
    return images.index_select(0, torch.arange(batch_size, device=images.device) % count)  # exactly batch_size


def forward(model: torch.nn.Module, batch: torch.Tensor, dtype: str) -> torch.Tensor:
    """One forward in the timing conditions (inference mode, the run's autocast)."""
    with torch.inference_mode(), autocast(batch.device, dtype):
        return model(batch)


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` under ``torch.compile`` as the stage times it: inductor (``bench.sdpa.inductor``: a written-out
    attention stays written out), specialised to the batch's shape."""
    return torch.compile(model, backend=inductor, dynamic=False)


def graph_breaks(model: torch.nn.Module, batch: torch.Tensor, dtype: str) -> dict[str, Any]:
    """How ``torch.compile`` splits ``model``'s forward: graphs, graph breaks and the first reasons."""
    torch._dynamo.reset()
    with torch.inference_mode(), autocast(batch.device, dtype):
        explained = torch._dynamo.explain(model)(batch)
    torch._dynamo.reset()
    reasons = [str(getattr(reason, "reason", reason)).strip().splitlines()[0][:200]
               for reason in explained.break_reasons[:3]]
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count, "break_reasons": reasons}


def measure(model: torch.nn.Module, dense: torch.nn.Module, batch: torch.Tensor, dtype: str, warmup: int, runs: int,
            compile_: bool, cuda_graphs: bool = False) -> dict[str, Any]:
    """One throughput entry: ``model`` against ``dense`` on ``batch`` (see the module docstring)."""
    compile_s, graphs = None, {}
    if compile_:
        torch._dynamo.reset()  # a fresh compilation per batch size, specialised to it
        model, dense = compiled(model), compiled(dense)
        sync(batch.device)
        start = time.perf_counter()
        forward(model, batch, dtype)
        forward(dense, batch, dtype)
        sync(batch.device)
        compile_s = time.perf_counter() - start
    timed, timed_dense = model, dense
    if cuda_graphs:
        try:
            timed, timed_dense = capture(model, batch, dtype), capture(dense, batch, dtype)
            graphs = {"cuda_graphs": True}
        except CaptureError as error:
            graphs = {"cuda_graphs": False, "cuda_graphs_error": str(error)}
    measured, baseline = compare_throughput(timed, timed_dense, batch, dtype, warmup, runs)
    del timed, timed_dense  # the graphs' memory pools go before the memory is measured
    memory, kind = peak_memory_mb(lambda: forward(model, batch, dtype), batch.device)
    baseline_memory, _ = peak_memory_mb(lambda: forward(dense, batch, dtype), batch.device)
    entry = measured.to_dict()
    entry.update(
        runs=runs,
        latency_p50_ms=1e3 * stats.percentile(measured.times_s, 50),
        latency_p90_ms=1e3 * stats.percentile(measured.times_s, 90),
        peak_mem_mb=memory,
        peak_mem_kind=kind,
        baseline_images_per_s=baseline.images_per_s,
        baseline_latency_p50_ms=1e3 * stats.percentile(baseline.times_s, 50),
        baseline_latency_p90_ms=1e3 * stats.percentile(baseline.times_s, 90),
        baseline_peak_mem_mb=baseline_memory,
        baseline_times_s=baseline.times_s,
        slow_rounds=stats.slow_rounds(measured.times_s),
        baseline_slow_rounds=stats.slow_rounds(baseline.times_s),
        **stats.speedup(measured.times_s, baseline.times_s),
        compile=compile_,
        compile_s=compile_s,
        **graphs,
    )
    return entry


def sweep(sizes: list[int], measure_size: Callable[[int], dict[str, Any]], auto: bool) -> list[dict[str, Any]]:
    """The entries of the listed ``sizes`` and, with ``auto``, of doubled sizes (after the largest listed
    one) until one runs out of GPU memory (recorded as ``{"batch_size", "auto", "out_of_memory"}``). A
    listed size that runs out of memory is recorded the same way and the sweep goes on. Out of memory:
    ``bench.throughput.out_of_memory`` (cuBLAS / cuDNN allocation failures included); other errors propagate."""
    entries: list[dict[str, Any]] = []

    def attempt(batch_size: int, doubled: bool) -> bool:
        try:
            entry = measure_size(batch_size)
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one
            if not out_of_memory(error):
                raise
            entry = {"batch_size": batch_size, "out_of_memory": True}
        if doubled:
            entry["auto"] = True
        entries.append(entry)
        torch.cuda.empty_cache()  # a no-op unless CUDA is in use
        return not entry.get("out_of_memory", False)

    for batch_size in sizes:
        attempt(batch_size, doubled=False)
    batch_size = 2 * max(sizes)
    while auto and batch_size <= AUTO_LIMIT and attempt(batch_size, doubled=True):
        batch_size *= 2
    return entries


def run(ctx: StageContext) -> list[dict[str, Any]]:
    run, settings = ctx.run, ctx.run.throughput
    dense = bench.apply(ctx.model.vit, "baseline")
    auto = bool(settings.get("auto")) and ctx.device.type == "cuda"
    if settings.get("auto") and not auto:
        print(f"throughput: {run.key}: auto batch sizes need CUDA; measured only {settings['batch_sizes']}",
              file=sys.stderr)
    graphs = bool(settings.get("cuda_graphs")) and ctx.device.type == "cuda"
    if settings.get("cuda_graphs") and not graphs:
        print(f"throughput: {run.key}: cuda_graphs needs CUDA; timed eagerly", file=sys.stderr)
    compile_ = bool(run.compile)
    breaks = graph_breaks(ctx.model, real_batch(ctx, settings["batch_sizes"][0]), run.dtype) if compile_ else {}
    distinct = max(settings["batch_sizes"])  # the listed sizes time their own draw; the doubled ones repeat it

    def measure_size(batch_size: int) -> dict[str, Any]:
        entry = measure(ctx.model, dense, real_batch(ctx, batch_size, distinct), run.dtype, settings["warmup"],
                        settings["runs"], compile_, graphs)
        return {**entry, **breaks}

    entries = sweep(list(settings["batch_sizes"]), measure_size, auto)
    for entry in entries:
        slow = entry.get("slow_rounds", 0) + entry.get("baseline_slow_rounds", 0)
        if slow:
            print(f"warning: throughput: {run.key}: batch {entry['batch_size']}: {slow} of {2 * entry['runs']} timed "
                  f"forwards took over {stats.SLOW_FACTOR:g}x their median (slowed from outside the model: another "
                  "process, a clock or power-state change?): latency p90 reads high; images/s and the speed-up are "
                  "medians, moved only where many were", file=sys.stderr)
    return entries
