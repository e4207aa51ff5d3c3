"""Building timm models by name and loading weights: a local file (DeiT's ``{"model": state_dict}``,
``{"state_dict": ...}`` or a plain state dict), a URL (torch.hub's cache) or a timm pretrained tag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class WeightsError(ValueError):
    """Weights missing, unreadable or not matching the model (the message names the file)."""


def create_model(name: str, kwargs: dict[str, Any] | None = None, meta: bool = False) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``; ``meta``: without allocating weights."""
    import timm

    kwargs = dict(kwargs or {})
    if meta:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: DeiT's ``{"model": ...}``, ``{"state_dict": ...}``, plain;
    a DDP ``module.`` prefix is removed."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source}: not a state dict (expected tensors, or {{'model': state_dict}} as DeiT saves)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def read_weights(path_or_url: str) -> dict[str, torch.Tensor]:
    """Load a state dict from a local file or URL (URLs go through torch.hub's download cache)."""
    if path_or_url.startswith(("http://", "https://")):
        try:
            obj = torch.hub.load_state_dict_from_url(path_or_url, map_location="cpu", check_hash=False,
                                                     weights_only=True)  # as a local file: no pickled code runs
        except Exception as error:  # noqa: BLE001 - network and format errors alike become one line
            what = (_load_failure(error) if "Weights only load failed" in str(error)
                    else f"download failed ({type(error).__name__}: {error})")
            raise WeightsError(f"{path_or_url}: {what}") from None
        return extract_state_dict(obj, path_or_url)
    path = Path(path_or_url)
    if not path.is_file():
        raise WeightsError(f"{path}: {'a folder, not a weights file' if path.is_dir() else 'weights file not found'}")
    with path.open("rb") as handle:
        head = handle.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip archive, or a legacy pickle
        raise WeightsError(f"{path}: {'an empty file' if not head else 'not a PyTorch checkpoint'} (torch.save writes "
                           "a zip archive or a pickle; allowed: such a file holding a state dict)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torn, foreign or pickled-code files
        raise WeightsError(f"{path}: {_load_failure(error)}") from None
    return extract_state_dict(obj, str(path))


def _load_failure(error: Exception) -> str:
    """One line for a checkpoint ``torch.load(weights_only=True)`` could not read. A refused pickle says
    why first (it could run code), then what it held; torch's own text puts that after its remedies."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|\n|$)", text)
        what = f" ({found.group(1).strip().rstrip('.')})" if found and found.group(1).strip(" .") else ""
        return ("refused: the checkpoint holds pickled Python objects besides tensors, and unpickling those can "
                f"run arbitrary code, so weights are loaded with torch.load(weights_only=True){what}; if you trust "
                "its source, re-save its state dict alone")
    reason = text.splitlines()[0] if text else type(error).__name__
    return f"unreadable checkpoint ({reason[:200]})"


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> str | None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        key = wrong[0]
        parts.append(f"shape of {key} is {tuple(state[key].shape)}, model has {tuple(expected[key].shape)}")
    return f"{source}: does not fit the model: " + "; ".join(parts)


def check_weights(model: nn.Module, weights: str) -> None:
    """Raise ``WeightsError`` when local weights are missing, unreadable or do not fit ``model``
    (a meta model is fine). URLs and timm tags are checked when the run loads them."""
    if weights.startswith(("http://", "https://", "timm:")):
        return
    problem = _mismatch(model, read_weights(weights), weights)
    if problem:
        raise WeightsError(problem)


def load_model(name: str, kwargs: dict[str, Any], weights: str | None) -> nn.Module:
    """A timm model with its weights: ``None`` (random init, seeded by the caller), a path, a URL or
    ``timm:<tag>`` (timm's own pretrained weights, e.g. ``timm:fb_in1k``)."""
    if weights and weights.startswith("timm:"):
        import timm

        tag = weights[len("timm:") :]
        try:
            return timm.create_model(f"{name}.{tag}" if tag else name, pretrained=True, **kwargs)
        except Exception as error:  # noqa: BLE001
            raise WeightsError(f"{weights}: timm pretrained weights for {name} unavailable ({error})") from None
    model = create_model(name, kwargs)
    if weights:
        state = read_weights(weights)
        problem = _mismatch(model, state, weights)
        if problem:
            raise WeightsError(problem)
        model.load_state_dict(state)
    return model
