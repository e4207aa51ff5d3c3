"""The report's view of the throughput sweeps and token maps (``report.py`` calls these).

* ``ENTRY_COLUMNS`` / ``entry_fields``: the per-batch-size numbers of a record's throughput entries, for the
  long throughput frame;
* ``format_speedup``: ``1.42x (1.39-1.45)``: the median paired ratio and its bootstrap 95% interval;
* ``crossover``: the smallest measured batch size from which a method beats dense (speed-up > 1 at it and
  at every larger measured size); ``includes_one``: its 95% interval there includes 1.00x (marked ``UNSURE``);
* ``speed_section``: per model group, the crossover and a latency / memory table at the smallest (batch 1
  where measured) and the largest batch size;
* ``plot_throughput``: ``throughput.png``, images/s and speed-up against the batch size (log x), one row per
  group;
* ``token_grids``: ``tokens.png`` (``tokens_<label>.png`` per group when there are several): rows = the
  images, columns = the input and each run's final token map (from the tokens stage's ``tokens/<key>.npz``).

Light: pandas, numpy, matplotlib (no model stack).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

NUMBER_FIELDS = ["latency_p50_ms", "latency_p90_ms", "peak_mem_mb", "baseline_latency_p50_ms",
                 "baseline_latency_p90_ms", "baseline_peak_mem_mb", "speedup_low", "speedup_high", "graph_breaks"]
FLAG_FIELDS = ["auto", "out_of_memory", "compile", "cuda_graphs"]
ENTRY_COLUMNS = NUMBER_FIELDS + ["peak_mem_kind", "cuda_graphs_error"] + FLAG_FIELDS
MEMORY_KINDS = {
    "cpu_rss_growth": "growth of the resident set during one forward (CPU; a lower bound of its working memory)",
    "cuda_max_allocated": "torch.cuda.max_memory_allocated during one forward (weights and input included)",
}


def number(value: Any, scale: float = 1.0) -> float:
    """A float (divided by ``scale``), NaN for missing or non-numeric values."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value) / scale
    except (TypeError, ValueError):
        return math.nan


def fixed(value: Any, digits: int, suffix: str = "", signed: bool = False) -> str:
    """``value`` with ``digits`` decimals (and ``suffix``), empty when it is not a number."""
    value = number(value)
    return "" if math.isnan(value) else f"{value:{'+' if signed else ''}.{digits}f}{suffix}"


def run_label(method: Any, params: Any) -> str:
    """``tome (r=4)``; the bare method name without parameters."""
    return f"{method} ({params})" if params else str(method)


def entry_fields(entry: dict) -> dict[str, Any]:
    """The ``ENTRY_COLUMNS`` of one throughput entry (NaN / False where the record lacks them)."""
    fields: dict[str, Any] = {name: number(entry.get(name)) for name in NUMBER_FIELDS}
    fields["peak_mem_kind"] = entry.get("peak_mem_kind")
    fields["cuda_graphs_error"] = entry.get("cuda_graphs_error")
    fields.update({name: bool(entry.get(name, False)) for name in FLAG_FIELDS})
    return fields


def format_speedup(speedup: Any, low: Any = None, high: Any = None) -> str:
    """``1.42x (1.39-1.45)``; ``1.42x`` without an interval; empty when there is no speed-up."""
    value, low, high = number(speedup), number(low), number(high)
    if math.isnan(value):
        return ""
    if math.isnan(low) or math.isnan(high):
        return f"{value:.2f}x"
    return f"{value:.2f}x ({low:.2f}-{high:.2f})"


def crossover(batch_sizes: Sequence[Any], speedups: Sequence[Any]) -> int | None:
    """The smallest batch size from which every measured speed-up is above 1 (None: not at the largest)."""
    points = sorted((int(b), number(s)) for b, s in zip(batch_sizes, speedups, strict=True)
                    if not pd.isna(b) and not math.isnan(number(s)))
    found = None
    for batch, speedup in reversed(points):
        if speedup <= 1.0:
            break
        found = batch
    return found


UNSURE = "†"  # a crossover whose speed-up interval at its batch size includes 1.00x (see speed_section's note)


def includes_one(low: Any, high: Any) -> bool:
    """The speed-up's 95% interval ``low``-``high`` includes 1.00x (False without one): the median is no evidence
    that the method is faster than dense there (a method that reduces nothing read "beats dense from bs 100" on a
    1.00x median with a wide interval). The crossover's definition stays the median's; the table marks it."""
    low, high = number(low), number(high)
    return not (math.isnan(low) or math.isnan(high)) and low <= 1.0 <= high


def _measured(tp: pd.DataFrame) -> pd.DataFrame:
    """Entries with numbers (not the out-of-memory markers), batch size as int."""
    valid = tp.dropna(subset=["batch_size", "images_per_s"])
    return valid.assign(batch_size=valid["batch_size"].astype(int))


def speed_section(df: pd.DataFrame, tp: pd.DataFrame, group_keys: Sequence[str],
                  sort: Callable[[pd.DataFrame], pd.DataFrame], title: Callable[..., str]) -> list[str]:
    """``## Latency, memory and crossover``: per group, where each method beats dense and its latency / memory at
    the smallest and the largest measured batch size. Empty without throughput entries."""
    if tp.empty:
        return []
    measured = _measured(tp)
    if measured.empty:
        return []
    lines = ["## Latency, memory and crossover", ""]
    for names, group in measured.groupby(list(group_keys), sort=True):
        sizes = sorted(group["batch_size"].unique())
        ends = [sizes[0]] + ([sizes[-1]] if sizes[-1] != sizes[0] else [])
        headers = ["Method", "Params", "Beats dense from"]
        for batch in ends:
            headers += [f"p50 ms (bs {batch})", f"p90 ms (bs {batch})", f"Peak MB (bs {batch})",
                        f"Dense p50 ms (bs {batch})", f"Dense p90 ms (bs {batch})", f"Dense peak MB (bs {batch})"]
        rows, unsure = [], False
        for _, run in sort(df[df["key"].isin(group["key"])]).iterrows():
            entries = group[group["key"] == run["key"]]
            if run["method"] == "baseline":
                beats = "(dense)"
            else:
                found = crossover(entries["batch_size"], entries["speedup"])
                beats = f"bs {found}" if found is not None else f"not up to bs {int(entries['batch_size'].max())}"
                at = entries[entries["batch_size"] == found]
                if len(at) and includes_one(at["speedup_low"].iloc[0], at["speedup_high"].iloc[0]):
                    beats += f" {UNSURE}"
                    unsure = True
            row = [str(run["method"]), str(run["params"] or ""), beats]
            for batch in ends:
                match = entries[entries["batch_size"] == batch]
                entry = match.iloc[0] if len(match) else None
                row += [""] * 6 if entry is None else [
                    fixed(entry["latency_p50_ms"], 2), fixed(entry["latency_p90_ms"], 2),
                    fixed(entry["peak_mem_mb"], 1), fixed(entry["baseline_latency_p50_ms"], 2),
                    fixed(entry["baseline_latency_p90_ms"], 2), fixed(entry["baseline_peak_mem_mb"], 1)]
            rows.append(row)
        lines += [f"### {title(*names)}", "", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True),
                  ""]
        kinds = [MEMORY_KINDS.get(kind, kind) for kind in group["peak_mem_kind"].dropna().unique()]
        notes = ["“Beats dense from”: the smallest measured batch size from which the speed-up (median paired "
                 "ratio) stays above 1 at every larger measured size"]
        if unsure:
            notes.append(f"{UNSURE}: the 95% interval of the speed-up at that batch size includes 1.00x (the median "
                         "is above 1, but dense may be as fast there)")
        if kinds:
            notes.append("peak memory: " + "; ".join(kinds))
        compiled = group[group["compile"].fillna(False).astype(bool)]
        if not compiled.empty:
            breaks = compiled.drop_duplicates("key")
            notes.append("both models compiled (torch.compile); graph breaks: " + ", ".join(
                f"{run_label(run.method, run.params)} {fixed(run.graph_breaks, 0) or '?'}"
                for run in breaks.itertuples()))
        graphed = group[group["cuda_graphs"].fillna(False).astype(bool)]
        refused = group[group["cuda_graphs_error"].notna()].drop_duplicates("key")
        if not graphed.empty or not refused.empty:
            note = "times are CUDA-graph replays of both models (no Python dispatch)"
            if not refused.empty:
                note += "; timed eagerly, not capturable: " + ", ".join(
                    f"{run_label(run.method, run.params)}: {run.cuda_graphs_error}"
                    for run in refused.itertuples())
            notes.append(note)
        oom = tp[(tp["key"].isin(group["key"])) & tp["out_of_memory"].fillna(False).astype(bool)]
        if not oom.empty:
            notes.append("out of memory at batch size " + ", ".join(sorted({str(int(b)) for b in oom["batch_size"]})))
        lines += ["_" + ". ".join(notes) + "._", ""]
    return lines


def figure_labels(groups: Sequence[tuple]) -> dict[tuple, str]:
    """A short label per (model, data, weights) group for a figure: ``model on data`` (the data label without its
    transform), with ``(weights)`` added where two groups would read alike (before and after fine-tuning), and the
    whole data label, transform included, where they still would (``--all``: an earlier config's other crop)."""
    short = {group: f"{group[0]} on {str(group[1]).split(' [')[0]}" for group in groups}
    counts = Counter(short.values())
    labels = {group: f"{text} ({group[2]})" if counts[text] > 1 else text for group, text in short.items()}
    counts = Counter(labels.values())
    return {group: f"{group[0]} on {group[1]} ({group[2]})" if counts[text] > 1 else text
            for group, text in labels.items()}


def plot_throughput(df: pd.DataFrame, tp: pd.DataFrame, path: str | Path, group_keys: Sequence[str],
                    sort: Callable[[pd.DataFrame], pd.DataFrame]) -> bool:
    """Images/s (left) and speed-up with its interval (right) against the batch size, log x, one row per
    group and one line per run; the dense model dashed. False (nothing written) without entries."""
    measured = _measured(tp) if not tp.empty else tp
    if measured.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.pipeline.files import atomic_file

    groups = list(measured.groupby(list(group_keys), sort=True))
    titles = figure_labels([names for names, _ in groups])
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    colours = plt.get_cmap("tab20")
    for row, (names, group) in enumerate(groups):
        rate_ax, speed_ax = axes[row]
        runs = sort(df[df["key"].isin(group["key"])])
        for index, (_, run) in enumerate(runs.iterrows()):
            entries = group[group["key"] == run["key"]].sort_values("batch_size")
            label = run_label(run["method"], run["params"])
            if run["method"] == "baseline":
                rate_ax.plot(entries["batch_size"], entries["images_per_s"], "k--", marker="o", label=label)
                continue
            colour = colours(index % 20)
            rate_ax.plot(entries["batch_size"], entries["images_per_s"], color=colour, marker="o", label=label)
            low = (entries["speedup"] - entries["speedup_low"]).clip(lower=0).fillna(0)
            high = (entries["speedup_high"] - entries["speedup"]).clip(lower=0).fillna(0)
            speed_ax.errorbar(entries["batch_size"], entries["speedup"], yerr=[low, high], color=colour, marker="o",
                              capsize=3, label=label)
        speed_ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        for ax, ylabel in ((rate_ax, "images/s"), (speed_ax, "speed-up over dense (95% interval)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3, which="both")
            ax.set_title(titles[names], fontsize=9)  # the full group title is in the markdown
        rate_ax.set_yscale("log")
        rate_ax.legend(fontsize=6.5, loc="best")
    fig.tight_layout()
    with atomic_file(path, binary=True) as handle:
        fig.savefig(handle, dpi=110, format="png")
    plt.close(fig)
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "model"


def token_grids(df: pd.DataFrame, results_dir: str | Path, group_keys: Sequence[str],
                sort: Callable[[pd.DataFrame], pd.DataFrame], title: Callable[..., str],
                out_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """Compose the token-map grid of every group whose runs left ``tokens/<key>.npz`` (under ``results_dir``)
    into ``out_dir`` (default ``results_dir``); returns ``[(caption, path)]``. Runs drawn on other images than
    the group's first run are left out."""
    from bench.tokenmap import compose, load_maps

    folder = Path(results_dir)
    found = []
    for names, group in df.groupby(list(group_keys), sort=True):
        columns, images, indices = [], None, None
        for _, run in sort(group).iterrows():
            path = folder / "tokens" / f"{run['key']}.npz"
            if not path.is_file():
                continue
            try:
                maps = load_maps(path)
            except (OSError, ValueError, KeyError):
                continue
            if images is None:
                images, indices = maps["images"], maps["indices"]
            elif not np.array_equal(maps["indices"], indices):
                continue
            caption = "\n".join([str(run["method"]), *textwrap.wrap(str(run["params"] or ""), 22)])
            columns.append((caption, maps["labels"][:, -1]))
        if columns:
            found.append((names, images, columns))
    written = []
    slugs = [_slug(str(names[0])) for names, _, _ in found]  # labels that differ only in punctuation share a slug
    # captions and titles as throughput.png's rows: groups of one model label (another data set, crop or weights,
    # --all) each say which they are, not "Token maps: <model> (<weights>)" twice
    labels = figure_labels([names for names, _, _ in found])
    for index, (names, images, columns) in enumerate(found):
        if len(found) == 1:
            name = "tokens.png"
        else:
            slug = slugs[index]
            name = f"tokens_{slug}.png" if slugs.count(slug) == 1 else f"tokens_{slug}-{index + 1}.png"
        path = Path(out_dir or folder) / name
        caption = f"Token maps: {labels[names]}"
        compose(path, images, columns, f"{caption} (grey: pruned; a colour: one merged token)")
        written.append((caption, path))
    return written


def write_figures(df: pd.DataFrame, tp: pd.DataFrame, results_dir: str | Path, markdown_dir: str | Path,
                  group_keys: Sequence[str], sort: Callable[[pd.DataFrame], pd.DataFrame],
                  title: Callable[..., str]) -> list[tuple[str, str, Path]]:
    """Write ``throughput.png`` and the token-map grids (from ``results_dir``'s ``tokens/``) into
    ``markdown_dir``, beside the markdown that links them; ``[(caption, path relative to markdown_dir, path)]``
    of those written."""
    import os

    folder = Path(markdown_dir)
    written = []
    if plot_throughput(df, tp, folder / "throughput.png", group_keys, sort):
        written.append(("Throughput and speed-up vs batch size", folder / "throughput.png"))
    written += token_grids(df, results_dir, group_keys, sort, title, out_dir=folder)
    return [(caption, Path(os.path.relpath(path, markdown_dir)).as_posix(), path) for caption, path in written]


def figures_section(figures: Sequence[tuple[str, str, Path]]) -> list[str]:
    """``## Figures``: each figure linked and embedded by its relative path."""
    if not figures:
        return []
    lines = ["## Figures", ""]
    for caption, relative, _ in figures:
        lines += [f"[{caption}]({relative})", "", f"![{caption}]({relative})", ""]
    return lines
