"""The pipeline end to end on real Fashion-MNIST images: YAML -> run_bench -> records -> report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import methods
import report
import run_bench
from bench.pipeline.config import ConfigError, load_experiment
from bench.pipeline.files import REPO
from bench.pipeline.records import read_all, read_record, record_path

MODEL = {
    "name": "vit_tiny_patch16_224",
    "label": "tiny-fmnist",
    "kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 4,
               "num_heads": 2},
}
METHODS = ["baseline", {"method": "tome", "r": 4}, {"method": "ppt", "r": 6, "layers": [1, 2], "threshold": 1e-3},
           {"method": "evit", "keep_rate": 0.7, "layers": [1]}]


def config(tmp_path: Path, **changes) -> dict:
    cfg = {
        "name": "unit",
        "defaults": {"model": MODEL, "weights": None, "data": {"name": "fashion_mnist", "subset": 200},
                     "batch_size": 100, "device": "cpu", "threads": 1},
        "stages": ["eval", "macs", "throughput"],
        "throughput": {"batch_sizes": [16], "warmup": 1, "runs": 2},
        "macs": {"images": 2},
        "grid": {"methods": METHODS},
    }
    cfg.update(changes)
    return cfg


def write(tmp_path: Path, cfg: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def bench_main(path: Path, results: Path, *extra: str) -> int:
    return run_bench.main(["--config", str(path), "--results", str(results), "--quiet", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One experiment run once; tests read its results (and copy them before changing anything)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    path = write(tmp, config(tmp))
    results = tmp / "results"
    assert bench_main(path, results) == 0
    return path, results


def test_every_run_has_a_complete_record(finished):
    _, results = finished
    records, problems = read_all(results)
    assert problems == []
    by_method = {r["run"]["method"]: r for r in records}
    assert sorted(by_method) == ["baseline", "evit", "ppt", "tome"]
    base = by_method["baseline"]
    assert base["metrics"]["eval"]["images"] == 200
    assert base["metrics"]["eval"]["agreement"] == 100.0
    assert 0 <= base["metrics"]["eval"]["top1"] <= base["metrics"]["eval"]["top5"] <= 100
    assert base["tokens_per_layer"]["out"] == [50, 50, 50, 50]
    assert by_method["tome"]["tokens_per_layer"]["out"] == [46, 42, 38, 34]
    assert by_method["ppt"]["tokens_per_layer"]["out"] == [50, 44, 38, 38]
    assert set(by_method["ppt"]["method_stats"]) == {"1", "2"}
    assert isinstance(by_method["ppt"]["method_stats"]["1"]["pooled_fraction"], float)  # its values: test_harness
    for record in records:
        macs = record["metrics"]["macs"]
        assert abs(macs["analytic"] - macs["torchprofile"]) / macs["torchprofile"] < 0.02
        (throughput,) = record["metrics"]["throughput"]
        assert throughput["batch_size"] == 16 and throughput["dtype"] == "fp32" and throughput["threads"] == 1
        assert len(throughput["times_s"]) == 2 and len(throughput["baseline_times_s"]) == 2
        ratios = [base / own for own, base in zip(throughput["times_s"], throughput["baseline_times_s"], strict=True)]
        assert throughput["speedup"] == pytest.approx(float(np.median(ratios)))  # the median paired ratio
        assert throughput["speedup_low"] <= throughput["speedup"] <= throughput["speedup_high"]
        assert record["env"]["torch"] == torch.__version__
    assert by_method["tome"]["metrics"]["macs"]["torchprofile"] < base["metrics"]["macs"]["torchprofile"]
    # the parameters as the config gave them (the label: the budget knob, then those differing from the defaults)
    assert {method: r["run"]["params_label"] for method, r in by_method.items()} == {
        "baseline": "", "tome": "r=4", "ppt": "r=6, layers=[1, 2], threshold=0.001",
        "evit": "keep_rate=0.7, layers=[1]"}  # keep_rate 0.7 is its default, shown as its knob
    for entry in METHODS[1:]:
        given = {k: v for k, v in entry.items() if k != "method"}
        assert by_method[entry["method"]]["run"]["params"].items() >= given.items()


def test_record_holds_the_run_spec_and_accuracy_agreement_from_plain_timm(tmp_path):
    """top-1 and agreement recomputed outside the pipeline: plain timm forward for the dense model, the
    method's model on the same 200 images in batches of 100, compared prediction by prediction. Weights
    scaled x3 so that predictions vary (a random-init tiny model predicts one class for everything)."""
    import bench
    from bench.pipeline.config import load_experiment
    from bench.pipeline.data import build_dataset
    from bench.pipeline.models import create_model

    torch.manual_seed(0)
    vit = create_model(MODEL["name"], MODEL["kwargs"]).eval()
    with torch.no_grad():
        for parameter in vit.parameters():
            parameter.mul_(3.0)
    torch.save({"model": vit.state_dict()}, tmp_path / "scaled.pth")
    cfg = config(tmp_path, stages=["eval"])
    cfg["defaults"]["weights"] = "scaled.pth"
    path = write(tmp_path, cfg)
    assert bench_main(path, tmp_path / "results", "--no-report") == 0
    records = {r["key"]: r for r in read_all(tmp_path / "results")[0]}
    runs = load_experiment(path).runs
    val = build_dataset("fashion_mnist", "val", subset=200)
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    agreements = {}
    with torch.no_grad():
        dense = torch.cat([vit(batch).argmax(-1) for batch in images.split(100)])
        for run in runs:
            record = records[run.key]
            assert record["run"] == json.loads(json.dumps(run.to_dict()))
            model = bench.apply(vit, run.method, **run.params)
            top1 = torch.cat([model(batch).argmax(-1) for batch in images.split(100)])
            assert record["metrics"]["eval"]["top1"] == pytest.approx(100.0 * (top1 == targets).float().mean().item())
            agreements[run.method] = 100.0 * (top1 == dense).float().mean().item()
            assert record["metrics"]["eval"]["agreement"] == pytest.approx(agreements[run.method]), run.method
    assert agreements["baseline"] == 100.0 and min(agreements.values()) < 90.0, agreements


def test_report_is_written_from_the_records(finished):
    _, results = finished
    board = (results / "leaderboard.md").read_text()
    assert ("## tiny-fmnist on fashion_mnist (subset 200) [1x28x28 bicubic, crop_pct 1.0 center, mean 0.286, "
            "std 0.353] (random init)") in board
    csv = (results / "leaderboard.csv").read_text().splitlines()
    assert csv[0].startswith("model,method,params,top1,top5,delta_top1,agreement,gmacs,mac_reduction,images_per_s,speedup")
    assert len(csv) == 1 + 4
    assert (results / "pareto.png").stat().st_size > 1000


def test_second_invocation_skips_finished_runs(finished, capsys):
    path, results = finished
    before = {p.name: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")}
    assert bench_main(path, results, "--no-report") == 0
    assert "4 already done, 0 to run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")} == before


def test_torn_record_is_redone_and_others_kept(finished, tmp_path, capsys):
    import shutil

    path, original = finished
    results = tmp_path / "copy"
    shutil.copytree(original, results)
    records = sorted((results / "runs").glob("*.json"))
    torn = records[0]
    torn.write_text(torn.read_text()[:150])  # cut off mid-write
    untouched = {p.name: p.stat().st_mtime_ns for p in records[1:]}
    assert bench_main(path, results, "--no-report") == 0
    captured = capsys.readouterr()
    assert "record cut off" in captured.err and "1 to run" in captured.out
    assert read_record(torn)["key"] == torn.stem
    assert torn.with_name(torn.name + ".torn.1").exists()  # set aside, numbered: never overwritten
    assert {p.name: p.stat().st_mtime_ns for p in records[1:]} == untouched


def test_dry_run_lists_runs_and_writes_nothing(tmp_path, capsys):
    path = write(tmp_path, config(tmp_path))
    assert bench_main(path, tmp_path / "results", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "4 run(s), 0 already done, 4 to run" in out
    assert out.count("  todo  tiny-fmnist-") == 4
    assert not (tmp_path / "results").exists()


def test_only_and_force(finished, capsys):
    path, results = finished
    key = next(p.stem for p in (results / "runs").glob("*tome*.json"))
    before = record_path(results, key).stat().st_mtime_ns
    assert bench_main(path, results, "--only", "tome", "--force", "--no-report") == 0
    assert "1 run(s), 0 already done, 1 to run" in capsys.readouterr().out
    assert record_path(results, key).stat().st_mtime_ns > before


def test_only_given_twice_selects_the_runs_of_either_and_an_empty_glob_is_refused(finished, capsys):
    path, results = finished
    assert bench_main(path, results, "--only", "tome", "--only", "evit", "--dry-run") == 0
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("  done  ")]
    assert len(listed) == 2 and {key.split("-")[2] for key in listed} == {"tome", "evit"}
    assert bench_main(path, results, "--only", "tome", "--only", "", "--dry-run") == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --only: an empty GLOB; give a method name or a key glob (e.g. --only tome --only 'deit-s-*')"]
    for globs in (["tom"], ["tome", "tom"]):  # alone, or beside a glob that matches
        assert bench_main(path, results, *[arg for glob in globs for arg in ("--only", glob)], "--dry-run") == 2
        assert f"error: {path}: --only 'tom' matches no run (methods: baseline, tome, ppt, evit; keys: " in \
            capsys.readouterr().err


def test_only_a_method_after_its_budgets_changed_shows_its_current_budget_cells_only(tmp_path, capsys, monkeypatch):
    """--only tome after the config's budgets changed (0.6, 0.8 -> 0.5, 0.7): ToMe's budget rows (tables, CSV,
    ranking) and calibrations are the new config's alone, and its records at 0.6 and 0.8 are listed as records of
    earlier configs (kept in runs/). EViT, not selected and so not recalibrated, keeps its budget records and
    calibrations as the README says."""
    monkeypatch.setenv("TOKENBENCH_CACHE_DIR", str(tmp_path / "cache"))
    cfg = config(tmp_path, stages=["eval", "macs"], budgets={"macs": [0.6, 0.8]},
                 grid={"methods": ["baseline", "tome", {"method": "evit", "layers": [1]}]})
    results = tmp_path / "results"
    assert bench_main(write(tmp_path, cfg), results) == 0
    old = {(r["run"]["method"], r["run"]["budget"]["target"]): r["key"] for r in read_all(results)[0] if r["run"]["budget"]}
    assert sorted(old) == [("evit", 0.6), ("evit", 0.8), ("tome", 0.6), ("tome", 0.8)]
    cfg["budgets"] = {"macs": [0.5, 0.7]}
    path = write(tmp_path, cfg)
    assert bench_main(path, results, "--only", "tome") == 0
    assert len(read_all(results)[0]) == 7  # nothing computed is lost
    written = json.loads((results / "experiment.json").read_text())
    assert {old[("evit", 0.6)], old[("evit", 0.8)]} <= set(written["runs"])  # EViT's kept calibrations' runs
    assert sorted((c["method"], c["target"]) for c in written["calibrations"]) == [
        ("evit", 0.6), ("evit", 0.8), ("tome", 0.5), ("tome", 0.7)]
    budgets = pd.read_csv(results / "leaderboard.csv").dropna(subset=["budget"]).groupby("method")["budget"]
    assert {method: sorted(values) for method, values in budgets} == {"evit": [0.6, 0.8], "tome": [0.5, 0.7]}
    board = (results / "leaderboard.md").read_text()
    tables, earlier = board.split("## Records of earlier configs")
    assert all(old[("tome", target)] in earlier and old[("tome", target)] not in tables for target in (0.6, 0.8))
    assert all(old[("evit", target)] not in earlier for target in (0.6, 0.8))
    matched = tables.split("## Matched budgets", 1)[1].split("\n## ", 1)[0]
    (tome,) = [line.split("|") for line in matched.splitlines() if line.startswith("|") and line.split("|")[2].strip() == "tome"]
    assert [cell.strip() != "" for cell in tome[3:-3]] == [True, False, True, False], tome  # ≤ 0.50 and ≤ 0.70 only


def test_only_a_method_keeps_no_earlier_configs_budget_runs_of_the_others_in_the_tables(tmp_path, capsys,
                                                                                         monkeypatch):
    """--only tome keeps EViT's budget records of the last invocation's calibrations in the tables, not every EViT
    budget record in runs/: one at a budget an earlier config calibrated (0.6, then 0.8) or made under settings
    since edited (threads) is a record of an earlier config (it showed in the tables as a current run)."""
    monkeypatch.setenv("TOKENBENCH_CACHE_DIR", str(tmp_path / "cache"))
    cfg = config(tmp_path, stages=["eval", "macs"], budgets={"macs": [0.6]},
                 grid={"methods": ["baseline", {"method": "tome", "r": 2}, {"method": "evit", "layers": [1]}]})
    results = tmp_path / "results"
    assert bench_main(write(tmp_path, cfg), results) == 0
    cfg["budgets"] = {"macs": [0.8]}
    assert bench_main(write(tmp_path, cfg), results) == 0
    evit = {r["run"]["budget"]["target"]: r["key"] for r in read_all(results)[0] if r["run"]["method"] == "evit"}
    assert sorted(evit) == [0.6, 0.8]

    def shown() -> tuple[str, str]:
        board = (results / "leaderboard.md").read_text()
        tables, _, earlier = board.partition("## Records of earlier configs")
        return tables, earlier

    assert bench_main(write(tmp_path, cfg), results, "--only", "tome") == 0  # the same config: nothing to run
    tables, earlier = shown()
    assert evit[0.8] not in earlier and evit[0.6] in earlier and evit[0.6] not in tables
    assert list(pd.read_csv(results / "leaderboard.csv")["key"]).count(evit[0.8]) == 1
    cfg["defaults"] = {**cfg["defaults"], "threads": 2}
    assert bench_main(write(tmp_path, cfg), results, "--only", "tome") == 0
    tables, earlier = shown()
    assert all(key in earlier and key not in tables for key in evit.values())
    assert "evit" not in set(pd.read_csv(results / "leaderboard.csv")["method"])


def test_a_config_whose_every_run_is_an_unreachable_budget_is_one_line(tmp_path, capsys):
    cfg = config(tmp_path, stages=["macs"], budgets={"macs": [0.05]}, grid={"methods": ["tome"]})
    path = write(tmp_path, cfg)
    assert bench_main(path, tmp_path / "results") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"error: {path}: grid: makes no run (no MAC budget is reachable)", err
    assert not (tmp_path / "results").exists()


def test_kmedoids_runs_are_reproducible_whatever_ran_before(tmp_path):
    """K-Medoids draws its first medoid from numpy's global generator (its reference's draw): every run seeds it,
    so a forced rerun, after other numpy draws in the same process, gives the same record metrics."""
    import numpy

    kmedoids = {"method": "kmedoids", "keep_rate": 0.5, "layers": [1, 3], "equal_weight": True}
    cfg = config(tmp_path, stages=["eval"], grid={"methods": ["baseline", kmedoids]})
    embedded = {"name": "vit_tiny_patch16_224", "label": "fmnist-vit",  # trained: the medoids decide predictions
                "kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 96,
                           "depth": 8, "num_heads": 3}}
    cfg["defaults"] = {**cfg["defaults"], "model": embedded, "weights": str(REPO / "configs" / "fmnist_vit.pth")}
    path, results = write(tmp_path, cfg), tmp_path / "results"
    assert bench_main(path, results, "--no-report") == 0
    first = next(r for r in read_all(results)[0] if r["run"]["method"] == "kmedoids")["metrics"]["eval"]
    for draws in (1, 7):
        numpy.random.random(draws)  # the global generator elsewhere
        assert bench_main(path, results, "--only", "kmedoids", "--force", "--no-report") == 0
        again = next(r for r in read_all(results)[0] if r["run"]["method"] == "kmedoids")["metrics"]["eval"]
        assert again == first


def test_a_failing_run_is_reported_and_the_others_kept(tmp_path, monkeypatch, capsys):
    from bench.pipeline.stages import macs

    original = macs.run

    def flaky(ctx):
        if ctx.run.method == "tome":
            raise RuntimeError("injected failure in the macs stage")
        return original(ctx)

    monkeypatch.setattr(macs, "run", flaky)
    path = write(tmp_path, config(tmp_path, stages=["macs"]))
    results = tmp_path / "results"
    assert bench_main(path, results, "--no-report") == 1
    out = capsys.readouterr().out
    assert "FAILED tiny-fmnist-tome-r4-" in out and "injected failure in the macs stage" in out
    assert "3 run(s) succeeded, 1 failed" in out
    assert len(list((results / "runs").glob("*.json"))) == 3
    failure = json.loads(next((results / "failed").glob("*tome*.json")).read_text())
    assert failure["error"] == "RuntimeError: injected failure in the macs stage"
    assert run_bench.main(["--config", str(path), "--results", str(results), "--status"]) == 1
    status = capsys.readouterr().out
    assert "failed   tiny-fmnist-tome-r4-" in status and "injected failure" in status
    assert "3 done" in status and "1 failed" in status
    # the leaderboard says which runs of the experiment have no row, and why: failed, or never run (record gone)
    next((results / "runs").glob("*evit*.json")).unlink()
    assert report.main([str(results)]) == 0
    board = (results / "leaderboard.md").read_text()
    assert "2 runs in 1 group, generated " in board and "(nothing re-run). **2 runs of the experiment have no record**" in board
    listed = board.split("## Runs without a record\n\n", 1)[1].split("\n\n", 2)[1].splitlines()
    assert len(listed) == 2 and listed[0].startswith("- tiny-fmnist-tome-r4-") and listed[1].startswith("- tiny-fmnist-evit-")
    assert listed[0].endswith(": failed, RuntimeError: injected failure in the macs stage") and listed[1].endswith(": todo")
    assert "2 run(s) of the experiment have no record" in capsys.readouterr().err
    for record in (results / "runs").glob("*.json"):  # no record at all: no leaderboard, but what became of the runs
        record.unlink()
    assert report.main([str(results)]) == 2
    err = capsys.readouterr().err.splitlines()
    removed = [line for line in err if line.startswith("report.py: removed ")]  # the leaderboard of the gone records
    assert removed == [f"report.py: removed {results / name}: no record to show now (it showed records that no longer "
                       "read or are gone)" for name in ("leaderboard.md", "leaderboard.csv")]
    err = [line for line in err if line not in removed]
    assert err[0].startswith("report.py: error: no readable run record in ") and len(err) == 5, err
    assert sum(line.startswith("report.py:   tiny-fmnist-") and line.endswith(": todo") for line in err) == 3
    assert any(line.endswith(": failed, RuntimeError: injected failure in the macs stage") for line in err)


BAD_INPUTS = [
    ({"bogus": 1}, "exp.yaml: bogus: unknown key; allowed: name, description, defaults"),
    ({"defaults": {"model": MODEL, "colour": 1}}, "defaults.colour: unknown key; allowed: model, weights"),
    ({"grid": {"methods": ["tomee"]}}, "grid.methods[0].method: unknown method 'tomee'; allowed: " + ", ".join(methods.names())),
    ({"grid": {"methods": [{"method": "tome", "rr": 1}]}}, "grid.methods[0]: method 'tome': unknown parameter 'rr'"),
    ({"grid": {"methods": ["baseline", {"methd": "tome", "r": 2}]}}, "grid.methods[1]: has no method key (its keys: "
     "methd, r); must be a method name or {method: NAME, param: value, sweep: {param: [values]}}"),
    ({"grid": {"methods": [7]}}, "grid.methods[0]: must be a method name or {method: NAME, param: value, sweep: "
     "{param: [values]}}"),
    ({"grid": {"methods": [{"method": "tome", "r": 49}]}}, "r=49 would remove all 49 patch tokens"),
    ({"grid": {"methods": [{"method": "tome", "r": []}]}},
     "grid.methods[0]: method 'tome': parameter 'r' is an empty list: give one int, or one per block from the first"),
    ({"grid": {"methods": [{"method": "tome", "r": 25, "inflection": -1}]}},
     "r=25 with inflection -1 merges 50 tokens at one block, which would remove all 49 patch tokens of this model "
     "(allowed: at most 48 at any block)"),
    ({"budgets": {"macs": [0.7]}, "grid": {"methods": [{"method": "static", "not_contiguous": False, "layers": [1, 2]}]}},
     "parameter 'keep_rate' acts only with not_contiguous: true (the contiguous mode's radius is min_radius) "
     "(tiny-fmnist); budgets.macs sets keep_rate, the method's budget knob"),
    ({"grid": {"methods": [{"method": "ppt", "r": 4, "layers": [3, 6, 9]}]}}, "include block 6, but the model has 4 blocks"),
    ({"grid": {"methods": [{"method": "evit", "keep_rate": 2}]}}, "'keep_rate' must be a number in (0, 1], got 2"),
    ({"stages": ["finetune"], "finetune": {"lr": "fast"}}, "finetune.lr: must be a number >= 0, got 'fast'"),
    ({"stages": ["finetune"], "finetune": {"lr": float("inf"), "batch_size": 100}}, "finetune.lr: must be a number >= 0, got inf"),
    ({"stages": ["finetune"], "finetune": {"epochs": 2, "warmup_epochs": 3, "batch_size": 100}},
     "finetune.warmup_epochs: 3 is more than the 2 epochs of training; allowed: at most finetune.epochs"),
    ({"stages": ["finetune"], "finetune": {"batch_size": 45, "mixup": 0.8, "cutmix": 1.0}},
     "finetune.batch_size: 45 is odd; mixup and cutmix (timm's Mixup) pair the images of each process's batch; "
     "allowed: an even number (even per process under DDP)"),
    ({"stages": ["finetune"], "finetune": {"label_smoothing": 1.5, "batch_size": 100}},
     "finetune.label_smoothing: must be a number in [0, 1], got 1.5"),
    ({"finetune": {"epochz": 3}}, "finetune.epochz: unknown key; allowed: epochs, batch_size"),
    ({"stages": ["finetune"], "finetune": {"clip_grad": 0, "batch_size": 100}},  # was taken, and clipped nothing
     "finetune.clip_grad: must be null (no clipping) or a number > 0 (the largest gradient norm), got 0"),
    ({"throughput": {"batch_sizes": [0]}}, "throughput.batch_sizes[0]: must be an integer >= 1, got 0"),
    ({"throughput": {"batch_sizes": []}}, "throughput.batch_sizes: must be a non-empty list of integers >= 1, got []"),
    ({"throughput": {"warmup": 0}}, "throughput.warmup: must be an integer >= 1, got 0"),  # the method paid the first
    # forward's one-off costs alone: dense against itself read 0.15x with one timed round
    ({"throughput": {"batch_sizes": [4, 8, 4]}}, "throughput.batch_sizes: lists a batch size twice ([4, 8, 4]); allowed: distinct sizes"),
    ({"eval": {"agreement": "no"}}, "eval.agreement: must be true or false, got 'no'"),
    ({"stages": ["finetune"], "finetune": {"export": "tuned.pth", "batch_size": 100}},
     "finetune.export: one file for 4 fine-tuning runs: each would overwrite it; allowed: a path in an experiment of "
     "one run, or null"),
    ({"stages": ["finetune"], "grid": {"methods": ["baseline"]}, "finetune": {"export": "exp.yaml/tuned.pth"}},
     "exp.yaml/tuned.pth cannot be written: ", "exp.yaml is not a folder; allowed: a file path under a writable folder"),
    ({"stages": ["finetune"], "grid": {"methods": ["baseline"]}, "finetune": {"export": "."}},
     "finetune.export: ", " is a folder; allowed: a file path (e.g. "),
    ({"stages": ["finetune", "eval"], "finetune": {"batch_size": 256}},
     "finetune.batch_size: 256 is larger than the training set (defaults.data.subset: 200 images): not one full batch "
     "per epoch; allowed: at most 200"),
    # a streamed dataset has no random access: the run failed, its message listing every index of the epoch
    ({"stages": ["finetune", "eval"], "finetune": {"batch_size": 100},
      "defaults": {"model": MODEL, "data": {"name": "wds/imagenet", "root": "."}}},
     "defaults.data.name: 'wds/imagenet' is a streamed dataset (read in order, no random access): the finetune stage "
     "draws shuffled batches of images by index; allowed with finetune: fashion_mnist, imagenet, folder, torch/<name> "
     "or hfds/<name>"),
    ({"budgets": {"macs": [0.7, 0.8, 0.7]}}, "budgets.macs[2]: lists 0.7 twice ([0.7, 0.8, 0.7]); allowed: distinct fractions"),
    ({"budgets": {"macs": [0.7, 0.7000001]}, "grid": {"methods": ["tome"]}},
     "grid: grid.methods[0] at budget 0.7 and grid.methods[0] at budget 0.7000001 make the same run tiny-fmnist-tome-"),
    ({"grid": {"methods": [{"method": "tome", "r": 4}, {"method": "tome", "r": 4}]}},
     "grid: grid.methods[0] and grid.methods[1] make the same run tiny-fmnist-tome-r4-"),
    ({"grid": [{"methods": ["baseline", {"method": "evit", "keep_rate": 2}]}]},
     "grid[0].methods[1]: method 'evit': parameter 'keep_rate' must be a number in (0, 1], got 2"),
    ({"grid": {"methods": [{"method": "tome", "r": 2, "sweep": {"r": [3, 4]}}]}},
     "grid.methods[0].sweep.r: 'r' is also given as a fixed value (r: 2); give it in one place"),
    ({"reference": [{"method": "tome", "top1": "high"}]}, "reference[0].top1: must be a number, got 'high'"),
    ({"reference": [{"method": "tome", "gmacs": True}]}, "reference[0].gmacs: must be a number, got True"),
    ({"reference": [{"method": "tome", "params": [4]}]}, "reference[0].params: must be a mapping of method parameters"),
    ({"reference": [{"method": "tome", "source": 7}]}, "reference[0].source: must be a string, got 7"),
    ({"reference": [{"top1": 1.0}]}, "reference[0].method: missing"),
    ({"slurm": {"profile": "nosuchcluster"}}, "slurm.profile: no such cluster profile 'nosuchcluster'; allowed: example_gpu"),
    ({"slurm": {"profile": 3}}, "slurm.profile: must be the name of a cluster profile"),
    ({"finetune": {"epochs": 0}}, "finetune.epochs: must be an integer >= 1, got 0"),
    ({"stages": ["eval", "speed"]}, "stages[1]: 'speed' not allowed; allowed: finetune, eval, macs, throughput"),
    # the model's own key, not the first method entry applied to it
    ({"defaults": {"model": {"name": "resnet18", "label": "r18"}, "data": {"name": "fashion_mnist"}}},
     "defaults.model.name: bench.apply needs a timm VisionTransformer (ViT / DeiT / distilled DeiT), got ResNet "
     "(resnet18)"),
    # timm's own message ("not all arguments converted during string formatting") names no keyword
    ({"defaults": {"model": {**MODEL, "kwargs": {**MODEL["kwargs"], "embed_dim": "32"}}, "data": {"name": "fashion_mnist"}}},
     "defaults.model.kwargs.embed_dim: must be an integer (VisionTransformer's embed_dim), got '32'; "
     "timm.create_model('vit_tiny_patch16_224') failed: "),
    ({"defaults": {"model": {**MODEL, "kwargs": {**MODEL["kwargs"], "depth": 0}}, "data": {"name": "fashion_mnist"}}},
     "defaults.model.kwargs: vit_tiny_patch16_224 has no blocks (depth 0); allowed: a depth of at least 1"),
    ({"stages": ["eval", "macs", "eval"]},
     "stages[2]: lists eval twice (eval, macs, eval); allowed: each stage once, of: finetune, eval, macs, throughput, tokens"),
    ({"defaults": {"model": MODEL, "data": {"name": "fashion_mnist", "root": "/nonexistent/fm"}}},
     "defaults.data.root: /nonexistent/fm does not exist"),
    ({"defaults": {"model": MODEL, "data": {"name": "imagenet", "root": "/nonexistent/in1k"}}},
     "defaults.data.root: /nonexistent/in1k/val does not exist"),
    ({"defaults": {"model": MODEL, "weights": "missing.pth", "data": {"name": "fashion_mnist"}}},
     "defaults.weights: "),
    ({"defaults": {"model": {**MODEL, "weights": "missing.pth"}, "data": {"name": "fashion_mnist"}}},
     "defaults.model.weights: "),
    ({"grid": {"models": [{**MODEL, "weights": "missing.pth"}], "methods": ["baseline"]}},
     "grid.models[0].weights: "),
    ({"defaults": {"model": {**MODEL, "name": "vit_nonexistent"}, "data": {"name": "fashion_mnist"}}},
     "unknown timm model 'vit_nonexistent'"),
    ({"stages": ["eval", "tokens"], "tokens": {"images": 8},
      "defaults": {"model": MODEL, "data": {"name": "fashion_mnist", "subset": 3}}},
     "tokens.images: 8 is more than the eval images (defaults.data.subset: 3); allowed: at most 3"),
    # the hint lists near spellings (it listed names sharing the first 6 characters: convit_small, ...)
    ({"defaults": {"model": {**MODEL, "name": "vit_small_patch16_reg4_dinov2"}, "data": {"name": "fashion_mnist"}}},
     "similar: vit_small_patch14_reg4_dinov2, "),
]


@pytest.mark.parametrize(("change", "message", "more"), [(*entry, "")[:3] for entry in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, change, message, more):
    cfg = config(tmp_path)
    for key, value in change.items():
        cfg[key] = value
    path = write(tmp_path, cfg)
    assert bench_main(path, tmp_path / "results") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {path}")
    assert message in err and more in err


def test_a_record_reused_after_its_methods_code_changed_is_named(tmp_path, capsys):
    """A method's file edited without raising its `revision` keeps its run keys, so its records were reused without a
    word: a researcher trying a variant saw the old numbers. A record keeps the hash of each of its method's files; a
    rerun names, in one line per set of changed files, those files and the methods whose records it reuses (reused as
    they are: a comment edit redoes nothing), and --force redoes them, after which nothing is named."""
    import hashlib
    import importlib.util
    import sys

    from methods.base import _REGISTRY

    source = tmp_path / "zz_mine.py"  # two methods in one file, built on baseline
    text = ('from methods.base import register\nfrom methods.baseline import Baseline\n\n\n'
            '@register("zz_mine")\nclass Mine(Baseline):\n    """The first version."""\n\n\n'
            '@register("zz_other")\nclass Other(Baseline):\n    pass\n')
    source.write_text(text)
    spec = importlib.util.spec_from_file_location("zz_mine", source)
    sys.modules["zz_mine"] = module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        grid = {"methods": ["zz_mine", "zz_other", {"method": "tome", "r": 4}], "models": [MODEL, {**MODEL, "label": "b"}]}
        path = write(tmp_path, config(tmp_path, stages=["eval"], grid=grid))
        results = tmp_path / "results"

        def invocation(*extra):
            assert bench_main(path, results, *extra) == 0
            err = capsys.readouterr().err
            records = {r["key"]: r for r in read_all(results)[0]}
            return [line for line in err.splitlines() if line.startswith("warning")], records

        warnings, first = invocation()
        assert warnings == [] and invocation() == ([], first)  # computed, then reused: nothing named
        codes = {r["run"]["method"]: r["method_code"] for r in first.values()}
        assert set(codes["zz_mine"]) == {str(source.resolve()), "methods/baseline.py"}
        assert set(codes["tome"]) == {"methods/tome.py", "methods/ops.py"}
        sha1 = hashlib.sha1(json.dumps(source.read_bytes().decode("latin-1")).encode()).hexdigest()[:8]
        assert codes["zz_mine"][str(source.resolve())] == sha1  # the file's own bytes
        source.write_text(text.replace("The first", "The second"))  # what the methods compute is the same
        warnings, reused = invocation()
        assert warnings == [f"warning: {source.resolve()} changed since 4 finished run(s) of zz_mine, zz_other were "
                            "computed, at the same revision: their records are reused as they are; where the change "
                            "makes a method compute something else, raise its `revision` (methods/base.py: "
                            "Method.revision), or redo them with --force"]
        assert reused == first  # tome's code did not change: not named; no record rewritten
        warnings, redone = invocation("--force")
        assert warnings == [] and invocation()[0] == []
        for key, record in redone.items():
            again = record["method_code"]
            if record["run"]["method"] == "tome":
                assert again == first[key]["method_code"]
            else:
                assert again[str(source.resolve())] != sha1
                assert again["methods/baseline.py"] == first[key]["method_code"]["methods/baseline.py"]
    finally:
        _REGISTRY.pop("zz_mine", None)
        _REGISTRY.pop("zz_other", None)
        sys.modules.pop("zz_mine", None)


def test_a_refusal_unrelated_to_the_budget_knob_does_not_blame_the_budget(tmp_path, capsys):
    """evit at a MAC budget on a model without a class token: the refusal is the class token's, not keep_rate's
    (user test 13: it ended with "budgets.macs sets keep_rate, the method's budget knob")."""
    cfg = config(tmp_path, budgets={"macs": [0.7]}, grid={"methods": ["baseline", {"method": "evit", "layers": [1]}]})
    cfg["defaults"]["model"] = {**MODEL, "kwargs": {**MODEL["kwargs"], "class_token": False, "global_pool": "avg"}}
    path = write(tmp_path, cfg)
    assert bench_main(path, tmp_path / "results") == 2
    assert capsys.readouterr().err.strip().endswith(
        "method 'evit' scores tokens by the class token's attention; this model has none (tiny-fmnist)")


def test_an_unsupported_model_is_named_once(tmp_path, capsys):
    """bench.vit's refusal of a model class already names timm's model; the config's line added the label (the same
    name when no label is given) a second time: "got Eva (eva02_tiny_patch14_224) (eva02_tiny_patch14_224)"."""
    cfg = config(tmp_path)
    cfg["defaults"]["model"] = {"name": "eva02_tiny_patch14_224", "kwargs": {"img_size": 28, "patch_size": 4,
                                                                             "in_chans": 1, "num_classes": 10}}
    path = write(tmp_path, cfg)
    assert bench_main(path, tmp_path / "results", "--dry-run") == 2
    # at the model's name (it was at grid.methods[0], the first method applied to it)
    assert capsys.readouterr().err.strip() == (f"error: {path}: defaults.model.name: bench.apply needs a timm "
                                               "VisionTransformer (ViT / DeiT / distilled DeiT), got Eva "
                                               "(eva02_tiny_patch14_224)")


def test_a_finetune_section_without_the_stage_is_warned_about(tmp_path, capsys):
    """User test 14: the recipe was silently ignored, even by --dry-run."""
    path = write(tmp_path, config(tmp_path, finetune={"epochs": 1, "batch_size": 100}))
    assert bench_main(path, tmp_path / "results", "--dry-run") == 0
    assert (f"warning: {path}: finetune: is set but stages has no finetune: the runs are evaluated without "
            "fine-tuning (add finetune to stages to train them)") in capsys.readouterr().err.splitlines()
    assert load_experiment(write(tmp_path, config(tmp_path))).warnings == []


def test_cuda_without_a_gpu_is_one_line_before_any_run(tmp_path, capsys, monkeypatch):
    """In-process and local runs need the GPU here; SLURM submission from a CPU login node stays allowed (its
    --dry-run too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this project's CPU machines
    cfg = config(tmp_path)
    cfg["defaults"]["device"] = "cuda"
    path, results = write(tmp_path, cfg), tmp_path / "results"
    for executor in ("inprocess", "local"):
        assert bench_main(path, results, "--executor", executor) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: {path}: defaults.device: cuda, but CUDA is not available on this machine (4 run(s) to do); "
            "allowed here: cpu or auto, or --executor slurm for GPU nodes"]
    assert not (results / "runs").exists() and not (results / "failed").exists()
    assert bench_main(path, results, "--dry-run", "--executor", "slurm") == 0
    assert capsys.readouterr().out.splitlines()[-1] == (  # the dry run says what a submission would refuse
        f"  note: --executor slurm refuses this: {path}: defaults.device: cuda, but cluster profile "
        f"{REPO / 'slurm' / 'local.yaml'} gives its jobs no GPU (gpus_per_node: 0); allowed: a profile with "
        "gpus_per_node >= 1 (e.g. slurm/example_gpu.yaml), or device auto or cpu")
    # ... but not to a cluster profile whose jobs get no GPU: every job would fail on its node (nothing submitted)
    assert bench_main(path, results, "--executor", "slurm", "--profile", "local") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {path}: defaults.device: cuda, but cluster profile {REPO / 'slurm' / 'local.yaml'} gives its jobs no "
        "GPU (gpus_per_node: 0); allowed: a profile with gpus_per_node >= 1 (e.g. slurm/example_gpu.yaml), or device "
        "auto or cpu")
    # ... nor to one that leaves gpus_per_node out: sbatch then asks for no GPU (user test 16)
    profile = tmp_path / "nogpu.yaml"
    profile.write_text(yaml.safe_dump({"partition": "debug", "timeout_min": 10}))
    assert bench_main(path, results, "--executor", "slurm", "--profile", str(profile)) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {path}: defaults.device: cuda, but cluster profile {profile} gives its jobs no GPU (no gpus_per_node); "
        "allowed: a profile with gpus_per_node >= 1 (e.g. slurm/example_gpu.yaml), or device auto or cpu")
    assert not (results / "logs").exists() and not (results / "jobs.json").exists()
    assert not (results / "experiment.json").exists()  # refused before anything is written (user test 16)


def test_an_export_onto_the_starting_weights_is_refused(tmp_path):
    """Each invocation would fine-tune its own result again (the file's hash is in the run key) and the
    original checkpoint would be gone."""
    cfg = config(tmp_path, stages=["finetune"], grid={"methods": ["baseline"]},
                 finetune={"epochs": 1, "batch_size": 100, "export": "w.pth"})
    cfg["defaults"]["weights"] = "w.pth"
    with pytest.raises(ConfigError) as raised:
        load_experiment(write(tmp_path, cfg), check_files=False)
    assert str(raised.value) == (f"{tmp_path / 'exp.yaml'}: finetune.export: {tmp_path / 'w.pth'} is also the weights "
                                 "the run starts from (w.pth): every invocation would fine-tune its own result again and "
                                 "overwrite the checkpoint; allowed: another file")
    cfg["finetune"]["export"] = "tuned.pth"
    assert load_experiment(write(tmp_path, cfg), check_files=False).runs[0].finetune["export"] == str(tmp_path / "tuned.pth")


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads lr: 1e-4 as the string '1e-4'; the loader reads it as the number users mean."""
    text = write(tmp_path, config(tmp_path, stages=["finetune"], grid={"methods": ["baseline"]})).read_text()
    path = tmp_path / "exp.yaml"
    path.write_text(text + "finetune: {epochs: 1, batch_size: 100, lr: 1e-4, min_lr: 5E-6}\n")
    (run,) = load_experiment(path, check_files=False).runs
    assert run.finetune["lr"] == 1e-4 and run.finetune["min_lr"] == 5e-6


def test_no_calibrate_still_validates_the_budget_entries(tmp_path, capsys):
    """--no-calibrate leaves the budget runs out, not the checks of their other parameters."""
    for entry, message in (({"method": "evit", "layers": [1, 99]}, "include block 99, but the model has 4 blocks"),
                           ({"method": "tome", "inflection": 5}, "parameter 'inflection' must be a number in [-1, 1]"),
                           ({"method": "tome", "rr": 1}, "unknown parameter 'rr'")):
        cfg = config(tmp_path, stages=["macs"], budgets={"macs": [0.7]}, grid={"methods": ["baseline", entry]})
        path = write(tmp_path, cfg)
        assert bench_main(path, tmp_path / "results", "--no-calibrate", "--dry-run") == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {path}: grid.methods[1]: ") and message in line, line


def test_malformed_yaml_and_missing_file(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ngrid: {methods: [baseline\n")
    assert bench_main(path, tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "broken.yaml: malformed YAML (line" in err
    # the line where the unclosed bracket opened, not only the one where the parser gave up
    path.write_text("name: x\ntokens: {images: 4\nmacs: {images: 2}\n")
    assert bench_main(path, tmp_path / "r") == 2
    assert capsys.readouterr().err.strip() == (f"error: {path}: malformed YAML (line 3, column 5: expected ',' or '}}', "
                                               "but got ':'; while parsing a flow mapping from line 2, column 9)")
    assert bench_main(tmp_path / "nope.yaml", tmp_path / "r") == 2
    assert "nope.yaml: experiment file not found" in capsys.readouterr().err
    (tmp_path / "configs").mkdir()
    assert bench_main(tmp_path / "configs", tmp_path / "r") == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'configs'}: is a folder, not an experiment file"


def test_weights_deit_format_plain_and_corrupt(tmp_path, capsys):
    from bench.pipeline.models import create_model

    vit = create_model(MODEL["name"], MODEL["kwargs"])
    # a head that ignores the image: every image class 0 with confidence 27 / (27 + 9) = 0.75, which a random
    # head (the weights not loaded) would not give
    with torch.no_grad():
        vit.head.weight.zero_()
        vit.head.bias.copy_(torch.tensor([math.log(27.0)] + [0.0] * 9))
    torch.save({"model": vit.state_dict(), "epoch": 3}, tmp_path / "deit_style.pth")
    torch.save(vit.state_dict(), tmp_path / "plain.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    for name in ("deit_style.pth", "plain.pth"):
        cfg = config(tmp_path, stages=["eval"], grid={"methods": ["baseline"]})
        cfg["defaults"]["weights"] = name
        assert bench_main(write(tmp_path, cfg), tmp_path / f"results-{name}", "--no-report") == 0
        (record,), _ = read_all(tmp_path / f"results-{name}")
        assert record["run"]["weights"] == name
        metrics = record["metrics"]["eval"]
        hits = metrics["top1"] / 100  # the share of class 0 among the images: every prediction is class 0
        assert 0 < hits < 1 and metrics["images"] == 200
        # one bin, (0.733, 0.8], holds every image: |accuracy - confidence|
        assert metrics["ece"] == pytest.approx(abs(hits - 0.75), abs=1e-6)
        # -log 0.75 for the images of class 0, -log(1 / 36) for the others
        nll = hits * -math.log(0.75) + (1 - hits) * math.log(36.0)
        assert metrics["nll"] == pytest.approx(nll, abs=1e-5) and metrics["loss"] == pytest.approx(nll, abs=1e-5)
    cfg = config(tmp_path)
    cfg["defaults"]["weights"] = "corrupt.pth"
    assert bench_main(write(tmp_path, cfg), tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert "corrupt.pth: unreadable checkpoint" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "notes.pth").write_text("hello world\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "folder.pth").mkdir()
    for name, what in (("notes.pth", "not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; "
                                     "allowed: such a file holding a state dict)"),
                       ("empty.pth", "an empty file"), ("folder.pth", "a folder, not a weights file")):
        cfg["defaults"]["weights"] = name
        assert bench_main(write(tmp_path, cfg), tmp_path / "c") == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and f"{tmp_path / name}: {what}" in line, line


def test_finetune_stage_trains_checkpoints_and_exports(tmp_path):
    cfg = config(tmp_path, stages=["finetune", "eval"], grid={"methods": [{"method": "tome", "r": 2}]},
                 finetune={"epochs": 3, "batch_size": 50, "lr": 1e-3, "warmup_epochs": 0.5, "export": "tuned.pth"})
    path = write(tmp_path, cfg)
    results = tmp_path / "results"
    assert bench_main(path, results, "--no-report") == 0
    (record,), _ = read_all(results)
    history = record["metrics"]["finetune"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    losses = [h["train_loss"] for h in history]
    assert losses[2] < losses[1] < losses[0], losses  # it learns
    exported = torch.load(tmp_path / "tuned.pth", weights_only=True)
    final = torch.load(results / "checkpoints" / record["key"] / "final.pth", weights_only=True)
    assert set(exported) == {"model"}
    assert all(torch.equal(exported["model"][k], final["model"][k]) for k in final["model"])
    assert "agreement" in record["metrics"]["eval"]
    assert os.path.exists(results / "checkpoints" / record["key"] / "last.pth")
    # the leaderboard and the CSV say the run was fine-tuned, how, and what agreement compares with
    assert report.main([str(results)]) == 0
    board = (results / "leaderboard.md").read_text().splitlines()
    assert any(line.startswith("| tome     | r=2 [fine-tuned] |") for line in board), board
    assert ("_[fine-tuned]: trained by the finetune stage (3 epochs at lr 0.001; the CSV's finetune_epochs and "
            "finetune_lr) from the weights above before it was evaluated. Agreement and Feature cos compare with the "
            "dense model of those starting weights, not fine-tuned._") in board
    row = pd.read_csv(results / "leaderboard.csv").iloc[0]
    assert (row["params"], row["finetune_epochs"], row["finetune_lr"]) == ("r=2 [fine-tuned]", 3, 0.001)


def test_all_takes_a_fine_tuned_runs_delta_against_the_fine_tuned_baseline(tmp_path):
    """report.py --all with the same methods fine-tuned (an earlier config) and off the shelf (the current one):
    each row's Δ is against the baseline trained alike, and the labels say [fine-tuned] once (not also the
    stages that differ)."""
    methods_ = ["baseline", {"method": "tome", "r": 2}]
    results = tmp_path / "results"
    tuned = config(tmp_path, stages=["finetune", "eval"], grid={"methods": methods_},
                   finetune={"epochs": 1, "batch_size": 100, "lr": 1e-3})
    assert bench_main(write(tmp_path, tuned), results, "--no-report") == 0
    assert bench_main(write(tmp_path, config(tmp_path, stages=["eval"], grid={"methods": methods_})), results) == 0
    assert report.main([str(results), "--all", "--out", str(tmp_path / "all.md")]) == 0
    df = report.load_all(results, everything=True)[0].set_index("params")
    assert sorted(df.index) == ["", "[fine-tuned] [earlier config]", "r=2", "r=2 [fine-tuned] [earlier config]"]
    for suffix in ("", " [fine-tuned] [earlier config]"):
        base = df.loc[suffix.strip(), "top1"]
        assert df.loc[f"r=2{suffix}", "delta_top1"] == pytest.approx(df.loc[f"r=2{suffix}", "top1"] - base)
    assert df.loc["", "top1"] != df.loc["[fine-tuned] [earlier config]", "top1"]  # two different baselines


def test_all_keeps_an_earlier_configs_other_split_in_a_group_of_its_own(tmp_path):
    """report.py --all after the data's split changed: the earlier runs were measured on other images, so they form
    their own group (its data label names the split) and take their delta against their own baseline."""
    methods_ = ["baseline", {"method": "tome", "r": 2}]
    results = tmp_path / "results"
    train = config(tmp_path, stages=["eval"], grid={"methods": methods_},
                   defaults={**config(tmp_path)["defaults"], "data": {"name": "fashion_mnist", "split": "train",
                                                                     "subset": 200}})
    assert bench_main(write(tmp_path, train), results, "--no-report") == 0
    assert bench_main(write(tmp_path, config(tmp_path, stages=["eval"], grid={"methods": methods_})), results) == 0
    assert report.main([str(results), "--all", "--out", str(tmp_path / "all.md"), "--csv", str(tmp_path / "all.csv")]) == 0
    df = report.load_all(results, everything=True)[0]
    assert sorted(df["data"].str.split(" \\[").str[0]) == ["fashion_mnist (subset 200)"] * 2 + \
        ["fashion_mnist, split train (subset 200)"] * 2
    bases = df.loc[df["method"] == "baseline", "top1"]
    assert bases.nunique() == 2  # other images, other top-1s: one baseline's delta would be wrong for the other split
    for data, group in df.groupby("data"):
        base = group.loc[group["method"] == "baseline", "top1"].item()
        tome = group.loc[group["method"] == "tome"].iloc[0]
        assert tome["delta_top1"] == pytest.approx(tome["top1"] - base), data
    assert pd.read_csv(tmp_path / "all.csv")["data"].str.contains("split train").sum() == 2
    assert "fashion_mnist, split train (subset 200)" in (tmp_path / "all.md").read_text()


@pytest.mark.parametrize("name", ["quickstart", "fmnist_vit", "deit_imagenet", "deit_s_ppt_finetune", "backbones"])
def test_shipped_configs_are_valid_under_dry_run(name, tmp_path, capsys):
    path = REPO / "configs" / f"{name}.yaml"
    # calibrating DeiT-T/S/B at every budget takes minutes: the quickstart's calibration is tested here
    quick = ["--no-calibrate"] if name in ("deit_imagenet", "backbones") else []
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path), "--dry-run", *quick]) == 0
    assert " to run -> " in capsys.readouterr().out


def test_paper_config_expands_models_methods_and_references():
    from bench.pipeline.config import load_experiment

    experiment = load_experiment(REPO / "configs" / "deit_imagenet.yaml", data_required=False, calibrate=False)
    assert len(experiment.runs) == 3 * 15 + 3  # the papers' settings on DeiT-T/S/B, and a DiffRate schedule each
    assert "144 MAC-budget run(s) left out" in " ".join(experiment.warnings)  # 16 methods x 3 budgets x 3 models
    by = {(r.model_label, r.method, r.params_label): r for r in experiment.runs}
    ppt = by[("deit-s", "ppt", "r=50")]
    assert ppt.params == {"r": 50, "layers": [3, 6, 9], "threshold": 7e-5, "prop_attn": True}
    assert ppt.reference["top1"] == 79.498
    assert by[("deit-b", "baseline", "")].reference["gmacs"] == 17.56
    assert by[("deit-s", "tome", "r=13")].reference["gmacs"] == 2.70
    assert by[("deit-t", "tome", "r=13")].reference is None
    assert by[("deit-s", "diffrate", "target_flops=2.9")].reference["top1"] == 79.538
    assert by[("deit-s", "mctf", "r=0.35, layers=[3, 6, 9]")].reference["gmacs"] == 2.76
    assert by[("deit-s", "baseline", "")].weights.endswith("deit_small_patch16_224-cd65a155.pth")
    assert by[("deit-s", "baseline", "")].data["transform"]["crop_pct"] == 0.875  # DeiT's own eval transform


KEYS_SCRIPT = """
import json, sys
from bench.pipeline.config import load_experiment
print(json.dumps([run.key for run in load_experiment(sys.argv[1], check_files=False).runs]))
"""


def test_run_keys_do_not_depend_on_where_the_config_lies(tmp_path):
    """The same config (relative weights file and data folder) in two folders, loaded here and in a fresh
    process started in a third folder: the keys agree although every resolved path differs."""
    import subprocess
    import sys

    from bench.pipeline.config import load_experiment

    cfg = config(tmp_path, stages=["finetune", "eval"], finetune={"epochs": 1, "batch_size": 100})
    cfg["defaults"]["weights"] = "tiny.pth"
    cfg["defaults"]["data"]["root"] = "fm"
    here, there = tmp_path / "here", tmp_path / "there" / "copy"
    for folder in (here, there):
        folder.mkdir(parents=True)
        write(folder, cfg)
    (tmp_path / "cwd").mkdir()
    runs = load_experiment(here / "exp.yaml", check_files=False).runs
    copy = load_experiment(there / "exp.yaml", check_files=False).runs
    assert all(a.weights_path != b.weights_path and a.data["root"] != b.data["root"] for a, b in zip(runs, copy, strict=True))
    process = subprocess.run([sys.executable, "-c", KEYS_SCRIPT, str(there / "exp.yaml")], cwd=tmp_path / "cwd",
                             capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(process.stdout) == [run.key for run in runs]
    assert len({run.key for run in runs}) == len(METHODS)


def test_local_executor_runs_each_run_in_a_subprocess(tmp_path, capsys):
    cfg = config(tmp_path, stages=["macs"], grid={"methods": ["baseline", {"method": "tome", "r": 4}]})
    path = write(tmp_path, cfg)
    results = tmp_path / "results"
    assert bench_main(path, results, "--executor", "local", "--no-report") == 0
    out = capsys.readouterr().out
    assert out.count("(local job ") == 2
    records, _ = read_all(results)
    assert sorted(r["run"]["method"] for r in records) == ["baseline", "tome"]
    assert all(r["env"]["hostname"] for r in records)
    job_folders = [p for p in (results / "logs" / "local").iterdir() if p.name.isdigit()]
    assert len(job_folders) == 2  # one submitit folder per run
    assert sorted(p.name for p in (results / "logs" / "local").iterdir() if not p.name.isdigit()) == ["controller.log"]


def _image_folder(root: Path, classes: int = 2, per_class: int = 3) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (300, 260 + 20 * c, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"img_{i}.JPEG", format="JPEG")


def test_imagenet_folder_layout_and_deit_eval_transform(tmp_path):
    from bench.pipeline.data import build_dataset

    _image_folder(tmp_path / "in1k")
    val = build_dataset("imagenet", "val", root=str(tmp_path / "in1k"))
    image, label = val[4]
    assert len(val) == 6 and label == 1 and image.shape == (3, 224, 224)  # resize 256, center crop 224
    # normalised with ImageNet's mean / std, not raw [0, 1]: uniform noise pixels average 0.5 per channel
    from PIL import Image

    raw = torch.from_numpy(np.asarray(Image.open(val.samples[4][0]), dtype=np.float32) / 255)
    for channel, (mean, std) in enumerate(((0.485, 0.229), (0.456, 0.224), (0.406, 0.225))):
        expected = (raw[..., channel].mean().item() - mean) / std
        assert image[channel].mean().item() == pytest.approx(expected, abs=0.05)
        assert image[channel].std().item() > 0.5  # the same image unnormalised: std ~0.16 (JPEG-smoothed noise)
    train = build_dataset("imagenet", "train", root=str(tmp_path / "in1k"), augment=True)
    assert train[0][0].shape == (3, 224, 224)
    cfg = config(tmp_path, stages=["eval", "macs"], grid={"methods": ["baseline", {"method": "tome", "r": 8}]})
    cfg["defaults"] = {"model": {"name": "deit_tiny_patch16_224", "label": "deit-t-2", "kwargs": {"depth": 2}},
                       "data": {"name": "imagenet", "root": "in1k"}, "batch_size": 4, "device": "cpu"}
    results = tmp_path / "results"
    assert bench_main(write(tmp_path, cfg), results, "--no-report") == 0
    records = {r["run"]["method"]: r for r in read_all(results)[0]}
    assert records["baseline"]["metrics"]["eval"]["images"] == 6
    assert records["tome"]["tokens_per_layer"]["out"] == [189, 181]


def test_a_reference_added_after_the_runs_reaches_their_records_and_one_matching_nothing_is_a_warning(tmp_path, capsys):
    """Published numbers are not part of the run key: adding them later updates the finished records (the
    metrics untouched, nothing recomputed), and the report shows them; an entry that matches no run warns."""
    cfg = config(tmp_path, stages=["macs"], grid={"methods": ["baseline", {"method": "tome", "r": 4}]})
    path, results = write(tmp_path, cfg), tmp_path / "results"
    assert bench_main(path, results) == 0
    before = {r["run"]["method"]: r for r in read_all(results)[0]}
    assert [before[m]["run"]["reference"] for m in ("baseline", "tome")] == [None, None]
    capsys.readouterr()
    cfg["reference"] = [{"method": "tome", "params": {"r": 4}, "top1": 70.5, "source": "the paper, table 2"},
                        {"model": "tiny-fmnsit", "method": "tome", "top1": 1.0}]
    path = write(tmp_path, cfg)
    assert bench_main(path, results) == 0
    err = capsys.readouterr().err
    assert (f"warning: {path}: reference[1]: matches no run (model tiny-fmnsit, method tome, params {{}}); a reference "
            "is matched by model label, method and a subset of the parameters") in err.splitlines()
    assert "note: the published reference of 1 finished run(s) updated from the experiment file" in err.splitlines()
    after = {r["run"]["method"]: r for r in read_all(results)[0]}
    assert after["tome"]["run"]["reference"] == {"top1": 70.5, "source": "the paper, table 2"}
    assert after["baseline"] == before["baseline"]
    assert after["tome"]["metrics"] == before["tome"]["metrics"] and after["tome"]["key"] == before["tome"]["key"]
    board = (results / "leaderboard.md").read_text()
    assert "## Published vs measured" in board and "the paper, table 2" in board


def test_records_of_runs_the_edited_config_no_longer_makes_are_left_out_of_the_tables(tmp_path, capsys):
    """Edited parameters: the old run's record stays in runs/, but the tables, CSV and ranking show the runs the
    config makes now; the old one is listed at the end, counted in one stderr line, and --all shows it."""
    cfg = config(tmp_path, stages=["macs"], grid={"methods": ["baseline", {"method": "tome", "r": 4}]})
    path, results = write(tmp_path, cfg), tmp_path / "results"
    assert bench_main(path, results) == 0
    old = {r["run"]["method"]: r["key"] for r in read_all(results)[0]}["tome"]
    cfg["grid"] = {"methods": ["baseline", {"method": "tome", "r": 6}]}
    path = write(tmp_path, cfg)
    capsys.readouterr()
    assert bench_main(path, results) == 0
    err = capsys.readouterr().err
    assert len(read_all(results)[0]) == 3  # nothing computed is lost
    assert (f"report.py: left out 1 record of runs that the current config ({path}) no longer makes (listed in "
            "the leaderboard; --all shows them)") in err.splitlines()
    board = (results / "leaderboard.md").read_text()
    tables, earlier = board.split("## Records of earlier configs")
    assert "r=6" in tables and "r=4" not in tables and old not in tables
    assert f"- {old}: tome r=4, not a run of the current config ({path})" in earlier.splitlines()
    csv = (results / "leaderboard.csv").read_text()
    assert "r=6" in csv and "r=4" not in csv
    assert report.main([str(results), "--all", "--out", str(tmp_path / "all.md"), "--csv", str(tmp_path / "all.csv")]) == 0
    every = (tmp_path / "all.md").read_text()
    rows = [[cell.strip() for cell in line.split("|")[1:3]] for line in every.splitlines() if line.startswith("| tome")]
    assert ["tome", "r=4 [earlier config]"] in rows and ["tome", "r=6"] in rows and "Records of earlier configs" not in every
    assert "r=4 [earlier config]" in (tmp_path / "all.csv").read_text()
    assert json.loads((results / "experiment.json").read_text())["runs"] == [r.key for r in load_experiment(path).runs]


def test_all_keeps_the_settings_labels_of_earlier_runs(tmp_path):
    """--all: an fp32 run left by a config now in bf16 is labelled by the setting that differs and as earlier."""
    results = tmp_path / "results"
    cfg = config(tmp_path, stages=["macs"], grid={"methods": [{"method": "tome", "r": 4}]})
    for dtype in ("fp32", "bf16"):
        cfg["defaults"]["dtype"] = dtype
        assert bench_main(write(tmp_path, cfg), results) == 0
    assert report.main([str(results), "--all", "--out", str(tmp_path / "all.md")]) == 0
    rows = [[cell.strip() for cell in line.split("|")[1:3]] for line in (tmp_path / "all.md").read_text().splitlines()
            if line.startswith("| tome")]
    assert ["tome", "r=4 [dtype=fp32] [earlier config]"] in rows and ["tome", "r=4 [dtype=bf16]"] in rows, rows


def test_non_finite_logits_are_counted_warned_and_noted(tmp_path, capsys):
    """DiffRate's sizes may go negative (its reference code's quirk, docs/methods.md#diffrate): with registers
    and these schedules one of the 200 images gets NaN logits. The run says so in one warning line, its record
    counts the images, and the leaderboard notes them under the table; the dense run counts none."""
    model = {"name": "vit_small_patch16_224", "label": "regvit",
             "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2,
                        "num_classes": 10, "no_embed_class": True, "reg_tokens": 2}}
    diffrate = {"method": "diffrate", "prune_kept_num": [65, 60, 50, 40], "merge_kept_num": [65, 55, 45, 35]}
    cfg = config(tmp_path, stages=["eval"], grid={"methods": ["baseline", diffrate]})
    cfg["defaults"] = {**cfg["defaults"], "model": model, "data": {"name": "fashion_mnist", "subset": 200}}
    results = tmp_path / "results"
    assert bench_main(write(tmp_path, cfg), results) == 0
    err = capsys.readouterr().err
    records = {r["run"]["method"]: r for r in read_all(results)[0]}
    bad = records["diffrate"]["metrics"]["eval"]["nonfinite_images"]
    assert records["baseline"]["metrics"]["eval"]["nonfinite_images"] == 0 and bad == 1
    assert (f"warning: {records['diffrate']['key']}: 1 of 200 eval images gave non-finite logits (NaN or inf): top-1 "
            "counts their arg-max as the reference code's would; ECE, NLL and feature cos are undefined (NaN)"
            in err.splitlines())
    note = next(line for line in (results / "leaderboard.md").read_text().splitlines() if "Non-finite" in line)
    assert note.startswith("_Non-finite logits (NaN or inf), images of the eval set: diffrate (") and ") 1; " in note


def test_ece_nll_and_feature_cos_are_nan_where_logits_are_not_finite(tmp_path):
    """Weights whose head gives class 0 a -inf logit on every image: the softmax stays finite (probability 0), so
    ECE read a number, NLL inf and feature cos 1.0 (finite features), beside the warning that they are undefined
    (NaN). They are NaN, as it says; top-1 and the agreement still count."""
    from bench.pipeline.models import create_model

    torch.manual_seed(0)
    state = create_model(MODEL["name"], MODEL["kwargs"]).state_dict()
    state["head.bias"][0] = -math.inf
    torch.save({"model": state}, tmp_path / "minus_inf.pth")
    cfg = config(tmp_path, stages=["eval"], grid={"methods": ["baseline", {"method": "tome", "r": 4}]})
    cfg["defaults"]["weights"] = str(tmp_path / "minus_inf.pth")
    assert bench_main(write(tmp_path, cfg), tmp_path / "results", "--no-report") == 0
    for record in read_all(tmp_path / "results")[0]:
        metrics = record["metrics"]["eval"]
        assert metrics["nonfinite_images"] == 200 and 0 < metrics["top1"] < 100 and metrics["agreement"] > 0
        assert all(math.isnan(metrics[name]) for name in ("ece", "nll", "feature_cos")), metrics


def test_all_takes_delta_against_the_current_configs_baseline(tmp_path):
    """--all with an earlier config's baseline in the same group (another seed of a random init): every Δ is
    taken against the current baseline, which shows +0.00."""
    for seeds in ((0, 1), (1, 0)):  # either record may sort first
        results = tmp_path / f"results{seeds[0]}"
        cfg = config(tmp_path, stages=["eval"], grid={"methods": ["baseline", {"method": "tome", "r": 4}]})
        for seed in seeds:
            cfg["defaults"]["seed"] = seed
            assert bench_main(write(tmp_path, cfg), results) == 0
        df = report.load_all(results, everything=True)[0]
        current = df[(df["method"] == "baseline") & ~df["_earlier"]]["top1"].item()
        tome = df[(df["method"] == "tome") & ~df["_earlier"]]["top1"].item()
        assert df[~df["_earlier"]].set_index("method")["delta_top1"].to_dict() == {
            "baseline": 0.0, "tome": pytest.approx(tome - current)}
        earlier = df[(df["method"] == "baseline") & df["_earlier"]]
        assert earlier["delta_top1"].item() == pytest.approx(earlier["top1"].item() - current) != 0


def test_another_experiment_in_the_folder_is_named_and_a_bad_experiment_file_is_one_line(tmp_path, capsys):
    """Two experiments written into one --results folder: a note when the second takes it over, and the first
    one's records name their experiment. experiment.json not of run_bench's shape: report.py says so in one
    line and shows every record; a folder in its place stops run_bench with one line."""
    results = tmp_path / "results"
    first = write(tmp_path, config(tmp_path, name="ta", stages=["macs"], grid={"methods": ["baseline"]}), "a.yaml")
    assert bench_main(first, results) == 0
    second = write(tmp_path, config(tmp_path, name="tb", stages=["macs"], grid={"methods": [{"method": "tome", "r": 4}]}),
                   "b.yaml")
    capsys.readouterr()
    assert bench_main(second, results) == 0
    err = capsys.readouterr().err.splitlines()
    assert (f"note: {results} holds the results of experiment 'ta' ({first}); those runs are now listed under "
            "'Records of earlier configs' (report.py --all shows them)") in err
    (key,) = [r["key"] for r in read_all(results)[0] if r["experiment"] == "ta"]
    assert (f"- {key}: baseline, not a run of the current config ({second}; made by experiment 'ta', {first})"
            in (results / "leaderboard.md").read_text().splitlines())
    for text, problem in (('{"runs": []}', "key 'config' missing"), ('{"config": "x", "runs": [1, [2]]}', "key 'runs' is [1, [2]]"),
                          ('{"config": "x", "runs": ', "cut off"), ("[]", "not a JSON object")):
        (results / "experiment.json").write_text(text)
        assert report.main([str(results)]) == 0
        lines = capsys.readouterr().err.splitlines()
        assert any(line.startswith(f"report.py: skipped {results / 'experiment.json'}: {problem}") and
                   line.endswith("as run_bench writes it: ignored, every record counts as current") for line in lines), lines
        assert "| baseline |" in (results / "leaderboard.md").read_text()  # every record shown
    (results / "experiment.json").unlink()
    (results / "experiment.json").mkdir()
    assert bench_main(second, results) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: cannot write {results / 'experiment.json'} (")


def test_figures_the_current_records_no_longer_give_are_removed(tmp_path, capsys):
    cfg = config(tmp_path, stages=["macs", "throughput"], grid={"methods": ["baseline", {"method": "tome", "r": 4}]})
    results = tmp_path / "results"
    assert bench_main(write(tmp_path, cfg), results) == 0
    assert (results / "throughput.png").is_file()
    cfg["stages"] = ["macs"]
    capsys.readouterr()
    assert bench_main(write(tmp_path, cfg), results) == 0
    err = capsys.readouterr().err.splitlines()
    assert not (results / "throughput.png").exists()
    assert f"report.py: removed {results / 'throughput.png'}: the records shown give no such figure now" in err


def test_outputs_of_another_config_are_removed_when_no_current_record_is_left(tmp_path, capsys, monkeypatch):
    """Every run of an edited config fails: report.py exits 2 with its error line, and the leaderboard, CSV and
    figures of the earlier config's runs are removed (not left looking current); every record stays in runs/."""
    cfg = config(tmp_path, stages=["eval", "macs", "throughput"], grid={"methods": ["baseline", {"method": "tome", "r": 4}]})
    results = tmp_path / "results"
    assert bench_main(write(tmp_path, cfg), results) == 0
    outputs = [results / name for name in ("leaderboard.md", "leaderboard.csv", "pareto.png", "throughput.png")]
    assert all(path.is_file() for path in outputs)
    cfg["defaults"]["data"]["subset"] = 100  # every run another one
    path = write(tmp_path, cfg)
    monkeypatch.setenv("TOKENBENCH_FAIL_KEYS", "*")
    capsys.readouterr()
    assert bench_main(path, results) == 1
    err = capsys.readouterr().err.splitlines()
    assert (f"report.py: error: no record of a run the current config makes (2 records of runs that the current config "
            f"({path}) no longer makes: --all shows them) in {results / 'runs'}") in err
    assert [path for path in outputs if path.exists()] == [], err
    assert f"report.py: removed {results / 'leaderboard.md'}: no record to show now (it showed runs the current " \
           "config does not make; their records stay in runs/)" in err
    assert len(read_all(results)[0]) == 2  # nothing computed is lost
    assert report.main([str(results)]) == 2 and report.main([str(results), "--all"]) == 0  # --all shows them


def test_a_closed_pipe_stops_quietly(tmp_path):
    """``run_bench.py --dry-run | head -1``: no BrokenPipeError traceback once the reader is gone, exit 1."""
    import subprocess
    import sys

    path = write(tmp_path, config(tmp_path, stages=["macs"]))
    command = (f"{sys.executable} -u run_bench.py --config {path} --results {tmp_path / 'r'} --dry-run "
               "| true")  # the reader is gone before the first line
    out = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
    assert out.returncode == 1, (out.returncode, out.stderr)


def test_slurm_options_without_the_slurm_executor_are_one_line(tmp_path, capsys):
    path = write(tmp_path, config(tmp_path, stages=["macs"]))
    assert bench_main(path, tmp_path / "r", "--wait") == 2
    assert capsys.readouterr().err.strip() == (
        "error: --wait: does nothing here (--wait: with --executor slurm, when it submits; --profile: with "
        "--executor slurm or --dry-run); this invocation: --executor inprocess")
    assert bench_main(path, tmp_path / "r", "--executor", "local", "--profile", "local", "--wait") == 2
    assert "error: --wait and --profile: does nothing here" in capsys.readouterr().err
    # a dry run or --status submits nothing to wait for (both were accepted and the flag ignored)
    for extra in (["--dry-run"], ["--status"], ["--executor", "slurm", "--dry-run"], ["--executor", "slurm", "--status"]):
        assert bench_main(path, tmp_path / "r", *extra, "--wait") == 2, extra
        assert capsys.readouterr().err.strip().endswith(f"this invocation: {' '.join(extra if 'slurm' in extra else ['--executor', 'inprocess', *extra])}"), extra
    assert bench_main(path, tmp_path / "r", "--status", "--profile", "local") == 2  # --status reads no profile
    assert "error: --profile: does nothing here" in capsys.readouterr().err
    assert bench_main(path, tmp_path / "r", "--dry-run", "--profile", "local") == 0
    assert not (tmp_path / "r" / "runs").exists()


def test_the_dense_reference_is_kept_per_device_and_attention_kernel(tmp_path):
    """A GPU run (or one with another attention kernel) compared with the dense predictions a CPU run had cached:
    its agreement and feature cos counted the devices' rounding flips. Each device type and kernel has its own."""
    from dataclasses import replace

    from bench.pipeline import dense
    from bench.pipeline.context import StageContext

    (run,) = load_experiment(write(tmp_path, config(tmp_path, stages=["eval"], grid={"methods": ["baseline"]})),
                             check_files=False).runs

    def path(run, device: str) -> Path:
        return dense.cache_path(StageContext(run, None, tmp_path, torch.device(device), progress=False))

    assert path(run, "cpu") == path(replace(run, key="another"), "cpu")  # shared by the runs of the folder
    assert len({path(run, "cpu"), path(run, "cuda"), path(replace(run, sdpa_backend="math"), "cpu")}) == 3


def test_a_random_init_seed_has_its_own_dense_reference(tmp_path):
    """weights: null with seeds 0 and 1 in one results folder: each run's agreement and feature cos compare with
    its own seed's dense model (user test 15: the cache was keyed without the seed, so seed 1's runs were compared
    with seed 0's model). tome r=0 is the dense model: feature cos 1 against the right reference."""
    results = tmp_path / "results"
    for seed in (0, 1):
        cfg = config(tmp_path, stages=["eval"], grid={"methods": [{"method": "tome", "r": 0}]})
        cfg["defaults"]["seed"] = seed
        assert bench_main(write(tmp_path, cfg), results, "--no-report") == 0
    records = read_all(results)[0]
    assert sorted(r["run"]["seed"] for r in records) == [0, 1]
    for record in records:
        assert record["metrics"]["eval"]["agreement"] == 100.0
        assert record["metrics"]["eval"]["feature_cos"] == pytest.approx(1.0, abs=1e-3), record["run"]["seed"]
    assert len(list((results / "cache").glob("dense-*.pt"))) == 2


def test_a_profile_path_in_the_experiment_file_is_relative_to_that_file(tmp_path, capsys, monkeypatch):
    """slurm.profile: mine.yaml beside the experiment file works from any folder, as weights do (user test 16: it
    was read from the current folder)."""
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"partition": "short", "timeout_min": 7}))
    path = write(tmp_path, config(tmp_path, grid={"methods": ["baseline"]}, slurm={"profile": "mine.yaml"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert bench_main(path, tmp_path / "results", "--dry-run", "--executor", "slurm") == 0
    out = capsys.readouterr().out
    assert "partition=short" in out and "time=7" in out, out


def test_runs_with_more_threads_than_their_jobs_cpus_are_noted(tmp_path, capsys):
    """threads: 2 with a profile of cpus_per_task 1: --dry-run says the threads share one CPU (user test 16: the
    quickstart on the local profile timed two threads on one core, silently); threads 1: no note."""
    profile = tmp_path / "one.yaml"
    profile.write_text(yaml.safe_dump({"partition": "debug", "cpus_per_task": 1, "timeout_min": 10}))
    for threads in (2, 1):
        cfg = config(tmp_path, grid={"methods": ["baseline"]})
        cfg["defaults"]["threads"] = threads
        assert bench_main(write(tmp_path, cfg), tmp_path / "r", "--dry-run", "--executor", "slurm", "--profile",
                          str(profile)) == 0
        notes = [line.strip() for line in capsys.readouterr().out.splitlines() if "note: runs set threads" in line]
        assert notes == ([] if threads == 1 else [
            "note: runs set threads: 2, but each evaluation job (task) gets cpus_per_task=1: their threads share 1 "
            "CPU(s) and throughput reads low; give the profile at least that many cpus_per_task, or the runs fewer "
            "threads"])


def test_a_tokens_only_run_records_its_token_counts(tmp_path):
    """stages: [tokens] alone: the record's tokens_per_layer come from the token maps' forward (user test 18: it
    was null, only eval and macs noted them). tome r=4 on 49 patches and a class token, 4 blocks."""
    cfg = config(tmp_path, stages=["tokens"], grid={"methods": [{"method": "tome", "r": 4}]}, tokens={"images": 2})
    assert bench_main(write(tmp_path, cfg), tmp_path / "results", "--no-report") == 0
    (record,), _ = read_all(tmp_path / "results")
    assert record["tokens_per_layer"]["out"] == [46, 42, 38, 34]
    assert record["tokens_per_layer"]["in"] == [50, 46, 42, 38]


def test_the_cache_folder_rule_and_the_suite_keeps_out_of_the_users_cache(monkeypatch, tmp_path):
    from bench.pipeline.files import cache_dir

    session = cache_dir()  # this session's, from conftest
    assert session.is_relative_to(tmp_path.parent) and not session.is_relative_to(Path.home() / ".cache")
    monkeypatch.delenv("TOKENBENCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "tokenbench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "tokenbench"
    monkeypatch.setenv("TOKENBENCH_CACHE_DIR", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
