"""Peak memory of one call (a forward pass), as the throughput stage records it.

CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak right before the call, so it is the
peak of everything allocated during it, weights and input included (``peak_mem_kind: "cuda_max_allocated"``).

CPU: the growth of the process's resident set during the call (``"cpu_rss_growth"``): on Linux the peak
resident set (``VmHWM``) is reset through ``/proc/self/clear_refs`` and free heap pages are handed back
first (glibc ``malloc_trim``), so the growth is the pages the call touched beyond what the process already
held; elsewhere the growth of ``getrusage``'s lifetime maximum (0 once an earlier, larger call set it).
It is a lower bound of the call's working memory (the allocator may reuse pages it still holds).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch

CUDA_KIND, CPU_KIND = "cuda_max_allocated", "cpu_rss_growth"
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def peak_memory_mb(call: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """``(megabytes, kind)`` for one ``call()`` on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, CUDA_KIND
    _trim_heap()
    if _reset_peak_rss():
        before = _status_kb("VmRSS")
        call()
        return max(_status_kb("VmHWM") - before, 0) / 1024, CPU_KIND
    before = _maxrss_kb()
    call()
    return max(_maxrss_kb() - before, 0) / 1024, CPU_KIND


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return _status_kb("VmHWM") > 0
    except OSError:
        return False


def _maxrss_kb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else peak  # bytes on macOS, kB on Linux


def _trim_heap() -> None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
