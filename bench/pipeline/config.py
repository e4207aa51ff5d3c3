"""Experiment YAML -> validated, frozen run specifications with stable keys.

    name: quickstart                       # results go to results/<name>/ by default
    defaults:                              # every run starts from these
      model: {name: vit_tiny_patch16_224, kwargs: {img_size: 28, ...}, label: fmnist-vit}
      weights: fmnist_vit.pth              # null | path (relative to this file) | https://... | timm:<tag>
      data: {name: fashion_mnist, root: null, subset: null}
      batch_size: 256
      dtype: fp32                          # fp32 | fp16 | bf16 (autocast)
      device: auto                         # auto | cpu | cuda
      threads: null                        # CPU threads (null: torch's default)
      seed: 0
      workers: 0                           # data-loading processes
    stages: [eval, macs, throughput]       # any of: finetune, eval, macs, throughput
    throughput: {batch_sizes: [32], warmup: 3, runs: 10}
    macs: {images: 16}                     # real images for data-averaged MACs
    finetune: {epochs: 30, lr: 1.0e-5, ...}
    grid:                                  # models x methods; a list of such blocks is allowed too
      models: [{name: ..., label: ...}]    # optional; each entry overrides defaults.model (and weights)
      methods:
        - baseline
        - {method: tome, r: 4}
        - {method: ppt, sweep: {r: [4, 8]}, layers: [2, 4, 6]}   # sweep: one run per value (cartesian)
    reference:                             # optional published numbers, matched by model label + method + params
      - {model: deit-s, method: tome, params: {r: 13}, top1: 79.4, gmacs: 2.7, source: "ToMe, table 1"}
    slurm: {profile: local}                # cluster profile for --executor slurm

Each section's keys, types and defaults are the frozen dataclasses below (``bench.pipeline.schema``).
An unknown key, unknown method or parameter, a value impossible for the model, a missing data folder or
unreadable weights raise ``ConfigError`` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bench.pipeline.data import DATASETS
from bench.pipeline.files import canonical, digest
from bench.pipeline.schema import FileError, SchemaError, check_keys, option, parse
from bench.pipeline.stages import STAGES
from bench.pipeline.train import FinetuneOptions
from bench.throughput import DTYPES

DEVICES = ("auto", "cpu", "cuda")
WEIGHTS = "null, a path, a URL or timm:<tag>"


class ConfigError(FileError):
    """One bad value in an experiment file: ``<file>: <key>: <what is wrong; what is allowed>``."""


# ------------------------------------------------------------------------------------------ the schema
@dataclass(frozen=True)
class ModelSection:
    """``defaults.model`` and each ``grid.models`` entry (an entry overrides the defaults' keys)."""

    name: str | None = option(None, expect="a timm model name (e.g. deit_small_patch16_224)")
    kwargs: dict[str, Any] | None = option(None, expect="a mapping of timm.create_model keyword arguments")
    label: str | None = None
    weights: str | None = option(None, expect=WEIGHTS)


@dataclass(frozen=True)
class DataSection:
    name: str = option(choices=tuple(DATASETS))
    root: str | None = option(None, expect="a folder path")
    subset: int | None = option(None, minimum=1)


@dataclass(frozen=True)
class DefaultsSection:
    model: dict[str, Any] | None = None  # keys: ModelSection's
    weights: str | None = option(None, expect=WEIGHTS)
    data: DataSection | None = None
    batch_size: int = option(128, minimum=1)
    dtype: str = option("fp32", choices=tuple(DTYPES))
    device: str = option("auto", choices=DEVICES)
    threads: int | None = option(None, minimum=1)
    seed: int = option(0, minimum=0)
    workers: int = option(0, minimum=0)


@dataclass(frozen=True)
class ThroughputSection:
    batch_sizes: list[int] = option([32], minimum=1, nonempty=True)
    warmup: int = option(3, minimum=0)
    runs: int = option(10, minimum=1)


@dataclass(frozen=True)
class MacsSection:
    images: int = option(16, minimum=1)  # real images for data-averaged MACs


@dataclass(frozen=True)
class EvalSection:
    agreement: bool = True  # top-1 agreement with the dense model's predictions


@dataclass(frozen=True)
class ReferenceSection:
    """Published numbers, matched to runs by model label, method and (a subset of) parameters."""

    method: str
    model: str | None = None
    params: dict[str, Any] | None = option(None, expect="a mapping of method parameters")
    top1: float | None = None
    top5: float | None = None
    gmacs: float | None = None
    source: str | None = None


@dataclass(frozen=True)
class GridSection:
    models: list[Any] | None = None  # str or ModelSection mappings
    methods: list[Any] | None = None  # str or {method: NAME, param: value, sweep: {...}}


@dataclass(frozen=True)
class SlurmSection:
    profile: str | None = option(None, expect="the name of a cluster profile (slurm/<name>.yaml) or a path")


@dataclass(frozen=True)
class ExperimentSection:
    name: str = option(expect="a name of letters, digits, '_', '.', '-'")
    description: str | None = None
    defaults: DefaultsSection = DefaultsSection()
    stages: tuple[str, ...] = option(("eval", "macs"), choices=STAGES, nonempty=True,
                                     expect=f"a non-empty list of: {', '.join(STAGES)}")
    throughput: ThroughputSection = ThroughputSection()
    macs: MacsSection = MacsSection()
    eval: EvalSection = EvalSection()
    finetune: FinetuneOptions = FinetuneOptions()
    grid: Any = None  # one GridSection mapping or a list of them
    reference: list[ReferenceSection] | None = option(
        None, expect="a list of {model, method, params, top1, top5, gmacs, source}")
    slurm: SlurmSection = SlurmSection()


# ------------------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; travels to the job (small and picklable) and into its record."""

    experiment: str
    model: str
    model_kwargs: dict[str, Any]
    model_label: str
    weights: str | None  # as written in the config
    weights_path: str | None  # resolved: absolute file path, URL or timm:<tag>
    data: dict[str, Any]  # name, root (resolved), subset
    method: str
    params: dict[str, Any]
    batch_size: int
    dtype: str
    device: str
    threads: int | None
    seed: int
    workers: int
    stages: tuple[str, ...]
    throughput: dict[str, Any]  # ThroughputSection as a dict
    macs: dict[str, Any]  # MacsSection
    eval: dict[str, Any]  # EvalSection
    finetune: dict[str, Any] | None  # FinetuneOptions (export resolved); None without the finetune stage
    reference: dict[str, Any] | None
    config_file: str
    key: str = ""
    params_label: str = ""  # the parameters that differ from the method's defaults, for tables

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["stages"] = tuple(values["stages"])
        return cls(**values)


@dataclass
class Experiment:
    name: str
    file: Path
    runs: list[RunSpec]
    slurm: SlurmSection = field(default_factory=SlurmSection)
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
def load_experiment(path: str | Path, check_files: bool = True, data_required: bool = True) -> Experiment:
    """Parse, validate and expand an experiment file. ``check_files``: also check that local weights
    exist and fit the model, and that data folders exist (an error when ``data_required``, else a
    warning in ``Experiment.warnings``: ``--dry-run`` validates a cluster config on a laptop)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "", "experiment file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(path, "", f"malformed YAML ({where}{problem})") from None
    except OSError as error:
        raise ConfigError(path, "", f"cannot read ({error.strerror})") from None
    if not isinstance(raw, dict):
        raise ConfigError(path, "", "an experiment file must be a YAML mapping (name, defaults, grid, ...)")
    parser = Parser(path, check_files, data_required)
    try:
        return parser.experiment(raw)
    except SchemaError as error:
        raise ConfigError.of(path, error) from None


class Parser:
    def __init__(self, path: Path, check_files: bool, data_required: bool = True) -> None:
        self.path, self.check_files, self.data_required = path, check_files, data_required
        self.warnings: list[str] = []
        self.base = path.resolve().parent
        self._contexts: dict[str, Any] = {}
        self._checked_weights: set[tuple[str, str]] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, key, message)

    def resolve(self, value: str) -> str:
        """A local path relative to the config file's folder (``${VAR}`` and ``${VAR:-default}``
        expanded); URLs and timm tags unchanged."""
        if value.startswith(("http://", "https://", "timm:")):
            return value
        candidate = Path(expand_env(value)).expanduser()
        return str(candidate if candidate.is_absolute() else (self.base / candidate).resolve())

    # ----------------------------------------------------------------------------------------------
    def experiment(self, raw: dict[str, Any]) -> Experiment:
        section = parse(ExperimentSection, raw)
        name = section.name
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise self.error("name", f"must be a name of letters, digits, '_', '.', '-', got {name!r}")
        stages = tuple(stage for stage in STAGES if stage in section.stages)  # run order is fixed
        finetune = None
        if "finetune" in stages:
            finetune = section.finetune.to_dict()
            finetune["export"] = self.resolve(finetune["export"]) if finetune["export"] else None
        self.check_profile(section.slurm.profile)
        references = section.reference or []
        blocks = section.grid
        if blocks is None:
            raise self.error("grid", "missing; give models x methods to run (grid: {methods: [baseline, ...]})")
        blocks = blocks if isinstance(blocks, list) else [blocks]
        shared = {"stages": stages, "throughput": asdict(section.throughput), "macs": asdict(section.macs),
                  "eval": asdict(section.eval), "finetune": finetune}
        runs: list[RunSpec] = []
        for block_index, block in enumerate(blocks):
            where = f"grid[{block_index}]" if len(blocks) > 1 else "grid"
            block = parse(GridSection, block, where)
            models = block.models or [{}]
            method_entries = block.methods
            if not method_entries:
                raise self.error(f"{where}.methods", "must be a non-empty list (e.g. [baseline, {method: tome, r: 4}])")
            for model_index, model_entry in enumerate(models):
                base = self.run_base(section.defaults, model_entry, f"{where}.models[{model_index}]", name)
                for method_index, entry in enumerate(method_entries):
                    method_where = f"{where}.methods[{method_index}]"
                    for method, params in self.expand_method(entry, method_where):
                        runs.append(self.make_run(base, method, params, method_where, shared, references))
        keys = [run.key for run in runs]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise self.error("grid", f"the same run appears twice: {duplicates[0]}")
        return Experiment(name=name, file=self.path, runs=runs, slurm=section.slurm,
                          warnings=list(dict.fromkeys(self.warnings)))

    def check_profile(self, profile: str | None) -> None:
        from bench.pipeline.profiles import available_profiles, profile_path

        if profile is not None and not profile_path(profile).is_file():
            raise self.error("slurm.profile", f"no such cluster profile {profile!r}; allowed: "
                             f"{', '.join(available_profiles()) or 'none'} (or a path to a .yaml file)")

    def run_base(self, defaults: DefaultsSection, model_entry: Any, where: str, experiment: str) -> dict[str, Any]:
        model_defaults = check_keys(ModelSection, defaults.model, "defaults.model")
        if isinstance(model_entry, str):
            model_entry = {"name": model_entry}
        model_entry = check_keys(ModelSection, model_entry, where)
        merged = {**model_defaults, **model_entry}
        if "kwargs" in model_entry and "name" not in model_entry and isinstance(model_entry["kwargs"], dict):
            merged["kwargs"] = {**(model_defaults.get("kwargs") or {}), **model_entry["kwargs"]}
        model = parse(ModelSection, merged, where)
        if model.name is None:
            raise self.error(f"{where}.name", "missing: a timm model name (e.g. deit_small_patch16_224)")
        weights = model.weights if "weights" in merged else defaults.weights
        data = defaults.data or parse(DataSection, None, "defaults.data")
        base = {
            "experiment": experiment,
            "model": model.name,
            "model_kwargs": dict(model.kwargs or {}),
            "model_label": model.label or model.name,
            "weights": weights,
            "weights_path": self.resolve(weights) if weights else None,
            "data": {"name": data.name, "root": self.resolve(data.root) if data.root else None, "subset": data.subset},
            "batch_size": defaults.batch_size,
            "dtype": defaults.dtype,
            "device": defaults.device,
            "threads": defaults.threads,
            "seed": defaults.seed,
            "workers": defaults.workers,
            "config_file": str(self.path),
        }
        self.model_context(base, where)
        return base

    def model_context(self, base: dict[str, Any], where: str):
        """Depth and token count of the model, from a weightless (meta) instance; checks weights files."""
        import timm

        signature = canonical([base["model"], base["model_kwargs"]])
        if signature not in self._contexts:
            if not timm.is_model(base["model"]):
                close = timm.list_models(f"*{base['model'][:6]}*")[:5]
                hint = f"; similar: {', '.join(close)}" if close else ""
                raise self.error(f"{where}.name", f"unknown timm model {base['model']!r}{hint}")
            from bench.pipeline.models import create_model

            try:
                vit = create_model(base["model"], base["model_kwargs"], meta=True)
            except Exception as error:  # noqa: BLE001 - timm raises many kinds for bad kwargs
                raise self.error(f"{where}.kwargs", f"timm.create_model({base['model']!r}) failed: {error}") from None
            self._contexts[signature] = vit
        vit = self._contexts[signature]
        if self.check_files and base["weights_path"]:
            marker = (signature, base["weights_path"])
            if marker not in self._checked_weights:
                from bench.pipeline.models import WeightsError, check_weights

                try:
                    check_weights(vit, base["weights_path"])
                except WeightsError as error:
                    raise self.error(f"{where}.weights", str(error)) from None
                self._checked_weights.add(marker)
        return vit

    def expand_method(self, entry: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
        import methods

        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict) or "method" not in entry:
            raise self.error(where, "must be a method name or {method: NAME, param: value, sweep: {param: [values]}}")
        entry = dict(entry)
        name = entry.pop("method")
        if name not in methods.names():
            raise self.error(f"{where}.method", f"unknown method {name!r}; allowed: {', '.join(methods.names())}")
        sweep = entry.pop("sweep", None) or {}
        if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
            raise self.error(f"{where}.sweep", "must map parameter names to non-empty lists of values")
        expanded = []
        for values in itertools.product(*sweep.values()):
            params = {**entry, **dict(zip(sweep, values, strict=True))}
            try:
                method = methods.build(name, **params)
            except ValueError as error:
                raise self.error(where, str(error)) from None
            expanded.append((name, method.params))
        return expanded

    def make_run(self, base: dict[str, Any], method: str, params: dict[str, Any], where: str, shared: dict[str, Any],
                 references: list[ReferenceSection]) -> RunSpec:
        import bench

        vit = self.model_context(base, where)
        try:
            reduced = bench.apply(vit, method, **params)
            reduced.method.check_budget(reduced.context)
        except ValueError as error:
            raise self.error(where, f"{error} ({base['model_label']})") from None
        reference = next(
            (
                {k: v for k, v in asdict(ref).items() if k not in ("model", "method", "params") and v is not None}
                for ref in references
                if ref.method == method
                and (ref.model or base["model_label"]) == base["model_label"]
                and (ref.params or {}).items() <= params.items()
            ),
            None,
        )
        if self.check_files:
            self.check_data(base["data"], "finetune" in shared["stages"], where)
        run = RunSpec(**base, method=method, params=copy.deepcopy(params), **copy.deepcopy(shared),
                      reference=reference)
        return RunSpec.from_dict({**run.to_dict(), "key": run_key(run), "params_label": params_label(method, params)})

    def check_data(self, data: dict[str, Any], needs_train: bool, where: str) -> None:
        try:
            self._check_data(data, needs_train)
        except ConfigError as error:
            if self.data_required:
                raise
            self.warnings.append(f"warning: {error} (runs would fail here)")

    def _check_data(self, data: dict[str, Any], needs_train: bool) -> None:
        from bench.pipeline.data import DEBIAN_FMNIST

        root = data["root"]
        if data["name"] == "imagenet":
            if root is None:
                raise self.error("defaults.data.root", "imagenet needs a folder with train/ and val/ (ImageFolder layout)")
            for split in ("val", "train") if needs_train else ("val",):
                if not (Path(root) / split).is_dir():
                    raise self.error("defaults.data.root", f"{Path(root) / split} does not exist (ImageFolder layout)")
        elif root is not None and not Path(root).is_dir():
            raise self.error("defaults.data.root", f"{root} does not exist")
        elif root is None and not DEBIAN_FMNIST.is_dir():
            pass  # torchvision's downloader fetches it at run time where there is network


def expand_env(text: str) -> str:
    """``${VAR}`` / ``${VAR:-default}`` / ``$VAR`` from the environment."""

    def substitute(match: re.Match) -> str:
        name, default = match.group(1) or match.group(3), match.group(2)
        return os.environ.get(name) or (default if default is not None else match.group(0))

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", substitute, text)


def _non_default(method: str, params: dict[str, Any]) -> dict[str, Any]:
    import methods

    defaults = methods.parameters(method)
    return {k: v for k, v in params.items() if defaults.get(k) != v}


def params_label(method: str, params: dict[str, Any]) -> str:
    """``r=13`` or ``keep_rate=0.8, layers=[1, 3, 5]``: what differs from the method's defaults."""
    return ", ".join(f"{k}={v}" for k, v in _non_default(method, params).items())


def run_key(run: RunSpec) -> str:
    """Stable across machines: model label, method, compact parameters and a hash of everything that
    changes the result (paths as written, not as resolved)."""
    identity = {k: v for k, v in run.to_dict().items()
                if k not in ("key", "params_label", "weights_path", "config_file", "reference")}
    identity["data"] = {**run.data, "root": Path(run.data["root"]).name if run.data["root"] else None}
    if run.finetune:
        identity["finetune"] = {k: v for k, v in run.finetune.items() if k != "export"}
    compact = "-".join(f"{k}{_short(v)}" for k, v in _non_default(run.method, run.params).items())
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{run.model_label}-{run.method}-{compact}").strip("-")
    return f"{slug[:80]}-{digest(identity)}"


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "_".join(str(v) for v in value)
    return str(value)


def select(runs: list[RunSpec], pattern: str | None) -> list[RunSpec]:
    """Runs whose key or method matches the glob ``pattern`` (``--only``)."""
    if not pattern:
        return runs
    return [run for run in runs if fnmatch.fnmatch(run.key, pattern) or fnmatch.fnmatch(run.method, pattern)]
