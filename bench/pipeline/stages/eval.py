"""``eval``: top-1 / top-5 / loss on the eval images and, with ``eval.agreement``, the share of images
whose top-1 class equals the dense model's (original weights)."""

from __future__ import annotations

from typing import Any

from bench.pipeline import dense
from bench.pipeline.context import StageContext
from bench.pipeline.predict import predict


def run(ctx: StageContext) -> dict[str, Any]:
    run = ctx.run
    result = predict(ctx.model, ctx.loader(ctx.val_set()), ctx.device, run.dtype, f"eval {run.key}", ctx.progress)
    correct = result.top_k == result.targets[:, None]
    metrics = {
        "top1": 100.0 * correct[:, 0].float().mean().item(),
        "top5": 100.0 * correct.any(dim=1).float().mean().item(),
        "loss": result.loss,
        "images": int(result.targets.numel()),
    }
    if run.eval["agreement"]:
        top1 = result.top_k[:, 0]
        if run.method == "baseline" and "finetune" not in run.stages:
            dense.store(ctx, top1)
            reference = top1
        else:
            reference = dense.dense_predictions(ctx)
        metrics["agreement"] = 100.0 * (top1 == reference).float().mean().item()
    ctx.note_tokens(result.info)
    ctx.method_stats = result.stats
    return metrics
