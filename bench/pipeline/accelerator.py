"""What a GPU number needs next to it in a record: CUDA, cuDNN and driver versions, the TF32 setting and
the attention kernel choice (``env.cuda_version``, ``env.cudnn_version``, ``env.driver_version``,
``env.tf32``, ``env.sdpa_backend``). On CPU they are null (``sdpa_backend``: the pinned backend if any)."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import torch

from bench.sdpa import describe_backend


def driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``; None where it is absent or fails."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    versions = sorted({line.strip() for line in out.splitlines() if line.strip()})
    return ",".join(versions) or None


def cuda_environment(device: torch.device, sdpa_backend: str = "auto") -> dict[str, Any]:
    """The record's GPU fields for a run on ``device`` (null where not applicable: CPU)."""
    on_cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if on_cuda and torch.backends.cudnn.is_available() else None
    return {
        "cuda_version": torch.version.cuda if on_cuda else None,
        "cudnn_version": cudnn,
        "driver_version": driver_version() if on_cuda else None,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        if on_cuda else None,
        "sdpa_backend": describe_backend(sdpa_backend, device),
    }
