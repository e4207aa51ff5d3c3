"""What every method shares: the registry decorator, parameter validation and the token state.

A method is a small object with two questions answered per layer:

* ``signals(layer, ctx)``: which signals of that layer's attention it needs (empty: no reduction here);
* ``reduce(layer, tokens, signals, ctx)``: the reduced :class:`TokenState` and that layer's statistics.

It holds only its configuration: everything that changes during a forward pass lives in the harness's
forward (``bench.vit``), so a model can be entered twice and batches cannot leak into each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

# Signals a method may ask for (computed by bench.attention from the block's own attention).
METRIC = "metric"  # keys averaged over heads, (B, N, d): ToMe's similarity metric
CLS_ATTN = "cls_attn"  # post-softmax attention of the class token, mean over heads, (B, N)
PPT_SCORE = "ppt_score"  # PPT's importance score of the patch tokens, normalised, (B, N - p)
SIGNALS = frozenset({METRIC, CLS_ATTN, PPT_SCORE})

REQUIRED = object()  # marks a parameter without a default

_REGISTRY: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class ReductionContext:
    """What a method may know about the model it is attached to."""

    depth: int  # number of blocks
    num_prefix: int  # class (+ distillation / register) tokens, never reduced
    num_tokens: int  # tokens entering the first block (prefix + patches)


@dataclass
class TokenState:
    """The tokens between two blocks.

    ``size`` (B, N, 1): how many original patches each token stands for; ``None`` until the first
    reduction (all ones), so the dense path stays exactly timm's. ``source`` (B, N, N0): which input tokens
    each token covers, only when source tracking is on.
    """

    x: torch.Tensor
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None

    def sizes(self) -> torch.Tensor:
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[0], self.x.shape[1], 1)

    def gather(self, index: torch.Tensor) -> TokenState:
        """Keep the tokens ``index`` (B, N') of every image, in that order (pruning)."""
        return TokenState(
            x=_take(self.x, index),
            size=_take(self.sizes(), index),
            source=None if self.source is None else _take(self.source, index),
        )


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method buildable by name. A duplicate name is an immediate error."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method name {name!r} registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered() -> dict[str, type[Method]]:
    return dict(_REGISTRY)


class Method:
    """Base class. Subclasses set ``defaults`` (``REQUIRED`` for mandatory parameters) and may override
    ``validate`` to check values. ``self.params`` holds the validated parameters."""

    name: ClassVar[str] = "?"
    defaults: ClassVar[dict[str, Any]] = {}
    # True when the tokens a layer keeps can depend on the image (MACs are then also averaged over data).
    data_dependent: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(self.defaults) or "none"
            raise ValueError(f"method {self.name!r}: unknown parameter {unknown[0]!r}; allowed: {allowed}")
        merged = {key: params.get(key, default) for key, default in self.defaults.items()}
        missing = [key for key, value in merged.items() if value is REQUIRED]
        if missing:
            raise ValueError(f"method {self.name!r}: missing required parameter {missing[0]!r}")
        self.params: dict[str, Any] = self.validate(merged)

    # -- to override -------------------------------------------------------------------------------
    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        return params

    def check(self, ctx: ReductionContext) -> None:
        """Raise ``ValueError`` when the parameters do not fit this model's structure (e.g. a block index
        beyond its depth). An r larger than a layer allows is not an error here: it is capped, as in the
        reference code."""

    def check_budget(self, ctx: ReductionContext) -> None:
        """Stricter, for experiment files: raise ``ValueError`` when the requested reduction exceeds what
        the model has at all (r >= the number of patch tokens), where capping would hide a typo."""

    @property
    def prop_attn(self) -> bool:
        return bool(self.params.get("prop_attn", False))

    def signals(self, layer: int, ctx: ReductionContext) -> frozenset[str]:
        return frozenset()

    def reduce(
        self, layer: int, tokens: TokenState, signals: dict[str, torch.Tensor], ctx: ReductionContext
    ) -> tuple[TokenState, dict[str, float] | None]:
        return tokens, None

    # -- shared -------------------------------------------------------------------------------------
    def describe(self) -> str:
        """``name(k=v, ...)``, stable across runs: used in run keys and tables."""
        inner = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({inner})" if inner else self.name

    def __repr__(self) -> str:
        return f"<method {self.describe()}>"

    def _error(self, message: str) -> ValueError:
        return ValueError(f"method {self.name!r}: {message}")

    # Validators shared by several methods ---------------------------------------------------------
    def _bool(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self._error(f"parameter {key!r} must be true or false, got {value!r}")
        return value

    def _count(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._error(f"parameter {key!r} must be an integer >= 0, got {value!r}")
        return value

    def _layers(self, value: Any) -> list[int]:
        if not isinstance(value, (list, tuple)) or not value:
            raise self._error(f"parameter 'layers' must be a non-empty list of block indices, got {value!r}")
        layers = [self._count("layers", v) for v in value]
        if len(set(layers)) != len(layers):
            raise self._error(f"parameter 'layers' has a repeated block index: {value!r}")
        return sorted(layers)

    def _check_layers(self, ctx: ReductionContext) -> None:
        too_deep = [layer for layer in self.params["layers"] if layer >= ctx.depth]
        if too_deep:
            raise self._error(
                f"layers {self.params['layers']} include block {too_deep[0]}, but the model has {ctx.depth}"
                f" blocks (allowed: 0..{ctx.depth - 1})"
            )

    def _check_r(self, r: int, ctx: ReductionContext) -> None:
        patches = ctx.num_tokens - ctx.num_prefix
        if r >= patches:
            raise self._error(f"r={r} would remove all {patches} patch tokens of this model (allowed: r < {patches})")


def threshold_value(method: Method, value: Any) -> float:
    """A float >= 0; ``inf`` (YAML ``.inf`` or the string "inf") allowed."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise method._error(f"parameter 'threshold' must be a number >= 0 (or inf), got {value!r}") from None
    if isinstance(value, bool) or math.isnan(threshold) or threshold < 0:
        raise method._error(f"parameter 'threshold' must be a number >= 0 (or inf), got {value!r}")
    return threshold
