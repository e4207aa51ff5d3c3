"""Weights identified by content: the SHA-256 of a local weights file goes into run keys and the
dense-prediction cache, so a checkpoint changed in place (same path) means new runs and a new cache.

The hash is computed once per file version: a small JSON cache (``$TOKENBENCH_CACHE_DIR``, else
``$XDG_CACHE_HOME/tokenbench``, else ``~/.cache/tokenbench``; ``weights-sha256.json``) maps the resolved
path to its size, modification and status-change times (ns), inode and hash; any change of these recomputes it (a
file rewritten in place keeps its size and may get its mtime back, ``cp -p`` / ``touch -r``, but not its ctime,
which no call sets; one replaced by a rename has another inode). The cache
is written with the one atomic writer; an unreadable cache is ignored (hashes are recomputed).
URLs and ``timm:<tag>`` weights are identified by their string (the run key holds it already).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from bench.pipeline.files import atomic_write_json, cache_dir
from bench.pipeline.textio import TextError, read_json

REMOTE = ("http://", "https://", "timm:")


def cache_file() -> Path:
    return cache_dir() / "weights-sha256.json"


def _read_cache(path: Path) -> dict:
    try:
        cache = read_json(path)
    except TextError:
        return {}
    return cache if isinstance(cache, dict) else {}


def weights_sha256(weights: str | None) -> str | None:
    """The hex SHA-256 of a local weights file; ``None`` for no weights, a URL, a timm tag or a path that
    is not a file (the run then fails on loading it, naming the file)."""
    if not weights or weights.startswith(REMOTE):
        return None
    path = Path(weights).resolve()
    try:
        stat = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    cache_path = cache_file()
    cache = _read_cache(cache_path)
    entry = cache.get(str(path))
    version = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in version.items()) \
            and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    value = sha.hexdigest()
    cache = _read_cache(cache_path)  # re-read: another process may have added entries meanwhile
    cache[str(path)] = {**version, "sha256": value}
    try:
        atomic_write_json(cache_path, cache)
    except OSError:
        pass  # a read-only home: the hash is recomputed next time, nothing else changes
    return value


def check_unchanged(weights_path: str | None, planned: str | None) -> None:
    """Raise ``ValueError`` when a run's weights file no longer has the content it was planned with
    (changed between submission and the job): its key would name other weights than it measured."""
    if planned is None:
        return
    now = weights_sha256(weights_path)
    if now != planned:
        raise ValueError(f"{weights_path}: weights file changed since the run was planned (sha256 {planned[:12]} "
                         f"-> {(now or 'missing')[:12]}); rerun run_bench to plan new runs for it")
