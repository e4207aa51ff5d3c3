"""What a stage gets: the run, its model (the method attached), where results go, the device, and the
run's datasets and loaders. Stages also leave the per-layer token counts and method statistics here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from bench.pipeline.config import RunSpec
from bench.pipeline.data import DataError, cached_dataset
from bench.pipeline.samples import dataset_targets


@dataclass
class StageContext:
    run: RunSpec
    model: Any  # a bench.apply result (ReducedViT)
    results_dir: Path
    device: torch.device
    progress: bool = True
    rank: int = 0  # this process's rank in a multi-task (DDP) job: only rank 0 measures and records
    # {"in", "attn", "mlp", "out": [...]} of a real forward (bench.vit.ForwardInfo's counts)
    tokens_per_layer: dict[str, list[int]] | None = None
    method_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    labels_checked: set[str] = field(default_factory=set)  # the splits whose labels fit the model's classes

    def dataset(self, split: str, augment: bool = False) -> Dataset:
        """The run's ``split``; a label outside the model's classes is one line (not torch's "Target 2 is out of
        bounds" at the first batch holding it), checked once per split (every stage and batch size asks)."""
        data = cached_dataset(self.run.data, split, augment)
        if split not in self.labels_checked:
            classes = getattr(self.model, "num_classes", 0)
            labels = dataset_targets(data) if classes else None
            bad = next((label for label in labels or () if not 0 <= label < classes), None)
            if bad is not None:
                raise DataError(f"data {self.run.data['name']!r} ({split}): class index {bad} is not one of the "
                                f"model's {classes} classes (0 to {classes - 1}); allowed: model.kwargs num_classes "
                                "above every class index of the data, or a data.class_map onto the model's classes")
            self.labels_checked.add(split)
        return data

    def val_set(self) -> Dataset:
        return self.dataset("val")

    def loader(self, data: Dataset) -> DataLoader:
        return DataLoader(data, batch_size=self.run.batch_size, shuffle=False, num_workers=self.run.workers,
                          pin_memory=self.device.type == "cuda")

    def note_tokens(self, info: Any) -> None:
        """Keep the token counts of the first stage that ran a forward pass (``info``: a ForwardInfo)."""
        if self.tokens_per_layer is None and info is not None:
            self.tokens_per_layer = {"in": info.tokens_in, "attn": info.tokens_attn, "mlp": info.tokens_mlp,
                                     "out": info.tokens_out}
