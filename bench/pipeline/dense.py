"""The dense model's top-1 predictions on a run's eval images, for the agreement metric: computed once
per (model, weights, data, dtype) and shared by all runs of a results folder (``<results>/cache/``)."""

from __future__ import annotations

from pathlib import Path

import torch

import bench
from bench.pipeline.config import RunSpec
from bench.pipeline.context import StageContext
from bench.pipeline.files import atomic_torch_save, digest
from bench.pipeline.models import load_model
from bench.pipeline.predict import predict


def cache_path(run: RunSpec, results_dir: Path) -> Path:
    identity = [run.model, run.model_kwargs, run.weights, run.data, run.dtype]
    return Path(results_dir) / "cache" / f"dense-{digest(identity, 12)}.pt"


def store(ctx: StageContext, predictions: torch.Tensor) -> None:
    """Keep the dense model's own predictions (a baseline run with the original weights made them)."""
    path = cache_path(ctx.run, ctx.results_dir)
    if not path.exists():
        atomic_torch_save(predictions.clone(), path)


def dense_predictions(ctx: StageContext) -> torch.Tensor:
    """From the cache, or computed with the run's original weights (not fine-tuned ones) and cached."""
    run = ctx.run
    path = cache_path(run, ctx.results_dir)
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a torn cache file is recomputed
            path.unlink(missing_ok=True)
    torch.manual_seed(run.seed)  # with random-init weights: the same init as the run's own model
    vit = load_model(run.model, run.model_kwargs, run.weights_path).to(ctx.device)
    result = predict(bench.apply(vit, "baseline"), ctx.loader(ctx.val_set()), ctx.device, run.dtype,
                     "dense predictions", ctx.progress)
    predictions = result.top_k[:, 0].clone()
    atomic_torch_save(predictions, path)
    return predictions
