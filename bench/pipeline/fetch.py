"""Remote weights fetched once, where the runs are submitted, not in every job.

Compute nodes often have no internet, and a large array would race on one download cache. Before any run
starts (every executor), ``prefetch_weights`` turns each run's remote weights into a local file under
``<results>/cache/weights/`` and gives the run that path (``RunSpec.weights_path``; the run key and
``weights`` as written stay):

* ``http(s)://`` URLs are downloaded once, atomically, to ``<sha1 of the URL>-<file name>``;
* ``timm:<tag>`` weights are loaded through timm's hub download on this host and saved as a state dict
  named by a hash of (model, kwargs, tag, seed), with the run's seed applied first so that a head timm
  re-initialises (other ``num_classes``) is the one the job would have drawn. Where timm cannot fetch
  them here (offline), or the tagged model differs in shape from ``timm.create_model(model, **kwargs)``,
  the run keeps ``timm:<tag>`` and each job resolves it as before (a warning says so).
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.pipeline.files import atomic_file, atomic_torch_save, digest
from bench.pipeline.models import WeightsError, check_weights, create_model, load_model


def weights_cache(results_dir: Path) -> Path:
    return Path(results_dir) / "cache" / "weights"


def fetch_url(url: str, cache: Path) -> Path:
    """The local copy of ``url`` in ``cache`` (downloaded now if absent; hash-named, written atomically)."""
    name = os.path.basename(url.split("?")[0].rstrip("/")) or "weights"
    path = Path(cache) / f"{digest(url, 16)}-{name}"
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(url, timeout=120) as response, atomic_file(path, binary=True) as handle:
            while chunk := response.read(1 << 20):
                handle.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise WeightsError(f"{url}: download failed ({type(error).__name__}: {error})") from None
    return path


def fetch_timm(model: str, kwargs: dict[str, Any], weights: str, seed: int, cache: Path) -> Path:
    """timm's pretrained ``weights`` (``timm:<tag>``) of ``model`` as a local state dict in ``cache``;
    ``WeightsError`` when timm cannot provide them here or their shapes differ from the untagged model."""
    import torch

    path = Path(cache) / f"timm-{model}-{digest([model, kwargs, weights, seed], 12)}.pth"
    if path.is_file():
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # as the job seeds before building the model
        vit = load_model(model, kwargs, weights)
    state = vit.state_dict()
    atomic_torch_save({"model": state}, path)
    try:
        check_weights(create_model(model, kwargs, meta=True), str(path))
    except WeightsError:
        path.unlink(missing_ok=True)
        raise
    return path


def prefetch_weights(runs: list[Any], results_dir: Path, warn: Callable[[str], None] = print) -> list[Any]:
    """``runs`` with remote weights replaced by local files (see the module's docstring). A URL that cannot
    be fetched raises ``WeightsError``; a timm tag that cannot is left to the jobs, with a warning."""
    cache = weights_cache(results_dir)
    local: dict[Any, str | None] = {}
    checked: set[tuple[str, str]] = set()
    out = []
    for run in runs:
        source = run.weights_path
        if not source or not source.startswith(("http://", "https://", "timm:")):
            out.append(run)
            continue
        if source.startswith("timm:"):
            marker: Any = (run.model, digest(run.model_kwargs), source, run.seed)
            if marker not in local:
                try:
                    local[marker] = str(fetch_timm(run.model, run.model_kwargs, source, run.seed, cache))
                except WeightsError as error:
                    warn(f"warning: {source} for {run.model} not fetched here ({str(error)[:200]}); each job "
                         "will fetch it itself")
                    local[marker] = None
        else:
            marker = source
            if marker not in local:
                local[marker] = str(fetch_url(source, cache))
            fit = (digest([run.model, run.model_kwargs]), source)
            if fit not in checked:  # the config check skips URLs: check the file against the model now
                try:
                    check_weights(create_model(run.model, run.model_kwargs, meta=True), local[marker])
                except WeightsError as error:
                    raise WeightsError(f"{source}: {error}") from None
                checked.add(fit)
        path = local[marker]
        out.append(run if path is None else dataclasses.replace(run, weights_path=path))
    return out
