"""One typed schema mechanism for the pipeline's YAML inputs (experiment files, cluster profiles).

A section is a frozen dataclass: each field is a key, with its type (the annotation) and its default
(``option(default, ...)``) written once. ``parse(cls, mapping, where)`` checks a YAML mapping against it
and returns an instance; the first problem raises ``SchemaError(key, problem)``, which the caller turns
into its one-line ``<file>: <key>: <problem>; allowed: ...`` message.

Types understood: ``int``, ``float`` (an int is fine), ``bool``, ``str``, ``X | None``, ``list[X]``,
``tuple[X, ...]``, ``dict[str, Any]``, ``Any``, and a nested section (another such dataclass).
Options: ``minimum`` (numbers), ``choices`` (any value), ``nonempty`` (lists), ``expect`` (the words of
the "must be ..." message, for values whose meaning a type name does not say).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")
_MISSING = dataclasses.MISSING
INT64_MAX = 2**63 - 1  # every integer key's ceiling where its field gives none: torch, numpy and islice take int64


class SchemaError(ValueError):
    """``key`` (dotted, with list indices) and what is wrong with its value."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}" if key else problem)


class FileError(ValueError):
    """One bad value in an input file: ``<file>: <key>: <problem>`` (``<file>: <problem>`` for the whole file)."""

    def __init__(self, file: Any, key: str, message: str) -> None:
        self.file, self.key = str(file), key
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")

    @classmethod
    def of(cls, file: Any, error: SchemaError) -> FileError:
        return cls(file, error.key, error.problem)


def option(default: Any = _MISSING, *, minimum: float | None = None, maximum: float | None = None,
           positive: bool = False, choices: tuple | None = None, nonempty: bool = False,
           expect: str | None = None) -> Any:
    """A dataclass field with its default and the checks ``parse`` applies to it (``minimum`` and ``maximum``
    inclusive; ``positive``: above 0)."""
    metadata = {"minimum": minimum, "maximum": maximum, "positive": positive, "choices": choices,
                "nonempty": nonempty, "expect": expect}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_keys(cls: type, mapping: Any, where: str) -> dict[str, Any]:
    """``mapping`` (``None`` -> ``{}``) if it is a mapping whose keys are all fields of ``cls``."""
    allowed = keys(cls)
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise SchemaError(where, f"must be a mapping with keys from: {', '.join(allowed)}")
    for key in mapping:
        if key not in allowed:
            raise SchemaError(join(where, str(key)), f"unknown key; allowed: {', '.join(allowed)}")
    return mapping


def parse(cls: type[T], mapping: Any, where: str = "") -> T:
    """An instance of the section ``cls`` from a YAML mapping (``None``: every default)."""
    mapping = check_keys(cls, mapping, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = join(where, f.name)
        if f.name in mapping:
            values[f.name] = check(mapping[f.name], hints[f.name], key, f.metadata)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise SchemaError(key, "missing")
    return cls(**values)


def check(value: Any, kind: Any, key: str, meta: typing.Mapping[str, Any] | None = None) -> Any:
    """``value`` if it has type ``kind`` and passes the field's checks; lists come back as lists, tuples
    as tuples, sections as instances."""
    meta = meta or {}
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (kind,) = [arg for arg in args if arg is not type(None)]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    choices = meta.get("choices")
    if origin in (list, tuple):
        item = args[0]
        if not isinstance(value, list) or (meta.get("nonempty") and not value):
            raise SchemaError(key, f"must be {meta.get('expect') or describe(kind, meta)}, got {value!r}")
        items = [check(v, item, f"{key}[{i}]", {**meta, "expect": None}) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if choices is not None:
        if value not in choices:
            raise SchemaError(key, f"{value!r} not allowed; allowed: {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(kind):
        return parse(kind, value, key)
    if kind is Any:
        return value
    if not _is(value, origin or kind) or not _in_range(value, meta):
        raise SchemaError(key, f"must be {meta.get('expect') or describe(kind, meta)}, got {value!r}")
    if (origin or kind) is int and meta.get("maximum") is None and abs(value) > INT64_MAX:  # 1e23 overflowed at run time
        raise SchemaError(key, f"must be {meta.get('expect') or describe(kind, meta)} and at most 2**63-1 "
                          f"({INT64_MAX}), got {value!r}")
    return value


def _in_range(value: Any, meta: typing.Mapping[str, Any]) -> bool:
    low, high = meta.get("minimum"), meta.get("maximum")
    return ((low is None or value >= low) and (high is None or value <= high)
            and (not meta.get("positive") or value > 0))


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:  # a finite number: YAML's .inf and .nan are not learning rates or fractions
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def describe(kind: Any, meta: typing.Mapping[str, Any]) -> str:
    """What a value of ``kind`` with the field's checks ``meta`` must be, as messages say it: "an integer >= 1"."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (list, tuple):
        words = f"a{' non-empty' if meta.get('nonempty') else ''} list"
        if args[0] is Any:  # any items: a list is all there is to say ("a list of s" before)
            return words
        first, _, rest = describe(args[0], {**meta, "nonempty": False}).partition(" ")[2].partition(" ")
        return f"{words} of {first}s{' ' + rest if rest else ''}"
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        origin or kind, str(kind))
    if meta.get("positive"):
        name += " > 0"
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and high is not None:
        name += f" in [{low}, {high}]"
    elif low is not None:
        name += f" >= {low}"
    elif high is not None:
        name += f" <= {high}"
    return name
