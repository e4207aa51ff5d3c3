"""Predictions of a model over a loader: top-5 classes, targets, loss, top-1 confidence, optionally the
pre-logits features, and the method's per-layer stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from bench.pipeline import interrupts
from bench.throughput import autocast


@dataclass
class Predictions:
    top_k: torch.Tensor  # (N, k) class indices, best first (k = min(5, classes))
    targets: torch.Tensor  # (N,)
    loss: float  # mean cross-entropy
    info: Any  # the model's last ForwardInfo (None for a plain module)
    stats: dict[str, dict[str, float]]  # method statistics per layer, averaged over images
    confidence: torch.Tensor | None = None  # (N,) softmax probability of the top-1 class
    features: torch.Tensor | None = None  # (N, D) float32 pre-logits features (``features=True``)
    nonfinite: int = 0  # images whose logits hold a NaN or an infinity
    classes: int = 0  # the model's number of classes (its logits' width)


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device, dtype: str, description: str,
            progress: bool, features: bool = False) -> Predictions:
    """``features``: also keep the pre-logits feature of every image (``model.forward_with_features``, a
    ``bench.apply`` model: one pass through the blocks gives both)."""
    from tqdm import tqdm

    model.eval()
    loss_sum, top_k, targets, confidence, kept_features = 0.0, [], [], [], []
    stats_sum: dict[int, dict[str, float]] = {}
    seen, info, nonfinite = 0, None, 0
    for images, labels in tqdm(loader, desc=description, disable=not progress, leave=False, mininterval=2.0):
        interrupts.check()
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            if features:
                logits, pre_logits = model.forward_with_features(images)
                kept_features.append(pre_logits.float().cpu())
            else:
                logits = model(images)
        logits = logits.float()
        nonfinite += int((~torch.isfinite(logits).all(dim=-1)).sum())
        confidence.append(logits.softmax(dim=-1).amax(dim=-1).cpu())
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top_k.append(logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu())
        targets.append(labels.cpu())
        seen += images.shape[0]
        info = getattr(model, "last_forward", None)
        if info is not None:
            for layer, values in info.stats.items():
                slot = stats_sum.setdefault(layer, {})
                for name, value in values.items():
                    # statistics may be 0-d tensors (no host sync inside the forward): read them here
                    slot[name] = slot.get(name, 0.0) + float(value) * images.shape[0]
    stats = {str(layer): {name: total / seen for name, total in values.items()} for layer, values in stats_sum.items()}
    return Predictions(torch.cat(top_k), torch.cat(targets), loss_sum / max(seen, 1), info, stats,
                       torch.cat(confidence), torch.cat(kept_features) if features else None, nonfinite,
                       int(logits.shape[-1]) if seen else 0)
