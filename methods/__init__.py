"""The registry of token-reduction methods.

Each method lives in its own module in this package and registers itself with ``@register("name")``.
``names()`` lists them, ``build(name, **params)`` returns a configured :class:`Method`; an unknown name,
an unknown parameter or an invalid value raises ``ValueError`` naming what was given and what is allowed.

Adding a method = one new file here (a subclass of :class:`Method` decorated with ``@register``): every
module of this package except the shared ``base`` and ``ops`` is imported, which registers it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from methods.base import Method, ReductionContext, TokenState, register, registered

_SHARED = ("base", "ops")  # helpers, not methods

for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    if _module not in _SHARED:
        try:
            importlib.import_module(f"methods.{_module}")
        except Exception as _error:  # a broken or duplicate method file: one line naming it (run_bench: exit 2)
            raise ImportError(f"methods/{_module}.py: {type(_error).__name__}: {_error}") from _error


def names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(registered())


def method_class(name: str) -> type[Method]:
    """The registered class of ``name``; ``ValueError`` naming the allowed names for an unknown one."""
    classes = registered()
    if name not in classes:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(sorted(classes))}")
    return classes[name]


def build(name: str, **params: Any) -> Method:
    """A configured method: ``build("tome", r=13)``. Raises ``ValueError`` for unknown names or parameters."""
    return method_class(name)(**params)


def parameters(name: str) -> dict[str, Any]:
    """The parameters of a method with their defaults (``inspect``-free: read from the class)."""
    return dict(method_class(name).defaults)


__all__ = ["Method", "ReductionContext", "TokenState", "build", "method_class", "names", "parameters", "register"]
