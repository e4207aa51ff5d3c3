"""The eval images a run measures on beyond accuracy: the data-averaged MACs and the timed throughput batch.

Not the first images of the set: torchvision's ImageFolder sorts by class, so those would be 2-5 ImageNet
classes. A seeded draw across classes instead: each class's images in a seeded order, the classes in a
seeded order, then round-robin (one image of every class before a second of any), cycling when more are
asked than the set has. Without class labels, a seeded permutation. The same seed gives the same images on
every machine and in every run of an experiment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Subset


def dataset_targets(dataset: Dataset) -> list[int] | None:
    """The class label of every item, when the dataset exposes them (``targets``; through ``Subset``)."""
    if isinstance(dataset, Subset):
        inner = dataset_targets(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        return [int(t) for t in targets.reshape(-1)]
    return [int(t) for t in targets]


def stratified_indices(targets: Sequence[int] | None, size: int, count: int, seed: int = 0) -> list[int]:
    """``count`` indices into a set of ``size`` items, round-robin over the classes of ``targets``."""
    if size == 0:
        raise ValueError("no images to draw from")
    generator = torch.Generator().manual_seed(seed)
    if targets is None:
        order = torch.randperm(size, generator=generator).tolist()
    else:
        by_class: dict[int, list[int]] = {}
        for index, label in enumerate(targets):
            by_class.setdefault(label, []).append(index)
        classes = sorted(by_class)
        shuffled = [[members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
                    for members in (by_class[c] for c in classes)]
        class_order = torch.randperm(len(classes), generator=generator).tolist()
        longest = max(len(members) for members in shuffled)
        order = [shuffled[c][r] for r in range(longest) for c in class_order if r < len(shuffled[c])]
    return [order[i % size] for i in range(count)]


def sample_indices(dataset: Dataset, count: int, seed: int = 0) -> list[int]:
    """``count`` indices of ``dataset``, drawn across its classes (see the module's docstring)."""
    return stratified_indices(dataset_targets(dataset), len(dataset), count, seed)


def macs_images(dataset: Dataset, count: int, seed: int) -> list[torch.Tensor]:
    """The images a data-dependent method's MACs are averaged over (``macs.images`` of them, at most the set's
    size): the macs stage's ``data_mean`` and the calibration of its budgets take the same ones."""
    return [dataset[i][0] for i in sample_indices(dataset, min(count, len(dataset)), seed)]


def images_identity(weights: str | None, data: dict[str, Any], count: int, seed: int) -> str:
    """What picks the model and the images a data-dependent MAC count averages over: the weights by content where a
    local file (``bench/pipeline/fingerprint.py``), else as written; the data (subset, transform) and the images it
    holds (``data_digest``: a folder edited in place is other data); how many images; the seed. Part of the key of
    a calibration and of its count (``bench/pipeline/calibrate.py``)."""
    from bench.pipeline.data import data_digest
    from bench.pipeline.files import canonical

    return canonical([weights, data, data_digest(data), count, seed])

