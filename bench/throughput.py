"""Throughput the way timm's benchmark.py and torchbench do it: eval mode, ``torch.inference_mode``,
warm-up, synchronisation around the timed region on CUDA, repeated timed runs, the median reported and
the raw times kept, with batch size, dtype, device and thread count recorded next to the number."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from methods.base import END, MID, START, Method, ReductionContext, Step, TokenState

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ThroughputResult:
    images_per_s: float  # batch_size / median time of one forward
    batch_size: int
    dtype: str
    device: str
    device_name: str
    threads: int
    warmup: int
    times_s: list[float]  # every timed forward, in order

    def to_dict(self) -> dict:
        return asdict(self)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def autocast(device: torch.device, dtype: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """fp32: nothing; fp16 / bf16: autocast on the device (``cache=False`` while capturing a CUDA graph, as
    autocast's documentation requires)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype], cache_enabled=cache)


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(
    model: nn.Module,
    batch: torch.Tensor,
    dtype: str = "fp32",
    warmup: int = 3,
    runs: int = 10,
) -> ThroughputResult:
    """Images per second of ``model`` on ``batch`` (B, C, H, W), already on the model's device.

    Pass real images for methods whose work depends on the input (PPT's branch choice)."""
    (times,) = _time_rounds([model], batch, dtype, warmup, runs)
    return _result(times, batch, dtype, warmup)


def compare_throughput(
    model: nn.Module,
    baseline: nn.Module,
    batch: torch.Tensor,
    dtype: str = "fp32",
    warmup: int = 3,
    runs: int = 10,
) -> tuple[ThroughputResult, ThroughputResult]:
    """Time ``model`` and the dense ``baseline`` in the same process on the same batch, alternating
    one timed forward of each per round, so that drifting machine load hits both alike.
    Returns (method result, baseline result); the speed-up the harness records is the median of the per-round
    ratios of their ``times_s`` (``bench.stats.speedup``), not the ratio of their images/s (medians)."""
    return tuple(compare_many([model, baseline], batch, dtype, warmup, runs))


def compare_many(
    models: list[nn.Module], batch: torch.Tensor, dtype: str = "fp32", warmup: int = 3, runs: int = 10
) -> list[ThroughputResult]:
    """``compare_throughput`` for any number of models: one timed forward of each per round, in turn."""
    return [_result(times, batch, dtype, warmup) for times in _time_rounds(models, batch, dtype, warmup, runs)]


class ScheduleOnly(Method):
    """A reduced model's token counts without its reduction work: the ceiling of its speed-up in this harness.

    A method (not registered) that replays one forward's ``ForwardInfo`` through the one block loop: where the
    count dropped in that forward (at the start of a block, between its attention and MLP, or at its end) it
    keeps the first tokens of the new count, a view (no scores, no matching, no sizes, no bias). The same MACs
    in the blocks as the method, minus the method's own work: ``bench.apply(vit, ScheduleOnly(info))``
    (``benchmark_methods.py``)."""

    name = "schedule-only"

    def __init__(self, info) -> None:
        super().__init__()
        self.counts = list(zip(info.tokens_attn, info.tokens_mlp, info.tokens_out, strict=True))

    def _cut(self, layer: int, ctx: ReductionContext) -> tuple[str, int] | None:
        """Where block ``layer`` cuts and to how many tokens (one point per block, as every method)."""
        attn, mlp, out = self.counts[layer]
        entering = ctx.num_tokens if layer == 0 else self.counts[layer - 1][2]
        for point, before, after in ((START, entering, attn), (MID, attn, mlp), (END, mlp, out)):
            if after < before:
                return point, after
        return None

    def step(self, layer: int, ctx: ReductionContext) -> Step | None:
        cut = self._cut(layer, ctx)
        return None if cut is None else Step(cut[0])

    def reduce(self, layer, tokens, signals, ctx):
        return TokenState(x=tokens.x[:, : self._cut(layer, ctx)[1]]), None


class GraphReplay(nn.Module):
    """``model``'s forward on one fixed batch, captured once into a CUDA graph and replayed: the GPU time of
    its kernels without Python's per-operation dispatch (what a deployment with CUDA graphs or a compiled
    runtime pays). Called with that same batch (its values may change in place), it returns the captured
    output buffer. Build it with ``capture``."""

    def __init__(self, model: nn.Module, batch: torch.Tensor, graph: torch.cuda.CUDAGraph, output) -> None:
        super().__init__()
        self.model, self.batch, self.graph, self.output = model, batch, graph, output

    def forward(self, batch: torch.Tensor):
        if batch.data_ptr() != self.batch.data_ptr():
            self.batch.copy_(batch)
        self.graph.replay()
        return self.output


class CaptureError(RuntimeError):
    """A forward that cannot be captured into a CUDA graph (it synchronises with the host, e.g. data-dependent
    token counts): the message says which operation."""


SYNC_DEBUG_MESSAGE = "called a synchronizing CUDA operation"  # set_sync_debug_mode("error")'s RuntimeError
OUT_OF_MEMORY_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the GPU ran out of memory: ``torch.cuda.OutOfMemoryError``, or a plain
    ``RuntimeError`` from an allocation inside cuBLAS / cuDNN or a CUDA call ("CUDA error: out of memory")."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(message in str(error) for message in OUT_OF_MEMORY_MESSAGES))


def capture(model: nn.Module, batch: torch.Tensor, dtype: str, warmup: int = 3) -> GraphReplay:
    """``model`` on ``batch`` (CUDA) as a ``GraphReplay``. A forward that synchronises with the host is refused
    with ``CaptureError`` before any capture (one forward under ``torch.cuda.set_sync_debug_mode("error")``, after
    the warm-up).

    Every forward here runs under the capture's own settings (autocast without its weight-cast cache, which a
    graph cannot keep): a ``torch.compile`` model guards on them, so its compilation for them (Triton
    autotuning synchronises) happens in the warm-up, never inside the capture."""
    model.eval()
    device = batch.device
    stream = _capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream), torch.inference_mode(), autocast(device, dtype, cache=False):
            for _ in range(max(warmup, 1)):  # side-stream warm-up, as torch.cuda.graphs documents
                model(batch)
            _refuse_host_sync(model, batch)
    finally:
        torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), autocast(device, dtype, cache=False), torch.cuda.graph(graph, stream=stream):
        output = model(batch)
    return GraphReplay(model, batch, graph, output)


def _refuse_host_sync(model: nn.Module, batch: torch.Tensor) -> None:
    """One forward under ``torch.cuda.set_sync_debug_mode("error")``: ``CaptureError`` if it synchronises."""
    mode = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        with _sync_refused():
            model(batch)
    finally:
        torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def _sync_refused() -> Iterator[None]:
    """The sync-debug ``RuntimeError`` raised inside as ``CaptureError``; any other error (out of memory: the
    sweep records it) propagates as it is."""
    try:
        yield
    except RuntimeError as error:
        if SYNC_DEBUG_MESSAGE not in str(error):
            raise
        raise CaptureError(str(error).splitlines()[0][:200]) from None


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for every warm-up and capture of the process. cuBLAS keeps a workspace per
    stream (about 33 MB each on an H200) that is never handed back: a new stream per capture grew the
    allocated memory by ~198 MB per run (6 captures) on the H200 (docs/gpu_h200.md, run 3), inflating later
    runs' peak memory."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(index)
    return _CAPTURE_STREAMS[index]


def _time_rounds(models: list[nn.Module], batch: torch.Tensor, dtype: str, warmup: int, runs: int) -> list[list[float]]:
    """``warmup`` untimed rounds, then ``runs`` rounds of one synchronised, timed forward per model."""
    device = batch.device
    for model in models:
        model.eval()
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode(), autocast(device, dtype):
        for _ in range(warmup):
            for model in models:
                model(batch)
        sync(device)
        for _ in range(runs):
            for model, model_times in zip(models, times, strict=True):
                start = time.perf_counter()
                model(batch)
                sync(device)
                model_times.append(time.perf_counter() - start)
    return times


def _result(times: list[float], batch: torch.Tensor, dtype: str, warmup: int) -> ThroughputResult:
    return ThroughputResult(
        images_per_s=batch.shape[0] / statistics.median(times),
        batch_size=batch.shape[0],
        dtype=dtype,
        device=str(batch.device),
        device_name=device_name(batch.device),
        threads=torch.get_num_threads(),
        warmup=warmup,
        times_s=times,
    )
