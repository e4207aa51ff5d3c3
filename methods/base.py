"""What every method shares: the registry decorator, parameter validation and the token state.

A method is a small object with two questions answered per block (semantics: ``docs/methods.md``):

* ``step(layer, ctx)``: where block ``layer`` reduces (``START`` before ``norm1``, ``MID`` between the
  attention and the MLP residual, ``END`` after the MLP) and which signals it needs, or ``None``. Methods
  that reduce at ``MID`` only may answer ``signals(layer, ctx)`` instead (non-empty: reduce there);
* ``reduce(layer, tokens, signals, ctx)``: the reduced :class:`TokenState` and that layer's statistics.

It holds only its configuration: everything that changes during a forward pass lives in the harness's
forward (``bench.vit``; ``ctx.scratch`` is a dict created fresh for every forward), so a model can be
entered twice and batches cannot leak into each other. Tensors that follow from the configuration and the
model alone (a fixed index pattern) are ``constants(ctx)``: built once on the CPU, kept as buffers of the
model and moved with it, they reach ``reduce`` as ``ctx.constants`` on the tokens' device, so a forward
never copies from the host (on a GPU a synchronising copy, and one a CUDA graph cannot replay).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

# Signals a method may ask for (computed by bench.attention from the block's own attention).
METRIC = "metric"  # keys averaged over heads, (B, N, d): ToMe's similarity metric
CLS_ATTN = "cls_attn"  # post-softmax attention of the class token, mean over heads, (B, N)
PPT_SCORE = "ppt_score"  # PPT's importance score of the patch tokens, normalised, (B, N - p)
ATTN = "attn"  # the full post-softmax attention (B, H, N, N): explicit, only where asked
PREV_ATTN = "prev_attn"  # at START of block l: the full attention of block l-1 (B, H, N, N)

# Where a block reduces.
START, MID, END = "start", "mid", "end"
POINTS = (START, MID, END)
START_SIGNALS = frozenset({ATTN, METRIC, PREV_ATTN})  # what the harness can give before the attention

class _Required:
    """The marker of a parameter without a default (``methods.parameters`` shows it as ``REQUIRED``)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # marks a parameter without a default

_REGISTRY: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class ReductionContext:
    """What a method may know about the model it is attached to. ``scratch``: per-forward state (a new
    dict in every forward, e.g. a seeded generator); empty outside a forward."""

    depth: int  # number of blocks
    num_prefix: int  # class (+ distillation / register) tokens, never reduced
    num_tokens: int  # tokens entering the first block (prefix + patches)
    img_size: tuple[int, int] = (224, 224)  # the input (H, W) the model was built for
    patch_size: tuple[int, int] = (16, 16)  # input pixels per patch token (H, W)
    grid: tuple[int, int] = (14, 14)  # (rows, cols) of patch tokens: the model's; in a forward, its input's
    embed_dim: int = 0  # the token width C
    resizable: bool = True  # the embedding takes other input sizes (False: a hybrid ViT's CNN backbone, its size only)
    scratch: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # ``Method.constants`` of this model, already on the model's device (buffers of the ``bench.apply`` model)
    constants: dict = field(default_factory=dict, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class Step:
    """Block ``layer`` reduces at ``point`` (START / MID / END) with these ``signals`` of its attention."""

    point: str = MID
    signals: frozenset[str] = frozenset()


@dataclass(frozen=True)
class BudgetKnob:
    """The parameter a calibrator turns to meet a MAC budget.

    ``kind``: ``int`` (r), ``float`` (keep rates, ratios: searched to ``tolerance``) or ``choice`` (a
    discrete list, ``Method.budget_choices``). ``cheaper``: ``higher`` when a larger value costs fewer MACs
    (r), ``lower`` when a smaller one does (keep_rate)."""

    name: str
    kind: str = "float"
    cheaper: str = "lower"
    tolerance: float = 1e-3
    low: float = 0.0  # float knobs: the open lower end of the range (values > low)
    high: float = 1.0  # float knobs: the upper end (inclusive)


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
    # (B, N) bool, True for real tokens: images of one batch may keep different counts (ATS); padded
    # tokens are masked out of every attention (-inf key bias) and ignored by pooling and statistics.
    mask: torch.Tensor | None = None
    # Set by a START reduction that already knows this block's attention on the reduced tokens (MCTF's
    # one-step-ahead): (B, H, N', N') post-softmax, used instead of a new softmax. Consumed by the block.
    attn_probs: torch.Tensor | None = None

    def sizes(self) -> torch.Tensor:
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[0], self.x.shape[1], 1)

    def gather(self, index: torch.Tensor) -> TokenState:
        """Keep the tokens ``index`` (B, N') of every image, in that order (pruning)."""
        rows = Rows(index)
        return TokenState(
            x=take(self.x, rows),
            size=self.x.new_ones(*index.shape, 1) if self.size is None else take(self.size, rows),
            source=None if self.source is None else take(self.source, rows),
            mask=None if self.mask is None else self.mask.gather(1, index),
        )


class Rows:
    """Token indices ``index`` (B, K) of every image, with their row numbers in the (B * N, ...) flattening of
    a (B, N, ...) tensor computed once per N: every ``take``/``add_at`` given the same ``Rows`` reuses them
    (on a GPU each tensor op is a kernel launch, on either device a dispatch)."""

    __slots__ = ("index", "_flat", "_offsets")

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index
        self._flat: dict[int, torch.Tensor] = {}
        self._offsets: dict[int, torch.Tensor] = {}  # count -> image offsets (B, 1), shared by ``sharing``

    def sharing(self, index: torch.Tensor) -> Rows:
        """``Rows(index)`` for the same batch, sharing this one's image offsets: built once for all of a plan's."""
        rows = Rows(index)
        rows._offsets = self._offsets
        return rows

    def flat(self, count: int) -> torch.Tensor:
        """Row numbers (B * K,) of ``index`` in the flattening of a (B, ``count``, ...) tensor."""
        flat = self._flat.get(count)
        if flat is None:
            offsets = self._offsets.get(count)
            if offsets is None:
                # one stepped arange (an arange times count was two operations: eager, each one between the
                # blocks costs far more than on its own, see docs/benchmark.md)
                offsets = self._offsets[count] = torch.arange(0, self.index.shape[0] * count, count,
                                                              device=self.index.device)[:, None]
            flat = self._flat[count] = (self.index + offsets).reshape(-1)
        return flat


def take(t: torch.Tensor, index: torch.Tensor | Rows) -> torch.Tensor:
    """``t[b, index[b]]`` for every image: rows ``index`` (B, K) of ``t`` (B, N, ...) -> (B, K, ...). The
    values of ``t.gather(1, index expanded)``, by one ``index_select`` over the flattened batch: whole rows
    are copied (an expanded gather indexes every element; ~10x slower on CPU at B=64, N=50, C=96)."""
    rows = index if isinstance(index, Rows) else Rows(index)
    batch, count = t.shape[:2]
    picked = t.reshape(batch * count, *t.shape[2:]).index_select(0, rows.flat(count))
    return picked.view(batch, rows.index.shape[1], *t.shape[2:])


def add_at(t: torch.Tensor, index: torch.Tensor | Rows, src: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``t`` (B, N, ...) with row ``src[b, k]`` added to row ``index[b, k]`` (B, K), in k order: the values of
    ``t.scatter_add(1, index expanded, src)``, by one ``index_add`` over the flattened batch. ``inplace``: into
    ``t`` itself (contiguous, and a tensor no autograd node needs: a fresh result of ``take`` or ``*``), except
    compiled for the CPU (``_add_rows``, ``_add_few_rows``: a new tensor; callers use the result)."""
    rows = index if isinstance(index, Rows) else Rows(index)
    batch, count = t.shape[:2]
    rest = t.shape[2:]
    if t.device.type == "cpu" and torch.compiler.is_compiling():
        if rows.index.shape[1] >= count:  # a pooling (every token added into fewer rows: MCTF, DPC-KNN): ATen's
            flat = rows.flat(count)
            return _add_rows(t.reshape(batch * count, *rest), flat, src.reshape(-1, *rest)).view(t.shape)
        if rows.index.shape[1] <= FEW_ROWS:  # a merge of a few rows (ToMe's r): selections inductor fuses
            return _add_few_rows(t, rows.index, src)
    flat = rows.flat(count)
    if inplace:
        t.view(batch * count, *rest).index_add_(0, flat, src.reshape(-1, *rest))  # view: never a silent copy
        return t
    return t.reshape(batch * count, *rest).index_add(0, flat, src.reshape(-1, *rest)).view(t.shape)


FEW_ROWS = 16  # add_at compiled for the CPU: up to this many rows added by selections (``_add_few_rows``)


def _add_few_rows(t: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``add_at`` of a few rows (K <= ``FEW_ROWS``) compiled for the CPU: ``t`` plus, for k = 0 .. K-1 in turn,
    ``src[:, k]`` where the row is ``index[:, k]`` and an exact 0 elsewhere (``where``, so a NaN or an infinity
    of ``src`` stays in its own row). Every row receives its sums in k order, as ``index_add``'s: the same values
    bit for bit. Inductor decomposes ``index_add`` into atomic adds, a scatter that ends its loop nest: the
    merge, the residual add and the LayerNorm after a ToMe merge took three passes over the tokens, 0.11-0.23 ms a
    block on the quickstart's model against 0.04-0.10 without the merge. The selections are pointwise and fuse
    with them: compiled forwards, alternating in one process, ToMe r=5 2.9 % faster, r=3 1.3 %, PPT, PiToMe,
    ToFu, MCTF and pooling r=12 0.3-2.1 % (docs/benchmark.md), logits identical."""
    slots = torch.arange(t.shape[1], device=t.device).view(1, -1, *([1] * (t.dim() - 2)))
    for k in range(index.shape[1]):
        hit = index[:, k].view(-1, *([1] * (t.dim() - 1))) == slots
        t = t + torch.where(hit, src[:, k : k + 1], 0.0)
    return t


@torch.library.custom_op("tokenbench::add_rows", mutates_args=())
def _add_rows(t: torch.Tensor, flat: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t.index_add(0, flat, src)`` as one operator that ``torch.compile`` calls as it is: ``add_at`` of a pooling
    on the CPU under compilation. Inductor decomposes ``index_add`` into one atomic add per element, which on the
    CPU took 0.77 ms for DPC-KNN's merge of 64 x 49 rows of 96 into 36 (ATen's kernel: 0.08 ms; ATen's
    ``scatter_add``, inductor's own fallback for scatter sums: 0.2 ms); compiled forwards of the quickstart's model,
    batch 64: MCTF 7 %, DPC-KNN 3 % faster. A few rows added (ToMe's r merged tokens) take ``_add_few_rows``, which
    fuses with its neighbours (PiToMe was 1-2 % slower with this operator). The sums are ATen's, in the same order
    as eager."""
    return t.index_add(0, flat, src)


@_add_rows.register_fake
def _(t: torch.Tensor, flat: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def _add_rows_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
    return grad, None, grad.index_select(0, ctx.flat)


def _add_rows_save(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.flat = inputs[1]


_add_rows.register_autograd(_add_rows_backward, setup_context=_add_rows_save)


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
    # True when the MACs can vary per image (they are then also averaged over real images).
    data_dependent: ClassVar[bool] = False
    # How every block computes its attention: "fused" (scaled_dot_product_attention; explicit only in a
    # block that asks for ATTN), "explicit" (softmax written out in every block) or "policy" (ATS's fp32
    # softmax with its epsilon, in every block).
    attention: ClassVar[str] = "fused"
    # The parameter a MAC budget turns (None: the method has no cost knob, e.g. baseline).
    budget_knob: ClassVar[BudgetKnob | None] = None
    # The method's reference setting on DeiT-S at 224 (beyond its defaults), used by the MAC tests and the
    # benchmark script: one place for "a typical setting of this method".
    paper_params: ClassVar[dict[str, Any]] = {}
    # Raised by one whenever a change of the code changes what the method computes for the same parameters
    # (its section of docs/methods.md says when and why): it enters the run key (when above 0), so records
    # computed before the change are not taken for results of the new definition.
    revision: ClassVar[int] = 0

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

    @classmethod
    def knob_acts(cls, params: dict[str, Any]) -> bool:
        """Whether the budget knob changes what the method does with these (validated) parameters; labels show it
        only then (``static``'s ``keep_rate`` acts only with ``not_contiguous: true``)."""
        return True

    def check_budget(self, ctx: ReductionContext) -> None:
        """Stricter, for experiment files: raise ``ValueError`` when the requested reduction exceeds what
        the model has at all (r >= the number of patch tokens), where capping would hide a typo."""

    @property
    def prop_attn(self) -> bool:
        return bool(self.params.get("prop_attn", False))

    def signals(self, layer: int, ctx: ReductionContext) -> frozenset[str]:
        """MID-only methods: the signals block ``layer`` needs; non-empty means it reduces there."""
        return frozenset()

    def step(self, layer: int, ctx: ReductionContext) -> Step | None:
        """Where block ``layer`` reduces and with which signals; ``None``: it does not."""
        needs = self.signals(layer, ctx)
        return Step(MID, needs) if needs else None

    def constants(self, ctx: ReductionContext) -> dict[str, torch.Tensor]:
        """Tensors fixed by the parameters and the model (``ctx`` as built, not per forward), by name: the
        harness keeps them as buffers of the reduced model (they move with ``.to(device)``) and passes them
        to every forward as ``ctx.constants``."""
        return {}

    def input_size(self, ctx: ReductionContext) -> tuple[int, int] | None:
        """The (H, W) the images are resized to before the patch embedding (``resize``); None: unchanged."""
        return None

    def budget_choices(self, ctx: ReductionContext) -> list[Any]:
        """The values of a ``choice`` budget knob available for this model."""
        return []

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
    """A float >= 0; ``inf`` (YAML ``.inf`` or the string "inf") allowed. Another string is refused, as every
    other number parameter refuses one (a quoted "1e-3" was taken)."""
    refusal = method._error(f"parameter 'threshold' must be a number >= 0 (or inf), got {value!r}")
    if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower().lstrip("+") not in ("inf", "infinity")):
        raise refusal
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise refusal from None
    if math.isnan(threshold) or threshold < 0:
        raise refusal
    return threshold
