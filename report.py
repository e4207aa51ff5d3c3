"""Aggregate every run record of a results folder into a markdown leaderboard, a CSV and a Pareto plot.

    python report.py RESULTS_DIR [--out FILE.md] [--csv FILE] [--plot FILE.png] [--all]

Defaults: ``RESULTS_DIR/leaderboard.md``, and beside it ``leaderboard.csv``, ``pareto.png`` and the figures it
links (``throughput.png``, ``tokens*.png``): with ``--out`` elsewhere, all of them go there.
It only reads the records under ``RESULTS_DIR/runs`` (see ``bench/pipeline/records.py``); it never re-runs
anything. ``tokenbench-report`` (installed with the project) is the same command. Where ``run_bench`` left an
``experiment.json`` (the run keys of the config's latest invocation), records of runs that config no longer
makes (edited parameters, models, settings) are left out of the tables and listed at the end; ``--all`` keeps
them in.

Numbers come from the records as they are: ``delta_top1`` and ``mac_reduction`` compare a run with the
baseline run of its group (same model, data and weights; the one in the run's dtype where there is one);
``speedup`` is the one the record measured against a baseline timed in the same process, never recomputed
across processes. Runs of a group with the same method and params but other settings (dtype, batch size,
throughput runs...) get the settings that tell them apart in their params label: ``r=4 [dtype=bf16]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from tabulate import tabulate

from bench import stats  # numbers in, numbers out (light)
from bench.pipeline import budgets, measurements  # matched budgets, throughput sweeps, token maps (light too)
from bench.pipeline.files import atomic_file, atomic_write
from bench.pipeline.measurements import fixed, number
from bench.pipeline.records import (  # light: the model stack is not imported
    ExperimentFileError,
    current_runs,
    latest_revisions,
    read_all,
    read_experiment,
)
from bench.pipeline.stages import STAGES

GROUP = ["model", "data", "weights"]
EARLIER = "_earlier_config"  # set on a record by load_all(everything=True): shown as "[earlier config]"
CSV_COLUMNS = [
    "model", "method", "params", "top1", "top5", "delta_top1", "agreement", "gmacs", "mac_reduction",
    "images_per_s", "speedup", "budget", "mac_fraction",
    "data", "weights", "key", "gmacs_analytic", "gmacs_data", "gmacs_extra", "batch_size", "dtype", "device",
    "speedup_low", "speedup_high", "ece", "nll", "feature_cos",
]
EXTRA_COLUMNS = [
    "experiment", "throughput_batch_size", "throughput_dtype", "device_name", "threads",
    "throughput_cuda_graphs", "throughput_cuda_graphs_error", "throughput_compile", "ref_top1", "ref_top5",
    "ref_gmacs", "ref_source", "nonfinite_images", "finetune_epochs", "finetune_lr", "slow_rounds",
    "baseline_slow_rounds", "latency_p50_ms", "latency_p90_ms", "peak_mem_mb", "peak_mem_kind",
    "baseline_images_per_s", "baseline_latency_p50_ms", "baseline_latency_p90_ms", "baseline_peak_mem_mb",
    "compile_s", "graph_breaks", "gmacs_one_image",
]
THROUGHPUT_COLUMNS = [
    "key", "model", "data", "weights", "method", "params", "batch_size", "dtype", "device", "device_name",
    "threads", "images_per_s", "baseline_images_per_s", "speedup", *measurements.ENTRY_COLUMNS,
]
NAN = float("nan")
# a record's run settings that neither change its numbers nor tell apart rows of one group (see _settings)
UNCOMPARED = {"key", "params_label", "config_file", "weights_path", "weights_sha256", "experiment", "reference",
              "workers", "model_label", "data.root"}


# ----------------------------------------------------------------------------------------------- frame


def _get(mapping: Any, *path: str) -> Any:
    """``mapping[path[0]][path[1]]...``, or ``None`` where any level is missing or not a mapping."""
    for name in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(name)
    return mapping


def _format_param(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_param(item) for item in value) + "]"
    return str(value)


def format_params(params: Any) -> str:
    """``{"r": 13}`` -> ``r=13``; ``{"keep_rate": 0.7, "layers": [3, 6, 9]}`` -> ``keep_rate=0.7, layers=[3, 6, 9]``."""
    if not isinstance(params, dict) or not params:
        return ""
    return ", ".join(f"{name}={_format_param(value)}" for name, value in params.items())


def _data_label(data: Any) -> str:
    if isinstance(data, str):
        return data
    # the split and class map are part of what was measured: runs on other images or labels (an earlier config,
    # report.py --all) form a group of their own, with their own baseline
    name = ", ".join([str(_get(data, "name") or ""),
                      *(f"{key} {Path(str(value)).name if key == 'class_map' else value}"
                        for key in ("split", "class_map") if (value := _get(data, key)))])
    subset = _get(data, "subset")
    label = f"{name} (subset {subset})" if subset else name
    transform = _get(data, "transform")
    return f"{label} [{transform_label(transform)}]" if isinstance(transform, dict) else label


def transform_label(transform: dict) -> str:
    """``3x224x224 bicubic, crop_pct 0.9 center, mean 0.485/0.456/0.406, std 0.229/0.224/0.225``: a run's
    eval transform (``run.data.transform``, keys as timm names them)."""
    def numbers(values: Any) -> str:
        return "/".join(f"{v:.4g}" for v in values) if isinstance(values, (list, tuple)) else str(values)

    size = "x".join(str(v) for v in transform.get("input_size") or [])
    return (f"{size} {transform.get('interpolation')}, crop_pct {transform.get('crop_pct')} "
            f"{transform.get('crop_mode')}, mean {numbers(transform.get('mean'))}, std {numbers(transform.get('std'))}")


def _rows(recs: Sequence[dict]) -> list[dict[str, Any]]:
    """``_row`` of each record; where one weights path had different contents (a checkpoint changed in
    place), its label becomes ``fmnist_vit.pth (sha256 1a2b3c4d)``: each version is its own group. Rows of
    one group with the same method and params made under other settings get those settings in their params
    label: ``r=4 [dtype=bf16]`` and ``r=4 [dtype=fp32]``."""
    rows = [_row(record) for record in recs]
    versions: dict[str, set] = {}
    for record, row in zip(recs, rows, strict=True):
        versions.setdefault(row["weights"], set()).add(_get(record, "run", "weights_sha256"))
    for record, row in zip(recs, rows, strict=True):
        sha = _get(record, "run", "weights_sha256")
        if len(versions[row["weights"]]) > 1 and isinstance(sha, str):
            row["weights"] = _weights_version(row["weights"], sha)
    collisions: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        collisions.setdefault(tuple(row[name] for name in [*GROUP, "method", "params"]), []).append(index)
    for indices in collisions.values():
        settings = [_settings(_get(recs[index], "run")) for index in indices]
        for flat in settings:  # a stage's settings tell runs apart only where that stage ran
            ran = flat.get("stages") or ()
            for name in [name for name in flat if name.split(".")[0] in STAGES and name.split(".")[0] not in ran]:
                del flat[name]
            flat.setdefault("budget.target", None)  # a budget run beside a fixed run of the same setting
        differ = [name for name in dict.fromkeys(name for flat in settings for name in flat)  # set in all, unequal
                  if all(name in flat for flat in settings) and len({repr(flat[name]) for flat in settings}) > 1]
        if len({rows[index]["finetune_epochs"] is None for index in indices}) > 1:  # [fine-tuned] tells them apart
            differ = [name for name in differ if name != "stages" and not name.startswith("finetune.")]
        for index, flat in zip(indices, settings, strict=True):
            if differ:
                label = "[" + ", ".join(f"{name}={_format_param(flat.get(name))}" for name in differ) + "]"
                rows[index]["params"] = f"{rows[index]['params']} {label}".lstrip()
    for row in rows:
        if row["finetune_epochs"] is not None:  # trained before it was evaluated: never mistaken for off the shelf
            row["params"] = f"{row['params']} [fine-tuned]".lstrip()
    for record, row in zip(recs, rows, strict=True):
        if record.get(EARLIER):  # report.py --all: a run the current config no longer makes
            row["params"] = f"{row['params']} [earlier config]".lstrip()
    return rows


def _settings(run: Any, prefix: str = "") -> dict[str, Any]:
    """A record's ``run`` flattened to dotted keys (``throughput.runs``), less what does not change its
    numbers (names, paths, the published reference) or already sets its group."""
    flat: dict[str, Any] = {}
    for name, value in (run.items() if isinstance(run, dict) else ()):
        if prefix + name in UNCOMPARED:
            continue
        if isinstance(value, dict) and value:
            flat.update(_settings(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def _throughput_entries(record: dict) -> list[dict]:
    entries = _get(record, "metrics", "throughput")
    if isinstance(entries, dict):  # tolerate a single entry written without the list
        entries = [entries]
    return [entry for entry in entries or [] if isinstance(entry, dict)]


def _speedup(entry: dict) -> float:
    """The entry's speed-up; if only the in-process baseline rate was kept, their ratio (same process)."""
    speedup = number(entry.get("speedup"))
    if math.isnan(speedup):
        base = number(entry.get("baseline_images_per_s"))
        if base > 0:
            speedup = number(entry.get("images_per_s")) / base
    return speedup


def _gmacs(metrics: dict) -> float:
    """GMACs per image: torchprofile's one-image count; for a method whose work depends on the image (ATS:
    ``macs.data_dependent``), the mean over the ``macs`` stage's real images (``data_mean``), what its budget
    was calibrated on."""
    mean = number(_get(metrics, "macs", "data_mean"), 1e9)
    if _get(metrics, "macs", "data_dependent") is True and math.isfinite(mean):
        return mean
    return number(_get(metrics, "macs", "torchprofile"), 1e9)


def _weights_version(label: str, sha: str) -> str:
    """A weights label with the content it had, where one path had several: ``fmnist_vit.pth (sha256 1a2b3c4d)``."""
    return f"{label} (sha256 {sha[:8]})"


def _group_of(run: dict) -> tuple[str, str, str]:
    """A record's ``run`` as its model group's (model label, data, weights) columns, but the ``(sha256 ...)`` that
    ``_rows`` adds where one weights path had several contents."""
    weights = run.get("weights")
    return (str(run.get("model_label") or run.get("model") or ""), _data_label(run.get("data")),
            str(weights) if weights else "random init")


def _calibration_group(calibration: dict, weights_labels: set[str]) -> tuple[str, str, str] | None:
    """The model group (``GROUP``'s values) a calibration of ``experiment.json`` was made for, from the weights and
    data it records as its runs' records do (``weights_labels``: the frame's, to find its ``(sha256 ...)`` version);
    None for one written before calibrations recorded them (``budgets.budget_section`` then matches its label)."""
    if not isinstance(calibration.get("data"), dict) or "weights" not in calibration:
        return None
    model, data, weights = _group_of({"model_label": calibration.get("model"), "weights": calibration["weights"],
                                      "data": calibration["data"]})
    sha = calibration.get("weights_sha256")
    version = _weights_version(weights, sha) if isinstance(sha, str) else None
    return model, data, version if version in weights_labels else weights


def _row(record: dict) -> dict[str, Any]:
    run = record.get("run") if isinstance(record.get("run"), dict) else {}
    metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    method = str(run.get("method") or "")
    entries = _throughput_entries(record)
    first = entries[0] if entries else {}
    history = _get(metrics, "finetune", "history")  # a list where the finetune stage trained the model
    tuned = isinstance(history, list)
    reference = run.get("reference") if isinstance(run.get("reference"), dict) else {}
    model, data, weights = _group_of(run)
    return {
        "model": model,
        "method": method,
        "params": run["params_label"] if isinstance(run.get("params_label"), str) else format_params(run.get("params")),
        "top1": number(_get(metrics, "eval", "top1")),
        "top5": number(_get(metrics, "eval", "top5")),
        "delta_top1": NAN,
        "agreement": number(_get(metrics, "eval", "agreement")),
        "gmacs": _gmacs(metrics),
        "mac_reduction": NAN,
        "images_per_s": number(first.get("images_per_s")),
        "speedup": _speedup(first) if first else NAN,
        "speedup_low": number(first.get("speedup_low")),
        "speedup_high": number(first.get("speedup_high")),
        "ece": number(_get(metrics, "eval", "ece")),
        "nll": number(_get(metrics, "eval", "nll")),
        "feature_cos": number(_get(metrics, "eval", "feature_cos")),
        "data": data,
        "weights": weights,
        "key": str(record.get("key") or ""),
        # the analytic count of the one-image trace, beside torchprofile's of that image (for ATS, whose work depends
        # on the image, gmacs is the mean over real images, gmacs_data, and the one image is the fixed random one)
        "gmacs_analytic": number(_get(metrics, "macs", "analytic"), 1e9),
        "gmacs_one_image": number(_get(metrics, "macs", "torchprofile"), 1e9),
        "gmacs_data": number(_get(metrics, "macs", "data_mean"), 1e9),
        "gmacs_extra": number(_get(metrics, "macs", "extra"), 1e9),  # work torchprofile cannot see (cdist)
        "batch_size": run.get("batch_size"),
        "dtype": run.get("dtype"),
        "device": run.get("device"),
        "experiment": str(record.get("experiment") or ""),
        "throughput_batch_size": first.get("batch_size"),
        "throughput_dtype": first.get("dtype"),
        "device_name": first.get("device_name") or _get(record, "env", "device_name"),
        "threads": first.get("threads", _get(record, "env", "threads")) if first else None,
        "throughput_cuda_graphs": bool(first.get("cuda_graphs")),  # timed as CUDA-graph replays
        "throughput_compile": bool(first.get("compile")),  # both models under torch.compile
        "throughput_cuda_graphs_error": first.get("cuda_graphs_error"),  # why it could not be captured
        "ref_top1": number(reference.get("top1")),
        "ref_top5": number(reference.get("top5")),
        "ref_gmacs": number(reference.get("gmacs")),
        "ref_source": reference.get("source") if reference else None,
        "budget": number(_get(run, "budget", "target")),  # the MAC budget the run was calibrated to, if any
        # a budget run's parameters but the calibrated knob: one setting of the method, across its budgets
        "_setting": budgets.setting(run.get("params"), _get(run, "budget", "knob")),
        "mac_fraction": NAN,
        # not CSV columns: kept for the markdown sections, dropped by write_csv
        "_reference": bool(reference),
        "_tokens_out": _get(record, "tokens_per_layer", "out"),
        "_method_stats": record.get("method_stats") if isinstance(record.get("method_stats"), dict) else None,
        "_n_throughput": len(entries),
        "nonfinite_images": number(_get(metrics, "eval", "nonfinite_images")),
        # timed forwards of the main batch size slowed from outside (method, dense): the throughput entry's counts
        "slow_rounds": number(first.get("slow_rounds")),
        "baseline_slow_rounds": number(first.get("baseline_slow_rounds")),
        # latency and peak memory of the main batch size, the method's and the dense baseline's, and the dense
        # baseline's images/s timed beside the method's (other batch sizes: the records and the leaderboard's
        # latency / memory table)
        **{f"{who}{field}": number(first.get(f"{who}{field}")) for who in ("", "baseline_")
           for field in ("latency_p50_ms", "latency_p90_ms", "peak_mem_mb")},
        "baseline_images_per_s": number(first.get("baseline_images_per_s")),
        "peak_mem_kind": first.get("peak_mem_kind"),
        # compile: true: both models' compilation time at the main batch size, the method's graph breaks
        "compile_s": number(first.get("compile_s")),
        "graph_breaks": number(first.get("graph_breaks")),
        # fine-tuned by the finetune stage before it was evaluated: epochs trained and the peak learning rate
        "finetune_epochs": len(history) if tuned else None,
        "finetune_lr": number(_get(run, "finetune", "lr")) if tuned else NAN,
        "_slow": ", ".join(f"{slow} of {2 * entry['runs']} at batch {entry.get('batch_size')}" for entry in entries
                           if (slow := _slow_forwards(entry))),
        "_attention": run.get("sdpa_backend") or "auto",  # the attention kernel every model of the run used
        "_earlier": bool(record.get(EARLIER)),  # --all: a run of an earlier config
    }


def _slow_forwards(entry: dict) -> int:
    """Timed forwards (method and dense) of a throughput entry slowed from outside (``bench.stats.slow_rounds``)."""
    counts = [entry.get(name) for name in ("slow_rounds", "baseline_slow_rounds")]
    return sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool)) if isinstance(entry.get("runs"), int) else 0


def _first_valid(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.iloc[0]) if len(values) else NAN


def build_frame(recs: Sequence[dict]) -> pd.DataFrame:
    """One row per record (columns ``CSV_COLUMNS + EXTRA_COLUMNS`` and private ``_...`` columns), with
    ``delta_top1`` / ``mac_reduction`` against the baseline of the record's (model, data, weights) group
    (the one run in the record's dtype where there is one; with ``--all``, the current config's)."""
    rows = _rows(recs)
    columns = CSV_COLUMNS + EXTRA_COLUMNS + ["_reference", "_tokens_out", "_method_stats", "_n_throughput",
                                             "_slow", "_attention", "_earlier", "_setting"]
    df = pd.DataFrame(rows, columns=columns)
    if df.empty:
        return df
    for name in ("batch_size", "throughput_batch_size", "threads", "finetune_epochs", "slow_rounds",
                 "baseline_slow_rounds", "graph_breaks"):  # integers with gaps, not 32.0
        df[name] = pd.to_numeric(df[name], errors="coerce").astype("Int64")
    dtypes = df["dtype"].fillna("").astype(str)
    tuned = df["finetune_epochs"].notna()
    for _, group in df.groupby(GROUP, sort=False):
        bases = group[group["method"] == "baseline"]
        if bases.empty:
            continue
        for dtype, fine in dict.fromkeys(zip(dtypes[group.index], tuned[group.index], strict=True)):
            index = group.index[(dtypes[group.index] == dtype) & (tuned[group.index] == fine)]
            # the baseline of the same dtype and fine-tuning, else of the same dtype, else any
            same_dtype = bases[dtypes[bases.index] == dtype]
            base = next(pool for pool in (same_dtype[tuned[same_dtype.index] == fine], same_dtype, bases) if len(pool))
            if (~base["_earlier"]).any():  # --all: the current config's baseline, not an earlier one's
                base = base[~base["_earlier"]]
            base_top1, base_gmacs = _first_valid(base["top1"]), _first_valid(base["gmacs"])
            df.loc[index, "delta_top1"] = df.loc[index, "top1"] - base_top1
            if base_gmacs > 0:
                df.loc[index, "mac_reduction"] = 100.0 * (1.0 - df.loc[index, "gmacs"] / base_gmacs)
                df.loc[index, "mac_fraction"] = df.loc[index, "gmacs"] / base_gmacs
    return df


def build_throughput_frame(recs: Sequence[dict]) -> pd.DataFrame:
    """Long format: one row per throughput entry of every record."""
    rows = []
    for record, row in zip(recs, _rows(recs), strict=True):
        for entry in _throughput_entries(record):
            rows.append({
                "key": row["key"], "model": row["model"], "data": row["data"], "weights": row["weights"],
                "method": row["method"], "params": row["params"],
                "batch_size": entry.get("batch_size"), "dtype": entry.get("dtype"),
                "device": entry.get("device"), "device_name": entry.get("device_name"),
                "threads": entry.get("threads"), "images_per_s": number(entry.get("images_per_s")),
                "baseline_images_per_s": number(entry.get("baseline_images_per_s")), "speedup": _speedup(entry),
                **measurements.entry_fields(entry),
            })
    return pd.DataFrame(rows, columns=THROUGHPUT_COLUMNS)


class Loaded(NamedTuple):
    """``load_all``'s one read of a results folder."""

    frame: pd.DataFrame
    throughput: pd.DataFrame
    problems: list[str]  # unreadable records, superseded revisions, an experiment.json not of run_bench's shape
    earlier: list[str]  # one line per record of a run the current config no longer makes (left out)
    experiment: dict[str, Any] | None  # experiment.json, None where there is none (or it is unreadable)


def load_all(results_dir: str | Path, everything: bool = False) -> Loaded:
    """The records of the folder, read once: ``earlier`` names the records the experiment's current config no
    longer makes (``experiment.json``), left out unless ``everything`` (then their params say
    ``[earlier config]``). An ``experiment.json`` that is not run_bench's is a problem, and every record counts
    as current."""
    recs, problems = read_all(Path(results_dir))
    recs, superseded = latest_revisions(recs)
    try:
        experiment = read_experiment(Path(results_dir))
    except ExperimentFileError as error:
        experiment = None
        problems.append(f"{error}: ignored, every record counts as current")
    kept, stale, earlier = current_runs(recs, experiment)
    if everything:  # marked after the settings that tell runs apart ([dtype=bf16]) are labelled
        marked = {id(record) for record in stale}
        recs = [{**record, EARLIER: True} if id(record) in marked else record for record in recs]
        earlier = []
    else:
        recs = kept
    return Loaded(build_frame(recs), build_throughput_frame(recs), problems + superseded, earlier, experiment)


def unrecorded_runs(results_dir: Path, experiment: dict[str, Any] | None, shown: set[str]) -> list[str]:
    """One line per run of the experiment's current config (``experiment.json``) with no record to show: its state as
    ``run_bench.py --status`` gives it (failed with its error, interrupted, queued or running on SLURM, not run)."""
    from bench.pipeline.status import collect_status  # light: no model stack

    missing = [key for key in (experiment or {}).get("runs", []) if key not in shown]
    if not missing:
        return []
    return [f"{row.key}: {row.state}" + (f", {row.detail}" if row.detail else "")
            for row in collect_status(missing, results_dir) if row.state != "done"]  # done: superseded, in problems


def sort_group(group: pd.DataFrame) -> pd.DataFrame:
    """Baseline first, then by GMACs descending (unmeasured last), then method / params / key."""
    order = group.assign(_not_base=group["method"] != "baseline", _neg_gmacs=-group["gmacs"])
    order = order.sort_values(["_not_base", "_neg_gmacs", "method", "params", "key"], na_position="last",
                              kind="stable")
    return group.loc[order.index]


def pareto_front(df: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows not dominated in (GMACs lower, top-1 higher): each has a strictly higher top-1 than every row
    with at most its GMACs. Rows lacking either number are ignored. Sorted by GMACs ascending; with
    ``by`` (e.g. ``GROUP``) the front is computed separately within each group."""
    valid = df.dropna(subset=["top1", "gmacs"])
    if by:
        parts = [pareto_front(group) for _, group in valid.groupby(list(by), sort=False)]
        return pd.concat(parts) if parts else valid.iloc[0:0]
    ordered = valid.sort_values(["gmacs", "top1"], ascending=[True, False], kind="stable")
    keep, best = [], -math.inf
    for index, top1 in ordered["top1"].items():
        if top1 > best:
            keep.append(index)
            best = top1
    return ordered.loc[keep]


# -------------------------------------------------------------------------------------------- markdown


def _cell(value: Any) -> str:
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[list[str]], headers: list[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _group_title(model: str, data: str, weights: str) -> str:
    return f"{model} on {data} ({weights})"


def _conditions(group: pd.DataFrame) -> str:
    seen: list[str] = []
    for _, row in group.iterrows():
        if math.isnan(row["images_per_s"]):
            continue
        parts = [str(row["device_name"] or row["device"] or "unknown device")]
        if row["throughput_batch_size"] is not None and not pd.isna(row["throughput_batch_size"]):
            parts.append(f"batch size {int(row['throughput_batch_size'])}")
        if row["throughput_dtype"]:
            parts.append(str(row["throughput_dtype"]))
        if row["threads"] is not None and not pd.isna(row["threads"]):
            parts.append(f"{int(row['threads'])} thread{'s' if int(row['threads']) != 1 else ''}")
        if row["throughput_compile"]:
            parts.append("torch.compile")
        if row["throughput_cuda_graphs"]:
            parts.append("CUDA-graph replays")
        if row["_attention"] == "explicit":
            parts.append("attention written out")
        elif row["_attention"] != "auto":
            parts.append(f"SDPA kernel pinned to {row['_attention']}")
        text = ", ".join(parts)
        if text not in seen:
            seen.append(text)
    if not seen:
        return "_Throughput: not measured._"
    return ("_Throughput: " + "; ".join(seen) +
            ". Speed-up is against a baseline timed in the same process and conditions._")


def _leaderboard_section(df: pd.DataFrame) -> list[str]:
    headers = ["Method", "Params", "Top-1", "Top-5", "Δ Top-1", "Agreement", "GMACs", "MAC red.",
               "Images/s", "Speed-up", "ECE", "NLL", "Feature cos"]
    lines: list[str] = []
    for (model, data, weights), group in df.groupby(GROUP, sort=True):
        gmacs_digits = 3 if group["gmacs"].max() >= 1 else 4  # small models: 0.0482, not 0.048
        rows = [[
            _cell(row["method"]), _cell(row["params"]), fixed(row["top1"], 2), fixed(row["top5"], 2),
            fixed(row["delta_top1"], 2, signed=True), fixed(row["agreement"], 2), fixed(row["gmacs"], gmacs_digits),
            fixed(row["mac_reduction"], 1, "%"), fixed(row["images_per_s"], 0),
            measurements.format_speedup(row["speedup"], row["speedup_low"], row["speedup_high"]),
            fixed(row["ece"], 3), fixed(row["nll"], 3), fixed(row["feature_cos"], 4),
        ] for _, row in sort_group(group).iterrows()]
        lines += [f"## {_group_title(model, data, weights)}", "", _table(rows, headers), "", _conditions(group)]
        if not (group["method"] == "baseline").any():
            lines += ["", "_No baseline run in this group: Δ Top-1 and MAC reduction are left empty._"]
        if (group["top1"].notna() & group["top5"].isna()).any():
            lines += ["", "_Top-5 is left empty: the model has 5 classes or fewer (every true class is among its top 5)._"]
        broken = [f"{measurements.run_label(row['method'], row['params'])} {int(row['nonfinite_images'])}"
                  for _, row in sort_group(group).iterrows() if row["nonfinite_images"] > 0]
        if broken:
            lines += ["", f"_Non-finite logits (NaN or inf), images of the eval set: {', '.join(broken)}; their arg-max "
                          "counts in top-1 as in the reference code, and ECE, NLL and feature cos are undefined._"]
        tuned = sorted({(int(epochs), lr) for epochs, lr in zip(group["finetune_epochs"], group["finetune_lr"], strict=True)
                        if not pd.isna(epochs)})
        if tuned:
            how = " or ".join(f"{epochs} epoch{'s' * (epochs != 1)} at lr {lr:g}" for epochs, lr in tuned)
            lines += ["", f"_[fine-tuned]: trained by the finetune stage ({how}; the CSV's finetune_epochs and "
                          "finetune_lr) from the weights above before it was evaluated. Agreement and Feature cos "
                          "compare with the dense model of those starting weights, not fine-tuned._"]
        slowed = [f"{measurements.run_label(row['method'], row['params'])} {row['_slow']}"
                  for _, row in sort_group(group).iterrows() if row["_slow"]]
        if slowed:
            lines += ["", f"_Timed forwards (method and dense) over {stats.SLOW_FACTOR:g}x their median, slowed from "
                          f"outside the model (another process, a clock or power-state change?): {'; '.join(slowed)}. "
                          "Their latency p90 reads high; images/s (from the median forward) and the speed-up (the "
                          "median of paired per-round ratios) move only where many forwards were slowed._"]
        lines.append("")
    return lines


def _throughput_section(df: pd.DataFrame, tp: pd.DataFrame) -> list[str]:
    if tp.empty or not (df["_n_throughput"] > 1).any():
        return []
    lines = ["## Throughput by batch size", ""]
    tp = tp.assign(_dtype=tp["dtype"].fillna("").astype(str))
    several_dtypes = tp["_dtype"].nunique() > 1
    for (model, data, weights), group in tp.groupby(GROUP, sort=True):
        conditions = sorted({(int(b), d) for b, d in zip(group["batch_size"], group["_dtype"], strict=True)
                             if b is not None and not pd.isna(b)})
        headers = ["Method", "Params"]
        for batch, dtype in conditions:
            label = f"bs {batch}" + (f" {dtype}" if several_dtypes else "")
            headers += [f"Images/s ({label})", f"Speed-up ({label})"]
        order = sort_group(df[df["key"].isin(group["key"])])
        rows = []
        for _, rec in order.iterrows():
            entries = group[group["key"] == rec["key"]]
            row = [_cell(rec["method"]), _cell(rec["params"])]
            for batch, dtype in conditions:
                match = entries[(entries["batch_size"] == batch) & (entries["_dtype"] == dtype)]
                first = match.iloc[0] if len(match) else None
                row += [fixed(first["images_per_s"], 0) if first is not None else "",
                        measurements.format_speedup(first["speedup"], first["speedup_low"], first["speedup_high"])
                        if first is not None else ""]
            rows.append(row)
        lines += [f"### {_group_title(model, data, weights)}", "", _table(rows, headers), ""]
    return lines


def _reference_section(df: pd.DataFrame) -> list[str]:
    refs = df[df["_reference"]]
    if refs.empty:
        return []
    rows = []
    for _, row in refs.sort_values(["model", "data", "weights", "method", "params"], kind="stable").iterrows():
        for name, measured_col, ref_col, digits in (("Top-1", "top1", "ref_top1", 2),
                                                    ("Top-5", "top5", "ref_top5", 2),
                                                    ("GMACs", "gmacs", "ref_gmacs", 3)):
            if math.isnan(row[ref_col]):
                continue
            rows.append([_cell(row["model"]), _cell(row["method"]), _cell(row["params"]), name,
                         fixed(row[ref_col], digits), fixed(row[measured_col], digits),
                         fixed(row[measured_col] - row[ref_col], digits, signed=True), _cell(row["ref_source"])])
    if not rows:
        return []
    headers = ["Model", "Method", "Params", "Metric", "Published", "Measured", "Measured − published", "Source"]
    return ["## Published vs measured", "", _table(rows, headers), ""]


def _stats_line(stats: dict) -> str:
    by_name: dict[str, list[str]] = {}
    layers = sorted(stats, key=lambda layer: (not str(layer).isdigit(), int(layer) if str(layer).isdigit() else 0,
                                              str(layer)))
    for layer in layers:
        values = stats[layer]
        if not isinstance(values, dict):
            continue
        for name, value in values.items():
            figure = number(value)
            text = f"{figure:.2f}" if not math.isnan(figure) else str(value)
            by_name.setdefault(name, []).append(f"layer {layer}: {text}")
    return "; ".join(f"{name.replace('_', ' ')} per layer: {', '.join(parts)}" for name, parts in by_name.items())


# the forward's counts: where images keep different numbers (ATS), the padded width of the batch; the tokens each
# image keeps are the method's statistics under the table ("kept mean"), user test 11
TOKENS_HEADER = ("Tokens leaving each block (where images keep different counts: the padded width of the last batch "
                 "the run computed; each image's: kept mean, below)")


def _tokens_section(df: pd.DataFrame) -> list[str]:
    has_tokens = df["_tokens_out"].map(lambda value: isinstance(value, list) and len(value) > 0)
    has_stats = df["_method_stats"].map(lambda value: bool(value))
    if not (has_tokens | has_stats).any():
        return []
    lines = ["## Per-layer tokens", ""]
    for (model, data, weights), group in df[has_tokens | has_stats].groupby(GROUP, sort=True):
        group = sort_group(group)
        rows = [[_cell(row["method"]), _cell(row["params"]),
                 ", ".join(str(n) for n in row["_tokens_out"]) if isinstance(row["_tokens_out"], list) else ""]
                for _, row in group.iterrows()]
        lines += [f"### {_group_title(model, data, weights)}", "",
                  _table(rows, ["Method", "Params", TOKENS_HEADER]), ""]
        for _, row in group.iterrows():
            if row["_method_stats"]:
                label = row["method"] + (f" ({row['params']})" if row["params"] else "")
                lines.append(f"- {_cell(label)}: {_stats_line(row['_method_stats'])}")
        if group["_method_stats"].map(bool).any():
            lines.append("")
    return lines


def render_markdown(df: pd.DataFrame, problems: Sequence[str] = (), throughput_df: pd.DataFrame | None = None,
                    generated: datetime | None = None, figures: Sequence[tuple[str, str, Path]] = (),
                    calibrations: Sequence[dict] = (), earlier: Sequence[str] = (), unrecorded: Sequence[str] = ()) -> str:
    """The leaderboard as markdown (see the module docstring); ``generated`` defaults to now (UTC);
    ``figures``: ``measurements.write_figures``'s list, linked in a last section; ``earlier``: ``load_all``'s
    records left out as runs of earlier configs, listed last; ``unrecorded``: runs of the experiment without a
    record (``unrecorded_runs``), said under the title and listed."""
    throughput_df = throughput_df if throughput_df is not None else pd.DataFrame(columns=THROUGHPUT_COLUMNS)
    generated = generated or datetime.now(timezone.utc)
    experiments = sorted({name for name in df["experiment"] if name}) if not df.empty else []
    title = ", ".join(experiments) or "tokenbench"
    stamp = generated.strftime("%Y-%m-%d %H:%M %Z").strip()
    n_groups = df.groupby(GROUP).ngroups if not df.empty else 0
    missing = ""
    if unrecorded:
        count = f"{len(unrecorded)} run{'s' if len(unrecorded) != 1 else ''}"
        missing = (f" **{count} of the experiment {'have' if len(unrecorded) != 1 else 'has'} no record** and no row: "
                   "see *Runs without a record*.")
    lines = [f"# Leaderboard: {title}", "",
             f"{len(df)} run{'s' if len(df) != 1 else ''} in {n_groups} group{'s' if n_groups != 1 else ''}, "
             f"generated {stamp} by `report.py` from the run records (nothing re-run).{missing}", ""]
    if not df.empty:
        labels = set(df["weights"])
        lines += budgets.budget_section(df, calibrations, GROUP, _group_title, _table,
                                        group_of=lambda calibration: _calibration_group(calibration, labels))
        lines += _leaderboard_section(df)
        lines += _throughput_section(df, throughput_df)
        lines += measurements.speed_section(df, throughput_df, GROUP, sort_group, _group_title)
        lines += _reference_section(df)
        lines += _tokens_section(df)
    lines += measurements.figures_section(figures)
    if problems:
        lines += ["## Skipped records", ""] + [f"- {_cell(problem)}" for problem in problems] + [""]
    if unrecorded:
        lines += ["## Runs without a record", "",
                  "Runs of the experiment's current config that have no record, so no row in the tables (the state "
                  "`run_bench.py --status` gives):", ""]
        lines += [f"- {_cell(line)}" for line in unrecorded] + [""]
    if earlier:
        lines += ["## Records of earlier configs", "",
                  "In `runs/`, not in the tables: the experiment's current config does not make these runs (its "
                  "parameters, models or settings were edited since, or another experiment wrote this folder). "
                  "`report.py --all` shows them, marked `[earlier config]`.", ""]
        lines += [f"- {_cell(line)}" for line in earlier] + [""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ csv & plot


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_file(path) as handle:
        df[CSV_COLUMNS + EXTRA_COLUMNS].to_csv(handle, index=False)


def plot_pareto(df: pd.DataFrame, path: str | Path) -> bool:
    """Top-1 vs GMACs: a colour per method, a marker per group, each group's Pareto front as a step line.
    ``False`` (nothing written) when no record has both numbers."""
    valid = df.dropna(subset=["top1", "gmacs"])
    if valid.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    names = sorted(valid["method"].unique())
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    method_colour = {name: colours(i % colours.N) for i, name in enumerate(names)}
    markers = "os^Dv<>p*h"
    groups = list(valid.groupby(GROUP, sort=True))
    legend = measurements.figure_labels([names for names, _ in groups])
    for name in method_colour:  # one legend entry per method (colour), also one that the first group lacks
        ax.scatter([], [], color=method_colour[name], marker="o", s=40, label=name)
    for index, (names, group) in enumerate(groups):
        marker = markers[index % len(markers)]
        for method, points in group.groupby("method", sort=True):
            ax.scatter(points["gmacs"], points["top1"], color=method_colour[method], marker=marker, s=40, zorder=3)
        short = legend[names]  # the full title (transform, weights) is in the markdown
        ax.scatter([], [], color="grey", marker=marker,  # cut in the middle: the end tells apart groups of one label
                   label=short if len(short) <= 60 else short[:28] + "..." + short[-29:])
        unbudgeted = group[group["budget"].isna()]  # budget runs are told apart by their line and colour
        for rank, (_, row) in enumerate(unbudgeted.sort_values("gmacs", kind="stable").iterrows()):
            text = row["params"] if row["params"] else row["method"]
            # alternate above / below so neighbouring labels do not print over each other
            ax.annotate(text, (row["gmacs"], row["top1"]), xytext=(4, 5 if rank % 2 == 0 else -11),
                        textcoords="offset points", fontsize=6.5, color=method_colour[row["method"]])
        budgeted = group[group["budget"].notna()]
        lines = budgeted.assign(_line=budgets.row_labels(budgeted)) if len(budgeted) else budgeted.assign(_line=[])
        for _, points in lines.groupby("_line", sort=True):  # each setting's matched-budget line
            points = points.sort_values("gmacs")
            ax.plot(points["gmacs"], points["top1"], color=method_colour[points["method"].iloc[0]], alpha=0.7,
                    linewidth=1.0, zorder=2)
        base = group[group["method"] == "baseline"]["gmacs"].dropna()
        for target in sorted(set(budgeted["budget"])) if len(base) else []:  # the budgets, as MACs
            ax.axvline(target * base.iloc[0], color="grey", linestyle=":", linewidth=0.8, zorder=1)
        front = pareto_front(group)
        xs, ys = list(front["gmacs"]), list(front["top1"])
        if group["gmacs"].max() > xs[-1]:  # the best top-1 stays reachable up to the largest budget
            xs.append(group["gmacs"].max())
            ys.append(ys[-1])
        ax.plot(xs, ys, drawstyle="steps-post", color="black", alpha=0.45, linewidth=1.2, zorder=2)
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel("GMACs per image (torchprofile)")
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title("Top-1 vs GMACs (step line: Pareto front per group)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_file(path, binary=True) as handle:
        fig.savefig(handle, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------- cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path, help="folder holding runs/*.json")
    # strings, not paths: Path drops the trailing slash of a folder given by mistake
    parser.add_argument("--out", help="markdown file (default RESULTS_DIR/leaderboard.md); the CSV, the plot and "
                                      "the figures go beside it by default")
    parser.add_argument("--csv", help="CSV file (default leaderboard.csv beside the markdown file)")
    parser.add_argument("--plot", help="PNG file (default pareto.png beside the markdown file)")
    parser.add_argument("--all", action="store_true",
                        help="also the records of runs the experiment's current config no longer makes")
    return parser


def _not_a_file(path: str | Path) -> str | None:
    """Why ``path`` cannot become a file (it names a folder, a file stands where a folder above it must be, or
    the folder it would be written in is not writable: also a read-only file system, even as root), or
    ``None``."""
    text = str(path)
    if text.endswith(("/", os.sep)) or os.path.isdir(text):  # os.path: False, not an error, on a bad name
        return "it names a folder, not a file"
    for parent in Path(text).parents:  # the nearest existing one decides
        if os.path.exists(parent):
            if not os.path.isdir(parent):
                return f"{parent} is not a folder"
            return None if os.access(parent, os.W_OK | os.X_OK) else f"{parent} is not writable"
    return None


def figure_files(folder: Path) -> list[Path]:
    """The figures report.py writes into ``folder`` besides the Pareto plot: ``throughput.png``, ``tokens*.png``."""
    return sorted({folder / "throughput.png", folder / "tokens.png", *folder.glob("tokens_*.png")})


def remove_outputs(paths: Sequence[Path], why: str) -> bool:
    """Remove the report's outputs among ``paths`` that the records shown no longer give (one stderr line each,
    saying ``why``), so that none is left looking current; ``False`` after one error line naming a file that
    cannot be removed."""
    for path in dict.fromkeys(paths):
        try:
            if path.is_file():
                os.unlink(path)
                print(f"report.py: removed {path}: {why}", file=sys.stderr)
        except OSError as error:
            print(f"report.py: error: cannot remove {path} ({error.strerror or error})", file=sys.stderr)
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # bad usage: argparse has printed the message
        return int(exit_.code or 0)
    folder: Path = args.results_dir
    if not folder.is_dir():  # a file given (a leaderboard, the experiment's YAML) is not "missing"
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        print(f"report.py: error: results folder {folder} {problem}", file=sys.stderr)
        return 2
    try:
        df, tp, problems, earlier, experiment = load_all(folder, everything=args.all)
    except OSError as error:
        print(f"report.py: error: cannot read results folder {folder}: {error.strerror}", file=sys.stderr)
        return 2
    older = (f"{len(earlier)} record{'s' if len(earlier) != 1 else ''} of runs that the current config "
             f"({experiment['config']}) no longer makes" if earlier and experiment else "")
    beside = Path(args.out).parent if args.out else folder  # every output goes beside the markdown by default
    paths = (args.out or folder / "leaderboard.md", args.csv or beside / "leaderboard.csv",
             args.plot or beside / "pareto.png")
    out, csv, plot = (Path(path) for path in paths)
    if df.empty:
        extra = f" ({len(problems)} unreadable file{'s' if len(problems) != 1 else ''})" if problems else ""
        what = f"no record of a run the current config makes ({older}: --all shows them)" if older else \
            "no readable run record"
        print(f"report.py: error: {what} in {folder / 'runs'}{extra}", file=sys.stderr)
        for line in unrecorded_runs(folder, experiment, set()):  # what became of the experiment's runs
            print(f"report.py:   {line}", file=sys.stderr)
        if (folder / "runs").is_dir():  # a results folder: its leaderboard, CSV and figures showed other records
            remove_outputs([out, csv, plot, *figure_files(out.parent)], "no record to show now (it showed " + (
                "runs the current config does not make; their records stay in runs/)" if older else
                "records that no longer read or are gone)"))
        return 2
    for problem in problems:
        print(f"report.py: skipped {problem}", file=sys.stderr)
    if older:  # edited parameters, models or settings: their files stay, the tables show the current runs
        print(f"report.py: left out {older} (listed in the leaderboard; --all shows them)", file=sys.stderr)
    unrecorded = unrecorded_runs(folder, experiment, set(df["key"]))
    if unrecorded:  # failed, cancelled, not run yet: a reader of the tables alone would not see them missing
        print(f"report.py: {len(unrecorded)} run(s) of the experiment have no record (listed in the leaderboard)",
              file=sys.stderr)

    for path in paths:
        reason = _not_a_file(path)
        if reason:
            print(f"report.py: error: cannot write {path} ({reason})", file=sys.stderr)
            return 2
    calibrations = experiment["calibrations"] if experiment else []
    target = f"figures in {out.parent}"  # beside the markdown: a read-only results folder is fine
    try:  # every file atomic: a failed write leaves the previous file (or none) and no temporary file
        figures = measurements.write_figures(df, tp, folder, out.parent, GROUP, sort_group, _group_title)
        target = str(plot)
        plotted = plot_pareto(df, plot)
        if plotted:  # linked from the markdown like the others (relative to it)
            figures = [("Top-1 vs GMACs, each group's Pareto front", Path(os.path.relpath(plot, out.parent)).as_posix(),
                        plot), *figures]
        target = str(out)
        atomic_write(out, render_markdown(df, problems, tp, figures=figures, calibrations=calibrations,
                                          earlier=earlier, unrecorded=unrecorded))
        print(out)
        target = str(csv)
        write_csv(df, csv)
        print(csv)
    except OSError as error:
        print(f"report.py: error: cannot write {target} ({error.strerror or error})", file=sys.stderr)
        return 2
    shown = {path.name for _, _, path in figures}  # a figure the records no longer give: not left showing earlier runs
    if not remove_outputs([path for path in figure_files(out.parent) if path.name not in shown] + ([] if plotted else [plot]),
                          "the records shown give no such figure now"):
        return 2
    if not plotted:
        print("report.py: no record has both top-1 and GMACs; plot skipped", file=sys.stderr)
    for _, _, path in figures:  # pareto.png, throughput.png, tokens*.png
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
