"""``finetune``: train with the method active (every task of a multi-task job takes part; ``ctx.rank``
tells the runner which one records). Rank 0 saves the final weights (DeiT format) under
``<results>/checkpoints/<key>/final.pth`` and, with ``finetune.export``, a copy there.

A run redone with ``--force`` trains afresh: its finished training's checkpoint is not resumed. A finished
run whose export is missing (``export`` changed, or the file deleted: not part of the run key) gets it from
its final weights on the next invocation (``restore_export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.pipeline.config import RunSpec
from bench.pipeline.context import StageContext
from bench.pipeline.distributed import distributed_context
from bench.pipeline.files import atomic_torch_save
from bench.pipeline.records import RecordError, read_record, record_path
from bench.pipeline.train import FinetuneOptions, finetune


def run(ctx: StageContext) -> dict[str, Any]:
    run, model = ctx.run, ctx.model
    options = FinetuneOptions(**run.finetune)
    checkpoint_dir = checkpoints(ctx.results_dir, run.key)
    with distributed_context(ctx.device) as dist:
        model.to(dist.device)
        result = finetune(model, ctx.dataset("train", augment=True), options, checkpoint_dir, dist.device,
                          run.dtype, rank=dist.rank, world_size=dist.world_size, progress=ctx.progress,
                          redone_history=_recorded_history(ctx.results_dir, run.key))
        result["world_size"] = dist.world_size  # processes that trained (tasks of a DDP job)
        if dist.rank == 0:
            # on the CPU: a plain torch.load of the exported weights works on a machine without the training GPU
            final = {"model": {name: value.detach().cpu() for name, value in model.vit.state_dict().items()}}
            atomic_torch_save(final, checkpoint_dir / "final.pth")
            if options.export:
                atomic_torch_save(final, Path(options.export))
    model.to(ctx.device)
    ctx.rank = dist.rank
    return result


def checkpoints(results_dir: Path, key: str) -> Path:
    """The run's fine-tuning folder: ``last.pth`` (resumed from) and ``final.pth``."""
    return Path(results_dir) / "checkpoints" / key


def _recorded_history(results_dir: Path, key: str) -> list[dict] | None:
    """The fine-tuning history of the run's finished record. A job reaches its stages with a readable
    record only when the run is redone (``--force``; ``lock.run_guard`` skips it otherwise)."""
    try:
        return read_record(record_path(results_dir, key))["metrics"].get("finetune", {}).get("history")
    except (RecordError, AttributeError):
        return None


def restore_export(run: RunSpec, results_dir: Path) -> str | None:
    """For a finished run: write its ``finetune.export`` from ``checkpoints/<key>/final.pth`` when that
    file is missing (atomically). Returns the note to print, a warning when the final weights are gone,
    None when there is nothing to do."""
    export = (run.finetune or {}).get("export")
    if not export or Path(export).exists():
        return None
    final = checkpoints(results_dir, run.key) / "final.pth"
    if not final.is_file():
        return (f"warning: run {run.key}: its fine-tuned weights are not at {export} and its final weights "
                f"({final}) are gone; rerun it with --force to export them")
    import torch

    try:
        weights = torch.load(final, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a torn file: one line, the other runs go on
        return (f"warning: run {run.key}: its fine-tuned weights are not at {export} and its final weights "
                f"({final}) do not load ({type(error).__name__}); rerun it with --force to export them")
    try:
        atomic_torch_save(weights, Path(export))
    except OSError as error:  # the path cannot be written (any more): one line, the other runs go on
        return (f"warning: run {run.key}: its fine-tuned weights could not be exported to {export} "
                f"({type(error).__name__}: {error.strerror or error}); they stay in {final}")
    return f"note: run {run.key}: fine-tuned weights exported to {export} from {final}"
