"""Datasets and their transforms.

Datasets (``data.name``): ``imagenet`` (an ImageFolder tree with ``train/`` and ``val/``), ``folder`` (any
ImageFolder tree: ``root`` and an optional ``split`` sub-folder; ``class_map`` maps folder names to class
indices), ``fashion_mnist`` (IDX files, adapted to the model's input; splits ``test``, t10k, and ``train``) and timm's ``create_dataset`` names
(``torch/cifar10``, ``hfds/...``, ``hfids/...``, ``tfds/...``, ``wds/...``; downloads only with
``download: true``).

Transforms: the eval transform is timm's (``timm.data.create_transform``) from the model's pretrained
config (``timm.data.resolve_model_data_config``), with the model's own input size and the config's
overrides; it is resolved when the experiment is loaded (``resolve_transform``), stored in the run and in
its record as ``run.data.transform``. Training keeps DeiT's augmentation recipe (RandAugment m9, random
erasing 0.25, bicubic) with the resolved mean, std and size. Fashion-MNIST keeps its own statistics
(mean 0.2860, std 0.3530) and whole image (crop_pct 1.0); for a model whose input is not 1x28x28 the image
is resized to its size and the grey channel repeated to its channels.

Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``),
from a given folder, or, on machines with network, fetched once by torchvision's downloader.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {"train": "train", "val": "t10k", "test": "t10k"}  # a split -> the prefix of its IDX files
DATASETS = ("fashion_mnist", "imagenet", "folder")
TIMM_PREFIXES = ("torch/", "hfds/", "hfids/", "tfds/", "wds/")  # timm.data.create_dataset's
STREAMED_PREFIXES = ("hfids/", "tfds/", "wds/")  # iterable datasets: read in order, no random access
TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
# DeiT's eval transform (resize 256, center crop 224): used when no transform is given
DEIT_TRANSFORM = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD), "crop_pct": 0.875, "crop_mode": "center"}
STREAM_HEAD = 1024  # images of a streamed dataset that stages may index (MACs, throughput batches)


class DataError(ValueError):
    """A data folder or file is missing or unreadable (message names it)."""


def dataset_problem(name: str) -> str | None:
    """Why ``name`` is not a dataset name, or None."""
    if name in DATASETS or (name.lower().startswith(TIMM_PREFIXES) and name.partition("/")[2]):
        return None
    return (f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}, or timm's "
            f"{', '.join(p + '<name>' for p in TIMM_PREFIXES)}")


# ------------------------------------------------------------------------------------------ transforms
def resolve_transform(model: torch.nn.Module, dataset: str, *overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The eval transform of ``model`` on ``dataset`` (a meta model is fine: nothing is computed), keys as
    timm names them. timm's ``resolve_model_data_config`` with the model's own input (channels, image size,
    which differ from the pretrained config when the model was built with other ``img_size``/``in_chans``);
    Fashion-MNIST: its own statistics and whole image. ``overrides`` (experiment, then model) win."""
    from timm.data import resolve_model_data_config

    from bench.vit import embedded_size

    config = dict(resolve_model_data_config(model))
    embed = getattr(model, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    own = None  # the (C, H, W) the model was built for
    if embed is not None and proj is not None and getattr(embed, "img_size", None) is not None:
        own = list(embedded_size(embed))
        config["input_size"] = tuple(own)
    channels = config["input_size"][0]
    if dataset == "fashion_mnist":
        config.update(mean=[FMNIST_MEAN] * channels, std=[FMNIST_STD] * channels, crop_pct=1.0, crop_mode="center")
    elif channels == 1:  # a grey model under an RGB pretrained config: the channels' average
        config.update({key: [sum(config[key]) / len(config[key])] for key in ("mean", "std")})
    for override in overrides:
        config.update({k: v for k, v in (override or {}).items() if v is not None})
    channels = config["input_size"][0]
    for key in ("mean", "std"):  # one value stands for every channel (timm's rule)
        if len(config[key]) == 1:
            config[key] = list(config[key]) * channels
    transform = {
        "input_size": [int(v) for v in config["input_size"]],
        "interpolation": str(config["interpolation"]),
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "crop_pct": float(config["crop_pct"]),
        "crop_mode": str(config.get("crop_mode") or "center"),
    }
    if len(transform["input_size"]) != 3:
        raise DataError(f"transform.input_size must be [channels, height, width], got {transform['input_size']}")
    if own is not None and transform["input_size"] != own:  # MACs, budgets and token maps follow the model's input
        raise DataError(f"transform.input_size {transform['input_size']} differs from the model's input {own}; "
                        "allowed: the model's own (build the model at another size with model.kwargs img_size / "
                        "in_chans, or shrink the input with method resize)")
    for key in ("mean", "std"):
        if len(transform[key]) != channels:
            raise DataError(f"transform.{key} has {len(transform[key])} values, the input has {channels} channels")
    return transform


def eval_transform(transform: dict[str, Any] | None):
    """timm's eval transform (resize to input / crop_pct, crop, to tensor, normalise)."""
    from timm.data import create_transform

    t = transform or DEIT_TRANSFORM
    return _grey(t, create_transform(tuple(t["input_size"]), is_training=False, interpolation=t["interpolation"],
                                     mean=tuple(t["mean"]), std=tuple(t["std"]), crop_pct=t["crop_pct"],
                                     crop_mode=t["crop_mode"]))


def train_transform(transform: dict[str, Any] | None):
    """DeiT's training augmentation through timm (random resized crop, flip, RandAugment m9, random erasing
    0.25, bicubic) at the resolved input size, mean and std."""
    from timm.data import create_transform

    t = transform or DEIT_TRANSFORM
    return _grey(t, create_transform(tuple(t["input_size"]), is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                     interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1,
                                     mean=tuple(t["mean"]), std=tuple(t["std"])))


def _grey(t: dict[str, Any], transform):
    """For a one-channel model, images are converted to grey first (PIL's "L")."""
    if t["input_size"][0] != 1:
        return transform
    from torchvision import transforms

    return transforms.Compose([transforms.Grayscale(1), transform])


# --------------------------------------------------------------------------------------- Fashion-MNIST
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
    """The given folder, else Debian's, else a cache folder filled by torchvision's downloader
    (``$TOKENBENCH_DATA/fashion-mnist``, else ``fashion-mnist`` in tokenbench's cache folder)."""
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataError(f"data root {path} does not exist (Fashion-MNIST IDX files expected there)")
        return path
    if DEBIAN_FMNIST.is_dir():
        return DEBIAN_FMNIST
    from bench.pipeline.files import cache_dir

    cache = Path(os.environ.get("TOKENBENCH_DATA") or cache_dir()).expanduser() / "fashion-mnist"
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
    used to train the embedded model: random crop with 2-pixel padding and horizontal flip (probability 2/5:
    a third draw in 0..4 that is odd, as the embedded checkpoint was trained).

    ``transform`` (a resolved transform): for a model whose input is not (1, 28, 28), or other statistics,
    each image is renormalised, resized to ``input_size`` (scaled to ``size / crop_pct`` and center-cropped)
    and its grey channel repeated to the model's channels. The native input is left exactly as it is."""

    def __init__(self, root: str | os.PathLike | None, split: str, augment: bool = False,
                 transform: dict[str, Any] | None = None) -> None:
        base = fashion_mnist_root(root)
        prefix = FMNIST_FILES.get(split)
        if prefix is None:
            raise DataError(f"fashion_mnist split {split!r} unknown; allowed: test (t10k, also called val), train")
        images = read_idx(_find_idx(base, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(base, f"{prefix}-labels-idx1-ubyte"))
        self.images = (torch.from_numpy(images.copy()).float().div_(255) - FMNIST_MEAN) / FMNIST_STD
        self.images = self.images.unsqueeze(1)
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.augment = augment
        self.epoch, self.seed = 0, 0
        self.adapt = transform if transform and not _native_fmnist(transform) else None
        problem = tensor_transform_problem(transform)
        if problem:
            raise DataError(f"fashion_mnist: transform.{problem[0]} {problem[1]}")

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        """The fine-tuning epoch and its ``finetune.seed``: other seeds, other crops and flips (seed 0: the streams
        the embedded checkpoint was trained with)."""
        self.epoch, self.seed = epoch, seed

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            # Seeded by (seed, epoch, image), not by process: one and several DDP processes see the same batches.
            # The epoch's stream as the fine-tuning loop numbers it (seed * 10_007 + epoch); below 2**64 for every
            # seed up to finetune.seed's ceiling, and for seed 0 the seeds of before the seed counted.
            stream = self.seed * 10_007 + self.epoch
            generator = torch.Generator().manual_seed((stream * 1_000_003 + index) % 2**64)
            padded = torch.nn.functional.pad(image, (2, 2, 2, 2), value=-FMNIST_MEAN / FMNIST_STD)
            top, left, flip = torch.randint(0, 5, (3,), generator=generator).tolist()
            image = padded[:, top : top + 28, left : left + 28]
            if flip % 2:
                image = image.flip(-1)
        if self.adapt:
            image = _adapt_fmnist(image, self.adapt)
        return image, int(self.targets[index])


TENSOR_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # torch.nn.functional.interpolate's, for tensor datasets


def tensor_transform_problem(transform: dict[str, Any] | None) -> tuple[str, str] | None:
    """``(transform key, what is wrong; allowed ...)`` where Fashion-MNIST's tensors cannot be adapted as the resolved
    ``transform`` says (the native 1x28x28 input is never resized: anything goes there); else None. The experiment
    loader asks it too, so a dry run refuses what every run would."""
    if not transform or _native_fmnist(transform):
        return None
    if transform["interpolation"] not in TENSOR_INTERPOLATIONS:
        return "interpolation", (f"{transform['interpolation']!r} is not available for tensors; allowed: "
                                 f"{', '.join(TENSOR_INTERPOLATIONS)}")
    if transform["crop_mode"] == "border":
        return "crop_mode", "'border' not supported for tensors; allowed: center, squash"
    return None


def _native_fmnist(transform: dict[str, Any]) -> bool:
    return (transform["input_size"] == [1, 28, 28] and transform["mean"] == [FMNIST_MEAN]
            and transform["std"] == [FMNIST_STD] and transform["crop_pct"] == 1.0)


def _adapt_fmnist(image: torch.Tensor, t: dict[str, Any]) -> torch.Tensor:
    """A normalised (1, 28, 28) Fashion-MNIST image as the transform ``t`` wants it (see FashionMNIST)."""
    channels, height, width = t["input_size"]
    scale = (math.floor(height / t["crop_pct"]), math.floor(width / t["crop_pct"]))
    if t["crop_mode"] != "squash":  # timm's center mode keeps the aspect: the square image to the larger side
        scale = (max(scale), max(scale))
    mode = t["interpolation"]
    x = image[None] * FMNIST_STD + FMNIST_MEAN  # back to [0, 1]
    if tuple(x.shape[-2:]) != scale:
        x = torch.nn.functional.interpolate(x, size=scale, mode=mode, antialias=mode != "nearest",
                                            **({} if mode == "nearest" else {"align_corners": False}))
        x = x.clamp_(0, 1)
    top, left = int(round((scale[0] - height) / 2)), int(round((scale[1] - width) / 2))  # torchvision's CenterCrop
    x = x[0, :, top : top + height, left : left + width].expand(channels, -1, -1)
    mean = torch.tensor(t["mean"], dtype=x.dtype)[:, None, None]
    std = torch.tensor(t["std"], dtype=x.dtype)[:, None, None]
    return (x - mean) / std


# ----------------------------------------------------------------------------------- image folders
def load_class_map(path: str | os.PathLike) -> dict[str, int]:
    """Folder name -> class index: a ``.json`` mapping, or a text file with one folder name per line
    (index = line number, timm's format) or ``name index`` per line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise DataError(f"class_map {path}: cannot read ({error.strerror or error})") from None
    if path.suffix == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"class_map {path}: malformed JSON (line {error.lineno})") from None
        # bool is an int to Python, and JSON's true would be class 1: refused with the other non-integers
        if not isinstance(mapping, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                    for v in mapping.values()):
            raise DataError(f"class_map {path}: must map folder names to integer class indices")
        if not mapping:
            raise DataError(f"class_map {path}: empty")
        return {str(k): v for k, v in mapping.items()}
    mapping: dict[str, int] = {}
    for number, line in enumerate(line for line in text.splitlines() if line.strip()):
        fields = line.split()
        if len(fields) == 1:
            mapping[fields[0]] = number
        elif len(fields) == 2 and fields[1].lstrip("-").isdigit():
            mapping[fields[0]] = int(fields[1])
        else:
            raise DataError(f"class_map {path}: line {number + 1} must be 'folder' or 'folder index', got {line!r}")
    if not mapping:
        raise DataError(f"class_map {path}: empty")
    return mapping


def load_image(path: str):
    """torchvision's image loader (PIL, RGB); an image it cannot read is one line naming the file."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"image {path}: cannot be read ({type(error).__name__}: {reason[:200]})") from None


def folder_problem(folder: Path) -> str | None:
    """What keeps an existing ``folder`` from being an ImageFolder tree, as torchvision reads it (class sub-folders,
    each searched through for files of its image extensions), or None: the first image found ends the search (an
    ImageNet split is not listed). Asked when the experiment is loaded: an empty tree failed every run, one by one."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(entry.path for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        return "no class sub-folder (ImageFolder layout: <class>/<image> files)"
    for path in classes:
        for _, _, files in os.walk(path, followlinks=True):
            if any(name.lower().endswith(IMG_EXTENSIONS) for name in files):
                return None
    return (f"no image file ({', '.join(IMG_EXTENSIONS[:4])}, ...) in its {len(classes)} class sub-folder"
            f"{'s' if len(classes) > 1 else ''} (ImageFolder layout: <class>/<image> files)")


def image_folder(folder: Path, transform, class_map: str | None = None) -> Dataset:
    """torchvision's ImageFolder with timm's class order (folder names in natural order, ``2`` before ``10``, as
    ImageNet-V2's folders ``0`` .. ``999`` are their class indices); with ``class_map``, each class folder's index
    comes from that file."""
    from timm.utils.misc import natural_key
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist (ImageFolder layout: <class>/<image> files)")
    mapping = load_class_map(class_map) if class_map else None

    class MappedFolder(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = sorted(super().find_classes(directory)[0], key=natural_key)
            if mapping is None:
                return classes, {name: index for index, name in enumerate(classes)}
            missing = [name for name in classes if name not in mapping]
            if missing:
                raise DataError(f"class_map {class_map} has no entry for folder {missing[0]!r} of {directory} "
                                f"({len(missing)} of {len(classes)} folders missing)")
            return classes, {name: mapping[name] for name in classes}

    try:
        return MappedFolder(str(folder), transform=transform, loader=load_image)
    except (FileNotFoundError, OSError) as error:
        raise DataError(f"data folder {folder}: {error}") from None


# ------------------------------------------------------------------------------------ timm datasets
class StreamedDataset(IterableDataset):
    """A timm iterable dataset (``hfids/``, ``tfds/``, ``wds/``) read in order, ``limit`` samples at most.
    Stages that look at single images (MACs, throughput) index its first ``STREAM_HEAD`` images, read once."""

    def __init__(self, dataset: Any, limit: int | None = None) -> None:
        self.dataset, self.limit = dataset, limit
        self._head: list[tuple[torch.Tensor, int]] = []

    def __iter__(self):
        for index, sample in enumerate(self.dataset):
            if self.limit is not None and index >= self.limit:
                return
            yield sample

    def __len__(self) -> int:
        total = len(self.dataset)
        return min(total, self.limit) if self.limit is not None else total

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index >= STREAM_HEAD:
            raise IndexError(f"a streamed dataset gives random access to its first {STREAM_HEAD} images only")
        if not self._head:
            for sample in self:
                self._head.append(sample)
                if len(self._head) >= STREAM_HEAD:
                    break
        return self._head[index]

    def set_epoch(self, epoch: int, seed: int = 0) -> None:  # finetune refuses streamed data: evaluated only
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def timm_dataset(name: str, root: str | None, split: str, training: bool, transform, download: bool,
                 class_map: str | None) -> Dataset:
    """``timm.data.create_dataset`` with the run's transform; any failure is one ``DataError`` line."""
    from timm.data import create_dataset

    if name.lower().startswith(("hfds/", "hfids/")) and not download:
        # Hugging Face datasets fetch what is not cached: only from the local cache unless download: true
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        dataset = create_dataset(name, root=root, split=split, is_training=training, download=download,
                                 class_map=class_map or None)
    except Exception as error:  # noqa: BLE001 - missing files, missing packages, offline: one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = "" if download else " (set data.download: true to fetch it)"
        raise DataError(f"dataset {name!r} (root {root}, split {split!r}) unavailable: {reason[:300]}{hint}") from None
    dataset.transform = transform
    return dataset


# ---------------------------------------------------------------------------------------------- entry
def build_dataset(name: str, split: str, root: str | None = None, subset: int | None = None,
                  augment: bool = False, transform: dict[str, Any] | None = None, eval_split: str | None = None,
                  train_split: str = "train", class_map: str | None = None, download: bool = False) -> Dataset:
    """A dataset by name; ``split`` is ``train`` or ``val`` (the folder / split names are ``train_split``
    and ``eval_split``); ``subset`` keeps a fixed random selection of that many images (seed 0), so every run
    of an experiment sees the same images (streamed datasets: the first ``subset``)."""
    problem = dataset_problem(name)
    if problem:
        raise DataError(problem)
    training = split == "train"
    if name == "fashion_mnist":  # its IDX files: test (t10k, the default eval split) and train
        sub = train_split if training else (eval_split or "test")
        dataset: Dataset = FashionMNIST(root, sub, augment=augment, transform=transform)
    else:
        images = train_transform(transform) if augment else eval_transform(transform)
        if name in ("imagenet", "folder"):
            if root is None:
                raise DataError(f"data {name!r} needs data.root (an ImageFolder tree)")
            default = "val" if name == "imagenet" else None
            sub = train_split if training else (eval_split or default)
            dataset = image_folder(Path(root).expanduser() / sub if sub else Path(root).expanduser(), images,
                                   class_map)
        else:
            sub = train_split if training else (eval_split or "validation")
            dataset = timm_dataset(name, root, sub, training, images, download, class_map)
            if isinstance(dataset, IterableDataset):
                return StreamedDataset(dataset, subset)
    if subset is not None and subset < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:subset]
        dataset = Subset(dataset, sorted(order.tolist()))
    return dataset


def dataset_identity(dataset: Dataset) -> list[Any]:
    """What images, labels and order a dataset holds, cheaply: an image folder's files (paths relative to its root,
    sizes in bytes) with their classes, a subset's indices, else its type and length. Caches of per-image results key
    on it, and records carry its digest (``data_digest``), so a folder edited in place (images added, relabelled,
    replaced) or another folder of the same name is never taken for the one a result was computed on. Not the
    files' times: a copy of the same images elsewhere (a node's scratch disk) is the same data."""
    if isinstance(dataset, Subset):
        return ["subset", dataset_identity(dataset.dataset), list(dataset.indices)]
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and getattr(dataset, "root", None) is not None:
        root = str(dataset.root)
        return ["folder", [(os.path.relpath(path, root), label, os.path.getsize(path)) for path, label in samples]]
    return [type(dataset).__name__, len(dataset) if hasattr(dataset, "__len__") else None]


def data_digest(data: dict[str, Any]) -> str | None:
    """The digest of the eval set's ``dataset_identity`` (a run's ``data`` section), None where the data cannot be
    read here (a laptop validating a cluster config). Computed once per invocation and data section (a folder's
    files are listed and sized once): the records, the rerun check and the dense reference's cache share it."""
    return _digest(json.dumps(data, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _digest(data_json: str) -> str | None:
    from bench.pipeline.files import digest

    try:
        return digest(dataset_identity(_cached(data_json, "val", False)), 16)
    except (OSError, DataError, RuntimeError, ValueError):
        return None


def run_dataset(data: dict[str, Any], split: str, augment: bool = False) -> Dataset:
    """The dataset of a run's ``data`` section (``RunSpec.data``)."""
    return build_dataset(data["name"], split, root=data.get("root"), subset=data.get("subset"), augment=augment,
                         transform=data.get("transform"), eval_split=data.get("split"),
                         train_split=data.get("train_split") or "train", class_map=data.get("class_map"),
                         download=bool(data.get("download")))


@functools.lru_cache(maxsize=4)
def _cached(data_json: str, split: str, augment: bool) -> Dataset:
    return run_dataset(json.loads(data_json), split, augment)


def cached_dataset(data: dict[str, Any], split: str, augment: bool = False) -> Dataset:
    """``run_dataset``, loaded once per invocation (the in-process executor runs many runs in one process;
    ``forget_datasets`` at the start of each invocation: a folder may have changed since the last one)."""
    return _cached(json.dumps(data, sort_keys=True), split, augment)


def forget_datasets() -> None:
    _cached.cache_clear()
    _digest.cache_clear()
