"""The pipeline's file primitives: the repository root, the one atomic writer and the one canonical hash.

Every file the pipeline writes (records, failure notes, ``jobs.json``, checkpoints, dense-prediction
caches, leaderboard / CSV / plot) goes through ``atomic_file``: readers see the old file or the new one,
never half of one, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """The user-level cache of tokenbench (weights hashes, MAC-budget calibrations): ``$TOKENBENCH_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/tokenbench``, else ``~/.cache/tokenbench``."""
    root = os.environ.get("TOKENBENCH_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenbench"
    return Path(root)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
    """A handle on a temporary file beside ``path`` (same folder, so the rename is atomic); on a clean
    exit it is flushed, fsynced and renamed over ``path``; on any exception it is removed. The file gets
    the usual permissions (0666 less the umask), like one written with ``open``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, content: str | bytes) -> None:
    with atomic_file(path, binary=isinstance(content, bytes)) as handle:
        handle.write(content)


def write_probe(folder: str | os.PathLike, size: int = 1) -> None:
    """Write a file of ``size`` bytes in ``folder`` as every file is written, then remove it: ``OSError`` where the
    folder does not take one (``os.access`` answers yes to root everywhere, /proc and /sys included). The name is
    this call's own: invocations starting together do not write or remove each other's probe."""
    probe = Path(folder) / f".write-probe.{os.getpid()}.{secrets.token_hex(4)}"
    atomic_write(probe, b"\0" * size)
    probe.unlink()


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int = 1) -> None:
    with atomic_file(path) as handle:
        json.dump(value, handle, indent=indent, default=_jsonable)
        handle.write("\n")


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_file``."""
    import torch

    with atomic_file(path, binary=True) as handle:
        torch.save(obj, handle)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def shown(path: Path) -> str:
    """A file as a line names it: relative to the repository where it is in it (``methods/tome.py``), else its path."""
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text on every machine."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any, length: int = 8) -> str:
    """The first ``length`` hex digits of the SHA-1 of ``canonical(value)``."""
    return hashlib.sha1(canonical(value).encode()).hexdigest()[:length]
