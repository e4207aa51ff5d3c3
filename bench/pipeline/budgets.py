"""The leaderboard's answer to "which method is most accurate at my compute budget": the ``## Matched
budgets`` section (one row per method, one column per MAC budget, each cell top-1 (Δ vs dense) at the
achieved MAC fraction, the best cell per column in bold) and the Pareto AUC that ranks the methods.

Pareto AUC: the area under a method's top-1 over the budgets of its cells (trapezoid rule, each cell at its
budget) divided by the range of those budgets, i.e. its mean top-1 over the budget range. Every method with a
cell at every budget is measured over the same range, and one that is at least as accurate in every cell has at
least its AUC (over the achieved fractions, a method whose knob undershoots a budget, ATS or resize, was averaged
over a wider range of its own and could rank below one it beats in every cell). The achieved fractions it covered
are printed next to it. A method with a single cell has no area: its AUC is empty.
Rank: first by the budgets a method has no cell for (fewer first: out of reach, or over budget), then by AUC,
higher first (none last), then by the mean top-1 of its cells, higher first, then by name.
Light: pandas only (``report.py`` imports it without the model stack).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

OVER_BUDGET = 1e-6  # a cell's MAC fraction above its budget by more than this is over it


def budget_text(target: float) -> str:
    """A MAC budget as the tables and messages show it: two decimals (0.60), more where it has more (0.705 was shown
    as 0.70, the header of a cell at 0.703)."""
    text = f"{target:.2f}"
    return text if float(text) == round(target, 6) else f"{round(target, 6):g}"


def pareto_auc(fractions: Sequence[float], top1: Sequence[float]) -> float:
    """Trapezoid area of top-1 over MAC fractions (the leaderboard's: the budgets of a method's cells) divided by
    the range they cover (the mean top-1 over that range); NaN with fewer than two distinct fractions."""
    points = sorted((f, t) for f, t in zip(fractions, top1, strict=True) if not (math.isnan(f) or math.isnan(t)))
    span = points[-1][0] - points[0][0] if points else 0.0
    if len(points) < 2 or span <= 0:
        return math.nan
    area = sum((f1 - f0) * (t0 + t1) / 2 for (f0, t0), (f1, t1) in zip(points, points[1:], strict=False))
    return area / span


def setting(params: Any, knob: Any) -> str | None:
    """A budget run's parameters without its calibrated knob (canonical JSON): the runs of one setting of a
    method across the budgets share it, and so does the calibration of a budget out of that setting's reach (its
    ``setting``); None for a run without a budget."""
    if not isinstance(params, dict) or not isinstance(knob, str):
        return None
    return json.dumps({name: value for name, value in params.items() if name != knob}, sort_keys=True, default=str)


def labeller(settings: dict[str, set]) -> Callable[[str, str | None], str]:
    """The row label of a setting of a method: the method, then the parameters that tell apart its settings
    (``settings``: method -> its settings) in this table (``evit [layers=[1, 3, 5]]`` beside ``evit [layers=[2, 4,
    6]]``: user test 15 saw them merged into one row, one cell and one AUC over both)."""
    parsed = {method: {text: json.loads(text) if isinstance(text, str) else {} for text in texts}
              for method, texts in settings.items()}
    differ = {}  # method -> the parameters whose values differ between its settings
    for method, known in parsed.items():
        names = sorted({name for each in known.values() for name in each})
        differ[method] = [name for name in names if len({json.dumps(each.get(name), sort_keys=True, default=str)
                                                          for each in known.values()}) > 1]

    def label(method: str, text: str | None) -> str:
        mine, names = parsed.get(method, {}).get(text, {}), differ.get(method, [])
        return method + (" [" + ", ".join(f"{name}={mine.get(name)}" for name in names) + "]" if names else "")

    return label


def row_labels(runs: pd.DataFrame, label: Callable[[str, str | None], str] | None = None) -> list[str]:
    """The matched-budget row of each budget run of one model group: the label of its setting (``label``, by
    default ``labeller`` of the runs' own settings), then ``[fine-tuned]`` or ``[earlier config]`` where the run
    was trained before it was evaluated or belongs to an earlier config (report.py --all)."""
    if label is None:
        known: dict[str, set] = {}
        for method, text in zip(runs["method"], runs["_setting"], strict=True):
            known.setdefault(method, set()).add(text)
        label = labeller(known)
    return [label(method, text) + " [fine-tuned]" * bool(tuned) + " [earlier config]" * bool(earlier)
            for method, text, tuned, earlier in zip(runs["method"], runs["_setting"], runs["finetune_epochs"].notna(),
                                                    runs["_earlier"], strict=True)]


def budget_section(df: pd.DataFrame, calibrations: Sequence[dict[str, Any]], group: list[str],
                   title: Callable[..., str], table: Callable[[list[list[str]], list[str]], str],
                   group_of: Callable[[dict[str, Any]], tuple | None] = lambda calibration: None) -> list[str]:
    """Markdown lines of the matched-budget tables, one per model group that has budget runs; empty when no
    run was calibrated to a budget and evaluated (a budget run without the eval stage has no top-1 to show).
    ``calibrations``: those of the experiment's ``experiment.json`` (unreachable budgets appear there only), each
    in the model group it was made for: ``group_of``'s (the ``group`` values of the weights and data it records);
    where it gives None (an ``experiment.json`` of an earlier version), the groups of the calibration's model label
    that hold a run of the current config. Not by label alone: with ``report.py --all``, an earlier config's group
    of that label (other weights or data) got this config's `–` cells and rows of methods it never ran."""
    runs = df[df["budget"].notna() & df["top1"].notna()]
    if runs.empty:
        return []
    current = {keys for keys, whole in df.groupby(group, sort=False) if (~whole["_earlier"].astype(bool)).any()}
    runs = runs.assign(_base=runs["method"])
    lines = ["## Matched budgets", "",
             "Each cell: top-1 (Δ vs dense) at the achieved fraction of the dense MACs (torchprofile; for ATS, "
             "whose work depends on the image, the mean over the macs stage's real images); every "
             "method's knob was calibrated to the least reduction within the budget. `–`: the budget is out "
             "of the method's reach. Pareto AUC: the method's mean top-1 over the budgets of its cells "
             "(trapezoid with each cell at its budget, divided by the budgets' range; Covered: the achieved "
             "fractions). Rank: by the budgets without a cell (fewer first), then by Pareto AUC (a method with "
             "one cell has none and comes after those with one), then by the mean top-1 of its cells, then by "
             "name.", ""]
    for keys, part in runs.groupby(group, sort=True):
        mine = [c for c in calibrations if (tuple(made) == tuple(keys) if (made := group_of(c)) is not None
                                            else c.get("model") == keys[0] and keys in current)]
        # budgets out of reach: of one setting of a method (its calibration's ``setting``), or of every setting
        # (calibrations written before settings were told apart)
        unreachable = {(c["method"], c.get("setting"), round(c["target"], 6)) for c in mine if c.get("value") is None}
        known: dict[str, set] = {}  # each method's settings: of its runs and of its budgets out of reach
        for method, text in [*zip(part["method"], part["_setting"], strict=True),
                             *((method, text) for method, text, _ in unreachable if text is not None)]:
            known.setdefault(method, set()).add(text)
        label = labeller(known)
        # one row per setting of a method (a run per cell): fine-tuned runs and an earlier config's apart, marked as
        # in the leaderboard's tables, so that their cells never stand for the method off the shelf
        part = part.assign(method=row_labels(part, label))
        # each row's (method, setting), also a setting out of reach at every budget (a row of "–")
        setting_of = {row: (method, text) for row, method, text in zip(part["method"], part["_base"], part["_setting"],
                                                                      strict=True)}
        for method, text, _ in unreachable:
            if text is not None:
                setting_of.setdefault(label(method, text), (method, text))
            elif method not in set(part["_base"]):
                setting_of.setdefault(method, (method, None))
        # every budget of the group, also one that no method reached (a column of "–") and one whose runs all lack a
        # record (failed, interrupted, not run yet: a column of blanks, not a table that reads as if it had no such
        # budget)
        targets = sorted({round(x, 6) for x in part["budget"]} | {t for _, _, t in unreachable}
                         | {round(c["target"], 6) for c in mine})
        methods = sorted(setting_of)
        # a record above its budget (calibrated on other images or code than it was measured with): shown as such,
        # never the best of its column nor part of a rank
        over = part["mac_fraction"] > part["budget"] + OVER_BUDGET
        within = part[~over]
        best = {target: within[within["budget"].round(6) == target]["top1"].max() for target in targets}
        rows, flagged = [], False
        for method in methods:
            mine = part[part["method"] == method]
            cells, shown = [], []  # shown: (budget, top-1) of the row's cells within their budget
            for target in targets:
                hit = mine[mine["budget"].round(6) == target]
                if hit.empty:
                    name, text = setting_of[method]
                    out = (name, text, round(target, 6)) in unreachable or (name, None, round(target, 6)) in unreachable
                    cells.append("–" if out else "")  # blank: not run, or its run failed
                    continue
                row = hit.iloc[0]
                text = f"{row['top1']:.2f}"  # Δ without a dense run, @ without the macs stage: left out
                text += "" if pd.isna(row["delta_top1"]) else f" ({row['delta_top1']:+.2f})"
                text += "" if pd.isna(row["mac_fraction"]) else f" @{row['mac_fraction']:.3f}"
                if over[hit.index[0]]:
                    cells.append(f"{text} over budget")
                    flagged = True
                    continue
                shown.append((target, row["top1"]))
                cells.append(f"**{text}**" if row["top1"] == best[target] else text)
            auc = pareto_auc([target for target, _ in shown], [top1 for _, top1 in shown])
            fractions = mine[~over[mine.index]]["mac_fraction"].dropna()
            covered = f"{fractions.min():.2f}–{fractions.max():.2f}" if len(fractions) else ""
            mean = sum(top1 for _, top1 in shown) / len(shown) if shown else math.nan
            # compared at 1e-4 points (one image in a million): top-1 values of earlier records carry float32 noise
            # of up to ~5e-6 (8.500000089, 85.9000027) that must not rank
            rows.append(((len(targets) - len(shown), math.isnan(auc), 0 if math.isnan(auc) else -round(auc, 4),
                          math.isnan(mean), 0 if math.isnan(mean) else -round(mean, 4), method), auc, method,
                         [*cells, covered]))
        rows.sort(key=lambda item: item[0])
        headers = ["Rank", "Method", *[f"≤ {budget_text(target)} MACs" for target in targets], "Covered", "Pareto AUC"]
        body = [[str(rank), method, *cells, "" if math.isnan(auc) else f"{auc:.2f}"]
                for rank, (_, auc, method, cells) in enumerate(rows, start=1)]
        lines += [f"### {title(*keys)}", "", table(body, headers), ""]
        if flagged:
            lines += ["_over budget: the run's MACs are above its budget, so it was calibrated on other images or "
                      "code than it was measured with; it is left out of the bold cells, the AUC and the rank: "
                      "run it again with --force._", ""]
        if part["finetune_epochs"].notna().any():
            lines += ["_[fine-tuned]: trained by the finetune stage before it was evaluated (see this model's table "
                      "below); not the method off the shelf._", ""]
    return lines
