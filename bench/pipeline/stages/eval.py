"""``eval``: top-1 / top-5 (None for a model of 5 classes or fewer) / loss on the eval images, the calibration of
the top-1 confidence (``ece``: expected calibration error over 15 equal-width bins, a fraction; ``nll``: mean
negative log-likelihood of the true class, nats) and, with ``eval.agreement``, the comparison with the dense
model (original weights) on the same images: ``agreement``, the share whose top-1 class equals the dense
model's, and ``feature_cos``, the mean cosine similarity of the pre-logits features to the dense model's;
``nonfinite_images``: how many images gave NaN or infinite logits (a warning line, and a note in the report)."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from bench import stats
from bench.pipeline import dense
from bench.pipeline.context import StageContext
from bench.pipeline.predict import predict


def percent(hits: torch.Tensor) -> float:
    """The share of true values in percent, from the integer count (85.9 for 1718 of 2000, not 85.9000027)."""
    return 100.0 * int(hits.sum()) / max(hits.numel(), 1)


def run(ctx: StageContext) -> dict[str, Any]:
    run = ctx.run
    compare = run.eval["agreement"]
    result = predict(ctx.model, ctx.loader(ctx.val_set()), ctx.device, run.dtype, f"eval {run.key}", ctx.progress,
                     features=compare)
    correct = result.top_k == result.targets[:, None]
    metrics = {
        "top1": percent(correct[:, 0]),  # exact shares of the images (float32 means carried 3e-6 of noise)
        # with 5 classes or fewer every true class is among the top 5: None, not a trivial 100 % (user test 15)
        "top5": percent(correct.any(dim=1)) if result.classes > 5 else None,
        "loss": result.loss,
        "nll": result.loss,  # the mean cross-entropy of the true class is its negative log-likelihood
        "ece": stats.expected_calibration_error(result.confidence.numpy(), correct[:, 0].numpy()),
        "images": int(result.targets.numel()),
        "nonfinite_images": result.nonfinite,  # NaN / inf logits: their arg-max still counts, as in the reference
    }
    if result.nonfinite:  # said at once, and in the leaderboard under the group's table
        print(f"warning: {run.key}: {result.nonfinite} of {metrics['images']} eval images gave non-finite logits "
              "(NaN or inf): top-1 counts their arg-max as the reference code's would; ECE, NLL and feature cos "
              "are undefined (NaN)", file=sys.stderr)
    if compare:
        top1 = result.top_k[:, 0]
        if run.method == "baseline" and "finetune" not in run.stages:
            dense.store(ctx, top1, result.features)
            reference, features = top1, result.features
        else:
            reference, features = dense.dense_reference(ctx)
        metrics["agreement"] = percent(top1 == reference)
        metrics["feature_cos"] = stats.mean_cosine(result.features.numpy(), features.numpy())
    if result.nonfinite:  # undefined, as the warning says: -inf logits alone left ECE finite and NLL inf
        metrics.update({name: math.nan for name in ("ece", "nll", "feature_cos") if name in metrics})
    ctx.note_tokens(result.info)
    ctx.method_stats = result.stats
    return metrics
