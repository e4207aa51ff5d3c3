"""GPU-only paths checked on CPU: the throughput batch of the auto sizes (tiled on the device from a bounded
draw), which errors count as out of memory or as a forward that cannot be captured (fed the exceptions CUDA
raises), and ``gpu_check.py --ddp-procs`` against the GPU count."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from bench.pipeline.files import REPO
from bench.pipeline.samples import sample_indices
from bench.pipeline.stages import throughput as throughput_stage
from bench.throughput import CaptureError, _sync_refused, out_of_memory
from tests.test_pipeline import _image_folder


class Counted(Dataset):
    """The eval set, counting the images decoded."""

    def __init__(self, val) -> None:
        self.val, self.targets, self.decoded = val, val.targets, 0

    def __len__(self) -> int:
        return len(self.val)

    def __getitem__(self, index: int):
        self.decoded += 1
        return self.val[index]


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    from bench.pipeline.data import build_dataset

    root = tmp_path_factory.mktemp("in1k")
    _image_folder(root, classes=4, per_class=3)
    return build_dataset("imagenet", "val", root=str(root))


def _ctx(dataset) -> SimpleNamespace:
    return SimpleNamespace(val_set=lambda: dataset, run=SimpleNamespace(seed=3), device=torch.device("cpu"))


def _stacked(val, batch_size: int) -> torch.Tensor:
    """The batch as the stage built it before: every image of the draw decoded and stacked."""
    return torch.stack([val[i][0] for i in sample_indices(val, batch_size, 3)])


# ------------------------------------------------------------------ 1. the auto sizes' batch
def test_sizes_above_the_cap_repeat_the_caps_images_and_decode_no_more(val):
    counted = Counted(val)
    batch = throughput_stage.real_batch(_ctx(counted), 10, distinct=4)
    first = _stacked(val, 4)
    assert batch.shape == (10, 3, 224, 224) and counted.decoded == 4
    assert torch.equal(batch, torch.cat([first, first, first[:2]]))


@pytest.mark.parametrize("batch_size, distinct", [(1, 4), (4, 4), (12, 12), (14, None), (14, 20), (30, 12)])
def test_sizes_within_the_cap_or_the_set_are_the_draw_as_before(val, batch_size, distinct):
    """Within the cap, or with the whole set decoded (12 images: the draw cycles), nothing changes."""
    counted = Counted(val)
    batch = throughput_stage.real_batch(_ctx(counted), batch_size, distinct)
    assert torch.equal(batch, _stacked(val, batch_size))
    assert counted.decoded == min(batch_size, len(val))


# ------------------------------------------------------------------ 2. out of memory, and what cannot be captured
@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    # CUDA's own error (a RuntimeError) where this torch has the class (2.8 and later; the floor, 2.5, has not)
    *([torch.AcceleratorError("CUDA error: out of memory")] if hasattr(torch, "AcceleratorError") else []),
])
def test_allocation_failures_are_out_of_memory(error):
    assert out_of_memory(error)


@pytest.mark.parametrize("error", [
    RuntimeError("called a synchronizing CUDA operation"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x8)"),
    CaptureError("called a synchronizing CUDA operation"),
    MemoryError(),  # the host's
    ValueError("out of memory"),
])
def test_other_errors_are_not_out_of_memory(error):
    assert not out_of_memory(error)


def test_a_sync_debug_error_is_a_capture_error():
    with pytest.raises(CaptureError, match=r"^called a synchronizing CUDA operation$"):
        with _sync_refused():
            raise RuntimeError("called a synchronizing CUDA operation\nException raised from ...")


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    torch.cuda.OutOfMemoryError("CUDA out of memory"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
])
def test_other_errors_of_the_capture_check_propagate_as_they_are(error):
    """Were all ``CaptureError`` ("no CUDA graphs"): an allocation failure hid the out of memory."""
    def forward():
        raise error

    with pytest.raises(RuntimeError) as raised:
        with _sync_refused():
            forward()
    assert raised.value is error


def test_sweep_records_a_plain_runtime_error_that_is_out_of_memory():
    def measure(batch_size):
        if batch_size == 600:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
        if batch_size >= 512:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return {"batch_size": batch_size}

    entries = throughput_stage.sweep([1, 128], measure, auto=True)
    assert entries == [{"batch_size": 1}, {"batch_size": 128}, {"batch_size": 256, "auto": True},
                       {"batch_size": 512, "out_of_memory": True, "auto": True}]
    assert throughput_stage.sweep([600, 2], measure, auto=False) == [{"batch_size": 600, "out_of_memory": True},
                                                                    {"batch_size": 2}]


def test_sweep_lets_other_errors_fail_the_run():
    def measure(batch_size):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        throughput_stage.sweep([1], measure, auto=True)


# ------------------------------------------------------------------ 4. gpu_check.py --ddp-procs
def _gpu_check():
    sys.path.insert(0, str(REPO / "scripts"))  # its ``import _repo``
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


@pytest.mark.parametrize("procs, gpus", [(3, 0), (3, 2), (2, 1)])
def test_more_cuda_processes_than_gpus_are_refused_in_one_line(procs, gpus):
    """Each rank takes GPU ``rank``: were "invalid device ordinal" inside ``mp.spawn``, no report."""
    assert _gpu_check().ddp_procs_error(procs, torch.device("cuda"), gpus) == (
        f"error: --ddp-procs {procs} needs {procs} GPUs (one per process); {gpus} found")


@pytest.mark.parametrize("procs, device, gpus", [(2, "cpu", 0), (3, "cpu", 0), (2, "cuda", 2), (None, "cuda", 0)])
def test_gloo_on_cpu_and_enough_gpus_are_accepted(procs, device, gpus):
    """The README's gloo fine-tuning (``--device cpu --ddp-procs 2``) needs no GPU."""
    assert _gpu_check().ddp_procs_error(procs, torch.device(device), gpus) is None


def test_the_script_refuses_one_process_more_than_gpus_in_one_line():
    """Without CUDA (this machine) its absence is said first; on a GPU machine the GPU count."""
    gpus = torch.cuda.device_count()
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--ddp-procs", str(gpus + 1)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    expected = (f"error: --ddp-procs {gpus + 1} needs {gpus + 1} GPUs (one per process); {gpus} found"
                if torch.cuda.is_available() else
                "error: CUDA is not available here; --device cpu runs the same checks on CPU")
    assert out.returncode == 2 and out.stdout == "" and out.stderr.strip() == expected, out.stderr[-500:]
