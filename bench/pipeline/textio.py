"""The one decoding path for every file the pipeline reads (records, experiment files, cluster profiles,
failure notes, ``jobs.json``, run claims, the weights-hash cache).

``read_text`` decodes UTF-8 (a byte-order mark is dropped) and turns undecodable bytes into ``TextError``
naming the file, the byte and its offset; ``read_json`` adds the JSON parse. Callers decide what such a
file means: a record is set aside (``set_aside``) and its run redone, an experiment file or a profile is
one line and exit 2, a failure note or a cache entry is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class TextError(ValueError):
    """A file that cannot be read, is not UTF-8 text or not the JSON it should be (message names the file).
    ``missing``: the file does not exist."""

    def __init__(self, path: str | os.PathLike, problem: str, missing: bool = False) -> None:
        self.path, self.problem, self.missing = str(path), problem, missing
        super().__init__(f"{path}: {problem}")


def read_text(path: str | os.PathLike) -> str:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TextError(path, f"cannot read ({error.strerror or error})",
                        missing=isinstance(error, FileNotFoundError)) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise TextError(path, f"not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})") from None


def read_json(path: str | os.PathLike) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TextError(path, f"cut off or malformed JSON (line {error.lineno}, column {error.colno})") from None


def set_aside(path: str | os.PathLike, why: str = "torn") -> Path:
    """Rename ``path`` to ``<name>.<why>.<n>`` (``torn``: unreadable; ``stale``: computed on other data) with the
    first unused ``n`` (an earlier copy is never overwritten: ``os.link`` refuses an existing name) and return the
    new path."""
    path = Path(path)
    for n in range(1, 100000):
        target = path.with_name(f"{path.name}.{why}.{n}")
        try:
            os.link(path, target)
        except FileExistsError:
            continue
        path.unlink()
        return target
    raise OSError(f"{path}: too many {why} copies beside it")
