"""report.py: numbers against the group baseline, CSV layout, markdown sections, Pareto front, CLI errors.

Records are written with bench/records.py's ``write_record`` / ``record_path`` (``report.records`` is that
module, loaded without importing the torch-heavy ``bench`` package so these tests stay fast)."""

from __future__ import annotations

import copy
import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

import report

write_record, record_path = report.records.write_record, report.records.record_path

LEADING = ["model", "method", "params", "top1", "top5", "delta_top1", "agreement", "gmacs", "mac_reduction",
           "images_per_s", "speedup", "data", "weights", "key", "gmacs_analytic", "gmacs_data", "batch_size",
           "dtype", "device"]
WEIGHTS = "configs/deit_fmnist.pth"
HEADING_A = "## deit-s on fashion_mnist (subset 2000) (configs/deit_fmnist.pth)"
HEADING_B = "## deit-s on fashion_mnist (subset 2000) (random init)"


def make_record(key, method, params=None, *, top1=None, top5=None, agreement=None, gmacs=None, throughput=(),
                weights=WEIGHTS, model="vit_small_patch16_224", label="deit-s", reference=None, tokens=None,
                stats=None):
    metrics = {}
    if top1 is not None:
        metrics["eval"] = {"top1": top1, "top5": top5, "loss": 0.5, "agreement": agreement, "images": 2000}
    if gmacs is not None:
        metrics["macs"] = {"torchprofile": gmacs * 1e9, "analytic": gmacs * 0.98e9, "data_mean": gmacs * 1.01e9}
    if throughput:
        metrics["throughput"] = [
            {"batch_size": bs, "dtype": "fp32", "device": "cpu", "device_name": "Xeon Test", "threads": 2,
             "images_per_s": ips, "times_s": [0.1, 0.1], "baseline_images_per_s": base_ips,
             "baseline_times_s": [0.1], "speedup": speedup}
            for bs, ips, base_ips, speedup in throughput]
    record = {
        "schema": 1, "key": key, "experiment": "unit",
        "run": {"model": model, "model_kwargs": {}, "model_label": label, "weights": weights,
                "data": {"name": "fashion_mnist", "root": None, "subset": 2000}, "method": method,
                "params": params or {}, "batch_size": 128, "dtype": "fp32", "device": "cpu", "threads": 2,
                "stages": ["eval", "macs", "throughput"], "throughput_batch_sizes": [32, 64],
                "reference": reference},
        "metrics": metrics,
        "env": {"torch": "2.4", "device_name": "Xeon Test", "threads": 2},
        "started_at": "2026-11-25T15:00:00+00:00", "finished_at": "2026-11-25T15:01:00+00:00", "wall_s": 60.0,
    }
    if tokens is not None:
        record["tokens_per_layer"] = {"in": tokens[:1] + tokens[:-1], "out": tokens}
    if stats is not None:
        record["method_stats"] = stats
    return record


RECORDS = [
    # group A: fine-tuned weights
    make_record("baseline-a", "baseline", top1=80.0, top5=95.0, agreement=100.0, gmacs=4.6,
                throughput=[(32, 1000.0, 1000.0, 1.0), (64, 1100.0, 1100.0, 1.0)],
                reference={"top1": 79.8, "top5": None, "gmacs": 4.6, "source": "DeiT paper, table 1"},
                tokens=[197] * 4),
    # speed-up 1.45 as measured in-process; 1500 / 1000 (the baseline *record*) would give 1.50
    make_record("tome-a", "tome", {"r": 13}, top1=78.5, top5=94.0, agreement=96.0, gmacs=2.7,
                throughput=[(32, 1500.0, 1034.5, 1.45), (64, 1760.0, 1100.0, 1.6)], tokens=[197, 184, 171, 158]),
    make_record("ppt-a", "ppt", {"keep_rate": 0.7, "layers": [3, 6, 9]}, top1=79.0, top5=94.5, agreement=97.0,
                gmacs=3.0, throughput=[(32, 1300.0, 1000.0, 1.3)], tokens=[197, 197, 138, 97],
                stats={"6": {"pooled_fraction": 0.55}, "3": {"pooled_fraction": 0.41}}),
    make_record("evit-a", "evit", {"keep_rate": 0.8}, top1=77.0, top5=93.0, agreement=95.0, gmacs=3.5),
    make_record("pruning-a", "pruning", {"keep_rate": 0.5}, gmacs=2.0),  # macs stage only
    # group B: same model and data, random init: its own baseline
    make_record("baseline-b", "baseline", top1=10.0, top5=50.0, agreement=100.0, gmacs=4.6, weights=None,
                throughput=[(32, 990.0, 990.0, 1.0)]),
    make_record("tome-b", "tome", {"r": 13}, top1=11.0, top5=52.0, agreement=40.0, gmacs=2.7, weights=None,
                throughput=[(32, 1480.0, 1000.0, 1.48)]),
    # group C: no baseline at all
    make_record("topk-c", "topk", {"k": 64}, top1=50.0, gmacs=1.0, model="vit_tiny_patch16_224", label="vit-t"),
]


@pytest.fixture
def results(tmp_path: Path) -> Path:
    for rec in RECORDS:
        write_record(record_path(tmp_path, rec["key"]), copy.deepcopy(rec))
    text = (tmp_path / "runs" / "tome-a.json").read_text()
    (tmp_path / "runs" / "zz-torn.json").write_text(text[: len(text) // 2])
    return tmp_path


@pytest.fixture
def frame(results: Path) -> pd.DataFrame:
    df, _ = report.load_frame(results)
    return df.set_index("key", drop=False)


def test_frame_values_against_group_baseline(frame):
    assert len(frame) == len(RECORDS)
    tome = frame.loc["tome-a"]
    assert tome["model"] == "deit-s"
    assert tome["params"] == "r=13"
    assert tome["data"] == "fashion_mnist (subset 2000)"
    assert tome["weights"] == WEIGHTS
    assert tome["delta_top1"] == pytest.approx(-1.5)
    assert tome["mac_reduction"] == pytest.approx(100 * (1 - 2.7 / 4.6))
    assert tome["gmacs"] == pytest.approx(2.7)
    assert tome["gmacs_analytic"] == pytest.approx(2.7 * 0.98)
    assert tome["gmacs_data"] == pytest.approx(2.7 * 1.01)
    assert tome["agreement"] == pytest.approx(96.0)
    assert tome["images_per_s"] == pytest.approx(1500.0)  # first throughput entry (batch 32)
    assert tome["speedup"] == pytest.approx(1.45)  # the in-process number, not 1500 / 1000
    assert frame.loc["ppt-a", "params"] == "keep_rate=0.7, layers=[3, 6, 9]"
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


def test_throughput_long_table(results):
    _, tp, _ = report.load_all(results)
    tome = tp[tp["key"] == "tome-a"].sort_values("batch_size")
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
    assert set(front["key"]) == {"baseline-a", "ppt-a", "tome-a", "tome-b", "topk-c"}
    assert list(report.pareto_front(frame)["key"]) == ["topk-c", "tome-a", "ppt-a", "baseline-a"]


def test_csv_columns_and_numbers(results, tmp_path):
    assert report.main([str(results), "--csv", str(tmp_path / "out" / "lb.csv"),
                        "--plot", str(tmp_path / "p.png"), "--out", str(tmp_path / "lb.md")]) == 0
    csv = pd.read_csv(tmp_path / "out" / "lb.csv", keep_default_na=True)
    assert list(csv.columns[: len(LEADING)]) == LEADING
    row = csv[csv["key"] == "tome-a"].iloc[0]
    assert row["delta_top1"] == pytest.approx(-1.5)
    assert row["speedup"] == pytest.approx(1.45)
    assert row["gmacs"] == pytest.approx(2.7)
    assert row["mac_reduction"] == pytest.approx(41.304, abs=1e-3)
    assert math.isnan(csv[csv["key"] == "pruning-a"].iloc[0]["top1"])
    assert len(csv) == len(RECORDS)


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(heading + "\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start: end if end >= 0 else None]


def test_markdown_tables(results):
    df, tp, problems = report.load_all(results)
    md = report.render_markdown(df, problems, tp, generated=datetime(2026, 11, 26, 9, 30, tzinfo=timezone.utc))
    assert md.startswith("# Leaderboard: unit\n")
    assert "8 runs in 3 groups, generated 2026-11-26 09:30 UTC" in md
    section = _section(md, HEADING_A)
    rows = [line for line in section.splitlines() if line.startswith("| ") and "Method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["baseline", "evit", "ppt", "tome", "pruning"]
    tome = [cell.strip() for cell in rows[3].split("|")[1:-1]]
    assert tome == ["tome", "r=13", "78.50", "94.00", "-1.50", "96.00", "2.700", "41.3%", "1500", "1.45x"]
    assert "Xeon Test, batch size 32, fp32, 2 threads" in section
    assert HEADING_B in md and "## vit-t on fashion_mnist (subset 2000) (configs/deit_fmnist.pth)" in md
    assert "+1.00" in _section(md, HEADING_B)
    throughput = _section(md, "## Throughput by batch size")
    assert "Images/s (bs 64)" in throughput and "1.60x" in throughput and "1760" in throughput


def test_markdown_published_vs_measured(results):
    df, tp, problems = report.load_all(results)
    section = _section(report.render_markdown(df, problems, tp), "## Published vs measured")
    top1 = next(line for line in section.splitlines() if "| Top-1" in line)
    assert [cell.strip() for cell in top1.split("|")[4:9]] == ["Top-1", "79.80", "80.00", "+0.20",
                                                                 "DeiT paper, table 1"]
    assert "| GMACs" in section and "+0.000" in section
    assert "Top-5" not in section  # the reference has no top-5


def test_markdown_per_layer_tokens(results):
    df, tp, problems = report.load_all(results)
    section = _section(report.render_markdown(df, problems, tp), "## Per-layer tokens")
    assert "197, 184, 171, 158" in section
    assert "pooled fraction per layer: layer 3: 0.41, layer 6: 0.55" in section


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
    expected = [results / "leaderboard.md", results / "leaderboard.csv", results / "pareto.png"]
    assert out == [str(path) for path in expected]
    png = (results / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_plot_skipped_without_top1_and_gmacs(tmp_path, capsys):
    write_record(record_path(tmp_path, "p"), make_record("p", "pruning", {"keep_rate": 0.5}, gmacs=2.0))
    assert report.main([str(tmp_path)]) == 0
    assert not (tmp_path / "pareto.png").exists()
    assert "plot skipped" in capsys.readouterr().err


def test_main_missing_or_empty_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert report.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1
    (tmp_path / "torn" / "runs").mkdir(parents=True)
    (tmp_path / "torn" / "runs" / "x.json").write_text('{"schema": 1, "ke')
    assert report.main([str(tmp_path / "torn")]) == 2
    err = capsys.readouterr().err
    assert "torn" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "torn" / "leaderboard.md").exists()
