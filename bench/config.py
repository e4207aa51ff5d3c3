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

An unknown key, unknown method or parameter, a value impossible for the model, a missing data folder or
unreadable weights raise ``ConfigError`` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

STAGES = ("finetune", "eval", "macs", "throughput")
DTYPES = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
TOP_KEYS = ("name", "description", "defaults", "stages", "throughput", "macs", "eval", "finetune", "grid",
            "reference", "slurm")
DEFAULT_KEYS = ("model", "weights", "data", "batch_size", "dtype", "device", "threads", "seed", "workers")
MODEL_KEYS = ("name", "kwargs", "label", "weights")
DATA_KEYS = ("name", "root", "subset")
THROUGHPUT_KEYS = ("batch_sizes", "warmup", "runs")
MACS_KEYS = ("images",)
EVAL_KEYS = ("agreement",)
FINETUNE_KEYS = ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing",
                 "mixup", "cutmix", "clip_grad", "seed", "workers", "export")
REFERENCE_KEYS = ("model", "method", "params", "top1", "top5", "gmacs", "source")
GRID_KEYS = ("models", "methods")
SLURM_KEYS = ("profile",)


class ConfigError(ValueError):
    """One bad value in an experiment file: ``<file>: <key>: <what is wrong; what is allowed>``."""

    def __init__(self, file: str | Path, key: str, message: str) -> None:
        self.file, self.key = str(file), key
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


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
    throughput: dict[str, Any]
    macs: dict[str, Any]
    eval: dict[str, Any]
    finetune: dict[str, Any] | None
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
    slurm: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
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
    return Parser(path, raw, check_files, data_required).experiment()


class Parser:
    def __init__(self, path: Path, raw: dict[str, Any], check_files: bool, data_required: bool = True) -> None:
        self.path, self.raw, self.check_files, self.data_required = path, raw, check_files, data_required
        self.warnings: list[str] = []
        self.base = path.resolve().parent
        self._contexts: dict[str, Any] = {}
        self._checked_weights: set[tuple[str, str]] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, key, message)

    def keys(self, mapping: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
        if mapping is None:
            return {}
        if not isinstance(mapping, dict):
            raise self.error(where, f"must be a mapping with keys from: {', '.join(allowed)}")
        for key in mapping:
            if key not in allowed:
                joined = f"{where}.{key}" if where else str(key)
                raise self.error(joined, f"unknown key; allowed: {', '.join(allowed)}")
        return mapping

    def integer(self, value: Any, where: str, minimum: int = 0, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(where, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def choice(self, value: Any, allowed: tuple[str, ...], where: str) -> str:
        if value not in allowed:
            raise self.error(where, f"{value!r} not allowed; allowed: {', '.join(allowed)}")
        return value

    def resolve(self, value: str) -> str:
        """A local path relative to the config file's folder (``${VAR}`` and ``${VAR:-default}``
        expanded); URLs and timm tags unchanged."""
        if value.startswith(("http://", "https://", "timm:")):
            return value
        candidate = Path(expand_env(value)).expanduser()
        return str(candidate if candidate.is_absolute() else (self.base / candidate).resolve())

    # ----------------------------------------------------------------------------------------------
    def experiment(self) -> Experiment:
        raw = self.keys(self.raw, TOP_KEYS, "")
        name = raw.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise self.error("name", f"must be a name of letters, digits, '_', '.', '-', got {name!r}")
        defaults = self.keys(raw.get("defaults"), DEFAULT_KEYS, "defaults")
        stages = raw.get("stages", ["eval", "macs"])
        if not isinstance(stages, list) or not stages:
            raise self.error("stages", f"must be a non-empty list of: {', '.join(STAGES)}")
        for index, stage in enumerate(stages):
            self.choice(stage, STAGES, f"stages[{index}]")
        stages = tuple(stage for stage in STAGES if stage in stages)  # run order is fixed
        throughput = self.throughput(raw.get("throughput"))
        macs = self.keys(raw.get("macs"), MACS_KEYS, "macs")
        macs = {"images": self.integer(macs.get("images", 16), "macs.images", 1)}
        evaluation = self.keys(raw.get("eval"), EVAL_KEYS, "eval")
        evaluation = {"agreement": bool(evaluation.get("agreement", True))}
        finetune = self.finetune(raw.get("finetune"), "finetune" in stages)
        slurm = self.keys(raw.get("slurm"), SLURM_KEYS, "slurm")
        references = self.references(raw.get("reference"))
        blocks = raw.get("grid")
        if blocks is None:
            raise self.error("grid", "missing; give models x methods to run (grid: {methods: [baseline, ...]})")
        blocks = blocks if isinstance(blocks, list) else [blocks]
        runs: list[RunSpec] = []
        for block_index, block in enumerate(blocks):
            where = f"grid[{block_index}]" if len(blocks) > 1 else "grid"
            block = self.keys(block, GRID_KEYS, where)
            models = block.get("models") or [{}]
            if not isinstance(models, list):
                raise self.error(f"{where}.models", "must be a list of model entries")
            method_entries = block.get("methods")
            if not isinstance(method_entries, list) or not method_entries:
                raise self.error(f"{where}.methods", "must be a non-empty list (e.g. [baseline, {method: tome, r: 4}])")
            for model_index, model_entry in enumerate(models):
                model_where = f"{where}.models[{model_index}]"
                base = self.run_base(defaults, model_entry, model_where, name)
                for method_index, entry in enumerate(method_entries):
                    method_where = f"{where}.methods[{method_index}]"
                    for method, params in self.expand_method(entry, method_where):
                        runs.append(self.make_run(base, method, params, method_where, stages, throughput, macs,
                                                  evaluation, finetune, references))
        keys = [run.key for run in runs]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise self.error("grid", f"the same run appears twice: {duplicates[0]}")
        return Experiment(name=name, file=self.path, runs=runs, slurm=dict(slurm), raw=self.raw,
                          warnings=list(dict.fromkeys(self.warnings)))

    def throughput(self, value: Any) -> dict[str, Any]:
        value = self.keys(value, THROUGHPUT_KEYS, "throughput")
        sizes = value.get("batch_sizes", [32])
        if not isinstance(sizes, list) or not sizes:
            raise self.error("throughput.batch_sizes", f"must be a non-empty list of integers >= 1, got {sizes!r}")
        return {
            "batch_sizes": [self.integer(s, "throughput.batch_sizes", 1) for s in sizes],
            "warmup": self.integer(value.get("warmup", 3), "throughput.warmup", 0),
            "runs": self.integer(value.get("runs", 10), "throughput.runs", 1),
        }

    def finetune(self, value: Any, active: bool) -> dict[str, Any] | None:
        from bench.train import FinetuneOptions

        value = self.keys(value, FINETUNE_KEYS, "finetune")
        if not active:
            return None
        options = {}
        for option in fields(FinetuneOptions):
            if option.name not in value:
                continue
            given = value[option.name]
            if not (given is None and option.name == "clip_grad") and (
                isinstance(given, bool) or not isinstance(given, (int, float)) or given < 0
            ):
                raise self.error(f"finetune.{option.name}", f"must be a number >= 0, got {given!r}")
            options[option.name] = given
        resolved = FinetuneOptions(**options).to_dict()
        for whole in ("epochs", "batch_size", "seed", "workers"):
            self.integer(resolved[whole], f"finetune.{whole}", 1 if whole in ("epochs", "batch_size") else 0)
        export = value.get("export")
        if export is not None and not isinstance(export, str):
            raise self.error("finetune.export", f"must be a file path, got {export!r}")
        resolved["export"] = self.resolve(export) if export else None
        return resolved

    def references(self, value: Any) -> list[dict[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error("reference", "must be a list of {model, method, params, top1, top5, gmacs, source}")
        references = []
        for index, entry in enumerate(value):
            entry = self.keys(entry, REFERENCE_KEYS, f"reference[{index}]")
            if "method" not in entry:
                raise self.error(f"reference[{index}].method", "missing")
            references.append(dict(entry))
        return references

    def run_base(self, defaults: dict, model_entry: Any, where: str, experiment: str) -> dict[str, Any]:
        model_defaults = self.keys(defaults.get("model"), MODEL_KEYS, "defaults.model")
        if isinstance(model_entry, str):
            model_entry = {"name": model_entry}
        model_entry = self.keys(model_entry, MODEL_KEYS, where)
        model = {**model_defaults, **model_entry}
        if "kwargs" in model_entry and "name" not in model_entry:
            model["kwargs"] = {**(model_defaults.get("kwargs") or {}), **model_entry["kwargs"]}
        name = model.get("name")
        if not isinstance(name, str):
            raise self.error(f"{where}.name", "missing: a timm model name (e.g. deit_small_patch16_224)")
        kwargs = model.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise self.error(f"{where}.kwargs", "must be a mapping of timm.create_model keyword arguments")
        weights = model["weights"] if "weights" in model else defaults.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise self.error(f"{where}.weights", f"must be null, a path, a URL or timm:<tag>, got {weights!r}")
        data = self.keys(defaults.get("data"), DATA_KEYS, "defaults.data")
        data_name = data.get("name")
        from bench.data import DATASETS

        self.choice(data_name, DATASETS, "defaults.data.name")
        root = data.get("root")
        subset = self.integer(data.get("subset"), "defaults.data.subset", 1, optional=True)
        base = {
            "experiment": experiment,
            "model": name,
            "model_kwargs": dict(kwargs),
            "model_label": str(model.get("label") or name),
            "weights": weights,
            "weights_path": self.resolve(weights) if weights else None,
            "data": {"name": data_name, "root": self.resolve(root) if root else None, "subset": subset},
            "batch_size": self.integer(defaults.get("batch_size", 128), "defaults.batch_size", 1),
            "dtype": self.choice(defaults.get("dtype", "fp32"), DTYPES, "defaults.dtype"),
            "device": self.choice(defaults.get("device", "auto"), DEVICES, "defaults.device"),
            "threads": self.integer(defaults.get("threads"), "defaults.threads", 1, optional=True),
            "seed": self.integer(defaults.get("seed", 0), "defaults.seed", 0),
            "workers": self.integer(defaults.get("workers", 0), "defaults.workers", 0),
            "config_file": str(self.path),
        }
        self.model_context(base, where)
        return base

    def model_context(self, base: dict[str, Any], where: str):
        """Depth and token count of the model, from a weightless (meta) instance; checks weights files."""
        import timm

        signature = json.dumps([base["model"], base["model_kwargs"]], sort_keys=True, default=str)
        if signature not in self._contexts:
            if not timm.is_model(base["model"]):
                close = timm.list_models(f"*{base['model'][:6]}*")[:5]
                hint = f"; similar: {', '.join(close)}" if close else ""
                raise self.error(f"{where}.name", f"unknown timm model {base['model']!r}{hint}")
            from bench.models import create_model

            try:
                vit = create_model(base["model"], base["model_kwargs"], meta=True)
            except Exception as error:  # noqa: BLE001 - timm raises many kinds for bad kwargs
                raise self.error(f"{where}.kwargs", f"timm.create_model({base['model']!r}) failed: {error}") from None
            self._contexts[signature] = vit
        vit = self._contexts[signature]
        if self.check_files and base["weights_path"]:
            marker = (signature, base["weights_path"])
            if marker not in self._checked_weights:
                from bench.models import WeightsError, check_weights

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

    def make_run(self, base, method, params, where, stages, throughput, macs, evaluation, finetune, references):
        import bench

        vit = self.model_context(base, where)
        try:
            reduced = bench.apply(vit, method, **params)
            reduced.method.check_budget(reduced.context)
        except ValueError as error:
            raise self.error(where, f"{error} ({base['model_label']})") from None
        reference = next(
            (
                {k: v for k, v in ref.items() if k not in ("model", "method", "params")}
                for ref in references
                if ref["method"] == method
                and ref.get("model", base["model_label"]) == base["model_label"]
                and (ref.get("params") or {}).items() <= params.items()
            ),
            None,
        )
        if self.check_files:
            self.check_data(base["data"], "finetune" in stages, where)
        run = RunSpec(**base, method=method, params=copy.deepcopy(params), stages=stages, throughput=throughput,
                      macs=macs, eval=evaluation, finetune=finetune, reference=reference)
        return RunSpec.from_dict({**run.to_dict(), "key": run_key(run), "params_label": params_label(method, params)})

    def check_data(self, data: dict[str, Any], needs_train: bool, where: str) -> None:
        try:
            self._check_data(data, needs_train)
        except ConfigError as error:
            if self.data_required:
                raise
            self.warnings.append(f"warning: {error} (runs would fail here)")

    def _check_data(self, data: dict[str, Any], needs_train: bool) -> None:
        from bench.data import DEBIAN_FMNIST

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


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


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
    digest = hashlib.sha1(_canonical(identity).encode()).hexdigest()[:8]
    compact = "-".join(f"{k}{_short(v)}" for k, v in _non_default(run.method, run.params).items())
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{run.model_label}-{run.method}-{compact}").strip("-")
    return f"{slug[:80]}-{digest}"


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "_".join(str(v) for v in value)
    return str(value)


def select(runs: list[RunSpec], pattern: str | None) -> list[RunSpec]:
    """Runs whose key or method matches the glob ``pattern`` (``--only``)."""
    if not pattern:
        return runs
    return [run for run in runs if fnmatch.fnmatch(run.key, pattern) or fnmatch.fnmatch(run.method, pattern)]
