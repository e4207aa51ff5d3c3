"""Matched MAC budgets: the calibrator's search (integer, continuous and discrete knobs, unreachable
budgets), the experiment-file expansion, the records and the leaderboard's matched-budget section."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import pandas
import pytest
import yaml

import bench
import report
import run_bench
from bench.pipeline.budgets import pareto_auc
from bench.pipeline.calibrate import Calibrator, _least_reduction
from bench.pipeline.files import REPO
from bench.pipeline.records import read_all, record_path, write_record
from tests.helpers import small_vit


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def calibrator():
    return Calibrator(small_vit(), identity=["small_vit", 0])


def macs(vit, method, **params) -> int:
    return bench.count_macs(bench.apply(vit, method, **params))


def test_least_reduction_is_a_binary_search_for_the_first_affordable_value():
    costs = [100, 90, 90, 70, 55, 40, 40, 10]
    calls = []

    def cost(index):
        calls.append(index)
        return costs[index]

    assert _least_reduction(cost, len(costs), 70) == 3
    assert _least_reduction(cost, len(costs), 89.9) == 3
    assert _least_reduction(cost, len(costs), 90) == 1
    assert _least_reduction(cost, len(costs), 1000) == 0
    assert _least_reduction(cost, len(costs), 5) is None
    assert len(calls) < 5 * len(costs)  # logarithmic, not a scan per call


def test_integer_knob_is_the_least_r_within_the_budget(calibrator):
    vit, dense = calibrator.vit, calibrator.dense_macs
    result = calibrator.calibrate("tome", {}, 0.6)
    assert result.knob == "r" and isinstance(result.value, int)
    measured = macs(vit, "tome", r=result.value)
    assert measured == result.macs and measured <= 0.6 * dense
    assert macs(vit, "tome", r=result.value - 1) > 0.6 * dense  # one less reduction would exceed it
    assert result.achieved == pytest.approx(measured / dense)


def test_a_value_the_analytic_count_admits_but_torchprofile_does_not_is_corrected_to_the_next(calibrator):
    """At 0.618 of the dense MACs ToMe's r=4 fits by the analytic count (0.6177: it leaves out the similarity
    matrices) but not by torchprofile's (0.6184): the correction aims lower by their ratio and lands on r=5, which
    torchprofile puts within the budget. Aiming higher instead, or giving up after the first try, said
    'unreachable'."""
    vit, dense = calibrator.vit, calibrator.dense_macs
    r4 = bench.apply(vit, "tome", r=4)
    assert bench.analytic_macs(r4) <= 0.618 * dense < bench.count_macs(r4)  # the case the correction is for
    result = calibrator.calibrate("tome", {}, 0.618)
    assert result.reachable and result.value == 5
    assert result.macs == macs(vit, "tome", r=5) <= 0.618 * dense


def test_continuous_knob_to_a_thousandth(calibrator):
    vit, dense = calibrator.vit, calibrator.dense_macs
    result = calibrator.calibrate("evit", {"layers": [2, 5, 8]}, 0.7)
    assert result.knob == "keep_rate" and result.value == round(result.value, 3)
    assert macs(vit, "evit", keep_rate=result.value, layers=[2, 5, 8]) <= 0.7 * dense
    assert macs(vit, "evit", keep_rate=round(result.value + 0.001, 3), layers=[2, 5, 8]) > 0.7 * dense
    assert 0.67 <= result.achieved <= 0.7


def test_discrete_knob_picks_the_most_expensive_choice_within_the_budget(calibrator):
    vit, dense = calibrator.vit, calibrator.dense_macs
    result = calibrator.calibrate("resize", {}, 0.6)
    assert result.value == 48  # 56 px costs more than 60 % of 64 px, 48 px less (multiples of the 8 px patch)
    assert macs(vit, "resize", img_size=48) <= 0.6 * dense < macs(vit, "resize", img_size=56)


def test_an_unreachable_budget_says_why(calibrator):
    result = calibrator.calibrate("ppt", {"layers": [9], "threshold": 0.0}, 0.5)
    assert not result.reachable and result.value is None
    assert "cheapest r=" in result.reason and "of the dense MACs" in result.reason
    assert "unreachable" in result.describe()


def test_results_are_cached_across_calibrators(calibrator, tmp_path):
    first = calibrator.calibrate("tome", {}, 0.75)
    again = Calibrator(small_vit(), identity=["small_vit", 0])
    again._search = None  # a cache miss would call it and fail
    assert again.calibrate("tome", {}, 0.75) == first


def test_a_calibration_depends_on_its_method_modules_and_the_harness_only():
    """An edit to one method (or a new file in methods/) keeps every other method's cached calibrations: the cache
    key hashes the method's own module and the methods modules it imports, the package's shared files and the
    harness (before: every methods/*.py)."""
    from bench.pipeline.calibrate import code_files

    harness = {f"bench/{path.name}" for path in (REPO / "bench").glob("*.py")} | {"bench/pipeline/calibrate.py",
                                                                                   "bench/pipeline/models.py"}
    shared = {"methods/__init__.py", "methods/base.py"}

    def files(method):
        return {path.relative_to(REPO).as_posix() for path in code_files(method)} - harness - shared

    assert files("tome") == {"methods/tome.py", "methods/ops.py"}
    assert files("kmedoids") == {"methods/kmedoids.py", "methods/dpcknn.py"}
    assert files("tofu") == {"methods/tofu.py", "methods/pitome.py", "methods/ops.py"}
    assert files("topk") == {"methods/topk.py", "methods/evit.py", "methods/ops.py"}
    assert files("pruning") == {"methods/pruning.py", "methods/ppt.py", "methods/ops.py"}
    assert files("baseline") == {"methods/baseline.py"}
    # ATS's MACs follow its images: what reads, transforms and draws them too (an edit to the draw reused a stale one)
    assert files("ats") == {"methods/ats.py", "bench/pipeline/data.py", "bench/pipeline/samples.py"}
    assert harness <= {path.relative_to(REPO).as_posix() for path in code_files("tome")}


def test_every_import_form_of_a_methods_module_is_followed():
    """A method built on another by `from methods import droplast` (user test 8) must be recalibrated when that one
    changes, as with `from methods.droplast import ...`."""
    from bench.pipeline.calibrate import imported_modules

    source = ("from methods import droplast\nfrom methods.base import Method, register\nimport methods.ops as o\n"
              "from methods import (evit,\n    ppt as p)  # two\nfrom methods import tome, tofu  # more\n"
              "import torch\nfrom bench.pipeline import methods_like\n\n\nclass Mine(droplast.DropLast):\n    pass\n")
    assert imported_modules(source) == ["base", "ops", "droplast", "evit", "ppt", "tome", "tofu"]


def test_pareto_auc_is_the_mean_top1_over_the_covered_range():
    assert pareto_auc([0.6, 0.8], [70.0, 80.0]) == pytest.approx(75.0)
    assert pareto_auc([0.8, 0.5, 0.6], [80.0, 60.0, 70.0]) == pytest.approx((0.1 * 65 + 0.2 * 75) / 0.3)
    assert math.isnan(pareto_auc([0.7], [75.0]))


MODEL = {"name": "vit_tiny_patch16_224", "label": "fmnist-vit",  # the embedded, trained model
         "kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 96, "depth": 8,
                    "num_heads": 3}}


def experiment(tmp_path: Path) -> Path:
    cfg = {
        "name": "budgets",
        "defaults": {"model": MODEL, "weights": str(REPO / "configs" / "fmnist_vit.pth"),
                     "data": {"name": "fashion_mnist", "subset": 64},
                     "batch_size": 64, "device": "cpu", "threads": 1},
        "stages": ["eval", "macs"],
        "budgets": {"macs": [0.55, 0.8]},
        "grid": {"methods": ["baseline", "tome", {"method": "evit", "layers": [1]},
                             {"method": "ppt", "layers": [1], "threshold": 1.0e-3}, "resize",
                             {"method": "tome", "r": 1}]},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budgets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOKENBENCH_CACHE_DIR", str(tmp / "cache"))
        path = experiment(tmp)
        assert run_bench.main(["--config", str(path), "--results", str(tmp / "results"), "--quiet"]) == 0
    return path, tmp / "results"


def test_dry_run_prints_every_calibrated_knob_and_unreachable_budgets(budget_run, capsys):
    path, results = budget_run
    assert run_bench.main(["--config", str(path), "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.strip().startswith("budget ")]
    assert len(lines) == 8  # tome, evit, ppt, resize x 2 budgets
    assert any("tome @0.55 -> r=" in line for line in lines)
    assert any("ppt @0.55 -> unreachable" in line for line in lines)
    assert "ppt @0.55 -> unreachable" in out.err  # also a warning line


def test_budget_runs_record_their_budget_and_stay_within_it(budget_run):
    _, results = budget_run
    records, problems = read_all(results)
    assert not problems
    by_budget = [r for r in records if r["run"].get("budget")]
    assert len(by_budget) == 7  # 8 budget cells, ppt @0.55 unreachable
    dense = next(r for r in records if r["run"]["method"] == "baseline")["metrics"]["macs"]["torchprofile"]
    for record in by_budget:
        budget = record["run"]["budget"]
        assert budget["knob"] in record["run"]["params"] and record["run"]["params"][budget["knob"]] == budget["value"]
        assert record["metrics"]["macs"]["torchprofile"] <= budget["target"] * dense
        assert budget["achieved"] == pytest.approx(record["metrics"]["macs"]["torchprofile"] / dense)
    explicit = [r for r in records if r["run"]["method"] == "tome" and not r["run"].get("budget")]
    assert [r["run"]["params"]["r"] for r in explicit] == [1]  # an entry that sets its knob runs as written


def test_leaderboard_has_the_matched_budget_table(budget_run):
    _, results = budget_run
    text = (results / "leaderboard.md").read_text()
    section = text.split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[2].strip(): line for line in section.splitlines() if line.startswith("| ") and "Rank" not in line}
    assert set(rows) == {"tome", "evit", "ppt", "resize"}
    assert "–" in rows["ppt"]  # unreachable at 0.55
    for column in (3, 4):  # the best top-1 of each budget column, and only it, in bold
        cells = {method: line.split("|")[column].strip() for method, line in rows.items()}
        values = {method: float(cell.strip("*").split()[0]) for method, cell in cells.items() if cell != "–"}
        best = max(values.values())
        assert {m for m, c in cells.items() if c.startswith("**")} == {m for m, v in values.items() if v == best}
    csv = (results / "leaderboard.csv").read_text().splitlines()
    header = csv[0].split(",")
    assert "budget" in header and "mac_fraction" in header


def test_budget_runs_without_eval_or_dense_run_print_no_nan(budget_run, tmp_path):
    """Budget runs that only time (no eval: no top-1) leave the matched-budget table out; evaluated ones
    without a dense run or MAC count show top-1 without the Δ and the @fraction, never "nan"."""
    path, _ = budget_run
    cfg = yaml.safe_load(path.read_text())
    cfg["budgets"] = {"macs": [0.8]}
    cfg["grid"] = {"methods": ["tome", {"method": "evit", "layers": [1]}]}
    cases = {"timing": ["throughput"], "eval": ["eval"]}
    for label, stages in cases.items():
        cfg.update(name=label, stages=stages, throughput={"batch_sizes": [4], "warmup": 1, "runs": 1})
        config = tmp_path / f"{label}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TOKENBENCH_CACHE_DIR", str(path.parent / "cache"))
            assert run_bench.main(["--config", str(config), "--results", str(tmp_path / label), "--quiet"]) == 0
    timing = (tmp_path / "timing" / "leaderboard.md").read_text()
    assert "## Matched budgets" not in timing and "nan" not in timing
    evaluated = (tmp_path / "eval" / "leaderboard.md").read_text()
    section = evaluated.split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    assert "nan" not in section
    cells = [line.split("|")[3].strip().strip("*") for line in section.splitlines()
             if line.startswith("| ") and "Rank" not in line]
    assert len(cells) == 2 and all(re.fullmatch(r"\d+\.\d\d", cell) for cell in cells), cells


def test_a_record_above_its_budget_is_marked_and_kept_out_of_bold_and_rank(budget_run, tmp_path):
    """A record whose MACs are above its budget (calibrated on other images or code than it was measured with) was
    shown, bold when best, under "≤ budget". It is now marked, never bold, and left out of the AUC and the rank."""
    _, results = budget_run
    folder = tmp_path / "over"
    records, _ = read_all(results)
    dense = next(r for r in records if r["run"]["method"] == "baseline")["metrics"]["macs"]["torchprofile"]
    for record in records:
        budget = record["run"]["budget"]
        if record["run"]["method"] == "tome" and budget and budget["target"] == 0.55:
            record = copy.deepcopy(record)
            record["metrics"]["eval"]["top1"] = 99.0  # the best of its column, were it within the budget
            record["metrics"]["macs"]["torchprofile"] = int(0.6 * dense)  # 0.600 of the dense MACs
        write_record(record_path(folder, record["key"]), record)
    shutil.copy(results / "experiment.json", folder / "experiment.json")
    assert report.main([str(folder)]) == 0
    section = (folder / "leaderboard.md").read_text().split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    rows = {cells[1]: cells for cells in ([cell.strip() for cell in line.split("|")[1:-1]]
                                          for line in section.splitlines() if line.startswith("| ") and "Rank" not in line)}
    assert rows["tome"][2].startswith("99.00 (") and rows["tome"][2].endswith(" @0.600 over budget")
    assert rows["evit"][2].startswith("**") or rows["resize"][2].startswith("**")  # the best within the budget
    assert rows["tome"][-1] == ""  # one cell left: no Pareto AUC
    assert max(rows, key=lambda name: -int(rows[name][0])) != "tome" and int(rows["tome"][0]) > 1
    assert "_over budget: the run's MACs are above its budget" in section


def test_a_budget_whose_runs_all_lack_a_record_keeps_its_column(budget_run, tmp_path):
    """Every run at 0.8 failed or was interrupted: its column stays, blank, with the rank unchanged (it vanished, and
    the table read as if the experiment had one budget)."""
    _, results = budget_run
    folder = tmp_path / "partial"
    records, _ = read_all(results)
    for record in records:
        budget = record["run"]["budget"]
        if not (budget and budget["target"] == 0.8):
            write_record(record_path(folder, record["key"]), record)
    shutil.copy(results / "experiment.json", folder / "experiment.json")
    assert report.main([str(folder)]) == 0
    section = (folder / "leaderboard.md").read_text().split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| Rank"))
    assert [cell.strip() for cell in header.split("|")[3:5]] == ["≤ 0.55 MACs", "≤ 0.80 MACs"]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| ") and "Rank" not in line]
    assert rows and all(row[3] in ("", "–") for row in rows) and any(row[2] for row in rows)


def test_a_method_better_in_every_cell_ranks_first_whatever_fractions_its_knob_reached(tmp_path):
    """Three budgets; evit beats tome by 0.1 points in every cell, but undershoots the lowest budget (0.40 of the
    dense MACs under 0.55). Over the achieved fractions its AUC averaged a wider range of its own (83.69 against
    84.23) and ranked it second; over the budgets both are measured on the same range (84.33 against 84.23)."""
    cfg = yaml.safe_load(experiment(tmp_path).read_text())
    cfg.update({"budgets": {"macs": [0.55, 0.7, 0.8]}, "grid": {"methods": ["baseline", "tome",
                                                                           {"method": "evit", "layers": [1]}]}})
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(cfg))
    results = tmp_path / "results"
    assert run_bench.main(["--config", str(path), "--results", str(results), "--quiet", "--no-report"]) == 0
    records, _ = read_all(results)
    dense = next(r for r in records if r["run"]["method"] == "baseline")["metrics"]["macs"]["torchprofile"]
    cells = {("evit", 0.55): (79.1, 0.40), ("evit", 0.7): (86.0, 0.69), ("evit", 0.8): (88.0, 0.79),
             ("tome", 0.55): (79.0, 0.54), ("tome", 0.7): (85.9, 0.69), ("tome", 0.8): (87.9, 0.79)}
    for record in records:
        if record["run"]["budget"]:
            top1, fraction = cells[record["run"]["method"], record["run"]["budget"]["target"]]
            record["metrics"]["eval"]["top1"] = top1
            record["metrics"]["macs"]["torchprofile"] = int(fraction * dense)
            write_record(record_path(results, record["key"]), record)
    assert report.main([str(results)]) == 0
    section = (results / "leaderboard.md").read_text().split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| ") and "Rank" not in line]
    assert [(row[0], row[1], row[-2], row[-1]) for row in rows] == [("1", "evit", "0.40–0.79", "84.33"),
                                                                    ("2", "tome", "0.54–0.79", "84.23")]


def test_one_budget_ranks_by_mean_top1_then_a_method_without_cells_last(budget_run, tmp_path):
    """One budget: no method has a Pareto AUC, so the rank follows the cells' top-1 (not the names); ppt,
    unreachable at 0.55, has no cell and comes last."""
    _, results = budget_run
    records, _ = read_all(results)
    chosen = {"evit": 85.5, "resize": 80.0, "tome": 88.5}
    folder = tmp_path / "one"
    for record in records:
        budget = record["run"]["budget"]
        method = record["run"]["method"]
        if method == "baseline" or (budget and budget["target"] == 0.55 and method in chosen):
            record = copy.deepcopy(record)
            record["metrics"]["eval"]["top1"] = chosen.get(method, 89.0)
            write_record(record_path(folder, record["key"]), record)
    shutil.copy(results / "experiment.json", folder / "experiment.json")
    assert report.main([str(folder)]) == 0
    section = (folder / "leaderboard.md").read_text().split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| ") and "Rank" not in line]
    assert [row[:2] for row in rows] == [["1", "tome"], ["2", "evit"], ["3", "resize"], ["4", "ppt"]]
    assert [row[2].split()[0] for row in rows] == ["**88.50", "85.50", "80.00", "–"]
    assert [row[-1] for row in rows] == ["", "", "", ""]  # one budget: no Pareto AUC


def test_budgets_removed_from_the_config_leave_the_report_with_their_runs_and_calibrations(budget_run, tmp_path):
    """experiment.json is rewritten by every invocation: once the budgets are gone from the config, the matched
    budget table (unreachable cells included) and the budget runs leave the tables; their records stay."""
    path, results = budget_run
    folder = tmp_path / "results"
    shutil.copytree(results, folder)
    cfg = yaml.safe_load(path.read_text())
    del cfg["budgets"]
    cfg["grid"]["methods"] = ["baseline", {"method": "tome", "r": 1}]  # the runs without a budget: done already
    edited = tmp_path / "exp.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    assert run_bench.main(["--config", str(edited), "--results", str(folder), "--quiet"]) == 0
    assert json.loads((folder / "experiment.json").read_text())["calibrations"] == []
    board = (folder / "leaderboard.md").read_text()
    assert "## Matched budgets" in (results / "leaderboard.md").read_text() and "## Matched budgets" not in board
    earlier = board.split("## Records of earlier configs", 1)[1]
    budget_keys = [r["key"] for r in read_all(results)[0] if r["run"]["budget"]]
    assert len(budget_keys) == 7 and all(f"- {key}: " in earlier for key in budget_keys)


def test_no_calibrate_keeps_the_budget_runs_current_and_a_fixed_twin_of_a_budget_run_is_told_apart(budget_run, tmp_path,
                                                                                                   capsys):
    """--no-calibrate runs the runs it can key without calibrating: experiment.json then lists those, keeps the
    last calibrations and says the budget runs are unknown, so their records stay in the tables beside the new
    run. A fixed run with the setting a budget calibrated to is labelled apart from the budget run."""
    path, results = budget_run
    folder = tmp_path / "results"
    shutil.copytree(results, folder)
    budget_r = next(r["run"]["params"]["r"] for r in read_all(results)[0]
                    if r["run"]["method"] == "tome" and r["run"]["budget"] and r["run"]["budget"]["target"] == 0.8)
    cfg = yaml.safe_load(path.read_text())
    cfg["grid"]["methods"].append({"method": "tome", "r": budget_r})
    edited = tmp_path / "exp.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    assert run_bench.main(["--config", str(edited), "--results", str(folder), "--quiet", "--no-calibrate"]) == 0
    written = json.loads((folder / "experiment.json").read_text())
    assert {r["key"] for r in read_all(results)[0] if r["run"]["budget"]} <= set(written["runs"])
    assert written["calibrations"] == json.loads((results / "experiment.json").read_text())["calibrations"] != []
    board = (folder / "leaderboard.md").read_text()
    assert "## Records of earlier configs" not in board and "## Matched budgets" in board
    labels = [line.split("|")[2].strip() for line in board.split("## fmnist-vit", 1)[1].splitlines()
              if line.startswith("| tome ")]
    assert f"r={budget_r} [budget.target=0.8]" in labels and f"r={budget_r} [budget.target=None]" in labels, labels


def test_only_a_method_calibrates_that_methods_budgets_and_keeps_the_others_calibrations(budget_run, tmp_path,
                                                                                          capsys):
    """``--only tome`` on an experiment with MAC budgets searches ToMe's budgets only (with an empty cache: it
    searched every method's, minutes on a large model), finds the same runs done, and experiment.json keeps
    the other methods' calibrations beside ToMe's; the leaderboard keeps every method's budget cells."""
    path, results = budget_run
    folder = tmp_path / "results"
    shutil.copytree(results, folder)
    full = json.loads((results / "experiment.json").read_text())
    # an earlier experiment.json without ToMe's calibrations: --only tome adds them, the others' stay
    (folder / "experiment.json").write_text(json.dumps({**full, "calibrations": [
        c for c in full["calibrations"] if c["method"] != "tome"]}))
    capsys.readouterr()
    assert run_bench.main(["--config", str(path), "--results", str(folder), "--quiet", "--only", "tome"]) == 0
    out = capsys.readouterr().out
    searched = [line.split(": ", 1)[1].split(" @")[0] for line in out.splitlines() if line.startswith("calibrated on ")]
    assert searched == ["tome", "tome"], out  # the cache is empty: each search is announced
    assert "budgets: 3 run(s), 3 already done, 0 to run" in out, out  # tome r=1 and its two budgets: the same keys
    written = json.loads((folder / "experiment.json").read_text())
    assert {r["key"] for r in read_all(results)[0] if r["run"]["budget"]} <= set(written["runs"])
    def key(calibration: dict) -> tuple:  # what one calibration is for: model, method, setting and budget
        return (calibration.get("model"), calibration.get("method"),
                json.dumps(calibration.get("setting"), sort_keys=True), round(calibration.get("target") or 0.0, 6))

    assert sorted(map(key, written["calibrations"])) == sorted(map(key, full["calibrations"])), written["calibrations"]
    assert len(full["calibrations"]) == 8
    board = (folder / "leaderboard.md").read_text()
    assert board.split("## Matched budgets", 1)[1] == (results / "leaderboard.md").read_text().split(
        "## Matched budgets", 1)[1]


def test_ats_budget_is_calibrated_on_the_images_its_record_averages_and_the_cache_tells_image_sets_apart(tmp_path,
                                                                                                      monkeypatch):
    """ATS's MACs depend on the image: its budget run's achieved fraction is the mean over the very images the
    macs stage averages (data_mean), which is what the leaderboard shows, so a cell never exceeds its budget;
    and a calibration cached for other images (macs.images) is not reused."""
    monkeypatch.setenv("TOKENBENCH_CACHE_DIR", str(tmp_path / "cache"))
    cells = {}
    for images in (4, 16):
        cfg = yaml.safe_load(experiment(tmp_path).read_text())
        cfg.update({"stages": ["macs"], "macs": {"images": images}, "budgets": {"macs": [0.8]},
                    "grid": {"methods": ["baseline", "ats"]}})
        path = tmp_path / f"ats{images}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        results = tmp_path / f"results{images}"
        assert run_bench.main(["--config", str(path), "--results", str(results), "--quiet"]) == 0
        records = {r["run"]["method"]: r for r in read_all(results)[0]}
        dense, ats = records["baseline"]["metrics"]["macs"]["torchprofile"], records["ats"]
        assert ats["run"]["budget"]["achieved"] == pytest.approx(ats["metrics"]["macs"]["data_mean"] / dense, abs=1e-6)
        assert ats["run"]["budget"]["achieved"] <= 0.8
        table = pandas.read_csv(results / "leaderboard.csv")
        cells[images] = ats["run"]["budget"]["achieved"]
        (fraction,) = table.loc[table["method"] == "ats", "mac_fraction"]
        assert fraction == pytest.approx(cells[images], abs=1e-3)
    assert cells[4] != cells[16]  # other images, another calibration (not the cached one)


def test_a_budget_run_takes_the_counts_its_calibration_traced_in_the_same_process(tmp_path, monkeypatch):
    """Calibrating a budget traces the setting it picks (torchprofile on the fixed image; for ATS on the macs stage's
    images) and the dense model; in the same process the runs' macs stages take those counts instead of tracing
    again (0.3-0.5 s a run, ATS's 16 images 4-8 s, in the quickstart). An entry that sets its knob was not traced by
    a calibration: its stage traces it. A second invocation (the calibrations cached on disk, nothing traced before
    the runs) and a rerun with --force trace in the stages, and their records hold the same counts."""
    import bench
    import bench.macs
    from bench.pipeline import calibrate

    monkeypatch.setenv("TOKENBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "_MEASURED", {})
    traced = []
    count_macs, data_macs = bench.macs.count_macs, bench.macs.data_macs

    def counting_one(model, *args, **kwargs):
        if kwargs.get("image") is None:  # the fixed image (data_macs passes each real one)
            traced.append((model.method.name, json.dumps(model.method.params, sort_keys=True), 1))
        return count_macs(model, *args, **kwargs)

    def counting(model, images):
        images = list(images)
        traced.append((model.method.name, json.dumps(model.method.params, sort_keys=True), len(images)))
        return data_macs(model, images)

    for module in (bench.macs, bench):  # the calibration calls bench.count_macs, the stage its own import
        monkeypatch.setattr(module, "count_macs", counting_one)
        monkeypatch.setattr(module, "data_macs", counting)
    monkeypatch.setattr("bench.pipeline.stages.macs.count_macs", counting_one)
    monkeypatch.setattr("bench.pipeline.stages.macs.data_macs", counting)
    cfg = yaml.safe_load(experiment(tmp_path).read_text())
    # the budgets' runs, and entries that set the knob (ToMe's r, ATS's layers): they run as written
    cfg.update({"stages": ["macs"], "macs": {"images": 4}, "budgets": {"macs": [0.8]},
                "grid": {"methods": ["baseline", "tome", "ats", {"method": "tome", "r": 2},
                                     {"method": "ats", "layers": [1, 2]}]}})
    path = tmp_path / "ats.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "one"), "--quiet"]) == 0
    records = {(r["run"]["method"], bool(r["run"]["budget"])): r for r in read_all(tmp_path / "one")[0]}
    assert len(records) == 5
    settings = {which: json.dumps(r["run"]["params"], sort_keys=True) for which, r in records.items()}
    once = {("baseline", settings["baseline", False], 1), ("tome", settings["tome", True], 1),
            ("ats", settings["ats", True], 4)}  # by the calibrations, not again by the stages
    by_stage = {("tome", settings["tome", False], 1), ("ats", settings["ats", False], 4),  # no calibration traced
                ("ats", settings["ats", True], 1), ("ats", settings["ats", False], 1)}  # ATS's image: its weights
    for trace in once | by_stage:
        assert traced.count(trace) == 1, (trace, traced)
    first = len(traced)
    every = sorted(once | by_stage)
    for folder, force in (("two", []), ("one", ["--force"])):  # the calibrations from the disk cache: stages trace
        monkeypatch.setattr(calibrate, "_MEASURED", {})
        assert run_bench.main(["--config", str(path), "--results", str(tmp_path / folder), "--quiet", *force]) == 0
        assert sorted(traced[first:]) == every, traced
        first = len(traced)
        for again in read_all(tmp_path / folder)[0]:
            record = records[again["run"]["method"], bool(again["run"]["budget"])]
            assert again["metrics"]["macs"] == record["metrics"]["macs"]
    assert records["ats", True]["metrics"]["macs"]["data_mean"] != records["ats", False]["metrics"]["macs"]["data_mean"]
    assert records["tome", True]["metrics"]["macs"]["torchprofile"] != records["tome", False]["metrics"]["macs"][
        "torchprofile"]


def test_a_budget_with_more_than_two_decimals_is_shown_with_them():
    """Budgets 0.701 and 0.704 were both headed "≤ 0.70 MACs" (and a 0.705 cell at @0.703 under it)."""
    from bench.pipeline.budgets import budget_text
    from bench.pipeline.calibrate import Calibration

    assert [budget_text(t) for t in (0.6, 0.705, 0.701, 0.8, 1.0)] == ["0.60", "0.705", "0.701", "0.80", "1.00"]
    line = Calibration(method="tome", knob="r", target=0.705, value=4, achieved=0.7031, macs=7031, dense_macs=10000).describe()
    assert line.startswith("tome @0.705 -> r=4 (0.703)"), line


def test_an_ats_calibration_cached_for_a_folder_is_not_reused_once_its_images_change_in_place(tmp_path):
    """The cache key of a data-dependent calibration held the data section, not the images: a folder whose JPEGs were
    replaced under the same names reused the calibration of the old images (an audit saw a cell @0.966 under a
    0.95 budget). It now holds the folder's identity (``data_digest``): another search, another cache entry."""
    from PIL import Image

    from bench.pipeline.calibrate import cache_path
    from bench.pipeline.config import load_experiment
    from bench.pipeline.data import forget_datasets
    from tests.test_backbones import jpeg_folder

    jpeg_folder(tmp_path / "imgs")
    model = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "num_classes": 2,
                                                        "embed_dim": 48, "depth": 4, "num_heads": 3}}
    cfg = {"name": "stale", "defaults": {"model": model, "weights": None, "device": "cpu", "batch_size": 4,
                                         "data": {"name": "folder", "root": str(tmp_path / "imgs"), "split": "val",
                                                  "transform": {"input_size": [3, 32, 32], "crop_pct": 1.0}}},
           "stages": ["macs"], "macs": {"images": 4}, "budgets": {"macs": [0.9]}, "grid": {"methods": ["ats"]}}
    path = tmp_path / "stale.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def ats_entries() -> int:  # one invocation: the data read afresh, as run_bench reads it
        forget_datasets()
        load_experiment(path)
        return len(json.loads(cache_path().read_text()))

    assert ats_entries() == 1 and ats_entries() == 1  # the same images: the cached calibration
    for image in sorted((tmp_path / "imgs").rglob("*.JPEG")):  # other pixels under the same names
        Image.new("RGB", (64, 48), (90, 120, 200)).save(image, format="JPEG")
    assert ats_entries() == 2


def test_ranking_ties_ignore_float_noise_and_a_budget_no_method_reaches_keeps_its_column(budget_run, tmp_path):
    """evit's cells 8.4999973 and 6.4999985 (float32 noise of 8.5 and 6.5, as records written before top-1 came
    from the integer count carry: user test 9 saw tofu rank above random this way) tie with tome's 7.5 and 7.5: the
    name decides (evit first), not the noise. Every method unreachable at 0.55: that column stays, all '–'."""
    _, results = budget_run
    folder = tmp_path / "tie"
    chosen = {"evit": (8.499997282028198, 6.499998474121094), "tome": (7.5, 7.5)}
    for record in read_all(results)[0]:
        budget, method = record["run"]["budget"], record["run"]["method"]
        if method == "baseline" or (budget and budget["target"] == 0.8 and method in chosen):
            record = copy.deepcopy(record)
            record["metrics"]["eval"]["top1"] = chosen[method][0] if method in chosen else 89.0
            write_record(record_path(folder, record["key"]), record)
            if method in chosen:  # a second point for the AUC: the same run at another fraction
                record = copy.deepcopy(record)
                record["key"] += "-b"
                record["run"]["budget"] = {**budget, "target": 0.7}
                record["metrics"]["macs"]["torchprofile"] = int(record["metrics"]["macs"]["torchprofile"] * 0.85)
                record["metrics"]["macs"]["data_mean"] = record["metrics"]["macs"]["torchprofile"]
                record["metrics"]["eval"]["top1"] = chosen[method][1]
                write_record(record_path(folder, record["key"]), record)
    experiment = json.loads((results / "experiment.json").read_text())
    experiment["runs"] += [key + "-b" for key in experiment["runs"]]
    experiment["calibrations"] = [{**c, "value": None} if c["target"] == 0.55 else c for c in experiment["calibrations"]]
    (folder / "experiment.json").write_text(json.dumps(experiment))
    assert report.main([str(folder)]) == 0
    section = (folder / "leaderboard.md").read_text().split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| Rank"))
    assert [cell.strip() for cell in header.split("|")[3:6]] == ["≤ 0.55 MACs", "≤ 0.70 MACs", "≤ 0.80 MACs"]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| ") and "Rank" not in line]
    assert [row[1] for row in rows[:2]] == ["evit", "tome"] and rows[0][-1] == rows[1][-1] == "7.50"
    assert {row[2] for row in rows} == {"–"}  # 0.55: every method unreachable



def test_every_entry_is_checked_before_any_budget_is_calibrated(tmp_path, capsys):
    """A mistake in the last entry is one line at once (user test 6: 14 minutes of calibration first), and a
    data-dependent method that cannot run on the model (ATS without a class token) is refused under --dry-run
    too, where it passed with 'calibrated when the run's data is present' and then stopped the real run."""
    cfg = yaml.safe_load(experiment(tmp_path).read_text())
    cfg["grid"]["methods"].append({"method": "static", "layers": [1]})  # contiguous: keep_rate does nothing
    path = tmp_path / "late.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: grid.methods[6]: method 'static': parameter 'keep_rate' acts only with "
                          "not_contiguous: true") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "cache" / "calibration.json").exists()  # nothing was calibrated first
    gap = {"name": "vit_tiny_patch16_224", "label": "gap",
           "kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 48, "depth": 4,
                      "num_heads": 2, "class_token": False, "global_pool": "avg"}}
    for method in ({"method": "ats", "layers": [1, 2]}, {"method": "evit", "layers": [1]}):
        # EViT reduces nothing at its least reduction (keep_rate 1): the check also runs at a reducing value
        cfg = {**cfg, "defaults": {**cfg["defaults"], "model": gap, "weights": None},
               "grid": {"methods": ["baseline", "tome", method]}}
        path.write_text(yaml.safe_dump(cfg))
        for flags in (["--dry-run"], []):
            assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), *flags]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: {path}: grid.methods[2]: model {gap['name']}: method '{method['method']}' "
                                  "scores tokens by the class token's attention") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "cache" / "calibration.json").exists()


def test_a_budget_entry_whose_knob_has_no_choice_here_is_checked_and_a_knob_its_parameters_replace_is_refused(
        tmp_path, capsys):
    """DiffRate off DeiT-T/S/B has no schedule to calibrate (each budget a warning, out of reach): its parameters were
    then not checked at all, so a typo was that warning too. And DiffRate's prune_kept_num / merge_kept_num replace
    target_flops: every budget ran the one explicit schedule, recorded as calibrated to a target_flops it does not
    use (DeiT-T: `diffrate @0.80 -> target_flops=0.6 (0.724)`), or out of reach on the fmnist model."""
    from bench.pipeline.config import load_experiment

    cfg = yaml.safe_load(experiment(tmp_path).read_text())
    path = tmp_path / "diffrate.yaml"
    lists = {"prune_kept_num": [50] * 8, "merge_kept_num": [50, 40, 40, 30, 30, 20, 20, 10]}
    deit = {"name": "deit_tiny_patch16_224", "label": "deit-t"}
    for model, entry, problem in [
        (MODEL, {"method": "diffrate", "bogus": 1}, "method 'diffrate': unknown parameter 'bogus'; allowed: "
                                                     "target_flops, prune_kept_num, merge_kept_num (fmnist-vit)"),
        (MODEL, {"method": "diffrate", "prune_kept_num": [50]}, "method 'diffrate': parameters 'prune_kept_num' and "
                                                                "'merge_kept_num' go together"),
        *[(each, {"method": "diffrate", **schedule}, "method 'diffrate': budgets.macs sets target_flops, the "
                                                     "method's budget knob, but prune_kept_num and merge_kept_num "
                                                     "replace it")
          for each, schedule in ((MODEL, lists), (deit, {"prune_kept_num": [197] * 12, "merge_kept_num": [150] * 12}))],
    ]:
        cfg = {**cfg, "defaults": {**cfg["defaults"], "model": model, "weights": None},
               "grid": {"methods": ["baseline", entry]}}
        path.write_text(yaml.safe_dump(cfg))
        for flags in (["--dry-run"], []):
            assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), *flags]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: {path}: grid.methods[1]: {problem}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r" / "runs").exists()
    # the lists with target_flops given (null): one run as written; the plain method: out of reach, as before
    cfg["defaults"]["model"] = MODEL
    cfg["grid"]["methods"] = ["baseline", {"method": "diffrate", "target_flops": None, **lists}, "diffrate"]
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_experiment(path)
    assert [(run.method, run.budget) for run in loaded.runs] == [("baseline", None), ("diffrate", None)]
    assert [(c["method"], c["target"], c["value"]) for c in loaded.calibrations] == [("diffrate", 0.55, None),
                                                                                        ("diffrate", 0.8, None)]


def test_dry_run_tells_apart_the_calibrations_of_two_settings_of_a_method(tmp_path, capsys):
    """A sweep of a budget entry's other parameters calibrates each setting: --dry-run printed the same
    ``tome @0.55 -> r=...`` line for each; now labelled as the matched-budget table's rows are."""
    cfg = yaml.safe_load(experiment(tmp_path).read_text())
    cfg["grid"]["methods"] = ["baseline", {"method": "tome", "sweep": {"prop_attn": [True, False]}},
                              {"method": "evit", "layers": [1]}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  budget  ")]
    assert [re.sub(r" -> .*", "", line) for line in lines] == [
        f"  budget  fmnist-vit: {method} @{target}" for method in ("tome [prop_attn=True]", "tome [prop_attn=False]",
                                                                   "evit") for target in ("0.55", "0.80")]


def test_each_calibration_announced_and_each_unreachable_warning_names_its_setting_as_the_dry_run(tmp_path, capsys):
    """Two settings of a sweep printed the same ``calibrated on fmnist-vit: tome @0.55 -> r=6 (0.500) in 1.5 s`` line
    and the same unreachable warning (the sweep's entry, its `where`, is one); now labelled as --dry-run's lines."""
    cfg = yaml.safe_load(experiment(tmp_path).read_text())
    cfg["grid"]["methods"] = ["baseline", {"method": "tome", "sweep": {"prop_attn": [True, False]}},
                              {"method": "evit", "sweep": {"layers": [[1], [7]]}}]  # [7] cannot reach 0.55 or 0.8
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    announced = [re.sub(r" in \d+\.\d s$", "", line.removeprefix("calibrated on ")) for line in out.splitlines()
                 if line.startswith("calibrated on ")]
    dry = [line.removeprefix("  budget  ") for line in out.splitlines() if line.startswith("  budget  ")]
    names = [f"{method} @{target}" for method in ("tome [prop_attn=True]", "tome [prop_attn=False]", "evit [layers=[1]]",
                                                  "evit [layers=[7]]") for target in ("0.55", "0.80")]
    assert [re.sub(r" -> .*", "", line) for line in dry] == [f"fmnist-vit: {name}" for name in names]
    assert announced == [line for line in dry if "unreachable" not in line] and len(announced) == 6, announced
    warned = [line.split(": fmnist-vit: ", 1)[1] for line in err.splitlines() if "unreachable" in line]
    assert warned == [line.removeprefix("fmnist-vit: ") for line in dry if "unreachable" in line] and \
        [re.sub(r" -> .*", "", line) for line in warned] == ["evit [layers=[7]] @0.55", "evit [layers=[7]] @0.80"]


def test_each_calibration_searched_is_announced_and_a_cached_one_is_not(tmp_path, capsys):
    cfg = yaml.safe_load(experiment(tmp_path).read_text())
    cfg["grid"]["methods"] = ["baseline", "tome"]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("calibrated on ")]
    assert len(lines) == 2, lines
    for line, target in zip(lines, ("0.55", "0.80"), strict=True):
        assert re.fullmatch(rf"calibrated on fmnist-vit: tome @{target} -> r=\d+ \(0\.\d{{3}}\) in \d+\.\d s", line), line
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    assert "calibrated on " not in capsys.readouterr().out


def test_the_wall_time_line_counts_the_calibration_before_the_runs(tmp_path, capsys):
    """The runs' wall time, and apart the time before them, which covers every calibration announced (the
    quickstart printed 105 s of runs for 3 minutes, the calibration unmentioned)."""
    cfg = yaml.safe_load(experiment(tmp_path).read_text())
    cfg["grid"]["methods"] = ["baseline", "tome"]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), "--quiet", "--no-report"]) == 0
    out = capsys.readouterr().out
    searched = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in out.splitlines()
                if line.startswith("calibrated on ")]
    (line,) = [line for line in out.splitlines() if line.startswith("wall time ")]
    runs, before = re.fullmatch(r"wall time (\d+\.\d) s for the runs, (\d+\.\d) s before them \(the experiment read, "
                                r"its MAC budgets calibrated, weights checked\)", line).groups()
    assert len(searched) == 2 and float(before) >= sum(searched) - 0.1 and float(runs) > 0, out


def test_a_fine_tuned_budget_run_and_an_earlier_configs_have_rows_of_their_own(budget_run, tmp_path):
    """The same budget cell fine-tuned (this config) and off the shelf (the earlier config, report.py --all): two
    marked rows with their own top-1, not one cell standing for both (user test 14: the table did not mark it)."""
    path, results = budget_run
    folder = tmp_path / "results"
    shutil.copytree(results, folder)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(budgets={"macs": [0.55]}, stages=["finetune", "eval", "macs"],
               finetune={"epochs": 1, "batch_size": 64, "lr": 1e-3})
    cfg["grid"]["methods"] = ["baseline", "tome"]
    edited = tmp_path / "exp.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    assert run_bench.main(["--config", str(edited), "--results", str(folder), "--quiet"]) == 0
    assert report.main([str(folder), "--all"]) == 0
    top1 = {(r["run"]["method"], "finetune" in r["metrics"]): r["metrics"]["eval"]["top1"] for r in read_all(folder)[0]
            if r["run"]["method"] == "tome" and (r["run"]["budget"] or {}).get("target") == 0.55}
    assert len(top1) == 2 and top1[("tome", True)] != top1[("tome", False)]
    board = (folder / "leaderboard.md").read_text()
    section = board.split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    rows = {cells[1]: cells for cells in ([cell.strip() for cell in line.split("|")[1:-1]]
                                          for line in section.splitlines() if line.startswith("| ") and "Rank" not in line)}
    assert {"tome [fine-tuned]", "tome [earlier config]", "evit [earlier config]"} <= set(rows), sorted(rows)
    assert "tome" not in rows and "baseline [fine-tuned]" not in rows
    assert float(rows["tome [fine-tuned]"][2].strip("*").split()[0]) == pytest.approx(top1[("tome", True)], abs=5e-3)
    assert float(rows["tome [earlier config]"][2].strip("*").split()[0]) == pytest.approx(top1[("tome", False)], abs=5e-3)
    assert rows["tome [fine-tuned]"][3] == ""  # 0.8: not run fine-tuned
    assert "_[fine-tuned]: trained by the finetune stage before it was evaluated" in section


def test_two_settings_of_a_method_have_a_row_and_an_auc_each(tmp_path):
    """evit at layers [1] and at layers [2], both calibrated to two budgets: two rows, each with its own cells and
    a Pareto AUC over its own two points (user test 15: one "evit" row showed one setting's cells and an AUC
    over all four points)."""
    path = experiment(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["budgets"] = {"macs": [0.7, 0.85]}
    cfg["grid"]["methods"] = ["baseline", {"method": "evit", "layers": [1]}, {"method": "evit", "layers": [2]}]
    path.write_text(yaml.safe_dump(cfg))
    results = tmp_path / "results"
    assert run_bench.main(["--config", str(path), "--results", str(results), "--quiet"]) == 0
    top1 = {}
    for record in read_all(results)[0]:
        if record["run"]["method"] == "evit":
            top1.setdefault(record["run"]["params"]["layers"][0], {})[record["run"]["budget"]["target"]] = \
                record["metrics"]["eval"]["top1"]
    assert sorted(top1) == [1, 2] and all(sorted(cells) == [0.7, 0.85] for cells in top1.values())
    section = (results / "leaderboard.md").read_text().split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    rows = {cells[1]: cells for cells in ([cell.strip() for cell in line.split("|")[1:-1]]
                                          for line in section.splitlines() if line.startswith("| ") and "Rank" not in line)}
    assert sorted(rows) == ["evit [layers=[1]]", "evit [layers=[2]]"]
    for layer, cells in top1.items():
        row = rows[f"evit [layers=[{layer}]]"]
        assert [float(cell.strip("*").split()[0]) for cell in row[2:4]] == pytest.approx([cells[0.7], cells[0.85]], abs=5e-3)
        assert float(row[-1]) == pytest.approx((cells[0.7] + cells[0.85]) / 2, abs=5e-3)  # two points: their mean


def test_a_setting_out_of_reach_keeps_its_row_and_a_failed_run_is_blank(tmp_path, monkeypatch):
    """evit at layers [1] and at layers [7] (one block from the end: it cannot reach 0.7): [7] keeps a row of `–`
    where its own calibrations say out of reach, and [1]'s run that failed is blank, not `–` (user test 17: the
    calibrations named the method only, so [7] had no row and a failed cell read as out of reach)."""
    from bench.pipeline.config import load_experiment

    path = experiment(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["budgets"] = {"macs": [0.7, 0.85]}
    cfg["grid"]["methods"] = ["baseline", {"method": "evit", "layers": [1]}, {"method": "evit", "layers": [7]}]
    path.write_text(yaml.safe_dump(cfg))
    failing = next(run.key for run in load_experiment(path).runs
                   if run.method == "evit" and run.params["layers"] == [1] and run.budget["target"] == 0.85)
    monkeypatch.setenv("TOKENBENCH_FAIL_KEYS", failing)
    results = tmp_path / "results"
    assert run_bench.main(["--config", str(path), "--results", str(results), "--quiet"]) == 1
    calibrations = json.loads((results / "experiment.json").read_text())["calibrations"]
    out_of_reach = {(json.loads(c["setting"])["layers"][0], c["target"]) for c in calibrations if c["value"] is None}
    assert (7, 0.7) in out_of_reach and (1, 0.7) not in out_of_reach and (1, 0.85) not in out_of_reach
    section = (results / "leaderboard.md").read_text().split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    rows = {cells[1]: cells for cells in ([cell.strip() for cell in line.split("|")[1:-1]]
                                          for line in section.splitlines() if line.startswith("| ") and "Rank" not in line)}
    assert sorted(rows) == ["evit [layers=[1]]", "evit [layers=[7]]"]
    for column, target in ((2, 0.7), (3, 0.85)):
        seven = rows["evit [layers=[7]]"][column]
        assert (seven == "–") == ((7, target) in out_of_reach), (target, seven)
    assert rows["evit [layers=[1]]"][3] == ""  # its run failed: not out of reach
    assert re.fullmatch(r"\*{0,2}\d+\.\d\d .*", rows["evit [layers=[1]]"][2])


def test_the_calibrations_fill_only_the_group_they_were_made_for(budget_run, tmp_path):
    """report.py --all after a config of the same model label on other data: the earlier config's group (subset 64)
    got the current config's budget column and a row of `–` for a method it never ran (the calibrations were
    matched to a group by label alone); now they fill the group of their own weights and data, and a calibration
    of an earlier experiment.json (no weights or data) the groups of its label that hold a current run."""
    path, results = budget_run
    folder = tmp_path / "results"
    shutil.copytree(results, folder)
    cfg = yaml.safe_load(path.read_text())
    cfg["defaults"]["data"]["subset"] = 32  # the same label, other data: a group of its own
    cfg["budgets"] = {"macs": [0.6]}
    cfg["grid"]["methods"] = ["baseline", "tome", {"method": "evit", "layers": [7]}]  # evit [7] cannot reach 0.6
    edited = tmp_path / "exp.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    assert run_bench.main(["--config", str(edited), "--results", str(folder), "--quiet"]) == 0
    calibrations = json.loads((folder / "experiment.json").read_text())["calibrations"]
    assert [(c["method"], c["value"] is None, c["data"]["subset"], c["weights"]) for c in calibrations] == [
        ("tome", False, 32, cfg["defaults"]["weights"]), ("evit", True, 32, cfg["defaults"]["weights"])]

    def tables() -> dict[str, dict[str, list[str]]]:
        """Each matched-budget table's rows by their label, its header row under "", by its data's subset."""
        section = (folder / "leaderboard.md").read_text().split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
        found = {}
        for part in section.split("\n### ")[1:]:
            rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in part.splitlines() if line.startswith("| ")]
            found[re.search(r"\(subset (\d+)\)", part)[1]] = {cells[1] if cells[0] != "Rank" else "": cells
                                                               for cells in rows}
        return found

    for old in (False, True):  # old: the calibrations as an experiment.json of an earlier version has them
        if old:
            written = json.loads((folder / "experiment.json").read_text())
            written["calibrations"] = [{k: v for k, v in c.items() if k not in ("weights", "weights_sha256", "data")}
                                       for c in written["calibrations"]]
            (folder / "experiment.json").write_text(json.dumps(written))
        assert report.main([str(folder), "--all"]) == 0
        found = tables()
        assert sorted(found) == ["32", "64"]
        assert found["32"][""][2:-2] == ["≤ 0.60 MACs"] and found["32"]["evit"][2] == "–", found["32"]
        assert re.fullmatch(r"\*\*\d+\.\d\d \([+-]\d+\.\d\d\) @0\.\d{3}\*\*", found["32"]["tome"][2])
        assert found["64"][""][2:-2] == ["≤ 0.55 MACs", "≤ 0.80 MACs"], found["64"][""]  # no 0.60 column
        assert sorted(found["64"]) == ["", "evit [earlier config]", "ppt [earlier config]", "resize [earlier config]",
                                       "tome [earlier config]"]  # no row of evit [7], which it never ran
        assert "–" not in [cell for cells in found["64"].values() for cell in cells]  # its own calibrations are gone
