"""Datasets: ImageNet in torchvision's ImageFolder layout, and Fashion-MNIST from its IDX files.

Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``),
from a given folder, or, on machines with network, fetched once by torchvision's downloader.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fashion_mnist", "imagenet")


class DataError(ValueError):
    """A data folder or file is missing or unreadable (message names it)."""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): the MNIST family's format (magic, dims, big-endian uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise DataError(f"{path}: cannot read IDX file ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem, root / "FashionMNIST" / "raw" / stem):
        if candidate.exists():
            return candidate
    raise DataError(f"{root}: no {stem}[.gz] (Fashion-MNIST IDX files expected; apt-get install dataset-fashion-mnist)")


def fashion_mnist_root(root: str | os.PathLike | None) -> Path:
    """The given folder, else Debian's, else a cache folder filled by torchvision's downloader."""
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataError(f"data root {path} does not exist (Fashion-MNIST IDX files expected there)")
        return path
    if DEBIAN_FMNIST.is_dir():
        return DEBIAN_FMNIST
    cache = Path(os.environ.get("TOKENBENCH_DATA", "~/.cache/tokenbench")).expanduser() / "fashion-mnist"
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache), train=True, download=True)
        FashionMNIST(str(cache), train=False, download=True)
    except Exception as error:  # noqa: BLE001 - any download failure becomes one clear message
        raise DataError(
            f"Fashion-MNIST not found in {DEBIAN_FMNIST} and download to {cache} failed ({error}); "
            "install Debian's dataset-fashion-mnist or set data.root"
        ) from None
    return cache


class FashionMNIST(Dataset):
    """Fashion-MNIST in memory as normalised (1, 28, 28) tensors. ``train`` adds the light augmentation
    used to train the embedded model: random crop with 2-pixel padding and horizontal flip."""

    def __init__(self, root: str | os.PathLike | None, split: str, augment: bool = False) -> None:
        base = fashion_mnist_root(root)
        prefix = {"train": "train", "val": "t10k", "test": "t10k"}.get(split)
        if prefix is None:
            raise DataError(f"fashion_mnist split {split!r} unknown; allowed: train, val")
        images = read_idx(_find_idx(base, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(base, f"{prefix}-labels-idx1-ubyte"))
        self.images = (torch.from_numpy(images.copy()).float().div_(255) - FMNIST_MEAN) / FMNIST_STD
        self.images = self.images.unsqueeze(1)
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            # Seeded by (epoch, image), not by process: one and several DDP processes see the same batches.
            generator = torch.Generator().manual_seed(self.epoch * 1_000_003 + index)
            padded = torch.nn.functional.pad(image, (2, 2, 2, 2), value=-FMNIST_MEAN / FMNIST_STD)
            top, left, flip = torch.randint(0, 5, (3,), generator=generator).tolist()
            image = padded[:, top : top + 28, left : left + 28]
            if flip % 2:
                image = image.flip(-1)
        return image, int(self.targets[index])


def imagenet(root: str | os.PathLike, split: str, augment: bool = False, input_size: int = 224) -> Dataset:
    """ImageNet ``train/`` or ``val/`` as torchvision ImageFolder. Eval: DeiT's transform (resize 256,
    center crop 224, bicubic, ImageNet mean/std); training: DeiT's (RandAugment, random erasing) via timm."""
    from timm.data import create_transform
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    folder = Path(root).expanduser() / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DataError(f"ImageNet folder {folder} does not exist (ImageFolder layout: {root}/train, {root}/val)")
    if augment:
        transform = create_transform(
            input_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
            re_prob=0.25, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )
    else:
        transform = transforms.Compose([
            transforms.Resize(int(input_size / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
    return ImageFolder(str(folder), transform=transform)


def build_dataset(name: str, split: str, root: str | None = None, subset: int | None = None,
                  augment: bool = False, input_size: int = 224) -> Dataset:
    """A dataset by name; ``subset`` keeps a fixed random selection of that many images (seed 0), so every
    run of an experiment sees the same images."""
    if name == "fashion_mnist":
        dataset: Dataset = FashionMNIST(root, split, augment=augment)
    elif name == "imagenet":
        if root is None:
            raise DataError("data 'imagenet' needs data.root (a folder with train/ and val/)")
        dataset = imagenet(root, split, augment=augment, input_size=input_size)
    else:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if subset is not None and subset < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:subset]
        dataset = Subset(dataset, sorted(order.tolist()))
    return dataset


@functools.lru_cache(maxsize=4)
def cached_dataset(name: str, split: str, root: str | None, subset: int | None, augment: bool = False) -> Dataset:
    """``build_dataset``, loaded once per process (the in-process executor runs many runs in one)."""
    return build_dataset(name, split, root=root, subset=subset, augment=augment)
