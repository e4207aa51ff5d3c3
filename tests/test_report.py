"""report.py: numbers against the group baseline, CSV layout, markdown sections, Pareto front, CLI errors.

The records are real: two tiny experiments run once per module through run_bench (so the report is tested
against the record format production writes). Only metric *values* are then set to chosen numbers, at
paths that must already exist in the real records (``_set`` fails when the format moves)."""

from __future__ import annotations

import copy
import errno
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import torch

import report
from bench.pipeline.records import read_all, record_path, write_record
from tests.test_pipeline import MODEL, bench_main, write

LEADING = ["model", "method", "params", "top1", "top5", "delta_top1", "agreement", "gmacs", "mac_reduction",
           "images_per_s", "speedup", "budget", "mac_fraction", "data", "weights", "key", "gmacs_analytic",
           "gmacs_data", "gmacs_extra", "batch_size", "dtype", "device"]
WEIGHTS = "tiny.pth"
FMNIST = "fashion_mnist (subset 100) [1x28x28 bicubic, crop_pct 1.0 center, mean 0.286, std 0.353]"  # + transform
HEADING_A = f"## deit-s on {FMNIST} (tiny.pth)"
HEADING_B = f"## deit-s on {FMNIST} (random init)"
REFERENCE = {"model": "deit-s", "method": "baseline", "top1": 79.8, "gmacs": 4.6, "source": "DeiT paper, table 1"}

# name -> (model entry, method entry); group A: weights file, B: random init (same label), C: another model
RUNS = {
    "baseline-a": ({"label": "deit-s", "weights": WEIGHTS}, "baseline"),
    "tome-a": ({"label": "deit-s", "weights": WEIGHTS}, {"method": "tome", "r": 4}),
    "ppt-a": ({"label": "deit-s", "weights": WEIGHTS}, {"method": "ppt", "r": 6, "layers": [1, 2], "threshold": 1e-3}),
    "evit-a": ({"label": "deit-s", "weights": WEIGHTS}, {"method": "evit", "keep_rate": 0.8, "layers": [1]}),
    "baseline-b": ({"label": "deit-s", "weights": None}, "baseline"),
    "tome-b": ({"label": "deit-s", "weights": None}, {"method": "tome", "r": 4}),
    "topk-c": ({"label": "vit-t", "kwargs": {"depth": 2}}, {"method": "topk", "keep_rate": 0.5, "layers": [1]}),
}
MACS_ONLY = {"pruning-a": ({"label": "deit-s", "weights": WEIGHTS}, {"method": "pruning", "r": 6, "layers": [1, 2]})}

# chosen values: eval (top1, top5, agreement), GMACs, throughput entries (images/s, baseline images/s,
# speed-up) for batch sizes 32, 64 (fewer tuples: fewer entries; None: no throughput stage)
VALUES = {
    "baseline-a": ((80.0, 95.0, 100.0), 4.6, [(1000.0, 1000.0, 1.0), (1100.0, 1100.0, 1.0)]),
    # speed-up 1.45 as measured in-process; 1500 / 1000 (the baseline *record*) would give 1.50
    "tome-a": ((78.5, 94.0, 96.0), 2.7, [(1500.0, 1034.5, 1.45), (1760.0, 1100.0, 1.6)]),
    "ppt-a": ((79.0, 94.5, 97.0), 3.0, [(1300.0, 1000.0, 1.3)]),
    "evit-a": ((77.0, 93.0, 95.0), 3.5, None),
    "pruning-a": (None, 2.0, None),  # macs stage only
    "baseline-b": ((10.0, 50.0, 100.0), 4.6, [(990.0, 990.0, 1.0)]),
    "tome-b": ((11.0, 52.0, 40.0), 2.7, [(1480.0, 1000.0, 1.48)]),
    "topk-c": ((50.0, 60.0, 70.0), 1.0, None),
}


def _experiment(folder: Path, runs: dict, stages: list[str], name: str, **defaults) -> Path:
    cfg = {
        "name": "unit",
        "defaults": {"model": MODEL, "data": {"name": "fashion_mnist", "subset": 100}, "batch_size": 100,
                     "device": "cpu", "threads": 1, **defaults},
        "stages": stages,
        "throughput": {"batch_sizes": [32, 64], "warmup": 1, "runs": 1},
        "macs": {"images": 1},
        "grid": [{"models": [model], "methods": [method]} for model, method in runs.values()],
        "reference": [REFERENCE],
    }
    return write(folder, cfg, name)


@pytest.fixture(scope="module")
def real_records(tmp_path_factory) -> dict[str, dict]:
    """name -> the record production wrote for that run (8 runs of two experiments, one results folder)."""
    from bench.pipeline.config import load_experiment
    from bench.pipeline.models import create_model

    folder = tmp_path_factory.mktemp("report")
    torch.manual_seed(1)
    torch.save({"model": create_model(MODEL["name"], MODEL["kwargs"]).state_dict()}, folder / WEIGHTS)
    keys = {}
    for runs, stages, name in ((RUNS, ["eval", "macs", "throughput"], "full.yaml"), (MACS_ONLY, ["macs"], "macs.yaml")):
        path = _experiment(folder, runs, stages, name)
        assert bench_main(path, folder / "results", "--no-report") == 0
        keys.update(zip(runs, (run.key for run in load_experiment(path).runs), strict=True))
    records, problems = read_all(folder / "results")
    assert problems == [] and len(records) == len(keys)
    by_key = {record["key"]: record for record in records}
    return {name: by_key[key] for name, key in keys.items()}


def _set(record: dict, path: str, value) -> None:
    """Set a value at a dotted path that the real record already has."""
    *parents, last = path.split(".")
    node = record
    for name in parents:
        node = node[name]
    assert last in node, f"production records no longer have {path}"
    node[last] = value


def controlled(record: dict, name: str) -> dict:
    record = copy.deepcopy(record)
    scores, gmacs, throughput = VALUES[name]
    if scores is not None:
        for metric, value in zip(("top1", "top5", "agreement"), scores, strict=True):
            _set(record, f"metrics.eval.{metric}", value)
        for metric, value in (("ece", 0.05), ("nll", 0.9), ("feature_cos", 0.98)):  # the same for every run
            _set(record, f"metrics.eval.{metric}", value)
    for metric, factor in (("torchprofile", 1.0), ("analytic", 0.98), ("data_mean", 1.01)):
        _set(record, f"metrics.macs.{metric}", gmacs * factor * 1e9)
    entries = record["metrics"].get("throughput")
    if throughput is None:  # as if the run had no throughput stage
        record["metrics"].pop("throughput", None)
    else:
        assert [entry["batch_size"] for entry in entries] == [32, 64]
        record["metrics"]["throughput"] = entries[: len(throughput)]
        for index, (rate, base, speedup) in enumerate(throughput):
            entry = record["metrics"]["throughput"][index]
            for key, value in (("images_per_s", rate), ("baseline_images_per_s", base), ("speedup", speedup),
                               ("speedup_low", speedup - 0.05), ("speedup_high", speedup + 0.05)):
                assert key in entry, f"production throughput entries no longer have {key}"
                entry[key] = value
    return record


@pytest.fixture
def names(real_records) -> dict[str, str]:
    """name (``tome-a``) -> the real run key."""
    return {name: record["key"] for name, record in real_records.items()}


@pytest.fixture
def results(tmp_path: Path, real_records) -> Path:
    for name, record in real_records.items():
        write_record(record_path(tmp_path, record["key"]), controlled(record, name))
    text = record_path(tmp_path, real_records["tome-a"]["key"]).read_text()
    (tmp_path / "runs" / "zz-torn.json").write_text(text[: len(text) // 2])
    return tmp_path


@pytest.fixture
def frame(results: Path, names) -> pd.DataFrame:
    df, _, _, _, _ = report.load_all(results)
    keys = {key: name for name, key in names.items()}
    return df.assign(name=df["key"].map(keys)).set_index("name", drop=False)


def test_frame_values_against_group_baseline(frame):
    assert len(frame) == len(VALUES)
    tome = frame.loc["tome-a"]
    assert tome["model"] == "deit-s"
    assert tome["params"] == "r=4"
    assert tome["data"] == FMNIST
    assert tome["weights"] == WEIGHTS
    assert tome["delta_top1"] == pytest.approx(-1.5)
    assert tome["mac_reduction"] == pytest.approx(100 * (1 - 2.7 / 4.6))
    assert tome["gmacs"] == pytest.approx(2.7)
    assert tome["gmacs_analytic"] == pytest.approx(2.7 * 0.98)
    assert tome["gmacs_data"] == pytest.approx(2.7 * 1.01)
    assert tome["gmacs_one_image"] == pytest.approx(2.7)  # torchprofile's count of the one traced image
    assert tome["agreement"] == pytest.approx(96.0)
    assert tome["images_per_s"] == pytest.approx(1500.0)  # first throughput entry (batch 32)
    assert tome["speedup"] == pytest.approx(1.45)  # the in-process number, not 1500 / 1000
    assert frame.loc["ppt-a", "params"] == "r=6, layers=[1, 2], threshold=0.001"
    assert frame.loc["ppt-a", "delta_top1"] == pytest.approx(-1.0)
    assert frame.loc["baseline-a", "params"] == ""
    assert frame.loc["baseline-a", "delta_top1"] == pytest.approx(0.0)
    assert frame.loc["baseline-a", "mac_reduction"] == pytest.approx(0.0)


def test_other_weights_use_their_own_baseline(frame):
    tome_b = frame.loc["tome-b"]
    assert tome_b["weights"] == "random init"
    assert tome_b["delta_top1"] == pytest.approx(1.0)  # 11 - 10, not 11 - 80
    assert tome_b["speedup"] == pytest.approx(1.48)
    assert math.isnan(frame.loc["topk-c", "delta_top1"])  # group without baseline
    assert math.isnan(frame.loc["topk-c", "mac_reduction"])


def test_missing_stages_are_nan(frame):
    pruning = frame.loc["pruning-a"]
    assert math.isnan(pruning["top1"]) and math.isnan(pruning["delta_top1"])
    assert math.isnan(pruning["images_per_s"]) and math.isnan(pruning["speedup"])
    assert pruning["mac_reduction"] == pytest.approx(100 * (1 - 2.0 / 4.6))
    assert math.isnan(frame.loc["evit-a", "speedup"])


def test_throughput_long_table(results, names):
    _, tp, _, _, _ = report.load_all(results)
    tome = tp[tp["key"] == names["tome-a"]].sort_values("batch_size")
    assert list(tome["batch_size"]) == [32, 64]
    assert list(tome["images_per_s"]) == [1500.0, 1760.0]
    assert list(tome["speedup"]) == [1.45, 1.6]
    assert len(tp) == 7


def test_pareto_front():
    df = pd.DataFrame({
        "top1": [80.0, 79.0, 78.5, 77.0, 78.5, float("nan"), 70.0, 79.0],
        "gmacs": [4.6, 3.0, 2.7, 3.5, 2.7, 1.0, 2.7, 4.0],
        "group": ["a"] * 7 + ["b"],
    }, index=list("ABCDEFGH"))
    # D dominated by B; E duplicates C; F has no top-1; G same GMACs as C but lower; H dominated by B
    assert list(report.pareto_front(df).index) == ["C", "B", "A"]
    by_group = report.pareto_front(df, by=["group"])
    assert sorted(by_group.index) == ["A", "B", "C", "H"]


def test_pareto_front_of_records(frame):
    front = report.pareto_front(frame, by=report.GROUP)
    # baseline-b (4.6 GMACs, 10.0) is dominated by tome-b (2.7, 11.0) within group B
    assert set(front["name"]) == {"baseline-a", "ppt-a", "tome-a", "tome-b", "topk-c"}
    assert list(report.pareto_front(frame)["name"]) == ["topk-c", "tome-a", "ppt-a", "baseline-a"]


def test_csv_columns_and_numbers(results, tmp_path, names):
    assert report.main([str(results), "--csv", str(tmp_path / "out" / "lb.csv"),
                        "--plot", str(tmp_path / "p.png"), "--out", str(tmp_path / "lb.md")]) == 0
    csv = pd.read_csv(tmp_path / "out" / "lb.csv", keep_default_na=True)
    assert list(csv.columns[: len(LEADING)]) == LEADING
    row = csv[csv["key"] == names["tome-a"]].iloc[0]
    assert row["delta_top1"] == pytest.approx(-1.5)
    assert row["speedup"] == pytest.approx(1.45)
    assert row["gmacs"] == pytest.approx(2.7)
    assert row["mac_reduction"] == pytest.approx(41.304, abs=1e-3)
    assert row["mac_fraction"] == pytest.approx(1 - 0.41304, abs=1e-5)
    assert math.isnan(row["budget"])  # not a matched-budget run
    assert math.isnan(csv[csv["key"] == names["pruning-a"]].iloc[0]["top1"])
    assert len(csv) == len(VALUES)


def test_csv_has_the_baseline_twin_of_every_main_batch_throughput_column(results, tmp_path, names, real_records):
    """The README: the CSV's main-batch throughput columns "and the same with baseline_"; baseline_images_per_s
    (the dense model's rate timed beside the method's) was missing."""
    assert report.main([str(results), "--out", str(tmp_path / "lb.md")]) == 0
    csv = pd.read_csv(tmp_path / "leaderboard.csv").set_index("key")
    for name in ("images_per_s", "latency_p50_ms", "latency_p90_ms", "peak_mem_mb"):
        assert name in csv.columns and f"baseline_{name}" in csv.columns
    tome = real_records["tome-a"]["metrics"]["throughput"][0]
    assert csv.loc[names["tome-a"], "baseline_images_per_s"] == pytest.approx(1034.5)  # controlled(): batch 32's
    assert csv.loc[names["tome-a"], "baseline_latency_p50_ms"] == pytest.approx(tome["baseline_latency_p50_ms"])
    assert math.isnan(csv.loc[names["evit-a"], "baseline_images_per_s"])  # no throughput stage


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(heading + "\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start: end if end >= 0 else None]


def test_markdown_tables(results, real_records):
    df, tp, problems, _, _ = report.load_all(results)
    md = report.render_markdown(df, problems, tp, generated=datetime(2026, 11, 26, 9, 30, tzinfo=timezone.utc))
    assert md.startswith("# Leaderboard: unit\n")
    assert "8 runs in 3 groups, generated 2026-11-26 09:30 UTC" in md
    section = _section(md, HEADING_A)
    rows = [line for line in section.splitlines() if line.startswith("| ") and "Method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["baseline", "evit", "ppt", "tome", "pruning"]
    tome = [cell.strip() for cell in rows[3].split("|")[1:-1]]
    assert tome == ["tome", "r=4", "78.50", "94.00", "-1.50", "96.00", "2.700", "41.3%", "1500", "1.45x (1.40-1.50)",
                    "0.050", "0.900", "0.9800"]
    entry = real_records["tome-a"]["metrics"]["throughput"][0]
    assert f"{entry['device_name']}, batch size 32, fp32, 1 thread." in section
    assert HEADING_B in md and f"## vit-t on {FMNIST} (random init)" in md
    assert "+1.00" in _section(md, HEADING_B)
    throughput = _section(md, "## Throughput by batch size")
    assert "Images/s (bs 64)" in throughput and "1.60x (1.55-1.65)" in throughput and "1760" in throughput


def test_markdown_published_vs_measured(results):
    df, tp, problems, _, _ = report.load_all(results)
    section = _section(report.render_markdown(df, problems, tp), "## Published vs measured")
    # matched by model label and method: both deit-s baselines (random init: -69.80)
    top1 = [[cell.strip() for cell in line.split("|")[4:9]] for line in section.splitlines() if "| Top-1" in line]
    assert top1 == [["Top-1", "79.80", "10.00", "-69.80", "DeiT paper, table 1"],
                    ["Top-1", "79.80", "80.00", "+0.20", "DeiT paper, table 1"]]
    assert "| GMACs" in section and "+0.000" in section
    assert "Top-5" not in section  # the reference has no top-5


def test_markdown_per_layer_tokens(results, real_records):
    df, tp, problems, _, _ = report.load_all(results)
    section = _section(report.render_markdown(df, problems, tp), "## Per-layer tokens")
    assert "46, 42, 38, 34" in section  # tome r=4 on 49 patches + class token, 4 blocks
    assert ("Tokens leaving each block (where images keep different counts: the padded width of the last batch the run "
            "computed; each image's: kept mean, below)") in section
    stats = real_records["ppt-a"]["method_stats"]
    assert sorted(stats) == ["1", "2"]
    fractions = [f"layer {layer}: {stats[layer]['pooled_fraction']:.2f}" for layer in ("1", "2")]
    assert f"pooled fraction per layer: {', '.join(fractions)}" in section


def test_torn_file_is_skipped_not_fatal(results, capsys):
    assert report.main([str(results)]) == 0
    md = (results / "leaderboard.md").read_text()
    skipped = _section(md, "## Skipped records")
    assert "zz-torn.json" in skipped
    assert "zz-torn.json" in capsys.readouterr().err
    assert "| tome " in md


def test_main_writes_files_and_png(results, capsys):
    assert report.main([str(results)]) == 0
    out = capsys.readouterr().out.split()
    expected = [results / "leaderboard.md", results / "leaderboard.csv", results / "pareto.png",
                results / "throughput.png"]  # no tokens stage ran: no token maps
    assert out == [str(path) for path in expected]
    png = (results / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_pareto_legend_names_every_method_also_one_the_first_group_lacks(frame, tmp_path, monkeypatch):
    """Each method has its colour in the legend: ppt, evit (group A) and topk (group C) are not in the first group
    plotted (deit-s, random init), and only that group's methods were named."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its legend
    assert report.plot_pareto(frame, tmp_path / "p.png")
    labels = [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()]
    monkeypatch.undo()
    plt.close(figures[0])
    assert [label for label in labels if " on " not in label] == ["baseline", "evit", "ppt", "tome", "topk"]
    assert len(labels) == 5 + 3  # and one marker per group


def test_a_crossover_whose_interval_includes_one_is_marked(real_records, tmp_path):
    """A method that reduces nothing read "beats dense from bs 100" on a 1.00x median with a wide interval: the
    crossover stays the median's (above 1 there and at every larger size), but where the 95% interval at its batch
    size includes 1.00x the cell is marked † and a note under the group's table says so (only where one is)."""
    for name, record in real_records.items():
        record = controlled(record, name)
        if name == "tome-a":  # as if it reduced nothing: below 1 at batch 32, 1.01x (0.95-1.08) at 64
            for index, (speedup, low, high) in enumerate(((0.97, 0.90, 0.99), (1.01, 0.95, 1.08))):
                for key, value in (("speedup", speedup), ("speedup_low", low), ("speedup_high", high)):
                    _set(record["metrics"]["throughput"][index], key, value)
        write_record(record_path(tmp_path, record["key"]), record)
    assert report.main([str(tmp_path)]) == 0
    section = _section((tmp_path / "leaderboard.md").read_text(), "## Latency, memory and crossover")
    note = "†: the 95% interval of the speed-up at that batch size includes 1.00x (the median is above 1, but dense " \
           "may be as fast there)"
    groups = {}
    for part in section.split("\n### ")[1:]:
        rows = [[cell.strip() for cell in line.split("|")[1:4]] for line in part.splitlines()
                if line.startswith("| ") and "Method" not in line]
        groups[part.split("\n", 1)[0]] = ({(method, params): beats for method, params, beats in rows}, note in part)
    a, b = groups[HEADING_A.removeprefix("## ")], groups[HEADING_B.removeprefix("## ")]
    assert a == ({("baseline", ""): "(dense)", ("tome", "r=4"): "bs 64 †", ("ppt", "r=6, layers=[1, 2], threshold=0.001"):
                  "bs 32"}, True)  # ppt: 1.30x (1.25-1.35) at 32, its only size
    assert b == ({("baseline", ""): "(dense)", ("tome", "r=4"): "bs 32"}, False)  # 1.48x (1.43-1.53): no note
    assert section.count("†: ") == 1


def test_plot_skipped_without_top1_and_gmacs(tmp_path, capsys, real_records):
    record = real_records["pruning-a"]
    assert "eval" not in record["metrics"]
    write_record(record_path(tmp_path, record["key"]), record)
    assert report.main([str(tmp_path)]) == 0
    assert not (tmp_path / "pareto.png").exists()
    assert "plot skipped" in capsys.readouterr().err


def test_main_missing_or_empty_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert report.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1
    # a file where the folder belongs (the experiment's YAML, as run_bench takes it): said so, not "does not exist"
    config = Path(report.__file__).parent / "configs" / "quickstart.yaml"
    assert report.main([str(config)]) == 2
    assert capsys.readouterr().err == f"report.py: error: results folder {config} is a file, not a folder\n"
    (tmp_path / "torn" / "runs").mkdir(parents=True)
    (tmp_path / "torn" / "runs" / "x.json").write_text('{"schema": 1, "ke')
    assert report.main([str(tmp_path / "torn")]) == 2
    err = capsys.readouterr().err
    assert "torn" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "torn" / "leaderboard.md").exists()


def test_read_only_results_folder_with_every_output_elsewhere(results, tmp_path_factory, capsys):
    """The figures go beside --out, not into the results folder (read-only here; as root, where chmod stops
    nothing, the folder's listing shows that nothing was written there)."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    before = sorted(results.rglob("*"))
    folders = [results, results / "runs"]
    for folder in folders:
        folder.chmod(0o555)
    try:
        code = report.main([str(results), "--out", str(elsewhere / "lb.md"), "--csv", str(elsewhere / "lb.csv"),
                            "--plot", str(elsewhere / "p.png")])
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert code == 0, capsys.readouterr().err
    assert sorted(results.rglob("*")) == before
    assert sorted(path.name for path in elsewhere.iterdir()) == ["lb.csv", "lb.md", "p.png", "throughput.png"]
    figures = _section((elsewhere / "lb.md").read_text(), "## Figures")
    assert "](throughput.png)" in figures and "](p.png)" in figures  # linked relative to the markdown
    assert capsys.readouterr().out.split()[-1] == str(elsewhere / "throughput.png")
    alone = tmp_path_factory.mktemp("alone")  # --out alone: the CSV and pareto.png follow it
    for folder in folders:
        folder.chmod(0o555)
    try:
        code = report.main([str(results), "--out", str(alone / "lb.md")])
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert code == 0 and sorted(results.rglob("*")) == before
    assert sorted(path.name for path in alone.iterdir()) == ["lb.md", "leaderboard.csv", "pareto.png", "throughput.png"]


def test_unwritable_output_is_one_line_naming_it(results, tmp_path, capsys):
    (tmp_path / "plain").write_text("a file")
    long_name = tmp_path / ("x" * 300 + ".csv")  # fails at the write itself (the markdown is written), even as root
    cases = [("--csv", str(tmp_path / "plain" / "lb.csv"), f"{tmp_path / 'plain'} is not a folder"),
             ("--out", str(tmp_path / "new") + os.sep, "it names a folder, not a file"),
             ("--plot", str(tmp_path / "runs"), "it names a folder, not a file"),
             ("--csv", str(long_name), os.strerror(errno.ENAMETOOLONG))]
    for option, path, reason in cases:
        assert report.main([str(results), option, path]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("report.py: skipped")]
        assert errors == [f"report.py: error: cannot write {path} ({reason})"]
        if option != "--csv" or path != str(long_name):  # refused before anything was written
            assert not (results / "leaderboard.md").exists() and not (results / "leaderboard.csv").exists()
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "runs").is_dir() and (tmp_path / "plain").read_text() == "a file"


def test_an_unwritable_csv_or_plot_folder_is_refused_before_anything_is_written(results, tmp_path, capsys,
                                                                               monkeypatch):
    """A read-only file system (user test 11: a read-only bind mount, as root) was found only when the CSV or the
    plot was written, after the markdown and the figures. ``os.access`` says so up front (as root too, for a
    read-only file system); simulated here, since the tests run as root where a read-only mode is no obstacle."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(report.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    out = tmp_path / "out"
    out.mkdir()
    for option in ("--csv", "--plot"):
        path = locked / ("lb.csv" if option == "--csv" else "p.png")
        assert report.main([str(results), "--out", str(out / "lb.md"), option, str(path)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("report.py: skipped")]
        assert errors == [f"report.py: error: cannot write {path} ({locked} is not writable)"]
        assert list(out.iterdir()) == [] and list(locked.iterdir()) == []
    # the results folder itself, without --out: named, nothing written there
    monkeypatch.setattr(report.os, "access", lambda path, mode: Path(path) != results and real_access(path, mode))
    assert report.main([str(results)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"report.py: error: cannot write {results / 'leaderboard.md'} "
                                                        f"({results} is not writable)")
    assert not (results / "leaderboard.md").exists() and not (results / "throughput.png").exists()


# the same runs made under other settings: fp32 and bf16 (baseline and tome), and tome at another batch size
SETTINGS = {"fp32": {}, "bf16": {"dtype": "bf16"}, "bs50": {"batch_size": 50}}
SETTING_RUNS = {"baseline": ({"label": "deit-s", "weights": None}, "baseline"),
                "tome": ({"label": "deit-s", "weights": None}, {"method": "tome", "r": 4})}
SETTING_TOP1 = {("baseline", "fp32"): 80.0, ("baseline", "bf16"): 79.0, ("tome", "fp32"): 78.5,
                ("tome", "bf16"): 78.0, ("tome", "bs50"): 78.0}


@pytest.fixture(scope="module")
def settings_results(tmp_path_factory) -> tuple[Path, dict[tuple[str, str], str]]:
    """A results folder with the records of ``SETTING_TOP1`` (top-1 set to those values) and their keys."""
    from bench.pipeline.config import load_experiment

    folder = tmp_path_factory.mktemp("settings")
    keys = {}
    for setting, defaults in SETTINGS.items():
        runs = {name: run for name, run in SETTING_RUNS.items() if (name, setting) in SETTING_TOP1}
        path = _experiment(folder, runs, ["eval", "macs"], f"{setting}.yaml", **defaults)
        assert bench_main(path, folder / "made", "--no-report") == 0
        keys.update({(name, setting): run.key for name, run in zip(runs, load_experiment(path).runs, strict=True)})
    records, problems = read_all(folder / "made")
    assert problems == [] and len(records) == len(keys)
    by_key = {record["key"]: record for record in records}
    for name, key in keys.items():
        record = copy.deepcopy(by_key[key])
        _set(record, "metrics.eval.top1", SETTING_TOP1[name])
        write_record(record_path(folder / "results", key), record)
    return folder / "results", keys


def test_runs_under_other_settings_are_told_apart(settings_results):
    results, keys = settings_results
    df, _, _, _, _ = report.load_all(results)
    params = dict(zip(df["key"], df["params"], strict=True))
    assert {name: params[key] for name, key in keys.items()} == {
        ("baseline", "fp32"): "[dtype=fp32]", ("baseline", "bf16"): "[dtype=bf16]",
        ("tome", "fp32"): "r=4 [batch_size=100, dtype=fp32]", ("tome", "bf16"): "r=4 [batch_size=100, dtype=bf16]",
        ("tome", "bs50"): "r=4 [batch_size=50, dtype=fp32]"}
    section = _section(report.render_markdown(df), f"## deit-s on {FMNIST} (random init)")
    rows = [[cell.strip() for cell in line.split("|")[1:4]] for line in section.splitlines()
            if line.startswith("| ") and "Method" not in line]
    assert sorted(rows) == [["baseline", "[dtype=bf16]", "79.00"], ["baseline", "[dtype=fp32]", "80.00"],
                            ["tome", "r=4 [batch_size=100, dtype=bf16]", "78.00"],
                            ["tome", "r=4 [batch_size=100, dtype=fp32]", "78.50"],
                            ["tome", "r=4 [batch_size=50, dtype=fp32]", "78.00"]]


def test_delta_against_the_baseline_of_the_same_dtype(settings_results, tmp_path):
    results, keys = settings_results
    assert report.main([str(results), "--out", str(tmp_path / "lb.md"), "--csv", str(tmp_path / "lb.csv")]) == 0
    csv = pd.read_csv(tmp_path / "lb.csv", keep_default_na=False).set_index("key")
    delta = {name: csv.loc[key, "delta_top1"] for name, key in keys.items()}
    assert delta == pytest.approx({("baseline", "fp32"): 0.0, ("baseline", "bf16"): 0.0, ("tome", "fp32"): -1.5,
                                   ("tome", "bf16"): -1.0, ("tome", "bs50"): -2.0})
    assert csv.loc[keys["tome", "bf16"], "params"] == "r=4 [batch_size=100, dtype=bf16]"
    assert list(csv["dtype"].sort_values()) == ["bf16", "bf16", "fp32", "fp32", "fp32"]
    tome = csv.loc[keys["tome", "bf16"]]
    base = csv.loc[keys["baseline", "bf16"]]
    assert tome["mac_reduction"] == pytest.approx(100 * (1 - tome["gmacs"] / base["gmacs"]))


def test_settings_of_a_stage_that_did_not_run_do_not_label_a_row(real_records):
    """Two records of one run made by experiments with other stages (and another ``macs.images``, which only
    the one with the macs stage used): the label says the stages, not the unused setting."""
    full = copy.deepcopy(real_records["tome-a"])
    eval_only = copy.deepcopy(full)
    _set(eval_only, "run.stages", ["eval"])
    _set(eval_only, "run.macs.images", 16)
    _set(eval_only, "key", full["key"] + "-other")
    assert full["run"]["stages"] == ["eval", "macs", "throughput"] and full["run"]["macs"]["images"] == 1
    df = report.build_frame([full, eval_only])
    assert list(df["params"]) == ["r=4 [stages=[eval, macs, throughput]]", "r=4 [stages=[eval]]"]


def test_the_readme_lists_the_csv_columns_in_order(results, tmp_path):
    """README's *CSV columns* paragraph names every column report.py writes, in the file's order."""
    import re

    from bench.pipeline.files import REPO

    assert report.main([str(results), "--out", str(tmp_path / "board.md"), "--csv", str(tmp_path / "board.csv")]) == 0
    header = (tmp_path / "board.csv").read_text().splitlines()[0].split(",")
    readme = (REPO / "README.md").read_text()
    paragraph = readme.split("**CSV columns**", 1)[1].split("\n\n", 1)[0]
    listed = [name for name in re.findall(r"`([a-z0-9_]+)`", paragraph) if name not in ("leaderboard", "macs")]
    assert listed == header == report.CSV_COLUMNS + report.EXTRA_COLUMNS


def test_a_fine_tuned_run_is_compared_with_the_fine_tuned_baseline(tmp_path):
    """Δ Top-1 of a run fine-tuned by the finetune stage is taken against the baseline fine-tuned the same way, and
    that of a run off the shelf against the baseline off the shelf: the same group (model, data, starting weights),
    four real records of two experiments, the expected deltas taken from the records' own top-1."""
    import yaml

    runs = {name: RUNS[name] for name in ("baseline-b", "tome-b")}
    plain = _experiment(tmp_path, runs, ["eval"], "plain.yaml")
    tuned = _experiment(tmp_path, runs, ["finetune", "eval"], "tuned.yaml")
    cfg = yaml.safe_load(tuned.read_text())
    cfg["finetune"] = {"epochs": 1, "batch_size": 50, "lr": 3e-3}
    tuned.write_text(yaml.safe_dump(cfg))
    records = []
    for path, folder in ((plain, "plain"), (tuned, "tuned")):
        assert bench_main(path, tmp_path / folder, "--no-report") == 0
        records += read_all(tmp_path / folder)[0]
    top1 = {(r["run"]["method"], "finetune" in r["metrics"]): r["metrics"]["eval"]["top1"] for r in records}
    assert len(top1) == 4 and top1["baseline", True] != top1["baseline", False]  # else the test could not tell
    df = report.build_frame(records)
    delta = {(method, not pd.isna(epochs)): value
             for method, epochs, value in zip(df["method"], df["finetune_epochs"], df["delta_top1"], strict=True)}
    assert delta == pytest.approx({(method, fine): top1[method, fine] - top1["baseline", fine]
                                   for method, fine in top1})


def test_with_all_every_row_is_compared_with_the_current_configs_baseline(tmp_path):
    """``report.py --all``: the group holds the current config's baseline and an earlier config's (another seed of
    the random init: other weights, other top-1); Δ Top-1 of every row is taken against the current one. Run with
    the seeds both ways round, so that the earlier baseline comes first in the frame in one of them."""
    import yaml

    runs = {name: RUNS[name] for name in ("baseline-b", "tome-b")}
    for earlier, current in ((0, 1), (1, 0)):
        folder = tmp_path / f"seeds{earlier}{current}"
        folder.mkdir()
        path = _experiment(folder, runs, ["eval"], "exp.yaml")
        cfg = yaml.safe_load(path.read_text())
        for seed in (earlier, current):
            cfg["defaults"]["seed"] = seed
            path.write_text(yaml.safe_dump(cfg))
            assert bench_main(path, folder / "results", "--no-report") == 0
        records = {(r["run"]["method"], r["run"]["seed"]): r["metrics"]["eval"]["top1"]
                   for r in read_all(folder / "results")[0]}
        assert len(records) == 4 and records["baseline", 0] != records["baseline", 1]  # else the test could not tell
        df = report.load_all(folder / "results", everything=True).frame
        delta = {(method, bool(old)): value
                 for method, old, value in zip(df["method"], df["_earlier"], df["delta_top1"], strict=True)}
        assert delta == pytest.approx({(method, seed == earlier): top1 - records["baseline", current]
                                       for (method, seed), top1 in records.items()})
