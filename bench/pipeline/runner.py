"""One run, start to end: build the timm model, load weights, attach the method, run the stages of
``bench.pipeline.stages`` in order and write the run's record. ``run_job`` is the picklable function every
executor calls (in-process, local subprocess, SLURM), with a small dict and a folder."""

from __future__ import annotations

import fnmatch
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import bench
from bench.pipeline import interrupts
from bench.pipeline.accelerator import cuda_environment
from bench.pipeline.calibrate import method_code
from bench.pipeline.config import RunSpec
from bench.pipeline.context import StageContext
from bench.pipeline.data import data_digest
from bench.pipeline.distributed import rank_device
from bench.pipeline.files import REPO, atomic_write_json
from bench.pipeline.fingerprint import check_unchanged
from bench.pipeline.lock import exit_with_parent, run_guard, slurm_job
from bench.pipeline.models import load_model
from bench.pipeline.records import build_record, failure_path, now, record_path, write_record
from bench.pipeline.stages import stage
from bench.pipeline.train import seed_everything
from bench.sdpa import check_backend, sdpa_backend
from bench.throughput import device_name


def run_job(spec: dict[str, Any], results_dir: str, progress: bool = True, redo: bool = False) -> str:
    """Execute one run and return its record's path. On failure, a failure note (error, traceback, log)
    is written next to the records and the exception propagates (the executor reports it); Ctrl-C marks
    the note ``interrupted``. ``bench.pipeline.lock.run_guard`` makes sure no two processes compute one run
    (``RunClaimed``) and skips a run whose record appeared since it was planned (unless ``redo``).

    ``SystemExit`` is not a failure: it is how submitit ends a job it has checkpointed and requeued after
    a preemption signal. Test hook: a run whose key matches the glob in ``$TOKENBENCH_FAIL_KEYS`` raises
    ``RuntimeError`` at job time (after validation, so failures inside a real SLURM job can be tested)."""
    run = RunSpec.from_dict(spec)
    exit_with_parent()  # first: a local job's inherited ignored SIGINT is Python's own again before once() looks
    with interrupts.once() as note, run_guard(Path(results_dir), run.key, redo) as already_done:
        if already_done:
            return str(record_path(Path(results_dir), run.key))
        try:
            fail_keys = os.environ.get("TOKENBENCH_FAIL_KEYS")
            if fail_keys and fnmatch.fnmatch(run.key, fail_keys):
                raise RuntimeError(f"injected failure: run {run.key} matches TOKENBENCH_FAIL_KEYS={fail_keys!r}")
            check_unchanged(run.weights_path, run.weights_sha256)
            execute(run, Path(results_dir), progress=progress)
        except SystemExit:
            raise
        except BaseException as error:
            with note(interrupted=isinstance(error, KeyboardInterrupt)):  # a Ctrl-C meanwhile: after the note
                write_failure(Path(results_dir), run, error)
            raise
    return str(record_path(Path(results_dir), run.key))


def submitted_job(spec: dict[str, Any], results_dir: str, redo: bool = False) -> str:
    """``run_job`` as a submitit job runs it (``slurm.RunJob``, and the ``local`` executor's jobs): no progress bar,
    and the job's log named in ``$TOKENBENCH_LOG``, so that a run failing in it leaves a note naming that log."""
    import submitit

    os.environ["TOKENBENCH_LOG"] = str(submitit.JobEnvironment().paths.stderr)
    return run_job(spec, results_dir, progress=False, redo=redo)


def write_failure(results_dir: Path, run: RunSpec, error: BaseException, log: str | None = None) -> None:
    """The run's failure note (``interrupted`` for a Ctrl-C). ``log``: the job's log, where the process writing
    the note is not the job (default: the job's own ``$TOKENBENCH_LOG``)."""
    atomic_write_json(failure_path(results_dir, run.key), {
        "key": run.key,
        "error": error_line(error),
        "state": "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
        "traceback": traceback.format_exc(),
        "log": log or os.environ.get("TOKENBENCH_LOG"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_job": slurm_job(),  # as jobs.json names it: --status tells the job's own note from a later attempt's
        "time": now(),
    })


def error_line(error: BaseException) -> str:
    """The failure note's one line: ``Type: message`` (its first line, at most 500 characters). An error raised in a
    DataLoader worker arrives re-raised as "Caught X in DataLoader worker process N." with the worker's traceback
    in its message: the line is then the worker's own ``X: message``, the traceback's last line (``X`` without its
    module, as for an error of this process)."""
    text = str(error).strip()
    if text.startswith("Caught ") and "in DataLoader worker process" in text.splitlines()[0]:
        name, colon, message = text.splitlines()[-1].strip().partition(": ")
        return f"{name.rsplit('.', 1)[-1]}{colon}{message}"[:500]
    return f"{type(error).__name__}: {text}".strip().rstrip(":").splitlines()[0][:500]  # no ": " for ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available on this machine")
    return torch.device(name)


def environment(device: torch.device, sdpa_backend: str = "auto") -> dict[str, Any]:
    import timm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "git_commit": commit,
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "slurm_job": slurm_job(),
        **cuda_environment(device, sdpa_backend),
    }


def execute(run: RunSpec, results_dir: Path, progress: bool = True) -> dict[str, Any] | None:
    """All stages of ``run``; writes and returns its record (None on the non-zero ranks of a DDP job,
    which only train)."""
    started, clock = now(), time.time()
    code = method_code(run.method)  # its method's files as the run starts (imported at the process's start)
    device = rank_device(resolve_device(run.device))  # each DDP rank's GPU is current before any CUDA call
    check_backend(run.sdpa_backend, device)
    if run.threads:
        torch.set_num_threads(run.threads)
    seed_everything(run.seed)  # torch, and numpy: K-Medoids draws its first medoid from numpy's (its reference's)
    vit = load_model(run.model, run.model_kwargs, run.weights_path)
    model = bench.apply(vit, run.method, **run.params).to(device)
    ctx = StageContext(run, model, Path(results_dir), device, progress)
    metrics: dict[str, Any] = {}
    with sdpa_backend(run.sdpa_backend):
        for name in run.stages:
            metrics[name] = stage(name).run(ctx)
            if ctx.rank != 0:
                return None
    record = build_record(run.to_dict(), metrics, ctx.tokens_per_layer, ctx.method_stats,
                          environment(device, run.sdpa_backend),
                          started_at=started, wall_s=time.time() - clock, method_revision=model.method.revision,
                          data_digest=data_digest(run.data), method_code=code)
    write_record(record_path(results_dir, run.key), record)
    failure_path(results_dir, run.key).unlink(missing_ok=True)
    return record
