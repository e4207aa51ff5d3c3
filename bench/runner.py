"""One run, start to end: build the timm model, load weights, attach the method, run the stages
(finetune -> eval -> macs -> throughput) and write the run's record. ``run_job`` is the picklable
function every executor calls (in-process, local subprocess, SLURM), with a small dict and a folder."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import bench
from bench.config import RunSpec
from bench.data import build_dataset
from bench.macs import analytic_macs, count_macs, data_macs
from bench.models import load_model
from bench.records import SCHEMA, failure_path, record_path, write_record
from bench.throughput import autocast, compare_throughput, device_name
from bench.train import FinetuneOptions, atomic_torch_save, finetune

REPO = Path(__file__).resolve().parent.parent


def run_job(spec: dict[str, Any], results_dir: str, progress: bool = True) -> str:
    """Execute one run and return its record's path. On failure, a failure note (error, traceback, log)
    is written next to the records and the exception propagates (the executor reports it).

    ``SystemExit`` is not a failure: it is how submitit ends a job it has checkpointed and requeued after
    a preemption signal. Test hook: a run whose key matches the glob in ``$TOKENBENCH_FAIL_KEYS`` raises
    ``RuntimeError`` at job time (after validation, so failures inside a real SLURM job can be tested)."""
    run = RunSpec.from_dict(spec)
    try:
        fail_keys = os.environ.get("TOKENBENCH_FAIL_KEYS")
        if fail_keys and fnmatch.fnmatch(run.key, fail_keys):
            raise RuntimeError(f"injected failure: run {run.key} matches TOKENBENCH_FAIL_KEYS={fail_keys!r}")
        execute(run, Path(results_dir), progress=progress)
    except SystemExit:
        raise
    except BaseException as error:
        _write_failure(Path(results_dir), run, error)
        raise
    return str(record_path(Path(results_dir), run.key))


def _write_failure(results_dir: Path, run: RunSpec, error: BaseException) -> None:
    path = failure_path(results_dir, run.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    note = {
        "key": run.key,
        "error": f"{type(error).__name__}: {error}".strip().splitlines()[0][:500],
        "traceback": traceback.format_exc(),
        "log": os.environ.get("TOKENBENCH_LOG"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "time": _now(),
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(note, indent=1))
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available on this machine")
    return torch.device(name)


def environment(device: torch.device) -> dict[str, Any]:
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
    }


@functools.lru_cache(maxsize=4)
def dataset(name: str, split: str, root: str | None, subset: int | None, augment: bool = False) -> Dataset:
    """Datasets are loaded once per process (the in-process executor runs many runs in one)."""
    return build_dataset(name, split, root=root, subset=subset, augment=augment)


def _val_set(run: RunSpec) -> Dataset:
    return dataset(run.data["name"], "val", run.data["root"], run.data["subset"])


def execute(run: RunSpec, results_dir: Path, progress: bool = True) -> dict[str, Any] | None:
    """All stages of ``run``; writes and returns its record (None on the non-zero ranks of a DDP job)."""
    started, clock = _now(), time.time()
    device = resolve_device(run.device)
    if run.threads:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    vit = load_model(run.model, run.model_kwargs, run.weights_path)
    model = bench.apply(vit, run.method, **run.params).to(device)
    metrics: dict[str, Any] = {}
    tokens, stats = None, {}
    if "finetune" in run.stages:
        metrics["finetune"], rank = finetune_stage(model, run, results_dir, device, progress)
        if rank != 0:
            return None  # the other tasks of a multi-task job only train; rank 0 measures and records
    if "eval" in run.stages:
        metrics["eval"], tokens, stats = eval_stage(model, run, results_dir, device, progress)
    if "macs" in run.stages:
        metrics["macs"], macs_tokens = macs_stage(model, run)
        tokens = tokens or macs_tokens
    if "throughput" in run.stages:
        metrics["throughput"] = throughput_stage(model, run, device)
    record = {
        "schema": SCHEMA,
        "key": run.key,
        "experiment": run.experiment,
        "run": run.to_dict(),
        "metrics": metrics,
        "tokens_per_layer": tokens,
        "method_stats": stats,
        "env": environment(device),
        "started_at": started,
        "finished_at": _now(),
        "wall_s": round(time.time() - clock, 3),
    }
    write_record(record_path(results_dir, run.key), record)
    failure_path(results_dir, run.key).unlink(missing_ok=True)
    return record


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
def _loader(data: Dataset, run: RunSpec, device: torch.device) -> DataLoader:
    return DataLoader(data, batch_size=run.batch_size, shuffle=False, num_workers=run.workers,
                      pin_memory=device.type == "cuda")


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device, dtype: str, description: str,
            progress: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits-derived results over a loader: (top-5 predictions (N, k), targets (N,), extras)."""
    from tqdm import tqdm

    model.eval()
    loss_sum, top_k, targets = 0.0, [], []
    stats_sum: dict[int, dict[str, float]] = {}
    seen, tokens = 0, None
    for images, labels in tqdm(loader, desc=description, disable=not progress, leave=False, mininterval=2.0):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top_k.append(logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu())
        targets.append(labels.cpu())
        seen += images.shape[0]
        info = getattr(model, "last_forward", None)
        if info is not None:
            tokens = {"in": info.tokens_in, "out": info.tokens_out}
            for layer, values in info.stats.items():
                slot = stats_sum.setdefault(layer, {})
                for name, value in values.items():
                    slot[name] = slot.get(name, 0.0) + value * images.shape[0]
    stats = {str(layer): {name: total / seen for name, total in values.items()} for layer, values in stats_sum.items()}
    return torch.cat(top_k), torch.cat(targets), {"loss": loss_sum / max(seen, 1), "tokens": tokens, "stats": stats}


def _dense_cache(run: RunSpec, results_dir: Path) -> Path:
    identity = json.dumps([run.model, run.model_kwargs, run.weights, run.data, run.dtype], sort_keys=True, default=str)
    return results_dir / "cache" / f"dense-{hashlib.sha1(identity.encode()).hexdigest()[:12]}.pt"


def dense_predictions(run: RunSpec, results_dir: Path, device: torch.device, progress: bool) -> torch.Tensor:
    """Top-1 predictions of the dense model with the run's original weights on the eval images, computed
    once per (model, weights, data) and shared by all runs of the results folder."""
    path = _dense_cache(run, results_dir)
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a torn cache file is recomputed
            path.unlink(missing_ok=True)
    torch.manual_seed(run.seed)  # with random-init weights: the same init as the run's own model
    vit = load_model(run.model, run.model_kwargs, run.weights_path).to(device)
    top_k, _, _ = predict(bench.apply(vit, "baseline"), _loader(_val_set(run), run, device), device, run.dtype,
                          "dense predictions", progress)
    predictions = top_k[:, 0].clone()
    atomic_torch_save(predictions, path)
    return predictions


def eval_stage(model, run: RunSpec, results_dir: Path, device: torch.device, progress: bool):
    val = _val_set(run)
    top_k, targets, extras = predict(model, _loader(val, run, device), device, run.dtype, f"eval {run.key}", progress)
    correct = top_k == targets[:, None]
    metrics = {
        "top1": 100.0 * correct[:, 0].float().mean().item(),
        "top5": 100.0 * correct.any(dim=1).float().mean().item(),
        "loss": extras["loss"],
        "images": int(targets.numel()),
    }
    if run.eval.get("agreement", True):
        if run.method == "baseline" and "finetune" not in run.stages:
            dense = top_k[:, 0]
            _store_dense(dense, run, results_dir)
        else:
            dense = dense_predictions(run, results_dir, device, progress)
        metrics["agreement"] = 100.0 * (top_k[:, 0] == dense).float().mean().item()
    return metrics, extras["tokens"], extras["stats"]


def _store_dense(predictions: torch.Tensor, run: RunSpec, results_dir: Path) -> None:
    path = _dense_cache(run, results_dir)
    if not path.exists():
        atomic_torch_save(predictions.clone(), path)


def macs_stage(model, run: RunSpec) -> tuple[dict[str, Any], dict[str, list[int]]]:
    single = count_macs(model)
    info = model.last_forward
    tokens = {"in": info.tokens_in, "out": info.tokens_out}
    analytic = analytic_macs(model, info.tokens_in, info.tokens_out)
    if model.method.data_dependent:
        val = _val_set(run)
        count = min(run.macs["images"], len(val))
        averaged = data_macs(model, (val[i][0] for i in range(count)))
    else:
        averaged = float(single)
    return {"torchprofile": single, "analytic": analytic, "data_mean": averaged}, tokens


def _real_batch(run: RunSpec, batch_size: int, device: torch.device) -> torch.Tensor:
    """The first ``batch_size`` eval images (cycled if the set is smaller): data-dependent methods are
    timed on the inputs they are evaluated on, not on noise."""
    val = _val_set(run)
    return torch.stack([val[i % len(val)][0] for i in range(batch_size)]).to(device)


def throughput_stage(model, run: RunSpec, device: torch.device) -> list[dict[str, Any]]:
    dense = bench.apply(model.vit, "baseline")
    entries = []
    for batch_size in run.throughput["batch_sizes"]:
        batch = _real_batch(run, batch_size, device)
        measured, baseline = compare_throughput(model, dense, batch, run.dtype, run.throughput["warmup"],
                                                run.throughput["runs"])
        entry = measured.to_dict()
        entry.update(baseline_images_per_s=baseline.images_per_s, baseline_times_s=baseline.times_s,
                     speedup=measured.images_per_s / baseline.images_per_s)
        entries.append(entry)
    return entries


def finetune_stage(model, run: RunSpec, results_dir: Path, device: torch.device, progress: bool) -> tuple[dict, int]:
    """Fine-tune with the method active (all tasks of a multi-task job take part); rank 0 saves the final
    weights (DeiT format) and, with ``finetune.export``, a copy there. Returns (result, rank)."""
    from bench.distributed import distributed_context

    options = FinetuneOptions(**{k: v for k, v in run.finetune.items() if k != "export"})
    train = dataset(run.data["name"], "train", run.data["root"], run.data["subset"], augment=True)
    checkpoint_dir = results_dir / "checkpoints" / run.key
    with distributed_context(device) as ctx:
        model.to(ctx.device)
        result = finetune(model, train, options, checkpoint_dir, ctx.device, run.dtype, rank=ctx.rank,
                          world_size=ctx.world_size, progress=progress)
        result["world_size"] = ctx.world_size  # processes that trained (tasks of a DDP job)
        if ctx.rank == 0:
            final = {"model": model.vit.state_dict()}
            atomic_torch_save(final, checkpoint_dir / "final.pth")
            if run.finetune.get("export"):
                atomic_torch_save(final, Path(run.finetune["export"]))
    model.to(device)
    return result, ctx.rank
