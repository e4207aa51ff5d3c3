"""Result records: one JSON file per run, written atomically, never edited.

A record (``schema: 1``), as ``build_record`` makes it::

    {
      "schema": 1,
      "key": "fmnist-vit-tome-r4-1a2b3c4d",  # stable: <label>-<method>-<non-default params>-<config hash>
      "experiment": "quickstart",
      "run": {                               # the frozen RunSpec (bench/pipeline/config.py) as a dict
        "experiment": "quickstart", "model": "vit_tiny_patch16_224", "model_kwargs": {...},
        "model_label": "fmnist-vit", "weights": "fmnist_vit.pth" | null | "https://..." | "timm:<tag>",
        "weights_path": "/abs/configs/fmnist_vit.pth", "data": {"name": "fashion_mnist", "root": null,
        "subset": 2000, "transform": {"input_size": [1, 28, 28], "interpolation": "bicubic", "mean": [0.286],
        "std": [0.353], "crop_pct": 1.0, "crop_mode": "center"}},  # + split, train_split, class_map, download
                                             # where set; transform: the eval transform timm resolved
        "method": "tome", "params": {"r": 4, ...}, "batch_size": 128, "dtype": "fp32",
        "device": "cpu", "threads": 2, "seed": 0, "workers": 0, "stages": ["eval", "macs", "throughput"],
        "throughput": {"batch_sizes": [32], "warmup": 3, "runs": 10}, "macs": {"images": 16},
        "eval": {"agreement": true}, "finetune": {...} | null,
        "reference": {"top1": 79.8, "gmacs": 4.6, "source": "DeiT paper"} | null,
        "config_file": "configs/quickstart.yaml", "key": "...", "params_label": "r=4"
      },
      "method_revision": 0,                  # Method.revision of the code that computed it (absent: 0)
      "method_code": {"methods/tome.py": "0a1b2c3d", "methods/ops.py": "..."},  # the method's modules, each
                                             # file's hash (calibrate.method_code; absent: not checked): a reused
                                             # record whose code changed since is named, with the files
      "data_digest": "0a1b2c3d4e5f6a7b",     # the eval images it was computed on (data.dataset_identity; absent:
                                             # not checked): a rerun redoes it when the data folder holds others
      "metrics": {                           # one entry per stage that ran (bench/pipeline/stages/)
        "eval": {"top1": 89.3, "top5": 99.8, "loss": 0.31, "nll": 0.31, "ece": 0.021, "agreement": 97.2,
                 "feature_cos": 0.993, "images": 10000},  # top5 null: a model of 5 classes or fewer
        "macs": {"torchprofile": 12345678, "analytic": 12300000, "data_mean": 12345678.0,
                 "data_dependent": false},     # true (ATS): the leaderboard's GMACs is data_mean
        "throughput": [{"images_per_s": 2100.0, "batch_size": 32, "dtype": "fp32", "device": "cpu",
                        "device_name": "...", "threads": 2, "warmup": 3, "times_s": [...],
                        "runs": 10, "latency_p50_ms": 15.2, "latency_p90_ms": 16.0, "peak_mem_mb": 12.5,
                        "peak_mem_kind": "cpu_rss_growth" | "cuda_max_allocated",
                        "baseline_images_per_s": 1500.0, "baseline_times_s": [...], "baseline_latency_p50_ms": 21.3,
                        "baseline_latency_p90_ms": 22.0, "baseline_peak_mem_mb": 14.1, "speedup": 1.4,
                        "speedup_low": 1.37, "speedup_high": 1.43, "slow_rounds": 0, "baseline_slow_rounds": 0,
                        "compile": false, "compile_s": null,  # slow_rounds: forwards over 3x their median
                        # with compile: "graphs", "graph_breaks", "break_reasons"; with throughput.auto:
                        # "auto": true, and {"batch_size": 2048, "auto": true, "out_of_memory": true} last
                        }],
        "tokens": {"images": 4, "indices": [...], "layers": [1, 3, 5], "patch_tokens": [[42, 35, 28], ...],
                   "png": "tokens/<key>.png", "maps": "tokens/<key>.npz"},
        "finetune": {"history": [...], "epochs_done": 10, "world_size": 1}  # + "resumes": [{"epoch", "step"}]
                                             # after a resumption (the cut epoch's entry: "resumed_at_step")
      },
      "tokens_per_layer": {"in": [50, ...], "attn": [50, ...], "mlp": [50, 42, ...], "out": [50, 42, ...]},
      "method_stats": {"3": {"pooled_fraction": 0.41}},
      "env": {"torch": "...", "timm": "...", "python": "...", "platform": "...", "device": "cpu",
              "device_name": "...", "threads": 2, "git_commit": "...", "hostname": "...",
              "slurm_job_id": null, "slurm_array_task_id": null, "slurm_job": null,  # slurm_job: "4_0" as
              # jobs.json names an array task (slurm_job_id is SLURM's own id of the task, e.g. "5")
              # null on CPU (bench/pipeline/accelerator.py); sdpa_backend: the pin, "auto:flash,..." on GPU
              "cuda_version": "12.4", "cudnn_version": 90100, "driver_version": "550.54.15",
              "tf32": {"matmul": false, "cudnn": true}, "sdpa_backend": "auto:flash,efficient,math,cudnn"},
      "started_at": "2026-11-25T15:00:00+00:00", "finished_at": "...", "wall_s": 12.3
    }

``started_at`` and ``wall_s`` are those of the invocation that wrote the record: a fine-tuning resumed from a
checkpoint counts its earlier invocations in ``metrics.finetune.history[].seconds`` (each epoch's training time,
a resumed epoch's with the part before the cut), not in ``wall_s``.

A file that is not UTF-8, does not parse, lacks the fields above or whose ``run`` / ``metrics`` is not a
mapping is a torn write: ``read_record`` reports it, ``run_bench`` sets it aside (``<key>.json.torn.<n>``)
and redoes that run. A failure note may say ``"state": "interrupted"`` (Ctrl-C) instead of ``"failed"``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.pipeline.files import atomic_write, atomic_write_json
from bench.pipeline.textio import TextError, read_json

SCHEMA = 1
REQUIRED_FIELDS = ("schema", "key", "run", "metrics", "env")


class RecordError(ValueError):
    """A record file is unreadable or incomplete (the message names the file)."""


def build_record(run: dict[str, Any], metrics: dict[str, Any], tokens_per_layer: dict[str, list[int]] | None,
                 method_stats: dict[str, dict[str, float]], env: dict[str, Any], started_at: str,
                 wall_s: float, method_revision: int = 0, data_digest: str | None = None,
                 method_code: dict[str, str] | None = None) -> dict[str, Any]:
    """The record of a finished run (``run``: ``RunSpec.to_dict()``); ``finished_at`` is now."""
    return {
        "schema": SCHEMA,
        "key": run["key"],
        "experiment": run["experiment"],
        "run": run,
        "method_revision": method_revision,
        "method_code": method_code,
        "data_digest": data_digest,
        "metrics": metrics,
        "tokens_per_layer": tokens_per_layer,
        "method_stats": method_stats,
        "env": env,
        "started_at": started_at,
        "finished_at": now(),
        "wall_s": round(wall_s, 3),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    atomic_write_json(path, record)


def read_record(path: Path) -> dict[str, Any]:
    """A record, or ``RecordError`` naming the file when it is cut off, malformed or incomplete."""
    path = Path(path)
    try:
        record = read_json(path)  # the one decoding path: undecodable bytes are a torn record too
    except TextError as error:
        raise RecordError(f"{path}: record {error.problem}") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: record is not a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise RecordError(f"{path}: record lacks field {missing[0]!r}")
    if record["schema"] != SCHEMA:
        raise RecordError(f"{path}: record schema {record['schema']!r}, this version reads {SCHEMA}")
    for name in ("run", "metrics"):
        if not isinstance(record[name], dict):
            raise RecordError(f"{path}: record field {name!r} is not a mapping")
    return record


def record_path(results_dir: Path, key: str) -> Path:
    return Path(results_dir) / "runs" / f"{key}.json"


def read_all(results_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable record under ``results_dir/runs`` (sorted by key) and one message per bad file."""
    records, problems = [], []
    for path in sorted((Path(results_dir) / "runs").glob("*.json")):
        try:
            records.append(read_record(path))
        except RecordError as error:
            problems.append(str(error))
    return records, problems


def method_revision(record: dict[str, Any]) -> int:
    """The revision of its method a record was computed with (``Method.revision``; 0 before the field)."""
    value = record.get("method_revision", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def latest_revisions(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """``(kept, left_out)``: of the records of one run (the same ``run`` apart from its key) computed with
    several revisions of its method, only those of the latest revision are kept; one line per record left
    out. (Revisions differ in the run key, so both records stay on disk.)"""

    def identity(record: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in record["run"].items() if k != "key"}, sort_keys=True, default=str)

    identities, revisions = [identity(r) for r in records], [method_revision(r) for r in records]
    latest: dict[str, int] = {}
    for name, revision in zip(identities, revisions, strict=True):
        latest[name] = max(latest.get(name, 0), revision)
    kept, left_out = [], []
    for record, name, revision in zip(records, identities, revisions, strict=True):
        if revision < latest[name]:
            method = record["run"].get("method")
            left_out.append(f"{record['key']}: {method} revision {revision}, superseded by the record of revision "
                            f"{latest[name]} of the same run (docs/methods.md#{method})")
        else:
            kept.append(record)
    return kept, left_out


def experiment_path(results_dir: Path) -> Path:
    """``experiment.json``: what the experiment's config made of the folder at its latest invocation (the
    config file, its run keys, its MAC-budget calibrations); ``run_bench`` rewrites it every time."""
    return Path(results_dir) / "experiment.json"


EXPERIMENT_SHAPE = ('a JSON object with "config" (a path), "runs" (a list of run keys), "calibrations" (a list), '
                    '"budget_runs" (true or false) and "budget_methods" (a list of method names), as run_bench writes it')


class ExperimentFileError(ValueError):
    """``experiment.json`` is unreadable or not what run_bench writes (the message names the file)."""


def write_experiment(results_dir: Path, name: str, config: Path, keys: list[str], calibrations: list[dict[str, Any]]
                     ) -> None:
    """``keys``: every run the config makes, the budget runs of calibrations it kept without calibrating
    (``--no-calibrate``, ``--only``) included. ``budget_runs`` is written true: an earlier version wrote false where
    its keys left such runs out, and ``current_runs`` still reads that."""
    atomic_write_json(experiment_path(results_dir), {
        "name": name, "config": str(Path(config).resolve()), "written_at": now(), "runs": keys, "calibrations": calibrations,
        "budget_runs": True, "budget_methods": []})


def experiment_bytes(results_dir: Path) -> bytes | None:
    """``experiment.json`` as it is now (None: none, or unreadable), for ``restore_experiment``."""
    try:
        return experiment_path(results_dir).read_bytes()
    except OSError:
        return None


def restore_experiment(results_dir: Path, content: bytes | None) -> None:
    """Put back ``experiment.json`` as ``experiment_bytes`` read it, when the invocation that rewrote it started
    nothing (sbatch refused the submission, weights could not be fetched): the folder describes its runs again."""
    try:
        if content is None:
            experiment_path(results_dir).unlink(missing_ok=True)
        else:
            atomic_write(experiment_path(results_dir), content)
    except OSError:  # the refusal is what the user needs to read; the next invocation rewrites the file anyway
        pass


def read_experiment(results_dir: Path) -> dict[str, Any] | None:
    """``experiment.json``, or None where run_bench wrote none; ``ExperimentFileError`` naming the file and
    what is wrong where it is unreadable or not of run_bench's shape."""
    path = experiment_path(results_dir)
    try:
        value = read_json(path)
    except TextError as error:
        if error.missing:
            return None
        raise ExperimentFileError(f"{path}: {error.problem}; expected {EXPERIMENT_SHAPE}") from None
    if not isinstance(value, dict):
        raise ExperimentFileError(f"{path}: not a JSON object; expected {EXPERIMENT_SHAPE}")
    shapes = {"config": lambda v: isinstance(v, str) and v,
              "runs": lambda v: isinstance(v, list) and all(isinstance(key, str) for key in v),
              "calibrations": lambda v: isinstance(v, list) and all(isinstance(c, dict) for c in v),
              "budget_runs": lambda v: isinstance(v, bool),
              "budget_methods": lambda v: isinstance(v, list) and all(isinstance(method, str) for method in v)}
    value.setdefault("budget_runs", True)
    value.setdefault("budget_methods", [])  # written before --only kept its methods' budget runs apart
    value.setdefault("name", None)
    for name, valid in shapes.items():
        if name not in value:
            raise ExperimentFileError(f"{path}: key {name!r} missing; expected {EXPERIMENT_SHAPE}")
        if not valid(value[name]):
            raise ExperimentFileError(f"{path}: key {name!r} is {json.dumps(value[name])[:60]}; expected {EXPERIMENT_SHAPE}")
    return value


def current_runs(records: list[dict[str, Any]], experiment: dict[str, Any] | None
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """``(kept, earlier, lines)``: the records whose run the experiment's current config still makes, the
    records it no longer does (its parameters, models or settings were edited since, or another config wrote
    the folder; the files stay), and one line per such record. Where ``experiment.json`` does not list every
    MAC-budget run (``budget_runs`` false), the budget records of the methods outside its ``budget_methods``
    count as current (``--no-calibrate``: every method's; ``--only tome``: the other methods')."""
    if experiment is None:
        return records, [], []
    keys, config = set(experiment["runs"]), experiment["config"]
    listed = None if experiment["budget_runs"] else set(experiment["budget_methods"])  # None: every method's
    kept, earlier, lines = [], [], []
    for record in records:
        run = record["run"]
        if record["key"] in keys or (listed is not None and run.get("budget") and run.get("method") not in listed):
            kept.append(record)
            continue
        earlier.append(record)
        label = f"{run.get('method')} {run.get('params_label') or ''}".rstrip()
        name = record.get("experiment")
        other = f"; made by experiment {name!r}, {run.get('config_file')}" if experiment["name"] and name != experiment["name"] else ""
        lines.append(f"{record['key']}: {label}, not a run of the current config ({config}{other})")
    return kept, earlier, lines


def failure_path(results_dir: Path, key: str) -> Path:
    """Where a failed run leaves its note (error line, traceback, log path); removed once it succeeds."""
    return Path(results_dir) / "failed" / f"{key}.json"


def read_failure(results_dir: Path, key: str) -> dict[str, Any] | None:
    try:
        note = read_json(failure_path(results_dir, key))
    except TextError as error:
        return None if error.missing else {"error": f"unreadable failure note: {error}"}
    return note if isinstance(note, dict) else {"error": f"unreadable failure note: {failure_path(results_dir, key)}"}


def last_error_line(text: str, default: str | None = None) -> str | None:
    """The line of a log or exception text that says what went wrong: the last one naming an Error or
    Exception (or ``RunClaimed``: another process computes the run), else the last one in which SLURM says
    ``error:`` (``srun: error: vm: task 0: Killed``, ``... Out Of Memory``: a task killed by a signal leaves no
    Python error, and the log's last line, ``srun: Force Terminated StepId=7.0``, said only that its step
    ended), else the last non-empty one, else ``default``."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line for word in ("Error", "Exception", "RunClaimed")):
            return line[:300]
    for line in reversed(lines):
        if "error:" in line.lower():
            return line[:300]
    return lines[-1][:300] if lines else default
