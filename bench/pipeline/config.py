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
      sdpa_backend: auto                   # auto | math | efficient | flash | cudnn | explicit: pin the attention kernel
    stages: [eval, macs, throughput]       # any of: finetune, eval, macs, throughput, tokens
    throughput: {batch_sizes: [32], warmup: 3, runs: 10}   # auto: true (CUDA): double until out of memory;
                                           # cuda_graphs: true (CUDA): time CUDA-graph replays
    compile: false                         # torch.compile both models of the throughput stage
    tokens: {images: 4}                    # token maps of 4 eval images (tokens stage)
    macs: {images: 16}                     # real images for data-averaged MACs
    finetune: {epochs: 30, lr: 1.0e-5, ...}
    grid:                                  # models x methods; a list of such blocks is allowed too
      models: [{name: ..., label: ...}]    # optional; each entry overrides defaults.model (and weights); one
                                           # naming another model takes none of its label, kwargs, transform
      methods:
        - baseline
        - {method: tome, r: 4}
        - {method: ppt, sweep: {r: [4, 8]}, layers: [2, 4, 6]}   # sweep: one run per value (cartesian)
    reference:                             # optional published numbers, matched by model label + method + params
      - {model: deit-s, method: tome, params: {r: 13}, top1: 79.4, gmacs: 2.7, source: "ToMe, table 1"}
    slurm: {profile: local}                # cluster profile for --executor slurm (a .yaml path: relative to this file)

Each section's keys, types and defaults are the frozen dataclasses below (``bench.pipeline.schema``).
An unknown key, unknown method or parameter, a value impossible for the model, a missing data folder or
unreadable weights raise ``ConfigError`` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
import itertools
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bench.pipeline.data import (
    CROP_MODES,
    DATASETS,
    INTERPOLATIONS,
    STREAMED_PREFIXES,
    TIMM_PREFIXES,
    dataset_problem,
)
from bench.pipeline.files import canonical, digest, write_probe
from bench.pipeline.fingerprint import weights_sha256
from bench.pipeline.samples import images_identity
from bench.pipeline.schema import FileError, SchemaError, check, check_keys, describe, option, parse
from bench.pipeline.stages import STAGES
from bench.pipeline.train import FinetuneOptions
from bench.pipeline.yamlload import load_yaml
from bench.sdpa import CPU_BACKENDS, SDPA_BACKENDS
from bench.throughput import DTYPES

DEVICES = ("auto", "cpu", "cuda")
MAX_THREADS = 4096  # torch.set_num_threads takes a C int; no machine has more cores than this
FMNIST_SPLITS = ("test", "train")  # data.split / data.train_split of fashion_mnist: its t10k and train IDX files
WEIGHTS = "null, a path, a URL or timm:<tag>"


class ConfigError(FileError):
    """One bad value in an experiment file: ``<file>: <key>: <what is wrong; what is allowed>``."""


# ------------------------------------------------------------------------------------------ the schema
@dataclass(frozen=True)
class TransformSection:
    """Overrides of the eval transform timm resolves from the model's pretrained config (keys as timm's)."""

    input_size: list[int] | None = option(None, minimum=1, expect="[channels, height, width]")
    interpolation: str | None = option(None, choices=INTERPOLATIONS)
    mean: list[float] | None = option(None, nonempty=True, expect="a list of numbers, one per channel")
    std: list[float] | None = option(None, nonempty=True, positive=True, expect="a list of numbers > 0, one per channel")
    crop_pct: float | None = option(None, positive=True, maximum=1.0, expect="a number in (0, 1] (1: the whole image)")
    crop_mode: str | None = option(None, choices=CROP_MODES)


@dataclass(frozen=True)
class ModelSection:
    """``defaults.model`` and each ``grid.models`` entry (an entry overrides the defaults' keys)."""

    name: str | None = option(None, expect="a timm model name (e.g. deit_small_patch16_224)")
    kwargs: dict[str, Any] | None = option(None, expect="a mapping of timm.create_model keyword arguments")
    label: str | None = None
    weights: str | None = option(None, expect=WEIGHTS)
    transform: TransformSection | None = None  # overrides data.transform for this model


@dataclass(frozen=True)
class DataSection:
    name: str = option(expect=f"one of {', '.join(DATASETS)} or timm's {'<name>, '.join(TIMM_PREFIXES)}<name>")
    root: str | None = option(None, expect="a folder path")
    subset: int | None = option(None, minimum=1)
    split: str | None = None  # eval split: imagenet val/, folder: root itself, timm: validation
    train_split: str = "train"  # for the finetune stage
    class_map: str | None = option(None, expect="a file mapping folder names to class indices (.txt or .json)")
    download: bool = False  # timm datasets: fetch what is missing
    transform: TransformSection | None = None


@dataclass(frozen=True)
class DefaultsSection:
    model: dict[str, Any] | None = None  # keys: ModelSection's
    weights: str | None = option(None, expect=WEIGHTS)
    data: DataSection | None = None
    batch_size: int = option(128, minimum=1)
    dtype: str = option("fp32", choices=tuple(DTYPES))
    device: str = option("auto", choices=DEVICES)
    threads: int | None = option(None, minimum=1, maximum=MAX_THREADS)
    seed: int = option(0, minimum=0)  # at most 2**63-1, as every integer key (schema.INT64_MAX)
    workers: int = option(0, minimum=0)
    sdpa_backend: str = option("auto", choices=SDPA_BACKENDS)  # pin the attention kernel (bench/sdpa.py)


@dataclass(frozen=True)
class ThroughputSection:
    batch_sizes: list[int] = option([32], minimum=1, nonempty=True)
    # at least one untimed round: the method, timed first in every round, would pay the first forward's one-off
    # costs alone (the dense model measured against itself read 0.15x with warmup 0 and one timed round)
    warmup: int = option(3, minimum=1)
    runs: int = option(10, minimum=1)
    auto: bool = False  # CUDA: after the listed sizes, double the batch size until out of memory
    cuda_graphs: bool = False  # CUDA: time replays of CUDA graphs captured from both models (no dispatch cost)


@dataclass(frozen=True)
class TokensSection:
    images: int = option(4, minimum=1)  # eval images (a seeded draw) whose token maps are drawn


@dataclass(frozen=True)
class BudgetsSection:
    """Matched-cost comparisons: each method entry that leaves its budget knob unset runs once per budget,
    with the knob calibrated (bench/pipeline/calibrate.py)."""

    macs: list[float] | None = option(None, nonempty=True, expect="a non-empty list of fractions of the dense "
                                                                  "model's MACs, each in (0, 1]")


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
    name: str = option(expect="a plain file name of letters, digits, '_', '.', '-' (not starting with '.')")
    description: str | None = None
    defaults: DefaultsSection = DefaultsSection()
    stages: tuple[str, ...] = option(("eval", "macs"), choices=STAGES, nonempty=True,
                                     expect=f"a non-empty list of: {', '.join(STAGES)}")
    throughput: ThroughputSection = ThroughputSection()
    macs: MacsSection = MacsSection()
    eval: EvalSection = EvalSection()
    tokens: TokensSection = TokensSection()
    budgets: BudgetsSection = BudgetsSection()
    compile: bool = False  # torch.compile the method's model and the dense baseline for the throughput stage
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
    sdpa_backend: str = "auto"  # auto | math | efficient | flash | cudnn | explicit (bench/sdpa.py)
    weights_sha256: str | None = None  # content of a local weights file (bench/pipeline/fingerprint.py)
    tokens: dict[str, Any] = field(default_factory=lambda: asdict(TokensSection()))  # TokensSection
    compile: bool = False  # torch.compile for the throughput stage
    budget: dict[str, Any] | None = None  # {target, achieved, knob, value} for a run calibrated to a MAC budget
    # an average-pool head: its rule for reduced tokens (bench.vit.ReducedViT.forward_head), part of the key; None:
    # a class-token head. "size-mean": the size-weighted mean over the sizes (until 2026-11-26: over the original
    # patch count, which shrank the mean where tokens were dropped)
    pool_rule: str | None = None

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
    # every budget calibration, reachable or not: [{"model": label, **Calibration fields, "setting": ..., and its model
    # group: "weights", "weights_sha256", "data" as the runs' records give them}]
    calibrations: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True  # False: MAC-budget runs left out (--no-calibrate, or of methods --only does not select)
    methods: tuple[str, ...] = ()  # every method the grid names, in its order (budget runs left out or not)
    # not complete: the methods whose MAC-budget runs are among ``runs`` all the same (--only METHOD: calibrated)
    budget_methods: tuple[str, ...] = ()
    # a calibration's method as its lines name it: the setting of a sweep told apart (``Parser.labeller``)
    budget_label: Callable[[str, str | None], str] = lambda method, setting: method
    # not complete: whether a record is a budget run left out that the config makes (``Parser.left_out_run``)
    left_out_run: Callable[[dict[str, Any], list[dict[str, Any]]], bool] = lambda record, calibrations: False


# --------------------------------------------------------------------------------------------------
def load_experiment(path: str | Path, check_files: bool = True, data_required: bool = True,
                    calibrate: bool = True, only: list[str] | None = None) -> Experiment:
    """Parse, validate and expand an experiment file. ``check_files``: also check that local weights
    exist and fit the model, and that data folders exist (an error when ``data_required``, else a
    warning in ``Experiment.warnings``: ``--dry-run`` validates a cluster config on a laptop).
    ``calibrate``: find the knob of every MAC-budget run (``bench.pipeline.calibrate``); without it those
    runs are left out (a warning counts them): a quick validation of a large experiment. ``only``: run_bench's
    ``--only`` globs; where each is a method's name, the MAC-budget runs of other methods are left out
    uncalibrated (they could not match: a run key holds its method's name and more), so ``--only tome`` on a
    large experiment calibrates ToMe's budgets only. Other globs may match any key: every budget is calibrated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "", "is a folder, not an experiment file" if path.is_dir() else "experiment file not found")
    raw = load_yaml(path, ConfigError)  # one loader: UTF-8 only, duplicate keys and alias bombs refused
    if not isinstance(raw, dict):
        raise ConfigError(path, "", "an experiment file must be a YAML mapping (name, defaults, grid, ...)")
    parser = Parser(path, check_files, data_required)
    parser.calibrate_budgets = calibrate
    if only:
        import methods

        if all(pattern in methods.names() for pattern in only):
            parser.only_methods = set(only)
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
        self._calibrators: dict[str, Any] = {}
        self.calibrations: list[dict[str, Any]] = []
        self.calibrate_budgets = True
        self.uncalibrated = 0
        self.only_methods: set[str] | None = None  # --only: the methods whose budget runs are calibrated
        self.unselected = 0  # budget runs of methods --only leaves out
        self.left_out: list[tuple] = []  # (model base, method, params, shared, where) of each budget entry not calibrated
        # a calibrated setting's name in its progress line and warning (``labeller``; set before calibrating)
        self.budget_label: Callable[[str, str | None], str] = lambda method, setting: method
        self.matched_references: set[int] = set()  # indices of the reference entries some run matched
        self.shadowed_references: dict[int, int] = {}  # entries a run matched that an earlier entry took first

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
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):  # a plain file name: no '.', '..', '/'
            raise self.error("name", f"must be a plain file name of letters, digits, '_', '.', '-' "
                             f"(not starting with '.'), got {name!r}")
        for index, stage in enumerate(section.stages):  # as budgets and batch sizes: a repeat is a slip
            if stage in section.stages[:index]:
                raise self.error(f"stages[{index}]", f"lists {stage} twice ({', '.join(section.stages)}); allowed: "
                                 f"each stage once, of: {', '.join(STAGES)}")
        stages = tuple(stage for stage in STAGES if stage in section.stages)  # run order is fixed
        finetune = None
        subset = section.defaults.data.subset if section.defaults.data else None  # the eval and training images
        if "finetune" in stages:
            finetune = section.finetune.to_dict()
            if finetune["export"] is not None and not finetune["export"].strip():  # '' meant no export, silently
                raise self.error("finetune.export", f"must be null or a file path, got {finetune['export']!r}")
            finetune["export"] = self.resolve(finetune["export"]) if finetune["export"] else None
            if finetune["export"] and self.check_files:
                self.local_check(lambda: self.check_export(finetune["export"]))
            if finetune["min_lr"] > finetune["lr"]:  # the cosine would rise from lr to min_lr
                raise self.error("finetune.min_lr", f"{finetune['min_lr']} is above finetune.lr ({finetune['lr']}): the "
                                 "schedule goes from lr down to min_lr; allowed: at most finetune.lr")
            if finetune["warmup_epochs"] > finetune["epochs"]:
                raise self.error("finetune.warmup_epochs", f"{finetune['warmup_epochs']} is more than the "
                                 f"{finetune['epochs']} epoch{'s' * (finetune['epochs'] != 1)} of training; allowed: at "
                                 "most finetune.epochs")
            if (finetune["mixup"] > 0 or finetune["cutmix"] > 0) and finetune["batch_size"] % 2:
                raise self.error("finetune.batch_size", f"{finetune['batch_size']} is odd; mixup and cutmix (timm's "
                                 "Mixup) pair the images of each process's batch; allowed: an even number (even per "
                                 "process under DDP)")
            data_name = section.defaults.data.name if section.defaults.data else ""
            if data_name.lower().startswith(STREAMED_PREFIXES):  # failed at the run, its message listing every index
                raise self.error("defaults.data.name", f"{data_name!r} is a streamed dataset (read in order, no random "
                                 "access): the finetune stage draws shuffled batches of images by index; allowed with "
                                 f"finetune: {', '.join(DATASETS)}, torch/<name> or hfds/<name>")
            if subset is not None and finetune["batch_size"] > subset:
                raise self.error("finetune.batch_size", f"{finetune['batch_size']} is larger than the training set "
                                 f"(defaults.data.subset: {subset} images): not one full batch per epoch; allowed: "
                                 f"at most {subset}")
        elif "finetune" in raw:  # a recipe that would silently not run (user test 14)
            self.warnings.append(f"warning: {self.path}: finetune: is set but stages has no finetune: the runs are "
                                 "evaluated without fine-tuning (add finetune to stages to train them)")
        if "tokens" in stages and subset is not None and section.tokens.images > subset:  # was cut silently
            raise self.error("tokens.images", f"{section.tokens.images} is more than the eval images "
                             f"(defaults.data.subset: {subset}); allowed: at most {subset}")
        if (section.slurm.profile or "").endswith((".yaml", ".yml")):  # a path: relative to this file, as weights are
            section = replace(section, slurm=replace(section.slurm, profile=self.resolve(section.slurm.profile)))
        self.check_profile(section.slurm.profile)
        self.check_sdpa(section.defaults)
        for flag, what in (("auto", "doubling the batch size until out of memory needs"), ("cuda_graphs", "CUDA graphs need")):
            if getattr(section.throughput, flag) and section.defaults.device == "cpu":
                raise self.error(f"throughput.{flag}", f"{what} CUDA (device: cpu); allowed on CPU: false")
        sizes = section.throughput.batch_sizes
        if len(set(sizes)) != len(sizes):
            raise self.error("throughput.batch_sizes", f"lists a batch size twice ({sizes}); allowed: distinct sizes")
        references = section.reference or []
        budgets = section.budgets.macs or []
        for index, target in enumerate(budgets):
            if not 0 < target <= 1:
                raise self.error(f"budgets.macs[{index}]", f"must be a fraction of the dense MACs in (0, 1], got {target!r}")
            if target in budgets[:index]:
                raise self.error(f"budgets.macs[{index}]", f"lists {target!r} twice ({budgets}); allowed: distinct fractions")
        blocks = section.grid
        if blocks is None:
            raise self.error("grid", "missing; give models x methods to run (grid: {methods: [baseline, ...]})")
        if blocks == []:  # no block: no run, said as "no MAC budget is reachable" at run_bench before
            raise self.error("grid", "must be {models, methods} or a non-empty list of such blocks, got []")
        blocks = blocks if isinstance(blocks, list) else [blocks]
        shared = {"stages": stages, "throughput": asdict(section.throughput), "macs": asdict(section.macs),
                  "eval": asdict(section.eval), "finetune": finetune, "tokens": asdict(section.tokens),
                  "compile": section.compile}
        entries = []  # (model base, method, params, budget target or None, where, origin), in the file's order
        labelled: dict[tuple, tuple[str, str]] = {}  # (label, weights) -> (model, where): the report's groups
        for block_index, block in enumerate(blocks):
            where = f"grid[{block_index}]" if isinstance(section.grid, list) else "grid"  # as the file has it
            block = parse(GridSection, block, where)
            if block.models == []:  # not "no model": it ran defaults.model, as if the key were left out
                raise self.error(f"{where}.models", "must be a non-empty list of model entries, got []; allowed: "
                                 "leave the key out to run defaults.model alone")
            models = block.models or [None]  # None: defaults.model alone (its keys are named as defaults.model.*)
            method_entries = block.methods
            if not method_entries:
                raise self.error(f"{where}.methods", "must be a non-empty list (e.g. [baseline, {method: tome, r: 4}])")
            for model_index, model_entry in enumerate(models):
                model_where = f"{where}.models[{model_index}]" if block.models else None
                base = self.run_base(section.defaults, model_entry, model_where, name)
                self.check_label(base, labelled, model_where or "defaults.model")
                for method_index, entry in enumerate(method_entries):
                    method_where = f"{where}.methods[{method_index}]"
                    entries += [(base, method, params, target, method_where, (model_where, method_where, swept))
                                for method, params, target, swept in self.expand_method(entry, method_where, budgets,
                                                                                        detail=True)]
        # every entry is checked against its model before any budget is calibrated (minutes on a large model):
        # a mistake in the last entry is one line at once, not after the others' calibrations
        checked = set()
        for base, method, params, target, where, _ in entries:
            if target is None:
                self.check_method(self.model_context(base, where), base, method, params, where)
            elif (identity := canonical([id(base), method, params])) not in checked:
                checked.add(identity)
                self.check_uncalibrated(base, method, params, where)
        runs: list[RunSpec] = []
        origins: list[tuple] = []  # where each run comes from: (model entry, grid.methods[1], sweep value, budget)
        calibrated = [entry for entry in entries if entry[3] is not None and self.calibrate_budgets
                      and (self.only_methods is None or entry[1] in self.only_methods)]
        self.budget_label = self.labeller(calibrated)
        for base, method, params, target, method_where, origin in entries:
            budget = None
            if target is not None and not self.calibrate_budgets:
                self.uncalibrated += 1
                self.left_out.append((base, method, params, shared, method_where))
                continue
            if target is not None and self.only_methods is not None and method not in self.only_methods:
                self.unselected += 1
                self.left_out.append((base, method, params, shared, method_where))
                continue
            if target is not None:
                params, budget = self.calibrate(base, method, params, target, shared, method_where)
                if budget is None:
                    continue  # unreachable: said in the warnings, shown as "-" in the report
            runs.append(self.make_run(base, method, params, method_where, shared, references, budget))
            origins.append((*origin, f" at budget {target!r}" if target is not None else ""))
        if budgets and all(entry[3] is None for entry in entries):  # a list that would silently make no run
            self.warnings.append(f"warning: {self.path}: budgets: is set but no grid entry leaves its method's budget "
                                 "knob unset (or every method lacks one): no run is calibrated to it (drop the knob "
                                 "from an entry to run it at each budget)")
        for index, ref in enumerate(references):
            if index not in self.matched_references and index in self.shadowed_references:
                self.warnings.append(f"warning: {self.path}: reference[{index}]: every run it matches takes "
                                     f"reference[{self.shadowed_references[index]}] (the first matching entry wins; "
                                     "list the more specific entry first)")
            elif index not in self.matched_references:
                self.warnings.append(f"warning: {self.path}: reference[{index}]: matches no run (model "
                                     f"{ref.model or 'any'}, method {ref.method}, params {ref.params or {}}); a "
                                     "reference is matched by model label, method and a subset of the parameters")
        if self.uncalibrated:
            self.warnings.append(f"warning: {self.path}: {self.uncalibrated} MAC-budget run(s) left out: not "
                                 "calibrated (--no-calibrate)")
        if finetune and finetune["export"]:
            if len(runs) > 1:
                raise self.error("finetune.export", f"one file for {len(runs)} fine-tuning runs: each would overwrite "
                                 "it; allowed: a path in an experiment of one run, or null (every run keeps its own "
                                 "weights in <results>/checkpoints/<key>/final.pth)")
            for run in runs:
                if run.weights_path and Path(run.weights_path) == Path(finetune["export"]):
                    raise self.error("finetune.export", f"{finetune['export']} is also the weights the run starts from "
                                     f"({run.weights}): every invocation would fine-tune its own result again and "
                                     "overwrite the checkpoint; allowed: another file")
        keys = [run.key for run in runs]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            first, second = describe_origins(*[origins[i] for i, key in enumerate(keys) if key == duplicates[0]][:2])
            raise self.error("grid", f"{first} and {second} make the same run {duplicates[0]} (budgets that "
                             "calibrate to one setting, or an entry listed twice); allowed: each run once")
        return Experiment(name=name, file=self.path, runs=runs, slurm=section.slurm,
                          warnings=list(dict.fromkeys(self.warnings)), calibrations=self.calibrations,
                          complete=not (self.uncalibrated or self.unselected),
                          methods=tuple(dict.fromkeys(entry[1] for entry in entries)),
                          budget_methods=tuple(sorted(self.only_methods)) if self.unselected else (),
                          budget_label=self.budget_label, left_out_run=self.left_out_run)

    def left_out_run(self, record: dict[str, Any], calibrations: list[dict[str, Any]]) -> bool:
        """Whether ``record`` is a run of a MAC-budget entry left out uncalibrated (``--no-calibrate``, ``--only``):
        the run the entry makes at the setting the record was calibrated to (its key), and that setting one of
        ``calibrations`` (the last ones kept), so an edit of the entry's model, data or settings, or a budget an
        earlier config calibrated, leaves it a record of an earlier config."""
        import methods

        run = record.get("run") or {}
        budget = run.get("budget")
        if not isinstance(budget, dict) or not any(
                c.get("method") == run.get("method") and c.get("model") == run.get("model_label")
                and c.get("target") == budget.get("target") and c.get("value") == budget.get("value")
                for c in calibrations):
            return False
        for base, method, params, shared, where in self.left_out:
            if method != run.get("method") or base["model_label"] != run.get("model_label"):
                continue
            try:
                built = methods.build(method, **{**params, budget["knob"]: budget["value"]})
            except (ValueError, TypeError, KeyError):
                continue
            if self.spec(base, method, built.params, where, shared, None, budget).key == record.get("key"):
                return True
        return False

    def check_label(self, base: dict[str, Any], labelled: dict[tuple, tuple[str, str]], where: str) -> None:
        """One model per label (with the same weights): the leaderboard groups and compares runs by label."""
        model = model_signature(base)
        first, first_where = labelled.setdefault((base["model_label"], base["weights"]), (model, where))
        if first != model:
            given = "" if base["model_label"] != base["model"] else " (the model name, as no label: is given)"
            raise self.error(f"{where}.label", f"{base['model_label']!r}{given} already labels {first_where}, a "
                             "different model (name or kwargs); allowed: one model per label (the leaderboard groups "
                             "runs by label): give each model entry its own label:")

    def check_profile(self, profile: str | None) -> None:
        from bench.pipeline.profiles import available_profiles, profile_path

        if profile is not None and not profile_path(profile).is_file():
            raise self.error("slurm.profile", f"no such cluster profile {profile!r}; allowed: "
                             f"{', '.join(available_profiles()) or 'none'} (or a path to a .yaml file)")

    def check_sdpa(self, defaults: DefaultsSection) -> None:
        """A CUDA-only attention kernel with ``device: cpu``. ``auto`` is resolved where the runs run (run_bench.py
        refuses it there before anything runs; ``--executor slurm`` submits from CPU login nodes)."""
        if defaults.device == "cpu" and defaults.sdpa_backend not in CPU_BACKENDS:
            raise self.error("defaults.sdpa_backend", f"{defaults.sdpa_backend!r} needs CUDA (device: cpu); "
                             f"allowed on CPU: {', '.join(CPU_BACKENDS)}")
        if defaults.sdpa_backend == "flash" and defaults.dtype == "fp32" and defaults.device != "cpu":
            # CUDA's flash kernel has no float32 variant: every forward (the dense model's too) would fail there
            problem = ("'flash' has no float32 kernel on CUDA (every forward fails there); allowed with dtype fp32: "
                       "auto, math, efficient, cudnn, explicit, or dtype fp16 / bf16")
            if defaults.device == "cuda":
                raise self.error("defaults.sdpa_backend", problem)
            self.warnings.append(f"warning: {self.path}: defaults.sdpa_backend: {problem} (device: auto runs it on "
                                 "the CPU where there is no CUDA)")

    def run_base(self, defaults: DefaultsSection, model_entry: Any, where: str | None, experiment: str) -> dict[str, Any]:
        """The run fields of one model: ``model_entry`` (a ``grid.models`` entry at ``where``; None: the file has no
        grid.models) over ``defaults.model`` (its ``kwargs`` and ``transform`` key by key over the defaults'). An entry
        naming another model than ``defaults.model.name`` takes none of the defaults' label, kwargs and transform
        (they describe that other model; its label is its own name unless it gives one); its weights follow the
        usual rule. Every problem names the key it came from."""
        model_defaults = check_keys(ModelSection, defaults.model, "defaults.model")
        parse(ModelSection, model_defaults, "defaults.model")  # a bad value there is named there
        if isinstance(model_entry, str):
            model_entry = {"name": model_entry}
        model_entry = check_keys(ModelSection, model_entry, where) if where else {}
        parse(ModelSection, model_entry, where)
        if "name" in model_entry and model_entry["name"] != model_defaults.get("name"):  # another model
            inherited = {k: v for k, v in model_defaults.items() if k not in ("label", "kwargs", "transform")}
        else:
            inherited = model_defaults
        merged = {**inherited, **model_entry}
        for key in ("kwargs", "transform"):  # the same model: its entry's kwargs and transform keys over the defaults'
            if key in model_entry and "name" not in model_entry and isinstance(model_entry[key], dict) and \
                    isinstance(model_defaults.get(key) or {}, dict):
                merged[key] = {**(model_defaults.get(key) or {}), **model_entry[key]}
        model = parse(ModelSection, merged, where or "defaults.model")

        def origin(key: str) -> str:  # the key a value of the model came from
            return f"{where}.{key}" if key in model_entry else f"defaults.model.{key}"

        if model.name is None:
            raise self.error(f"{where}.name" if where else "defaults.model", "missing: a timm model name (e.g. "
                             "deit_small_patch16_224); give defaults.model: {name: ...} or grid.models")
        weights_key = next((key for key, section in ((f"{where}.weights", model_entry),
                                                     ("defaults.model.weights", model_defaults))
                            if "weights" in section), "defaults.weights")
        weights = model.weights if "weights" in merged else defaults.weights
        if weights is not None and not weights.strip():  # '' meant random weights, silently
            raise self.error(weights_key, f"must be {WEIGHTS}, got {weights!r}")
        data = defaults.data or parse(DataSection, None, "defaults.data")
        base = {
            "experiment": experiment,
            "model": model.name,
            "model_kwargs": dict(model.kwargs or {}),
            "model_label": model.label or model.name,
            "weights": weights,
            "weights_path": self.resolve(weights) if weights else None,
            "weights_sha256": weights_sha256(self.resolve(weights)) if weights else None,
            "data": self.data_spec(data),
            "batch_size": defaults.batch_size,
            "dtype": defaults.dtype,
            "device": defaults.device,
            "threads": defaults.threads,
            "seed": defaults.seed,
            "workers": defaults.workers,
            "sdpa_backend": defaults.sdpa_backend,
            "config_file": str(self.path),
        }
        vit = self.model_context(base, where or "defaults.model", weights_key,
                                 keys={"name": origin("name"), "kwargs": origin("kwargs")})
        transform_key = origin("transform") if model.transform else "defaults.data.transform"
        base["data"]["transform"] = self.transform(vit, data, model, transform_key)
        return base

    def local_check(self, check: Callable[[], None]) -> None:
        """A check of this machine's files: its error stops the parse when ``data_required``, else it is a warning
        (``--dry-run`` validates a cluster config on a laptop)."""
        try:
            check()
        except ConfigError as error:
            if self.data_required:
                raise
            self.warnings.append(f"warning: {error} (runs would fail here)")

    def check_export(self, export: str) -> None:
        """``finetune.export`` must be a file the run can write: not a folder, under a folder that exists (or can
        be made) and is writable; said before anything is trained."""
        path = Path(export)
        if path.is_dir():
            raise self.error("finetune.export", f"{export} is a folder; allowed: a file path (e.g. "
                             f"{path / 'weights.pth'})")
        if path.is_symlink() or (path.exists() and not path.is_file()):  # the export would replace it by a file
            what = "a symbolic link" if path.is_symlink() else "not a regular file"
            raise self.error("finetune.export", f"{export} is {what}, which the export would replace by a file; "
                             "allowed: a regular file path (written atomically)")
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            what = "is not a folder" if not ancestor.is_dir() else "is not writable"
            raise self.error("finetune.export", f"{export} cannot be written: {ancestor} {what}; allowed: a file "
                             "path under a writable folder")
        try:  # root passes os.access everywhere: /proc, /sys, a read-only mount failed only after training
            write_probe(ancestor)
        except OSError as error:
            raise self.error("finetune.export", f"{export} cannot be written: {ancestor} takes no file "
                             f"({error.strerror or error}); allowed: a file path under a writable folder") from None

    def data_spec(self, data: DataSection) -> dict[str, Any]:
        problem = dataset_problem(data.name)
        if problem:
            raise self.error("defaults.data.name", problem)
        if data.name == "fashion_mnist":
            data = self.fashion_mnist_keys(data)
        spec = {"name": data.name, "root": self.resolve(data.root) if data.root else None, "subset": data.subset}
        extra = {"split": data.split, "train_split": data.train_split if data.train_split != "train" else None,
                 "class_map": self.resolve(data.class_map) if data.class_map else None,
                 "download": data.download or None}
        return {**spec, **{k: v for k, v in extra.items() if v is not None}}  # unset keys: no change of run keys

    def fashion_mnist_keys(self, data: DataSection) -> DataSection:
        """The data keys Fashion-MNIST honours: ``split`` and ``train_split`` name its IDX files (``test``: t10k, the
        default eval split, written as unset so the run keys stay; ``train``: the 60,000 training images), ``root``.
        ``class_map`` (its ten labels are the files') and ``download: true`` (it is read from root, Debian's package,
        or fetched by torchvision into the cache where root is null) are refused, as anything else would be ignored."""
        allowed = f"{', '.join(FMNIST_SPLITS)} (fashion_mnist's IDX files: test is t10k)"
        if data.split is not None and data.split not in FMNIST_SPLITS:
            raise self.error("defaults.data.split", f"{data.split!r} not allowed for fashion_mnist; allowed: null "
                             f"(test), {allowed}")
        if data.train_split not in FMNIST_SPLITS:
            raise self.error("defaults.data.train_split", f"{data.train_split!r} not allowed for fashion_mnist; "
                             f"allowed: {allowed}")
        if data.class_map is not None:
            raise self.error("defaults.data.class_map", "fashion_mnist has its own ten labels; allowed: null (class_map "
                             "applies to folder, imagenet and timm datasets)")
        if data.download:
            raise self.error("defaults.data.download", "fashion_mnist is read from data.root, else Debian's package, "
                             "else torchvision's one-time download into the cache ($TOKENBENCH_DATA); allowed: false")
        return replace(data, split=None if data.split == "test" else data.split)

    def transform(self, vit: Any, data: DataSection, model: ModelSection, key: str) -> dict[str, Any]:
        """The eval transform, resolved by timm from the (meta) model's pretrained config (``run.data.transform``);
        a problem is reported at ``key`` (the model's transform where it has one, else ``defaults.data.transform``).
        Tensor datasets (fashion_mnist) are adapted with tensor operations: what they cannot do is refused here, as
        the run would refuse it."""
        from bench.pipeline.data import DataError, resolve_transform, tensor_transform_problem

        overrides = [asdict(t) if t else None for t in (data.transform, model.transform)]
        try:
            transform = resolve_transform(vit, data.name, *overrides)
        except DataError as error:
            raise self.error(key, str(error)) from None
        if data.name == "fashion_mnist":
            problem = tensor_transform_problem(transform)
            if problem:
                name, message = problem  # the transform key refused: named where the file sets it
                if not (model.transform and getattr(model.transform, name) is not None) and data.transform \
                        and getattr(data.transform, name) is not None:
                    key = "defaults.data.transform"
                raise self.error(f"{key}.{name}", message)
        return transform

    def model_context(self, base: dict[str, Any], where: str, weights_key: str | None = None,
                      keys: dict[str, str] | None = None):
        """Depth and token count of the model, from a weightless (meta) instance; checks weights files
        (a problem is reported at ``weights_key``, where the weights were given; one of the model's name or kwargs
        at ``keys["name"]`` / ``keys["kwargs"]``, where they were given; else under ``where``)."""
        keys = keys or {"name": f"{where}.name", "kwargs": f"{where}.kwargs"}
        import timm

        signature = model_signature(base)
        if signature not in self._contexts:
            if not timm.is_model(base["model"]):
                close = difflib.get_close_matches(base["model"], timm.list_models(), n=5, cutoff=0.8)
                hint = f"; similar: {', '.join(close)}" if close else ""
                raise self.error(keys["name"], f"unknown timm model {base['model']!r}{hint}")
            weights = base.get("weights_path") or ""
            if "." in base["model"] and weights.startswith("timm:") and weights != "timm:":
                raise self.error(weights_key or f"{where}.weights", f"{weights!r} gives a pretrained tag, and the model "
                                 f"name {base['model']!r} gives one already; allowed: one of them (weights 'timm:' "
                                 f"takes the name's tag)")
            arch, _, tag = timm_name(base).partition(".")  # a tag in the name, else in weights: timm:<tag>
            tags = [name.partition(".")[2] for name in timm.list_models(f"{arch}.*", include_tags=True)]
            if tag and tag not in tags:
                key = keys["name"] if "." in base["model"] else weights_key or f"{where}.weights"
                raise self.error(key, f"{arch} has no timm pretrained tag {tag!r}; allowed: "
                                 f"{', '.join(tags) or 'none (no pretrained config)'}")
            from bench.pipeline.models import create_model

            try:
                vit = create_model(timm_name(base), base["model_kwargs"], meta=True)
            except Exception as error:  # noqa: BLE001 - timm raises many kinds for bad kwargs
                key, expect = mistyped_kwarg(base["model_kwargs"])  # timm's message rarely names it
                raise self.error(f"{keys['kwargs']}.{key}" if key else keys["kwargs"],
                                 f"{expect}timm.create_model({base['model']!r}) failed: {error}") from None
            from bench.vit import VisionTransformer, check_supported

            try:  # here, not at the first method entry applied to it (which a refusal named before)
                check_supported(vit)
            except ValueError as error:  # not a ViT: the name; its depth or attention: the kwargs where given
                key = keys["kwargs"] if base["model_kwargs"] and isinstance(vit, VisionTransformer) else keys["name"]
                raise self.error(key, str(error)) from None
            self._contexts[signature] = vit
        vit = self._contexts[signature]
        if self.check_files and base["weights_path"]:
            marker = (signature, base["weights_path"])
            if marker not in self._checked_weights:
                from bench.pipeline.models import WeightsError, check_weights

                try:
                    check_weights(vit, base["weights_path"])
                except WeightsError as error:
                    raise self.error(weights_key or f"{where}.weights", str(error)) from None
                self._checked_weights.add(marker)
        return vit

    def expand_method(self, entry: Any, where: str, budgets: list[float] = (), detail: bool = False) -> list[tuple]:
        """``(method, params, budget)`` per run of a grid entry: one per sweep value, and, for an entry that
        leaves its method's budget knob unset, one per MAC budget (params then still lack the knob: it is
        calibrated by ``calibrate``). ``detail``: a fourth item names the sweep values of the run
        (``sweep.r[1]``; None without a sweep), for messages about two runs of one entry."""
        import methods

        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict) or "method" not in entry:
            keys = ", ".join(map(str, entry)) if isinstance(entry, dict) else ""
            raise self.error(where, (f"has no method key (its keys: {keys}); " if keys else "") + "must be a method "
                             "name or {method: NAME, param: value, sweep: {param: [values]}}")
        entry = dict(entry)
        name = entry.pop("method")
        if name not in methods.names():
            raise self.error(f"{where}.method", f"unknown method {name!r}; allowed: {', '.join(methods.names())}")
        sweep = entry.pop("sweep", None) or {}
        if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
            raise self.error(f"{where}.sweep", "must map parameter names to non-empty lists of values")
        both = [key for key in sweep if key in entry]
        if both:
            raise self.error(f"{where}.sweep.{both[0]}", f"{both[0]!r} is also given as a fixed value "
                             f"({both[0]}: {entry[both[0]]!r}); give it in one place")
        knob = methods.registered()[name].budget_knob
        budgeted = bool(budgets) and knob is not None and knob.name not in entry and knob.name not in sweep
        expanded = []
        for positions in itertools.product(*(range(len(v)) for v in sweep.values())):
            values = [sweep[key][i] for key, i in zip(sweep, positions, strict=True)]
            swept = ", ".join(f"sweep.{key}[{i}]" for key, i in zip(sweep, positions, strict=True)) or None
            params = {**entry, **dict(zip(sweep, values, strict=True))}
            if budgeted:
                expanded += [(name, params, target, swept) for target in budgets]
                continue
            try:
                method = methods.build(name, **params)
            except ValueError as error:
                raise self.error(where, str(error)) from None
            expanded.append((name, method.params, None, swept))
        return expanded if detail else [run[:3] for run in expanded]

    def calibrate(self, base: dict[str, Any], method: str, params: dict[str, Any], target: float,
                  shared: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The method's parameters with its budget knob calibrated to ``target`` and the run's budget record;
        ``(params, None)`` when the budget is out of reach (a warning says why)."""
        import methods
        from bench.pipeline.budgets import budget_text
        from bench.pipeline.calibrate import Calibrator

        cls = methods.registered()[method]
        signature = canonical([base["model"], base["model_kwargs"], base["weights_path"], base["data"], base["seed"]])
        if signature not in self._calibrators:
            label = base["model_label"]
            self._calibrators[signature] = Calibrator(
                *self._calibration_model(base, shared),
                announce=lambda line: print(f"calibrated on {label}: {line}", flush=True))
        calibrator = self._calibrators[signature]
        setting = self.setting(method, params, cls.budget_knob.name)
        name = self.budget_label(method, setting)  # the setting of a sweep, as --dry-run and the table name it
        try:
            result = calibrator.calibrate(method, params, target, name)
        except (ValueError, OSError) as error:
            if cls.data_dependent and not self.data_required:
                self.warnings.append(f"warning: {self.path}: {where}: {method} @{budget_text(target)}: not calibrated here "
                                     f"({error}); calibrated when the run's data is present")
                return params, None
            raise self.error(where, f"{method} @{budget_text(target)}: calibration failed: {error} ({base['model_label']})") from None
        # the model group it was made for, as its runs' records give it (label, weights and their content, data):
        # the leaderboard's matched-budget table puts its cells in that group only, not in an earlier config's group
        # of the same label (report.py --all)
        self.calibrations.append({"model": base["model_label"], **result.__dict__,
                                  "setting": setting, "weights": base["weights"],
                                  "weights_sha256": base["weights_sha256"], "data": copy.deepcopy(base["data"])})
        if not result.reachable:
            self.warnings.append(f"warning: {self.path}: {where}: {base['model_label']}: {result.describe(name)}")
            return params, None
        try:
            built = methods.build(method, **{**params, result.knob: result.value})
        except ValueError as error:
            raise self.error(where, str(error)) from None
        return built.params, result.budget()

    def labeller(self, entries: list[tuple]) -> Callable[[str, str | None], str]:
        """``bench.pipeline.budgets.labeller`` of the settings of the budget ``entries`` (those calibrated), over every
        model as ``run_bench --dry-run`` labels the experiment's calibrations: a calibration's progress line and
        its unreachable warning name the setting of a sweep (``tome [prop_attn=False] @0.70 -> r=10``), where two
        settings printed the same line."""
        import methods
        from bench.pipeline.budgets import labeller

        settings: dict[str, set] = {}
        for _, method, params, *_ in entries:
            knob = methods.registered()[method].budget_knob.name
            settings.setdefault(method, set()).add(self.setting(method, params, knob))
        return labeller(settings)

    @staticmethod
    def setting(method: str, params: dict[str, Any], knob: str) -> str | None:
        """The setting a calibration belongs to, as its runs' records give it (``bench.pipeline.budgets.setting``
        of the built parameters): the leaderboard's matched-budget table puts a budget out of a setting's reach in
        that setting's row (user test 17). Built with the knob at the least reduction (0, the top of a float range);
        a choice knob, or a value the method refuses: the parameters as written."""
        import methods
        from bench.pipeline.budgets import setting

        spec = methods.registered()[method].budget_knob
        if spec.kind in ("int", "float"):
            with contextlib.suppress(ValueError):
                return setting(methods.build(method, **{**params, knob: 0 if spec.kind == "int" else spec.high}).params,
                               knob)
        return setting(params, knob)

    def check_uncalibrated(self, base: dict[str, Any], method: str, params: dict[str, Any], where: str) -> None:
        """A budget entry's other parameters, validated as a calibrated run's would be before any calibration (and
        under ``--no-calibrate``): with its knob at the least reduction (0, the top of a float range, or the model's
        first choice) and at a value that reduces (1, the middle of a float range), where checks that apply only
        to a reducing method run (EViT, top-k and PPT need a class token). A choice knob without a choice for this
        model (DiffRate off DeiT-T/S/B: calibrating calls each budget unreachable) still has the parameters checked,
        with the knob at its default and not against the model: an unknown or mistyped one was a warning that the
        budget is out of reach."""
        import bench
        import methods
        from methods.base import REQUIRED

        vit = self.model_context(base, where)
        cls = methods.registered()[method]
        knob = cls.budget_knob
        values = [0, 1] if knob.kind == "int" else [knob.high, (knob.low + knob.high) / 2]
        if knob.kind == "choice":
            try:
                values = cls.budget_choices(cls.__new__(cls), bench.apply(vit, "baseline").context)[:1]
            except ValueError:  # no choice for this model: calibrating would call the budget unreachable
                default = cls.defaults[knob.name]
                if default is not REQUIRED:  # resize, whose knob is all it takes, has none
                    try:
                        built = methods.build(method, **{**params, knob.name: default})
                    except ValueError as error:
                        raise self.error(where, f"{error} ({base['model_label']})") from None
                    self.check_knob_acts(built, {**params, knob.name: default}, knob.name, where)
                return
        for value in values:
            self.check_method(vit, base, method, {**params, knob.name: value}, where, knob.name)

    def check_knob_acts(self, built: Any, params: dict[str, Any], knob: str, where: str) -> None:
        """The budget knob ``params`` set is what the method ``built`` from them runs with, or one error line: where
        the entry's other parameters replace it (DiffRate's prune_kept_num and merge_kept_num replace target_flops),
        every budget would run the one setting they give, recorded as calibrated to a value it does not use."""
        if built.params.get(knob) == params[knob]:
            return
        defaults = type(built).defaults
        others = [key for key, value in built.params.items() if key != knob and value != defaults.get(key)]
        raise self.error(where, f"method {built.name!r}: budgets.macs sets {knob}, the method's budget knob, but "
                         f"{' and '.join(others) or 'the other parameters'} replace it (every budget would run the "
                         f"same setting); allowed: leave them out to calibrate {knob} per budget, or give {knob} in "
                         f"the entry ({knob}: null beside them) to run the entry as written")

    def check_method(self, vit: Any, base: dict[str, Any], method: str, params: dict[str, Any], where: str,
                     knob: str | None = None) -> None:
        """``method`` with ``params`` fits the model ``vit`` (a meta instance) and its budget, or one error line
        at ``where`` naming the model (and, where the error is about ``knob``, that budgets.macs set it)."""
        import bench

        try:
            reduced = bench.apply(vit, method, **params)
            reduced.method.check_budget(reduced.context)
        except ValueError as error:
            note = f"; budgets.macs sets {knob}, the method's budget knob" if knob and knob in str(error) else ""
            label = f" ({base['model_label']})"
            named = str(error).endswith(label)  # bench.vit's line may name timm's model already
            raise self.error(where, f"{error}{'' if named else label}{note}") from None
        if knob:
            self.check_knob_acts(reduced.method, params, knob, where)

    def _calibration_model(self, base: dict[str, Any], shared: dict[str, Any]):
        """(random-weight model, identity, loader of (the run's model, real images) for data-dependent methods,
        weights identity)."""
        import torch

        from bench.pipeline.models import create_model, load_model

        torch.manual_seed(0)
        vit = create_model(base["model"], base["model_kwargs"])
        identity = [base["model"], base["model_kwargs"]]

        def real() -> tuple[Any, torch.Tensor]:
            from bench.pipeline.data import cached_dataset
            from bench.pipeline.samples import macs_images

            val = cached_dataset(base["data"], "val")
            torch.manual_seed(base["seed"])
            model = load_model(base["model"], base["model_kwargs"], base["weights_path"])
            # the images the run's macs stage averages over (bench/pipeline/stages/macs.py): achieved = data_mean
            return model, torch.stack(macs_images(val, shared["macs"]["images"], base["seed"]))

        weights = base["weights_sha256"] or base["weights_path"]
        return vit, identity, real, lambda: images_identity(weights, base["data"], shared["macs"]["images"],
                                                            base["seed"])

    def make_run(self, base: dict[str, Any], method: str, params: dict[str, Any], where: str, shared: dict[str, Any],
                 references: list[ReferenceSection], budget: dict[str, Any] | None = None) -> RunSpec:
        vit = self.model_context(base, where)
        if budget:  # the calibrated setting (a fixed entry was checked before any calibration)
            self.check_method(vit, base, method, params, where, budget["knob"])
        matching = [i for i, ref in enumerate(references) if ref.method == method
                    and (ref.model or base["model_label"]) == base["model_label"]
                    and (ref.params or {}).items() <= params.items()]
        index = matching[0] if matching else None  # the first matching entry wins
        for later in matching[1:]:
            self.shadowed_references.setdefault(later, index)
        reference = None
        if index is not None:
            self.matched_references.add(index)
            reference = {k: v for k, v in asdict(references[index]).items()
                         if k not in ("model", "method", "params") and v is not None}
        if self.check_files:
            self.local_check(lambda: self.check_data(base["data"], "finetune" in shared["stages"]))
        return self.spec(base, method, params, where, shared, reference, budget)

    def spec(self, base: dict[str, Any], method: str, params: dict[str, Any], where: str, shared: dict[str, Any],
             reference: dict[str, Any] | None, budget: dict[str, Any] | None) -> RunSpec:
        """The run an entry makes, with its key (``make_run`` after its checks; ``left_out_run``)."""
        from bench.vit import pools_by_size

        pool_rule = "size-mean" if pools_by_size(self.model_context(base, where)) else None
        run = RunSpec(**base, method=method, params=copy.deepcopy(params), **copy.deepcopy(shared),
                      reference=reference, budget=budget, pool_rule=pool_rule)
        return RunSpec.from_dict({**run.to_dict(), "key": run_key(run), "params_label": params_label(method, params)})

    def check_image_folder(self, folder: Path) -> None:
        """An existing split folder that holds no image torchvision would read: one line here, not a failure per run."""
        from bench.pipeline.data import folder_problem

        problem = folder_problem(folder)
        if problem:
            raise self.error("defaults.data.root", f"{folder}: {problem}")

    def check_data(self, data: dict[str, Any], needs_train: bool) -> None:
        from bench.pipeline.data import DEBIAN_FMNIST

        root = data["root"]
        if data["name"] == "imagenet":
            if root is None:
                raise self.error("defaults.data.root", "imagenet needs a folder with train/ and val/ (ImageFolder layout)")
            splits = (data.get("split") or "val", data.get("train_split") or "train")
            for split in splits if needs_train else splits[:1]:
                if not (Path(root) / split).is_dir():
                    raise self.error("defaults.data.root", f"{Path(root) / split} does not exist (ImageFolder layout)")
                self.check_image_folder(Path(root) / split)
        elif data["name"] == "folder":
            splits = [data.get("split"), data.get("train_split") or "train"] if needs_train else [data.get("split")]
            for split in splits:
                folder = Path(root) / split if split else Path(root or "")
                if root is None or not folder.is_dir():
                    raise self.error("defaults.data.root", f"{folder if root else 'missing'}: folder needs an "
                                     "existing ImageFolder tree (root, and split for a sub-folder)")
                self.check_image_folder(folder)
        elif data["name"].startswith("torch/") and root is None:
            raise self.error("defaults.data.root", f"{data['name']} needs a folder to read (or, with download: "
                             "true, to download) it")
        elif root is not None and (data["name"] == "fashion_mnist" or not data.get("download")) \
                and not Path(root).is_dir():  # Fashion-MNIST never downloads into a given root: the run needs it
            raise self.error("defaults.data.root", f"{root} {'is not a folder' if Path(root).exists() else 'does not exist'}")
        elif data["name"] == "fashion_mnist" and root is not None:  # a folder without the split's IDX files: every
            # run failed on it, one after the other (exit 1), where the file was accepted
            from bench.pipeline.data import FMNIST_FILES, DataError, _find_idx

            splits = [data.get("split") or "test", data.get("train_split") or "train"][:1 + needs_train]
            for split in dict.fromkeys(splits):
                for stem in ("images-idx3-ubyte", "labels-idx1-ubyte"):
                    try:
                        _find_idx(Path(root), f"{FMNIST_FILES[split]}-{stem}")
                    except DataError as error:
                        raise self.error("defaults.data.root", f"{error}; allowed: a folder holding the {split} split's "
                                         "IDX files, or null (Debian's package, else torchvision's download)") from None
        if data.get("class_map"):
            from bench.pipeline.data import DataError, load_class_map

            try:
                load_class_map(data["class_map"])
            except DataError as error:
                raise self.error("defaults.data.class_map", str(error)) from None
        elif root is None and not DEBIAN_FMNIST.is_dir():
            pass  # torchvision's downloader fetches it at run time where there is network


def describe_origins(first: tuple, second: tuple) -> tuple[str, str]:
    """Two runs' origins ``(model entry or None, method entry, sweep values or None, budget)`` in as few words as
    tell them apart: ``grid.methods[0] and grid.methods[1]``, ``grid.methods[0] sweep.r[0] and ... sweep.r[1]``,
    ``grid.models[0] grid.methods[0] and grid.models[1] grid.methods[0]``."""

    def words(origin: tuple, model: bool, sweep: bool) -> str:
        model_where, method_where, swept, budget = origin
        text = f"{method_where} {swept}" if sweep and swept else method_where
        return (f"{model_where} with {text}" if model and model_where else text) + budget

    for model, sweep in ((False, False), (False, True), (True, True)):
        if words(first, model, sweep) != words(second, model, sweep):
            return words(first, model, sweep), words(second, model, sweep)
    return words(first, True, True), words(second, True, True)


def model_signature(base: dict[str, Any]) -> str:
    """The model a run builds (timm name and kwargs), whatever its label and weights."""
    return canonical([timm_name(base), base["model_kwargs"]])


def mistyped_kwarg(kwargs: dict[str, Any]) -> tuple[str | None, str]:
    """The first model keyword whose value is not of the type timm's ``VisionTransformer`` declares for it (an int,
    a float or a bool) and what it must be: ``("embed_dim", "must be an integer (VisionTransformer's embed_dim), got
    '96'; ")``; ``(None, "")`` when every one fits or is not such an argument. Read only after timm refused them."""
    import inspect

    from timm.models.vision_transformer import VisionTransformer

    kinds = {kind.__name__: kind for kind in (int, float, bool)}  # annotations as classes, or as their names
    parameters = inspect.signature(VisionTransformer.__init__).parameters
    for key, value in (kwargs or {}).items():
        annotation = parameters[key].annotation if key in parameters else None
        kind = kinds.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None))
        if kind is not None:
            try:  # the schema's own type check and words
                check(value, kind, key, {"expect": f"{describe(kind, {})} (VisionTransformer's {key})"})
            except SchemaError as error:
                return key, f"{error.problem}; "
    return None, ""


def timm_name(base: dict[str, Any]) -> str:
    """The model name timm builds: with ``weights: timm:<tag>``, ``<name>.<tag>`` (that tag's pretrained config)."""
    weights = base.get("weights_path") or ""
    tag = weights[len("timm:"):] if weights.startswith("timm:") else ""
    return f"{base['model']}.{tag}" if tag and "." not in base["model"] else base["model"]


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
    """``r=13`` or ``keep_rate=0.7, layers=[1, 3, 5]``: the method's budget knob (even at its default: the setting
    a reader compares first; where it acts: ``Method.knob_acts``), then what differs from the method's defaults."""
    import methods

    shown = _non_default(method, params)
    cls = methods.method_class(method)
    knob = cls.budget_knob
    if knob is not None and knob.name in params and (knob.name in shown or cls.knob_acts(params)):
        shown = {knob.name: params[knob.name], **shown}  # first
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def run_key(run: RunSpec) -> str:
    """Stable across machines: model label, method, compact parameters and a hash of everything that
    changes the result (paths as written, not as resolved), and of the experiment's name (a run belongs to its
    experiment: a renamed one starts afresh, in results/<name>)."""
    identity = {k: v for k, v in run.to_dict().items()
                if k not in ("key", "params_label", "weights_path", "config_file", "reference")}
    identity["data"] = {**run.data, "root": Path(run.data["root"]).name if run.data["root"] else None}
    if run.data.get("class_map"):
        identity["data"]["class_map"] = Path(run.data["class_map"]).name
    for name, section in (("throughput", ThroughputSection), ("macs", MacsSection), ("eval", EvalSection)):
        if name not in run.stages:  # only its stage reads it: as the defaults, so editing it redoes no run (and the
            identity[name] = asdict(section())  # keys of runs that left it at its defaults stay)
    if "throughput" not in run.stages:
        identity["compile"] = False  # the throughput stage's alone
    if identity["sdpa_backend"] == "auto":
        del identity["sdpa_backend"]  # PyTorch's own choice: the keys of runs from before the option stay
    if identity["weights_sha256"] is None:
        del identity["weights_sha256"]  # no local file (none, URL, timm tag: the string identifies them)
    if not identity["compile"]:
        del identity["compile"]  # eager, as before the option: earlier keys stay
    if identity.get("pool_rule") is None:
        identity.pop("pool_rule", None)  # a class-token head: earlier keys stay
    if "tokens" not in run.stages:
        del identity["tokens"]  # only the tokens stage reads it
    for flag in ("auto", "cuda_graphs"):  # off, as before the options: earlier keys stay
        if not identity["throughput"].get(flag):
            identity["throughput"].pop(flag, None)
    if run.finetune:
        identity["finetune"] = {k: v for k, v in run.finetune.items() if k != "export"}
    import methods

    revision = methods.method_class(run.method).revision
    if revision:  # the method redefined since (Method.revision): its earlier records are not reused
        identity["method_revision"] = revision
    compact = "-".join(f"{k}{_short(v)}" for k, v in _non_default(run.method, run.params).items())
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{run.model_label}-{run.method}-{compact}").strip("-")
    return f"{slug[:80]}-{digest(identity)}"


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "_".join(str(v) for v in value)
    return str(value)


def select(runs: list[RunSpec], patterns: list[str] | None) -> list[RunSpec]:
    """Runs whose key or method matches one of the globs ``patterns`` (``--only``, repeatable); all without."""
    if not patterns:
        return runs
    return [run for run in runs
            if any(fnmatch.fnmatch(run.key, pattern) or fnmatch.fnmatch(run.method, pattern) for pattern in patterns)]
