"""MAC budgets: find, per (model, method, budget), the least reduction whose MACs do not exceed the target.

A method declares its budget knob (``Method.budget_knob``: ``r`` for ToMe/PPT, ``keep_rate`` for EViT, a
discrete list for DiffRate / ATS / resize, ...). The budget is a fraction of the dense model's MACs
(torchprofile, one image). The search runs on the token counts of a forward pass (the analytic count of
``bench.analytic_macs``: one forward of one image, milliseconds), then the chosen value is checked with
torchprofile; if torchprofile's count exceeds the target (work the analytic count leaves out: similarity
matrices, MCTF's one-step-ahead projections), the search is repeated with the target scaled by that ratio.
Integer knobs are exact, continuous ones on a grid of ``BudgetKnob.tolerance`` (1e-3), discrete ones pick
the choice with the largest MACs within the budget. Methods whose MACs depend on the image
(``data_dependent``) are measured on the run's own weights and ``macs.images`` real images, averaged: the
images its ``macs`` stage averages over (``metrics.macs.data_mean``, what the leaderboard shows for them).

Results are cached (``calibration.json`` in ``bench.pipeline.files.cache_dir()``), keyed by a
hash of everything that determines them, so a rerun or ``--dry-run`` answers at once.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.pipeline import interrupts
from bench.pipeline.budgets import budget_text
from bench.pipeline.files import atomic_write_json, cache_dir, canonical, digest

MAX_CORRECTIONS = 4


@dataclass(frozen=True)
class Calibration:
    """The outcome for one (model, method, budget): ``value`` of ``knob`` reaching ``achieved`` (MACs as a
    fraction of the dense model's, torchprofile) for ``target``; ``value`` None when unreachable."""

    method: str
    knob: str
    target: float
    value: Any
    achieved: float | None
    macs: int | None
    dense_macs: int
    reason: str = ""

    @property
    def reachable(self) -> bool:
        return self.value is not None

    def budget(self) -> dict[str, Any]:
        """What a run's record keeps: ``run.budget``."""
        return {"target": self.target, "achieved": self.achieved, "knob": self.knob, "value": self.value}

    def describe(self, name: str | None = None) -> str:
        """``tome @0.70 -> r=9 (0.694)``, or why not; ``name``: the method as the line names it, by default
        ``method`` (``tome [prop_attn=False]``: the setting of a sweep, ``bench.pipeline.budgets.labeller``)."""
        name = name or self.method
        if not self.reachable:
            return f"{name} @{budget_text(self.target)} -> unreachable: {self.reason}"
        return f"{name} @{budget_text(self.target)} -> {self.knob}={_show(self.value)} ({self.achieved:.3f})"


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def read_json_or_none(path: Path) -> Any:
    """The cache's content; None when it is missing or unreadable (it is then rebuilt)."""
    from bench.pipeline.textio import TextError, read_json

    try:
        return read_json(path)
    except TextError:  # missing or unreadable
        return None


def read_cache() -> dict[str, Any]:
    """The calibration cache: a mapping of keys to ``Calibration`` fields; ``{}`` where it is missing, unreadable or
    of another shape (``[1]``, a string): unusable, so rebuilt (as ``bench.pipeline.fingerprint`` treats its own)."""
    cache = read_json_or_none(cache_path())
    return cache if isinstance(cache, dict) else {}


_FIELDS = ("method", "knob", "target", "value", "achieved", "macs", "dense_macs")  # Calibration's, but reason


def cached_calibration(entry: Any) -> Calibration | None:
    """A cache entry as a ``Calibration``; None where it is not one (another shape, a field missing or of another
    type, an unknown field): that calibration is searched again and the entry replaced."""
    if not isinstance(entry, dict) or not set(_FIELDS) <= set(entry) or not set(entry) <= {*_FIELDS, "reason"}:
        return None
    numbers = ("target", "dense_macs") + tuple(k for k in ("achieved", "macs") if entry[k] is not None)
    if not all(isinstance(entry[k], str) for k in ("method", "knob")) or not isinstance(entry.get("reason", ""), str) \
            or not all(isinstance(entry[k], (int, float)) and not isinstance(entry[k], bool) for k in numbers):
        return None
    return Calibration(**entry)


def imported_modules(text: str) -> list[str]:
    """The names a module's source imports from the ``methods`` package: ``from methods.x import ...``,
    ``import methods.x``, ``from methods import x, y`` (also parenthesised over several lines)."""
    names = re.findall(r"^[ \t]*(?:from|import)[ \t]+methods\.(\w+)", text, re.MULTILINE)
    for parens, plain in re.findall(r"^[ \t]*from[ \t]+methods[ \t]+import[ \t]+(?:\(([^)]*)\)|([^\n#]+))", text,
                                    re.MULTILINE):
        names += [part.split(" as ")[0].strip() for part in (parens or plain).split(",")]
    return [name for name in names if name.isidentifier()]


def code_files(method: str) -> list[Path]:
    """What decides ``method``'s MAC counts: the harness (``bench/*.py``), how a model is made
    (``bench/pipeline/models.py``), the methods package's shared files (``__init__``, ``base``), the method's own
    module and the ``methods`` modules it imports (transitively), and this module; for a method whose MACs depend
    on the image, also what reads, transforms and draws the images (``data.py``, ``samples.py``)."""
    import methods

    root = Path(__file__).resolve().parents[2]
    package = Path(methods.__file__).resolve().parent
    files = {package / "__init__.py", package / "base.py", *method_files(method)}
    pipeline = Path(__file__).resolve().parent
    files |= {*root.joinpath("bench").glob("*.py"), Path(__file__).resolve(), pipeline / "models.py"}
    if methods.registered()[method].data_dependent:
        files |= {pipeline / "data.py", pipeline / "samples.py"}
    return sorted(files)


@functools.cache
def code_version(method: str) -> str:
    """A hash of ``code_files(method)`` and the torch, timm and torchprofile versions (the counter): a cached
    calibration of other code is never used, and an edit to another method (or a new one) keeps it."""
    import importlib.metadata

    import timm

    versions = [torch.__version__, timm.__version__, importlib.metadata.version("torchprofile")]
    return digest(canonical(versions + _contents(code_files(method))))


def method_files(method: str) -> list[Path]:
    """``method``'s own module and the ``methods`` modules it imports, transitively (``ops``; not the package's
    ``__init__`` and ``base``, the harness's side); a method registered from elsewhere: its own file only."""
    import sys

    import methods

    package = Path(methods.__file__).resolve().parent
    shared = {package / "__init__.py", package / "base.py"}
    files: set[Path] = set()
    todo = [Path(sys.modules[methods.registered()[method].__module__].__file__)]
    while todo:
        path = todo.pop().resolve()
        if path in files or path in shared or not path.is_file():
            continue
        files.add(path)
        todo += [package / f"{name}.py" for name in imported_modules(path.read_text())]  # not a module: no such file
    return sorted(files)


def method_code(method: str) -> dict[str, str]:
    """``method_files(method)``, each named as a line shows it (``methods/tome.py``; a file outside the repository
    by its path) with the hash of its bytes, read now (not cached: an edit shows at the next call): a record keeps
    the one of its run's start, and a record reused after one of those files changed at the same ``revision`` is
    named, with the files (``bench.pipeline.status.todo_runs``)."""
    from bench.pipeline.files import shown

    return {shown(path): _hash(path) for path in method_files(method)}


def _hash(path: Path) -> str:
    """The hash of one file's bytes, as every code hash takes it."""
    return digest(path.read_bytes().decode("latin-1"))


def _contents(files: list[Path]) -> list[str]:
    """Each file as ``name:hash of its bytes``: the part of a code hash that one file gives."""
    return [f"{f.name}:{_hash(f)}" for f in files]


def cache_path() -> Path:
    return cache_dir() / "calibration.json"


_MEASURED: dict[str, Any] = {}  # the MAC counts traced in this process, by what decides them


def measured_once(model: torch.nn.Module, identity: Any, count: Callable[[], Any]) -> Any:
    """``count()``, a torchprofile count of ``model`` (a ``bench.apply`` model), traced once in this process per
    ``identity``, method, parameters and device. ``identity``: what else decides the count: ``["one image", [model
    name, model arguments]]`` for the fixed random image of a method whose MACs do not depend on the image (nor on the
    weights), ``["images", [name, arguments], images_identity(...)]`` for a data-dependent mean. A budget's search
    traces the setting it picks, and the dense model; the run's ``macs`` stage in the same process (in process, as
    the quickstart runs) takes those counts instead of tracing again: 0.3-0.5 s a run on the quickstart's model,
    4-8 s for ATS's 16 images."""
    device = next(model.parameters()).device.type
    # the method's class itself too: one registered again under its name (a test, a notebook) is other code
    key = canonical([identity, model.method.name, id(type(model.method)), model.method.params, device])
    if key not in _MEASURED:
        _MEASURED[key] = count()
    return _MEASURED[key]


class Calibrator:
    """Calibrates the methods of one model: ``vit`` with random weights (token counts of fixed-schedule
    methods do not depend on weights); ``data`` loads, for data-dependent methods, the run's own model and
    real images ((N, C, H, W)), identified in the cache key by ``data_id()`` (weights, data section and the images it
    holds, image count, seed), asked only for such methods."""

    def __init__(self, vit: torch.nn.Module, identity: Any,
                 data: Callable[[], tuple[torch.nn.Module, torch.Tensor]] | None = None,
                 data_id: Callable[[], str] | None = None, announce: Callable[[str], None] | None = None) -> None:
        import bench

        self.vit = vit.eval()
        self.identity = identity
        self.data = data
        self._data: tuple[torch.nn.Module, torch.Tensor] | None = None
        self.data_id = data_id
        self.announce = announce  # told of every calibration searched (not read from the cache)
        dense = bench.apply(vit, "baseline")
        self.dense_macs = measured_once(dense, ["one image", identity], lambda: bench.count_macs(dense))
        self._image = bench.count_image(dense)[None]
        self._memo: dict[str, float] = {}  # analytic counts already computed, shared by a method's budgets

    # -- public --------------------------------------------------------------------------------------
    def calibrate(self, method: str, params: dict[str, Any], target: float, name: str | None = None) -> Calibration:
        """``method`` with ``params`` calibrated to ``target``; ``name``: the method as the announcement names it
        (``Calibration.describe``)."""
        import methods

        cls = methods.registered()[method]
        knob = cls.budget_knob
        if knob is None:
            raise ValueError(f"method {method!r} has no budget knob")
        data_id = self.data_id() if cls.data_dependent and self.data_id is not None else None  # read only if needed
        key = digest(canonical([code_version(method), self.identity, data_id, method,
                                {k: v for k, v in params.items() if k != knob.name}, round(target, 6)]))
        cached = cached_calibration(read_cache().get(key))
        if cached is not None:
            return cached
        started = time.perf_counter()
        result = self._search(method, params, target, knob, cls.data_dependent)
        if self.announce and result.reachable:  # a search takes seconds to minutes on a large model: said as each
            # one ends (an unreachable budget is the caller's warning)
            self.announce(f"{result.describe(name)} in {time.perf_counter() - started:.1f} s")
        cache = read_cache()
        cache[key] = asdict(result)
        try:
            atomic_write_json(cache_path(), cache)
        except OSError:
            pass  # an unwritable cache only costs time
        return result

    # -- search --------------------------------------------------------------------------------------
    def _search(self, method: str, params: dict[str, Any], target: float, knob, data_dependent: bool) -> Calibration:
        import bench

        goal = target * self.dense_macs
        try:
            candidates = self._candidates(method, params, knob)
        except ValueError as error:  # e.g. DiffRate: published schedules exist for other models only
            return self._unreachable(method, knob, target, str(error).split(": ", 1)[-1])
        if not candidates:
            return self._unreachable(method, knob, target, "no value of the knob fits this model")
        vit, images = self.vit, self._image
        if data_dependent:
            if self.data is None:
                raise ValueError(f"{method}'s MACs depend on the image: calibrating needs the run's weights and data")
            if self._data is None:
                model, real = self.data()
                self._data = (model.eval(), real)
            vit, images = self._data

        def analytic(value: Any) -> float:
            return self._remember("analytic", method, {**params, knob.name: value}, lambda: _analytic(value))

        def _analytic(value: Any) -> float:
            model = bench.apply(vit, method, **{**params, knob.name: value})
            counts = []
            with torch.no_grad():
                for image in images:
                    model(image[None])
                    info = model.last_forward
                    counts.append(bench.analytic_macs(model, info))
            return sum(counts) / len(counts)

        def measured(value: Any) -> int:  # traced once in this process: the run's macs stage takes it (measured_once)
            interrupts.check()
            model = bench.apply(vit, method, **{**params, knob.name: value})
            if data_dependent:
                return round(measured_once(model, ["images", self.identity, self.data_id()],
                                           lambda: bench.data_macs(model, list(images))))
            return measured_once(model, ["one image", self.identity], lambda: bench.count_macs(model))

        if knob.kind == "choice":  # from the most to the least expensive, as measured here
            candidates = sorted(candidates, key=lambda value: -analytic(value))
        costs: dict[int, float] = {}

        def cost(index: int) -> float:
            if index not in costs:
                costs[index] = analytic(candidates[index])
            return costs[index]

        scale = 1.0
        for _ in range(MAX_CORRECTIONS):
            index = _least_reduction(cost, len(candidates), goal * scale)
            if index is None:
                cheapest = min(range(len(candidates)), key=cost)
                fraction = measured(candidates[cheapest]) / self.dense_macs
                return self._unreachable(method, knob, target, f"the cheapest {knob.name}={_show(candidates[cheapest])} "
                                                               f"costs {fraction:.3f} of the dense MACs")
            macs = measured(candidates[index])
            if macs <= goal:
                return Calibration(method, knob.name, target, candidates[index], macs / self.dense_macs, macs,
                                   self.dense_macs)
            scale *= cost(index) / macs  # the analytic count left something out: aim lower by that ratio
        return self._unreachable(method, knob, target, "the MAC count did not converge below the target")

    def _candidates(self, method: str, params: dict[str, Any], knob) -> list[Any]:
        """The knob's values ordered from the least to the most reduction."""
        import bench

        context = bench.apply(self.vit, "baseline").context
        if knob.kind == "choice":
            # the choices depend on the model only (a method's budget_choices reads ctx, not its parameters)
            import methods

            cls = methods.registered()[method]
            return list(cls.budget_choices(cls.__new__(cls), context))  # ordered by their cost in _search
        if knob.kind == "int":
            top = context.num_tokens - context.num_prefix - 1
            values = list(range(0, top + 1))
            return values if knob.cheaper == "higher" else values[::-1]
        step = knob.tolerance
        first, last = math.floor(knob.low / step + 1e-9) + 1, math.floor(knob.high / step + 1e-9)
        values = [round(i * step, 10) for i in range(first, last + 1)]
        return values[::-1] if knob.cheaper == "lower" else values

    def _remember(self, kind: str, method: str, params: dict[str, Any], compute: Callable[[], float]) -> float:
        key = canonical([kind, method, params])
        if key not in self._memo:
            interrupts.check()
            self._memo[key] = compute()
        return self._memo[key]

    def _unreachable(self, method: str, knob, target: float, reason: str) -> Calibration:
        return Calibration(method, knob.name, target, None, None, None, self.dense_macs, reason)


def _least_reduction(cost: Callable[[int], float], count: int, goal: float) -> int | None:
    """The first index (candidates run from the least to the most reduction, so costs fall) whose cost is
    within ``goal``; binary search, None when even the last is above it."""
    if cost(count - 1) > goal:
        return None
    low, high = 0, count - 1  # invariant: cost(high) <= goal
    while low < high:
        middle = (low + high) // 2
        if cost(middle) <= goal:
            high = middle
        else:
            low = middle + 1
    return high
