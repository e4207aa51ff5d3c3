"""The dense model's top-1 predictions and pre-logits features on a run's eval images, for the agreement
and feature-similarity metrics: computed once per (model, weights and their content hash, the seed, data and
the images it holds, dtype, device type and attention kernel) and shared by all runs of a results folder
(``<results>/cache/``, ``{"top1": (N,), "features": (N, D) float16}``)."""

from __future__ import annotations

from pathlib import Path

import torch

import bench
from bench.pipeline.context import StageContext
from bench.pipeline.data import data_digest
from bench.pipeline.files import atomic_torch_save, digest
from bench.pipeline.models import load_model
from bench.pipeline.predict import predict


def cache_path(ctx: StageContext) -> Path:
    """The cache file of the run's dense reference: keyed by the model, its weights (and their content), the seed
    (a random init, a new head), the data section, the images the eval set holds (``data_digest``: a folder
    edited in place gets its own), the dtype, and the device type and attention kernel it ran with (a GPU run
    compared with a CPU run's dense predictions counted their rounding flips as disagreement)."""
    run = ctx.run
    identity = [run.model, run.model_kwargs, run.weights, run.data, run.dtype, data_digest(run.data)]
    identity.append(["device", ctx.device.type, run.sdpa_backend])
    if run.weights_sha256:  # a checkpoint changed at the same path gets its own cache
        identity.append(run.weights_sha256)
    # the seed: it makes a random init, and the new head of pretrained weights (timm:<tag> with other num_classes);
    # user test 15: seeds 0 and 1 of a random init shared one cache
    identity.append(["seed", run.seed])
    return Path(ctx.results_dir) / "cache" / f"dense-{digest(identity, 12)}.pt"


def store(ctx: StageContext, predictions: torch.Tensor, features: torch.Tensor) -> None:
    """Keep the dense model's own predictions and features (a baseline run with the original weights made them)."""
    path = cache_path(ctx)
    if not path.exists():
        atomic_torch_save({"top1": predictions.clone(), "features": features.half()}, path)


def dense_reference(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top1, features)`` from the cache, or computed with the run's original weights (not fine-tuned
    ones) and cached."""
    run = ctx.run
    path = cache_path(ctx)
    if path.exists():
        try:
            cached = torch.load(path, weights_only=True)
            return cached["top1"], cached["features"].float()
        except Exception:  # noqa: BLE001 - a torn (or earlier-format) cache file is recomputed
            path.unlink(missing_ok=True)
    torch.manual_seed(run.seed)  # with random-init weights: the same init as the run's own model
    vit = load_model(run.model, run.model_kwargs, run.weights_path).to(ctx.device)
    result = predict(bench.apply(vit, "baseline"), ctx.loader(ctx.val_set()), ctx.device, run.dtype,
                     "dense predictions", ctx.progress, features=True)
    predictions, features = result.top_k[:, 0].clone(), result.features.half()
    atomic_torch_save({"top1": predictions, "features": features}, path)
    return predictions, features.float()  # as every later run reads them from the cache
