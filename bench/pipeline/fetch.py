"""Remote weights fetched once, where the runs are submitted, not in every job.

Compute nodes often have no internet, and a large array would race on one download cache. Before any run
starts (every executor), ``prefetch_weights`` turns each run's remote weights into a local file under
``<results>/cache/weights/`` and gives the run that path (``RunSpec.weights_path``; the run key and
``weights`` as written stay):

* ``http(s)://`` URLs are downloaded once, atomically, to ``<sha1 of the URL>-<file name>``;
* ``timm:<tag>`` weights are loaded through timm's hub download on this host and saved as a state dict
  named by a hash of (model, kwargs, tag, seed), with the run's seed applied first so that a head timm
  re-initialises (other ``num_classes``) is the one the job would have drawn. Where the tagged model
  differs in shape from ``timm.create_model(model, **kwargs)``, the run keeps ``timm:<tag>`` and each job
  resolves it as before (a warning says so). Where timm cannot fetch them here (offline), that is an error
  (``WeightsError``, one line) when the jobs run on this host too (``inprocess``, ``local``); for SLURM jobs
  (``jobs_here=False``) the tag is left to them, with a warning: compute nodes may have their own cache.
  huggingface_hub's warnings (a line per retry of an unreachable hub) are kept off the terminal meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


class NotFetched(WeightsError):
    """timm could not provide the pretrained weights on this host (offline, hub unreachable)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-blank line of ``error``'s message, at most ``limit`` characters."""
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return line if len(line) <= limit else line[:limit - 3] + "..."


@contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub's logger at ERROR while the body runs (its level restored after)."""
    try:
        import huggingface_hub  # noqa: F401 - its import sets the logger's level: first, not inside
    except ImportError:
        yield
        return
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fetch_timm(model: str, kwargs: dict[str, Any], weights: str, seed: int, cache: Path) -> Path:
    """timm's pretrained ``weights`` (``timm:<tag>``) of ``model`` as a local state dict in ``cache``;
    ``NotFetched`` when timm cannot provide them here, ``WeightsError`` when their shapes differ from the
    untagged model."""
    import torch

    path = Path(cache) / f"timm-{model}-{digest([model, kwargs, weights, seed], 12)}.pth"
    if path.is_file():
        return path
    with torch.random.fork_rng(devices=[]), quiet_hub():
        torch.manual_seed(seed)  # as the job seeds before building the model
        try:
            vit = load_model(model, kwargs, weights)
        except WeightsError as error:
            raise NotFetched(str(error)) from None
    state = vit.state_dict()
    atomic_torch_save({"model": state}, path)
    try:
        check_weights(create_model(model, kwargs, meta=True), str(path))
    except WeightsError:
        path.unlink(missing_ok=True)
        raise
    return path


def prefetch_weights(runs: list[Any], results_dir: Path, warn: Callable[[str], None] = print,
                     jobs_here: bool = False) -> list[Any]:
    """``runs`` with remote weights replaced by local files (see the module's docstring). A URL that cannot
    be fetched raises ``WeightsError``; so does a timm tag where the jobs run on this host (``jobs_here``),
    else it is left to the jobs, with a warning."""
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
                    if jobs_here and isinstance(error, NotFetched):  # the jobs would try the same download here
                        raise WeightsError(f"{first_line(error)}; the runs execute on this host, so they cannot "
                                           "fetch them either") from None
                    warn(f"warning: {source} for {run.model} not fetched here ({first_line(error)}); each job "
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
