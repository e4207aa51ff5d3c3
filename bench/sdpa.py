"""Which attention kernel runs, and pinning it.

On GPU, PyTorch picks a kernel per call: flash refuses an additive mask, so the dense model and the pruning
methods run flash in fp16/bf16 while the methods with proportional attention (ToMe, PPT: a ``log(size)``
mask after their first reduction) switch to the memory-efficient kernel. A comparison that must hold the
kernel fixed pins one: ``sdpa_backend: math|efficient|flash|cudnn`` in an experiment (``auto``: PyTorch's
choice). The pin applies to every forward of a run (method and dense baseline alike), through
``torch.nn.attention.sdpa_kernel``.

``explicit`` is no SDPA kernel: every block writes its attention out, ``softmax((q k^T) * scale + bias) @ v``
(``bench.attention.probabilities``, the official ToMe / EViT code's arithmetic), on any device: the faster
kernel at the embedded model's size on the CPU, the slower one at DeiT-S's (measurements:
``docs/methods.md#the-block-loop``). MAC counts do not depend on the kernel (``bench.macs.count_macs``
counts under PyTorch's choice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

SDPA_BACKENDS = ("auto", "math", "efficient", "flash", "cudnn", "explicit")
_ENUM_NAMES = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
               "cudnn": "CUDNN_ATTENTION"}
CPU_BACKENDS = ("auto", "math", "flash", "explicit")  # PyTorch has no memory-efficient or cuDNN kernel on CPU
_written_out = False  # inside ``sdpa_backend("explicit")``: read by ``bench.attention.attention``
# aten op that each kernel dispatches to (CPU and CUDA), for ``kernels_used``
_OPS = {"_scaled_dot_product_attention_math": "math", "_scaled_dot_product_flash_attention": "flash",
        "_scaled_dot_product_flash_attention_for_cpu": "flash", "_scaled_dot_product_efficient_attention": "efficient",
        "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_fused_attention_overrideable": "other"}


def check_backend(name: str, device: torch.device) -> None:
    """Raise ``ValueError`` (one line) for a backend this device or this PyTorch cannot run."""
    if name not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend {name!r} unknown; allowed: {', '.join(SDPA_BACKENDS)}")
    if device.type == "cpu" and name not in CPU_BACKENDS:
        raise ValueError(f"sdpa_backend {name!r} needs CUDA; allowed on CPU: {', '.join(CPU_BACKENDS)}")
    if name in _ENUM_NAMES:
        from torch.nn.attention import SDPBackend

        if not hasattr(SDPBackend, _ENUM_NAMES[name]):
            raise ValueError(f"sdpa_backend {name!r} needs a newer PyTorch than {torch.__version__}")


@contextlib.contextmanager
def sdpa_backend(name: str) -> Iterator[None]:
    """Every block's attention inside uses only kernel ``name`` (``auto``: PyTorch's choice of SDPA kernel;
    ``explicit``: written out, no SDPA)."""
    global _written_out
    previous, _written_out = _written_out, name == "explicit"
    try:
        if name not in _ENUM_NAMES:
            yield
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, _ENUM_NAMES[name])]):
            yield
    finally:
        _written_out = previous


def written_out() -> bool:
    """Whether the attention is written out in every block (inside ``sdpa_backend("explicit")``)."""
    return _written_out


def inductor(graph: torch.fx.GraphModule, example_inputs: list) -> object:
    """The ``torch.compile`` backend of the harness: inductor, with its pattern matcher off where the attention is
    written out. Inductor's pattern matcher rewrites a written-out ``softmax(q k^T * scale) @ v`` (no bias: the
    dense model, and every block before a method's first reduction or without proportional attention) back into
    an SDPA kernel, which would time PyTorch's kernel under an ``explicit`` pin; on the CPU its flash kernel is
    the slower one at the embedded model's size and does not follow the token count. Decided when a graph is
    compiled (a compiled model guards on the pin, so a forward under another pin compiles its own graph)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph, example_inputs, config_patches={"pattern_matcher": False} if _written_out else None)


def enabled_backends() -> list[str]:
    """The backends PyTorch may choose from right now (a pin narrows them to one)."""
    flags = {"flash": "flash_sdp_enabled", "efficient": "mem_efficient_sdp_enabled", "math": "math_sdp_enabled",
             "cudnn": "cudnn_sdp_enabled"}
    return [name for name, flag in flags.items() if getattr(torch.backends.cuda, flag, lambda: False)()]


def describe_backend(name: str, device: torch.device) -> str | None:
    """What a record keeps as ``env.sdpa_backend``: the pinned backend, ``auto:<enabled, ...>`` on GPU
    (PyTorch's choice among them), None for ``auto`` on CPU (PyTorch's CPU choice is not configurable
    beyond a pin)."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return None
    return "auto:" + ",".join(enabled_backends())


def kernels_used(model: torch.nn.Module, batch: torch.Tensor, dtype: str = "fp32") -> list[str]:
    """The SDPA kernels one forward of ``model`` on ``batch`` dispatches to (profiled, CPU-side ops)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.throughput import autocast

    model.eval()
    with torch.inference_mode(), autocast(batch.device, dtype), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(batch)
    seen = {_OPS[event.key.removeprefix("aten::")] for event in prof.key_averages()
            if event.key.removeprefix("aten::") in _OPS}
    return sorted(seen)
