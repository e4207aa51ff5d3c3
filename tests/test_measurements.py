"""Measurements researchers trust (issue 14): the statistics on known inputs, the throughput entry and its
batch-size sweep, peak memory, torch.compile against eager, token maps against source tracking, the eval
metrics (ECE, NLL, feature cosine) and the report's sections and figures."""

from __future__ import annotations

import math
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bench
import report
from bench import stats
from bench.memory import CPU_KIND, peak_memory_mb
from bench.pipeline import measurements
from bench.pipeline.config import ConfigError, load_experiment
from bench.pipeline.records import read_all
from bench.pipeline.stages import throughput as throughput_stage
from bench.pipeline.stages.tokens import draw_indices, patch_grid, token_maps
from bench.tokenmap import GREY, PRUNED, group_labels, patch_colours
from tests.helpers import images
from tests.test_pipeline import MODEL, bench_main, config, write

TINY = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 3, "num_heads": 2}


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)  # attention far from uniform: methods' choices matter
    return model


# ----------------------------------------------------------------------------------------- statistics


def test_speedup_is_the_median_of_paired_ratios_not_the_ratio_of_medians():
    method = [1.0, 2.0, 4.0, 1.0, 3.0]
    baseline = [2.0, 3.0, 4.0, 3.0, 3.0]
    ratios = stats.paired_ratios(method, baseline)
    assert list(ratios) == [2.0, 1.5, 1.0, 3.0, 1.0]
    result = stats.speedup(method, baseline)
    assert result["speedup"] == 1.5
    assert statistics.median(baseline) / statistics.median(method) == 1.5  # same here by chance ...
    skewed = stats.speedup([1.0, 1.0, 10.0], [1.0, 2.0, 10.0])  # ... not here: ratios 1, 2, 1 -> 1.0
    assert skewed["speedup"] == 1.0 and statistics.median([1.0, 2.0, 10.0]) / statistics.median([1.0, 1.0, 10.0]) == 2.0
    with pytest.raises(ValueError, match="one length"):
        stats.paired_ratios([1.0], [1.0, 2.0])


def test_bootstrap_interval_contains_the_estimate_is_seeded_and_collapses_without_spread():
    rng = np.random.default_rng(3)
    ratios = 1.4 + 0.05 * rng.standard_normal(30)
    low, high = stats.bootstrap_interval(ratios, seed=0)
    point = stats.median(ratios)
    assert low < point < high
    assert 1.3 < low and high < 1.5 and high - low < 0.1
    assert stats.bootstrap_interval(ratios, seed=0) == (low, high)  # seeded: reproducible
    # with few resamples the interval moves with the draw: equal for one seed, not across seeds
    few = [stats.bootstrap_interval(ratios, resamples=40, seed=seed) for seed in (0, 0, 1, 2, 3)]
    assert few[0] == few[1] and len(set(few[1:])) > 2
    assert stats.bootstrap_interval([1.25] * 7) == (1.25, 1.25)
    wider = stats.bootstrap_interval(1.4 + 0.2 * rng.standard_normal(30))
    assert wider[1] - wider[0] > high - low


def test_bootstrap_interval_is_the_95_percent_interval_of_resampled_medians():
    """Pins the statistic and the level: 34 ratios of 1.0 and 21 of 2.0. A resample's median is 2.0 exactly when
    at least 28 of its 55 draws are 2.0: P(Binomial(55, 21/55) >= 28) = 3.7 % (computed below), above the 2.5 %
    tail of a 95 % interval and below the 5 % of a 90 % one. So the 95 % interval of the median is exactly
    (1.0, 2.0): an interval of resampled means would have fractional bounds, a 90 % interval would be (1.0, 1.0)
    and swapped bounds would read (2.0, 1.0)."""
    n, twos = 55, 21
    tail = sum(math.comb(n, k) * (twos / n) ** k * (1 - twos / n) ** (n - k) for k in range(n // 2 + 1, n + 1))
    assert 0.030 < tail < 0.045  # 3.7 %: the seeded 2000 resamples stay on the same side of 2.5 % and 5 %
    assert stats.bootstrap_interval([1.0] * (n - twos) + [2.0] * twos) == (1.0, 2.0)


def test_latency_percentiles():
    times = [t / 1000 for t in range(1, 11)]  # 1..10 ms
    assert stats.percentile(times, 50) == pytest.approx(0.0055)
    assert stats.percentile(times, 90) == pytest.approx(0.0091)


def test_top1_is_the_exact_share_of_the_images():
    from bench.pipeline.stages.eval import percent

    hits = torch.zeros(2000, dtype=torch.bool)
    hits[:1718] = True
    assert percent(hits) == 85.9 and 100.0 * hits.float().mean().item() != 85.9  # float32 gave 85.9000027
    assert percent(torch.ones(3, dtype=torch.bool)) == 100.0 and percent(torch.zeros(0, dtype=torch.bool)) == 0.0


def test_slow_rounds_counts_forwards_over_three_times_the_median():
    assert stats.slow_rounds([0.010, 0.011, 0.009, 0.050, 0.010]) == 1  # median 0.010: 0.050 is 5x
    assert stats.slow_rounds([0.010, 0.011, 0.009, 0.030, 0.010]) == 0  # exactly 3x is not counted
    assert stats.slow_rounds([0.010, 0.012, 0.037, 0.2, 0.011]) == 2  # median 0.012: 0.037 and 0.2
    assert stats.slow_rounds([0.010] * 6) == 0


def test_forwards_slowed_from_outside_are_counted_warned_and_noted(tmp_path, monkeypatch, capsys):
    """Every 5th forward of the model sleeps 0.25 s (as if another process took the CPU; the method and the dense
    model alternate, so both are hit): the record counts every timed forward that slept (and any this shared
    machine slowed on its own), the run warns in one line, and the leaderboard notes them."""
    from bench.pipeline import runner

    original, calls = runner.load_model, []

    def sleepy(*args):
        vit = original(*args)

        def hook(module, inputs):
            calls.append(None)
            if len(calls) % 5 == 0:
                time.sleep(0.25)

        vit.patch_embed.register_forward_pre_hook(hook)
        return vit

    cfg = config(tmp_path, stages=["throughput"], grid={"methods": ["baseline", {"method": "tome", "r": 4}]},
                 throughput={"batch_sizes": [8], "warmup": 1, "runs": 6})
    monkeypatch.setattr(runner, "load_model", sleepy)
    results = tmp_path / "results"
    assert bench_main(write(tmp_path, cfg), results) == 0
    err = capsys.readouterr().err.splitlines()
    for record in read_all(results)[0]:
        (entry,) = record["metrics"]["throughput"]
        slept = sum(t >= 0.25 for t in entry["times_s"]), sum(t >= 0.25 for t in entry["baseline_times_s"])
        slow = entry["slow_rounds"], entry["baseline_slow_rounds"]
        assert sum(slept) >= 1 and slow[0] >= slept[0] and slow[1] >= slept[1]
        assert (f"warning: throughput: {record['key']}: batch 8: {sum(slow)} of 12 timed forwards took over 3x their "
                "median (slowed from outside the model: another process, a clock or power-state change?): latency p90 "
                "reads high; images/s and the speed-up are medians, moved only where many were") in err
    note = [line for line in (results / "leaderboard.md").read_text().splitlines() if "slowed from outside" in line]
    assert len(note) == 1 and note[0].startswith("_Timed forwards (method and dense) over 3x their median, slowed from "
                                                 "outside the model (another process, a clock or power-state change?): "
                                                 "baseline ")
    assert " of 12 at batch 8; tome (r=4) " in note[0] and note[0].count(" of 12 at batch 8") == 2
    csv = pd.read_csv(results / "leaderboard.csv").set_index("method")
    for record in read_all(results)[0]:
        (entry,) = record["metrics"]["throughput"]
        row = csv.loc[record["run"]["method"]]
        assert (row["slow_rounds"], row["baseline_slow_rounds"]) == (entry["slow_rounds"], entry["baseline_slow_rounds"])
        # the main batch size's latency and memory, the method's and the baseline's (user test 11: not in the CSV)
        for field in ("latency_p50_ms", "latency_p90_ms", "peak_mem_mb", "baseline_latency_p50_ms",
                      "baseline_latency_p90_ms", "baseline_peak_mem_mb"):
            assert row[field] == pytest.approx(entry[field], rel=1e-12), field
        assert row["latency_p50_ms"] > 0 and row["peak_mem_kind"] == entry["peak_mem_kind"] == "cpu_rss_growth"


def test_ece_of_a_perfectly_calibrated_toy_is_zero():
    # in each bin the accuracy equals the confidence: 7 of 10 right at 0.7, 9 of 10 at 0.9, 1 of 4 at 0.25
    confidence = [0.7] * 10 + [0.9] * 10 + [0.25] * 4
    correct = [1] * 7 + [0] * 3 + [1] * 9 + [0] + [1] + [0] * 3
    assert stats.expected_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_overconfident_toy_equals_the_hand_computed_value():
    # 10 at 0.9 with 5 right: gap 0.4; 4 at 0.6 with 3 right: gap 0.15 -> (10 * 0.4 + 4 * 0.15) / 14
    confidence = [0.9] * 10 + [0.6] * 4
    correct = [1] * 5 + [0] * 5 + [1, 1, 1, 0]
    assert stats.expected_calibration_error(confidence, correct) == pytest.approx((10 * 0.4 + 4 * 0.15) / 14)
    # different confidences within one bin (0.94, 0.96 share (14/15, 1]) average before the gap is taken
    assert stats.expected_calibration_error([0.94, 0.96], [1, 0]) == pytest.approx(abs(0.5 - 0.95))
    # in two bins the gaps do not cancel: 0.55 right (gap 0.45) and 0.45 wrong (gap 0.45)
    assert stats.expected_calibration_error([0.55, 0.45], [1, 0]) == pytest.approx(0.45)
    with warnings.catch_warnings():  # a NaN confidence (non-finite logits): undefined, without numpy's cast warning
        warnings.simplefilter("error")
        assert math.isnan(stats.expected_calibration_error([0.55, float("nan")], [1, 0]))


def test_ece_bins_are_closed_on_the_right_and_fifteen_wide():
    """Bin i holds (i/15, (i+1)/15]. 0.6 = 9/15 is the top of bin 8, so 0.6 (right) and 0.65 (wrong) fall in two bins:
    gaps 0.4 and 0.65 -> (0.4 + 0.65) / 2 = 0.525 (bins closed on the left would merge them: |1 - 1.25| / 2). 0.9
    (bin 13) and 0.95 (bin 14) are two bins too: (0.1 + 0.95) / 2 = 0.525, not |1 - 1.85| / 2 as an index one too
    high (clipped into the last bin) gives."""
    assert stats.expected_calibration_error([0.6, 0.65], [1, 0]) == pytest.approx((0.4 + 0.65) / 2)
    assert stats.expected_calibration_error([0.9, 0.95], [1, 0]) == pytest.approx((0.1 + 0.95) / 2)


def test_mean_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    assert stats.mean_cosine(a, a) == pytest.approx(1.0)
    assert stats.mean_cosine(a, 5 * a) == pytest.approx(1.0)
    b = np.array([[0.0, 1.0], [0.0, -1.0], [3.0, 3.0]])
    assert stats.mean_cosine(a, b) == pytest.approx((0.0 - 1.0 + 1.0) / 3)
    # cosines 1, 0 and 1/sqrt(2): their mean, not their median (the line above has mean = median = 0)
    c = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert stats.mean_cosine(a, c) == pytest.approx((1.0 + 0.0 + 1.0 / math.sqrt(2.0)) / 3)


# ----------------------------------------------------------------------------------- throughput entry


def test_throughput_entry_fields_come_from_its_own_timed_rounds():
    vit = tiny_vit()
    model, dense = bench.apply(vit, "tome", r=4), bench.apply(vit, "baseline")
    batch = images(8, size=28, channels=1)
    entry = throughput_stage.measure(model, dense, batch, "fp32", warmup=1, runs=5, compile_=False)
    times, base = entry["times_s"], entry["baseline_times_s"]
    assert len(times) == len(base) == 5 and entry["runs"] == 5
    assert entry["images_per_s"] == pytest.approx(8 / statistics.median(times))
    assert entry["baseline_images_per_s"] == pytest.approx(8 / statistics.median(base))
    assert entry["latency_p50_ms"] == pytest.approx(1e3 * statistics.median(times))
    assert entry["latency_p90_ms"] == pytest.approx(1e3 * float(np.percentile(times, 90)))
    assert entry["baseline_latency_p50_ms"] == pytest.approx(1e3 * statistics.median(base))
    assert entry["speedup"] == pytest.approx(statistics.median([b / t for t, b in zip(times, base, strict=True)]))
    assert entry["speedup_low"] <= entry["speedup"] <= entry["speedup_high"]
    assert entry["peak_mem_kind"] == CPU_KIND  # the values: test_the_dense_models_latency_slow_rounds_and_memory_...
    assert entry["compile"] is False and entry["compile_s"] is None


def test_the_dense_models_latency_slow_rounds_and_memory_are_its_own():
    """The ``baseline_...`` fields come from the dense model's own forwards, not the method's: a dense model that
    sleeps 0.1 s and 0.3 s in two of its five timed forwards has a p90 between them (numpy's linear percentile of its
    times) and two slow rounds (the method none), and one that writes 64 MB in the forward whose memory is measured a
    peak above 56 MB (the method's tiny forward stays below)."""
    vit = tiny_vit()
    model, inner = bench.apply(vit, "tome", r=4), bench.apply(vit, "baseline")
    calls = []

    class SlowHeavyDense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(None)
            time.sleep({3: 0.1, 5: 0.3}.get(len(calls), 0.0))  # call 1: the warm-up; 2-6: timed
            if len(calls) <= 6:
                return self.inner(x)
            block = torch.ones(64 * 2**20 // 4)  # the forward whose memory is measured: 64 MB, written
            return self.inner(x) + float(block[-1]) - 1.0

    entry = throughput_stage.measure(model, SlowHeavyDense(), images(8, size=28, channels=1), "fp32", warmup=1,
                                     runs=5, compile_=False)
    times, base = entry["times_s"], entry["baseline_times_s"]
    assert sorted(base)[3] >= 0.1 and sorted(base)[4] >= 0.3 and sorted(base)[2] < 0.05
    assert entry["baseline_latency_p90_ms"] == pytest.approx(1e3 * float(np.percentile(base, 90)))
    assert entry["baseline_latency_p90_ms"] > 1e3 * (0.1 + 0.6 * 0.2) - 1  # p90 of 5: 60 % from the 4th to the 5th
    assert entry["baseline_latency_p50_ms"] == pytest.approx(1e3 * sorted(base)[2])
    assert entry["baseline_slow_rounds"] == sum(b > 3 * statistics.median(base) for b in base) >= 2
    assert entry["slow_rounds"] == sum(t > 3 * statistics.median(times) for t in times)
    assert entry["baseline_peak_mem_mb"] > 56 and entry["peak_mem_mb"] < 56


def test_peak_memory_on_cpu_sees_what_the_call_touches():
    def allocate():
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, written
        return float(block[-1])

    touched, kind = peak_memory_mb(allocate, torch.device("cpu"))
    idle, _ = peak_memory_mb(lambda: None, torch.device("cpu"))
    assert kind == CPU_KIND
    assert 56 < touched < 200
    assert idle < 8


def test_sweep_doubles_until_out_of_memory_and_records_it():
    calls = []

    def measure(batch_size):
        calls.append(batch_size)
        if batch_size >= 512:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return {"batch_size": batch_size, "images_per_s": float(batch_size)}

    entries = throughput_stage.sweep([1, 64, 8], measure, auto=True)
    assert calls == [1, 64, 8, 128, 256, 512]
    assert [e["batch_size"] for e in entries] == [1, 64, 8, 128, 256, 512]
    assert [e.get("auto", False) for e in entries] == [False, False, False, True, True, True]
    assert entries[-1] == {"batch_size": 512, "out_of_memory": True, "auto": True}
    assert "out_of_memory" not in entries[-2]
    calls.clear()
    listed = throughput_stage.sweep([600, 2], measure, auto=False)  # a listed size may not fit either
    assert calls == [600, 2] and listed[0] == {"batch_size": 600, "out_of_memory": True} and "auto" not in listed[1]


# ------------------------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compiled_and_eager_models_give_the_same_logits():
    """torch.compile (inductor) on the tiny model for three methods, as the throughput stage compiles them: the
    logits of eager within 1e-5 (DPC-KNN: its pooling runs as ``tokenbench::add_rows``). Slow on CPU (three
    compilations: about 40 s cold, 2-3 min on a busy machine, 5 s from inductor's on-disk cache)."""
    vit = tiny_vit()
    batch = images(4, size=28, channels=1)
    tome = bench.apply(vit, "tome", r=4)
    entry = throughput_stage.measure(tome, tome, batch, "fp32", warmup=0, runs=2, compile_=True)  # compiles tome
    assert entry["compile"] is True and entry["compile_s"] > 0 and len(entry["times_s"]) == 2
    for model in (tome, bench.apply(vit, "evit", keep_rate=0.6, layers=[1]),
                  bench.apply(vit, "dpcknn", keep_rate=0.7, layers=[1])):
        eager = throughput_stage.forward(model, batch, "fp32")
        compiled = throughput_stage.forward(throughput_stage.compiled(model), batch, "fp32")  # tome: cached
        assert compiled.shape == eager.shape == (4, 10)
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # a compiled model honours the attention kernel pinned around it: dynamo guards the pin, so a forward
    # under ``explicit`` would recompile (refused here) instead of replaying the SDPA graph
    from bench.sdpa import kernels_used, sdpa_backend

    with (torch._dynamo.config.patch(error_on_recompile=True), sdpa_backend("explicit"),
          pytest.raises(torch._dynamo.exc.RecompileError, match="_written_out")):
        throughput_stage.forward(throughput_stage.compiled(tome), batch, "fp32")
    # ... and compiled under ``explicit`` its attention stays written out: inductor's pattern matcher would turn
    # the blocks without a bias (tome's first) back into SDPA (bench.sdpa.inductor), as it does under ``auto``
    with sdpa_backend("explicit"):
        assert kernels_used(throughput_stage.compiled(tome), batch) == []
    assert kernels_used(throughput_stage.compiled(tome), batch) == ["flash"]
    torch._dynamo.reset()


def test_graph_breaks_are_counted():
    vit = tiny_vit()
    batch = images(2, size=28, channels=1)
    tome = throughput_stage.graph_breaks(bench.apply(vit, "tome", r=4), batch, "fp32")
    assert tome == {"graphs": 1, "graph_breaks": 0, "break_reasons": []}  # no host sync: one graph
    ats = throughput_stage.graph_breaks(bench.apply(vit, "ats", layers=[1]), batch, "fp32")  # reads the padded width
    assert ats["graph_breaks"] >= 1 and ats["graphs"] == ats["graph_breaks"] + 1
    assert 1 <= len(ats["break_reasons"]) <= 3 and "item" in ats["break_reasons"][0]
    # K-Medoids' numpy draw of its first medoid (equal_weight) leaves the graph at each of its layers; traced into
    # it, the draw's guard failed under inference mode (an AssertionError out of every compiled forward)
    drawn = bench.apply(vit, "kmedoids", keep_rate=0.7, layers=[1, 2], equal_weight=True)
    breaks = throughput_stage.graph_breaks(drawn, batch, "fp32")
    assert breaks["graph_breaks"] >= 2 and breaks["graphs"] == breaks["graph_breaks"] + 1
    assert all("disable" in reason for reason in breaks["break_reasons"]), breaks["break_reasons"]


# ----------------------------------------------------------------------------------------- token maps


def test_a_step_that_removes_nothing_draws_no_panel():
    """One panel per reducing layer: a keep rate that keeps every token (0.999 of 49 patches) drew panels the same
    as the input; the blocks that reduce keep theirs."""
    vit = tiny_vit()
    batch = images(3, size=28, channels=1)
    for name, params in (("topk", {"keep_rate": 0.999, "layers": [0, 2]}), ("pitome", {"ratio": 0.999})):
        model = bench.apply(vit, name, track_source=True, **params)
        model(batch)
        assert model.last_forward.tokens_out == [50, 50, 50] and model.last_forward.layer_sources == {}, name
        layers, labels = token_maps(bench.apply(vit, name, **params), batch, "fp32")
        assert layers == [2] and labels.shape[1] == 1  # the final map alone, as for a method that never reduces
    halved = bench.apply(vit, "topk", keep_rate=0.5, layers=[0, 2], track_source=True)
    halved(batch)
    assert sorted(halved.last_forward.layer_sources) == [0, 2]


@pytest.mark.parametrize("name, params", [("tome", {"r": 5}), ("topk", {"keep_rate": 0.5, "layers": [0, 2]}),
                                          ("evit", {"keep_rate": 0.5, "layers": [1]})])
def test_token_groups_follow_source_tracking(name, params):
    vit = tiny_vit()
    batch = images(3, size=28, channels=1)
    model = bench.apply(vit, name, **params)
    layers, labels = token_maps(model, batch, "fp32")
    tracked = bench.apply(vit, name, track_source=True, **params)
    tracked(batch)
    info = tracked.last_forward
    assert layers == sorted(info.layer_sources) and len(layers) == labels.shape[1]
    assert torch.equal(info.layer_sources[layers[-1]][0], info.source)  # the last reducing layer's map is final
    for column, layer in enumerate(layers):
        source = info.layer_sources[layer][0][:, :, 1:]  # patches only (one class token)
        assert source.shape[1] == info.tokens_out[layer]
        for image in range(batch.shape[0]):
            flat = labels[image, column].reshape(-1)
            covered = source[image].sum(dim=0) > 0
            assert np.array_equal(flat == PRUNED, ~covered.numpy())  # grey: exactly the patches no token covers
            colours = patch_colours(labels[image, column]).reshape(-1, 4)
            assert np.all(colours[flat == PRUNED] == GREY)
            seen = set()
            for token in range(1, source.shape[1]):
                patches = torch.nonzero(source[image, token]).flatten().numpy()
                if len(patches) == 0:
                    continue
                assert set(flat[patches].tolist()) == {token}  # the group is exactly the token's sources
                assert np.count_nonzero(flat == token) == len(patches)
                colour = tuple(colours[patches[0]])
                assert all(tuple(c) == colour for c in colours[patches])
                if len(patches) > 1:  # merged: its own colour, not grey, not transparent
                    assert colour[3] > 0 and colour != GREY and colour not in seen
                    seen.add(colour)
                else:
                    assert colour[3] == 0
    if name == "topk":  # pruned: 24 of 49 patches grey after block 0
        assert (labels[:, 0] == PRUNED).sum(axis=(1, 2)).tolist() == [24] * 3
    else:  # merged (ToMe) or fused into one extra token (EViT: the last, covering the 24 dropped patches)
        assert not (labels == PRUNED).any()
    if name == "evit":
        assert [(labels[i, 0] == info.tokens_out[1] - 1).sum() for i in range(3)] == [24] * 3


def test_a_merged_group_keeps_its_colour_from_panel_to_panel():
    """ToMe r=5 at every block of a 4-block model: a group whose first patch stays its first keeps its colour in
    the next panel, even where groups with lower first patches appear before it."""
    vit = tiny_vit()
    layers, labels = token_maps(bench.apply(vit, "tome", r=5), images(3, size=28, channels=1), "fp32")
    assert len(layers) >= 3
    kept = 0
    for image in range(labels.shape[0]):
        for column in range(len(layers) - 1):
            before, after = labels[image, column].reshape(-1), labels[image, column + 1].reshape(-1)
            colours_before = patch_colours(labels[image, column]).reshape(-1, 4)
            colours_after = patch_colours(labels[image, column + 1]).reshape(-1, 4)
            for group in np.unique(before):
                members = np.flatnonzero(before == group)
                first = members[0]
                grown = np.flatnonzero(after == after[first])
                if len(members) < 2 or grown[0] != first:
                    continue
                assert tuple(colours_after[first]) == tuple(colours_before[first])
                assert all(tuple(c) == tuple(colours_before[first]) for c in colours_after[grown])
                kept += 1
    assert kept >= 10


def test_padded_tokens_cover_nothing_and_the_grid_follows_a_resize():
    source = np.zeros((1, 3, 5))  # class token + 2 outputs over a 2x2 grid
    source[0, 0, 0] = source[0, 1, [1, 2]] = source[0, 2, [3, 4]] = 1
    mask = np.array([[True, True, False]])  # the second output is padding
    labels = group_labels(source, mask, num_prefix=1, grid=(2, 2))
    assert labels.tolist() == [[[1, 1], [PRUNED, PRUNED]]]
    with pytest.raises(ValueError, match="prefix"):
        group_labels(source, None, num_prefix=1, grid=(3, 3))
    assert patch_grid(bench.apply(tiny_vit(), "resize", img_size=16)) == (4, 4)
    assert patch_grid(bench.apply(tiny_vit(), "baseline")) == (7, 7)


def test_image_draw_is_seeded_and_distinct():
    assert draw_indices(100, 4, seed=0) == draw_indices(100, 4, seed=0)
    assert draw_indices(100, 4, seed=0) != draw_indices(100, 4, seed=1)
    assert len(set(draw_indices(100, 4, seed=0))) == 4 and draw_indices(3, 4, seed=0) != []
    assert sorted(draw_indices(3, 4, seed=0)) == [0, 1, 2]


# -------------------------------------------------------------------------------------- report helpers


def test_crossover_and_speedup_format():
    assert measurements.crossover([1, 8, 32, 128], [0.8, 0.95, 1.1, 1.4]) == 32
    assert measurements.crossover([128, 1, 32, 8], [1.4, 0.8, 1.1, 0.95]) == 32  # order does not matter
    assert measurements.crossover([1, 8, 32], [1.2, 0.9, 1.3]) == 32  # beats dense *from* 32 on
    assert measurements.crossover([1, 8], [1.2, 1.1]) == 1
    assert measurements.crossover([1, 8], [1.2, 0.99]) is None
    assert measurements.crossover([1, 8, 32], [1.2, 1.0, 1.3]) == 32  # 1.00x is not beating dense
    # the interval includes 1.00x also where a bound is 1.00x itself (the † mark)
    assert measurements.includes_one(1.0, 1.2) and measurements.includes_one(0.9, 1.0)
    assert not measurements.includes_one(1.01, 1.2) and not measurements.includes_one(float("nan"), 1.2)
    assert measurements.crossover([1, 8], [1.2, float("nan")]) == 1  # unmeasured sizes do not count
    assert measurements.format_speedup(1.4234, 1.391, 1.4549) == "1.42x (1.39-1.45)"
    assert measurements.format_speedup(1.4234) == "1.42x"
    assert measurements.format_speedup(float("nan"), 1.0, 2.0) == ""


# -------------------------------------------------------------------------------------------- config


def test_config_keys_compile_tokens_and_auto(tmp_path):
    plain = load_experiment(write(tmp_path, config(tmp_path), "a.yaml")).runs[0]
    assert plain.compile is False and plain.tokens == {"images": 4} and plain.throughput["auto"] is False
    compiled = load_experiment(write(tmp_path, config(tmp_path, compile=True), "b.yaml")).runs[0]
    assert compiled.compile is True and compiled.key != plain.key
    # tokens.images changes the key only where the tokens stage runs
    fewer = load_experiment(write(tmp_path, config(tmp_path, tokens={"images": 2}), "c.yaml")).runs[0]
    assert fewer.key == plain.key
    staged = config(tmp_path, stages=["eval", "tokens"])
    with_stage = load_experiment(write(tmp_path, staged, "d.yaml")).runs[0]
    fewer_staged = load_experiment(write(tmp_path, {**staged, "tokens": {"images": 2}}, "e.yaml")).runs[0]
    assert with_stage.key != fewer_staged.key and fewer_staged.tokens == {"images": 2}
    auto = config(tmp_path, throughput={"batch_sizes": [8], "auto": True})
    with pytest.raises(ConfigError, match="throughput.auto"):
        load_experiment(write(tmp_path, auto, "f.yaml"))
    auto["defaults"] = {**auto["defaults"], "device": "cuda"}
    assert load_experiment(write(tmp_path, auto, "g.yaml")).runs[0].throughput["auto"] is True


def test_each_finetune_setting_but_the_export_path_is_in_the_key(tmp_path):
    """A run fine-tuned with another learning rate or for other epochs is another run (its record is not reused);
    where the trained weights are exported to changes nothing measured, so not the key."""
    def key(name: str, **finetune) -> str:
        cfg = config(tmp_path, stages=["finetune", "eval"], grid={"methods": ["baseline"]},
                     finetune={"epochs": 1, "lr": 1e-3, "batch_size": 50, **finetune})
        return load_experiment(write(tmp_path, cfg, name)).runs[0].key

    plain = key("a.yaml")
    assert len({plain, key("b.yaml", lr=2e-3), key("c.yaml", epochs=2)}) == 3
    assert key("d.yaml", export=str(tmp_path / "tuned.pth")) == plain


def test_a_section_of_a_stage_the_runs_skip_changes_no_key(tmp_path):
    """Editing throughput, compile, macs or eval where its stage does not run redoes no run (it redid every one,
    the eval included); where the stage runs, the edit makes new runs; a run that left them at their defaults keeps
    its key from before."""
    def key(name: str, **changes) -> str:
        return load_experiment(write(tmp_path, config(tmp_path, **changes), name)).runs[0].key

    plain = key("a.yaml", stages=["eval", "macs"], throughput={"batch_sizes": [32], "warmup": 3, "runs": 10})
    assert plain == "tiny-fmnist-baseline-70793164"  # its key before the fix: the sections at their defaults
    for index, changes in enumerate([{}, {"compile": True}, {"throughput": {"batch_sizes": [8], "runs": 5}}]):
        assert key(f"b{index}.yaml", stages=["eval", "macs"], **changes) == plain
    assert key("c.yaml", stages=["eval"], macs={"images": 8}) == key("d.yaml", stages=["eval"])
    assert key("e.yaml", stages=["macs"], eval={"agreement": False}) == key("f.yaml", stages=["macs"])
    timed = key("g.yaml")  # stages: [eval, macs, throughput]
    assert len({timed, key("h.yaml", compile=True), key("i.yaml", throughput={"batch_sizes": [8]}),
                key("j.yaml", macs={"images": 8}), key("k.yaml", eval={"agreement": False})}) == 5


def test_cuda_graphs_option_is_refused_on_cpu_and_keys_stay_without_it(tmp_path):
    plain = load_experiment(write(tmp_path, config(tmp_path), "a.yaml")).runs[0]
    off = config(tmp_path, throughput={"batch_sizes": [16], "warmup": 1, "runs": 2, "cuda_graphs": False})
    assert load_experiment(write(tmp_path, off, "b.yaml")).runs[0].key == plain.key
    from bench.pipeline.config import RunSpec, run_key
    from bench.pipeline.files import REPO

    quickstart = load_experiment(REPO / "configs" / "quickstart.yaml").runs[0]  # its key before the option
    assert run_key(RunSpec.from_dict({**quickstart.to_dict(), "sdpa_backend": "auto"})) == \
        "fmnist-vit-96x8-baseline-5e1d1e5a"  # (the quickstart ran PyTorch's SDPA kernel then)
    graphs = config(tmp_path, throughput={"batch_sizes": [16], "warmup": 1, "runs": 2, "cuda_graphs": True})
    with pytest.raises(ConfigError, match=r"c\.yaml.*throughput\.cuda_graphs.*allowed on CPU: false"):
        load_experiment(write(tmp_path, graphs, "c.yaml"))
    graphs["defaults"] = {**graphs["defaults"], "device": "cuda"}
    run = load_experiment(write(tmp_path, graphs, "d.yaml")).runs[0]
    assert run.throughput["cuda_graphs"] is True and run.key != plain.key


def test_cuda_graphs_on_a_machine_without_cuda_time_eagerly_and_say_so(tmp_path, capsys):
    """``device: auto`` resolved to the CPU: the stage says so on stderr and records eager timings (no
    ``cuda_graphs`` field: nothing was captured)."""
    cfg = config(tmp_path, stages=["throughput"],
                 throughput={"batch_sizes": [4], "warmup": 1, "runs": 2, "cuda_graphs": True})
    cfg["defaults"] = {**cfg["defaults"], "device": "auto", "model": {**MODEL, "kwargs": {**MODEL["kwargs"], "depth": 2}}}
    cfg["grid"] = {"methods": [{"method": "tome", "r": 2}]}
    assert bench_main(write(tmp_path, cfg), tmp_path / "results") == 0
    assert "cuda_graphs needs CUDA; timed eagerly" in capsys.readouterr().err
    ((record,), _) = read_all(tmp_path / "results")
    (entry,) = record["metrics"]["throughput"]
    assert entry["device"] == "cpu" and "cuda_graphs" not in entry and len(entry["times_s"]) == 2


def test_report_of_h200_records_timed_as_cuda_graph_replays(tmp_path):
    """Records written by this pipeline on an NVIDIA H200 (``throughput.cuda_graphs: true``, DeiT-S with random
    weights, bf16; tests/data/h200_cuda_graphs): the leaderboard says the times are graph replays and names
    the method that could not be captured (ATS synchronises with the host) with the reason; the CSV carries
    both fields."""
    import shutil

    results = tmp_path / "h200"
    shutil.copytree(Path(__file__).parent / "data" / "h200_cuda_graphs", results)
    assert report.main([str(results)]) == 0
    text = (results / "leaderboard.md").read_text()
    section = text.split("## Latency, memory and crossover", 1)[1]
    assert "times are CUDA-graph replays of both models (no Python dispatch); timed eagerly, not capturable: " \
           "ats: called a synchronizing CUDA operation" in section
    footer = next(line for line in text.splitlines() if line.startswith("_Throughput: "))
    conditions = footer.removeprefix("_Throughput: ").split(". Speed-up")[0].split("; ")
    assert sorted(conditions) == ["NVIDIA H200, batch size 1, bf16, 16 threads",  # ATS's row: timed eagerly
                                  "NVIDIA H200, batch size 1, bf16, 16 threads, CUDA-graph replays"]
    csv = pd.read_csv(results / "leaderboard.csv")
    ats, tome = csv[csv["method"] == "ats"].iloc[0], csv[csv["method"] == "tome"].iloc[0]
    assert not ats["throughput_cuda_graphs"]
    assert ats["throughput_cuda_graphs_error"] == "called a synchronizing CUDA operation"
    assert tome["throughput_cuda_graphs"] and pd.isna(tome["throughput_cuda_graphs_error"])
    assert tome["speedup"] == pytest.approx(0.408, abs=1e-3)  # the H200's bs-1 replay: 1.99 ms against 0.81 ms


# -------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("measurements")
    cfg = config(tmp, stages=["eval", "throughput", "tokens"], tokens={"images": 3},
                 throughput={"batch_sizes": [8, 1, 4], "warmup": 1, "runs": 3})
    cfg["defaults"]["data"]["subset"] = 60
    cfg["defaults"]["model"] = {**MODEL, "kwargs": {**MODEL["kwargs"], "depth": 3}}
    cfg["grid"] = {"methods": ["baseline", {"method": "tome", "r": 4},
                               {"method": "topk", "keep_rate": 0.5, "layers": [1]}]}
    start = time.perf_counter()
    assert bench_main(write(tmp, cfg), tmp / "results") == 0
    return tmp / "results", time.perf_counter() - start


def test_records_carry_the_sweep_and_the_eval_metrics(sweep_results):
    results, _ = sweep_results
    records, problems = read_all(results)
    assert problems == [] and len(records) == 3
    by_method = {record["run"]["method"]: record for record in records}
    for record in records:
        entries = record["metrics"]["throughput"]
        assert [entry["batch_size"] for entry in entries] == [8, 1, 4]
        for entry in entries:
            for name in ("images_per_s", "latency_p50_ms", "latency_p90_ms", "peak_mem_mb", "speedup",
                         "speedup_low", "speedup_high", "baseline_images_per_s", "baseline_latency_p50_ms",
                         "baseline_latency_p90_ms", "baseline_peak_mem_mb"):
                assert isinstance(entry[name], float) and math.isfinite(entry[name]), name
            assert entry["peak_mem_kind"] == CPU_KIND
        # the values of ECE and NLL: test_pipeline.py::test_weights_deit_format_plain_and_corrupt
        assert {"ece", "nll", "loss"} <= set(record["metrics"]["eval"])
        tokens = record["metrics"]["tokens"]
        assert tokens["images"] == 3 and (results / tokens["png"]).is_file() and (results / tokens["maps"]).is_file()
    assert by_method["baseline"]["metrics"]["eval"]["feature_cos"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < by_method["topk"]["metrics"]["eval"]["feature_cos"] < 0.9999
    assert by_method["tome"]["metrics"]["tokens"]["layers"] == [0, 1, 2]
    assert by_method["topk"]["metrics"]["tokens"]["layers"] == [1]
    assert by_method["baseline"]["metrics"]["tokens"]["patch_tokens"] == [[49]] * 3
    assert by_method["topk"]["metrics"]["tokens"]["patch_tokens"] == [[25]] * 3  # ceil(0.5 * 49)
    indices = {tuple(record["metrics"]["tokens"]["indices"]) for record in records}
    assert len(indices) == 1  # every run drew the same images


def test_report_links_figures_and_carries_the_new_columns(sweep_results, tmp_path):
    results, _ = sweep_results
    out = tmp_path / "md" / "board.md"
    assert report.main([str(results), "--out", str(out), "--csv", str(tmp_path / "lb.csv"),
                        "--plot", str(tmp_path / "p.png")]) == 0
    markdown = out.read_text()
    for figure in ("throughput.png", "tokens.png"):  # written beside the markdown that links them
        png = (out.parent / figure).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
        assert f"[{'Token maps' if figure == 'tokens.png' else 'Throughput'}" in markdown
        assert f"]({figure})" in markdown and "![" in markdown
    csv = pd.read_csv(tmp_path / "lb.csv")
    for name in ("speedup_low", "speedup_high", "ece", "nll", "feature_cos"):
        assert csv[name].notna().all(), name
    records = {r["run"]["method"]: r for r in read_all(results)[0]}
    first = records["tome"]["metrics"]["throughput"][0]  # batch 8: the main table's entry
    row = csv[csv["method"] == "tome"].iloc[0]
    assert row["speedup_low"] == pytest.approx(first["speedup_low"])
    assert row["ece"] == pytest.approx(records["tome"]["metrics"]["eval"]["ece"])
    cell = measurements.format_speedup(first["speedup"], first["speedup_low"], first["speedup_high"])
    assert f"| {cell} " in markdown
    section = markdown[markdown.index("## Latency, memory and crossover"):]
    assert "p50 ms (bs 1)" in section and "p50 ms (bs 8)" in section and "bs 4)" not in section.split("\n\n")[2]
    tome = [line for line in section.splitlines() if line.startswith("| tome")][0]
    cells = [cell.strip() for cell in tome.split("|")[1:-1]]
    entries = {entry["batch_size"]: entry for entry in records["tome"]["metrics"]["throughput"]}
    for first_cell, batch in ((3, 1), (9, 8)):  # per batch size: p50, p90, peak MB, and the dense model's three
        fields = ("latency_p50_ms", "latency_p90_ms", "peak_mem_mb")
        expected = [entries[batch][who + field] for who in ("", "baseline_") for field in fields]
        assert cells[first_cell:first_cell + 6] == [f"{value:.{1 if 'mem' in field else 2}f}" for value, field
                                                    in zip(expected, fields * 2, strict=True)]
    found = measurements.crossover(list(entries), [entry["speedup"] for entry in entries.values()])
    unsure = found and measurements.includes_one(entries[found]["speedup_low"], entries[found]["speedup_high"])
    assert cells[2] == (f"bs {found}" + " †" * bool(unsure) if found else "not up to bs 8")


def test_long_throughput_frame_has_the_entry_fields(sweep_results):
    results, _ = sweep_results
    _, tp, _, _, _ = report.load_all(results)
    assert len(tp) == 9
    assert set(measurements.ENTRY_COLUMNS) <= set(tp.columns)
    assert tp["latency_p50_ms"].notna().all() and (tp["peak_mem_kind"] == CPU_KIND).all()
    assert not tp["out_of_memory"].any()


def test_token_grid_composition_uses_each_runs_final_map(sweep_results, tmp_path):
    results, _ = sweep_results
    df, tp, _, _, _ = report.load_all(results)
    calls = []
    import bench.tokenmap as tokenmap

    original = tokenmap.compose

    def spy(path, images_, columns, title):
        calls.append((Path(path).name, images_.shape, [(name, labels.copy()) for name, labels in columns]))
        original(path, images_, columns, title)

    tokenmap.compose = spy
    try:
        written = measurements.token_grids(df, results, report.GROUP, report.sort_group, report._group_title)
    finally:
        tokenmap.compose = original
    assert [path.name for _, path in written] == ["tokens.png"]
    ((name, shape, columns),) = calls
    assert shape[0] == 3 and [column[0].split("\n")[0] for column in columns] == ["baseline", "tome", "topk"]
    keys = {r["run"]["method"]: r["key"] for r in read_all(results)[0]}
    for method, labels in ((column[0].split("\n")[0], column[1]) for column in columns):
        maps = np.load(results / "tokens" / f"{keys[method]}.npz")
        assert np.array_equal(labels, maps["labels"][:, -1])


def test_token_grids_of_labels_alike_but_for_punctuation_get_a_file_each(tmp_path):
    """fm_vit and fm-vit make one file-name slug: each group's grid must have its own file and link, not the second
    written over the first (both links then showed the second group's maps)."""
    cfg = config(tmp_path, stages=["eval", "tokens"], tokens={"images": 2})
    cfg["defaults"]["data"]["subset"] = 20
    cfg["grid"] = {"models": [{"label": "fm_vit"}, {"label": "fm-vit"}],
                   "methods": ["baseline", {"method": "topk", "keep_rate": 0.5, "layers": [1]}]}
    assert bench_main(write(tmp_path, cfg), tmp_path / "results", "--no-report") == 0
    df, _, _, _, _ = report.load_all(tmp_path / "results")
    written = measurements.token_grids(df, tmp_path / "results", report.GROUP, report.sort_group, report._group_title)
    assert sorted(caption.split(" on ")[0] for caption, _ in written) == ["Token maps: fm-vit", "Token maps: fm_vit"]
    assert len({path for _, path in written}) == 2 and all(path.is_file() for _, path in written)


def test_panel_pixels_blend_the_group_colours_over_the_image():
    """Each patch's pixels: the image where the patch is a single token, 0.6 of its group's colour over 0.4 of the
    image where it is merged, flat grey where pruned; a grid of another size (``resize``: 5 x 5 over 28 x 28 pixels)
    covers the image by the pixels' centres."""
    from bench.tokenmap import MERGED_ALPHA, group_colour, panel_pixels

    image = np.full((28, 28), 100, dtype=np.uint8)
    labels = np.arange(49, dtype=np.int32).reshape(7, 7)
    labels[0, 1] = 0  # patches (0, 0) and (0, 1): one merged token, its first patch 0
    labels[1, 1] = PRUNED
    pixels = panel_pixels(image, labels, (56, 56))  # enlarged twice
    assert pixels.shape == (56, 56, 3)
    grey, merged = 100 / 255, np.array(group_colour(0)[:3]) * MERGED_ALPHA + (1 - MERGED_ALPHA) * 100 / 255
    np.testing.assert_allclose(pixels[0:8, 0:16], np.broadcast_to(merged, (8, 16, 3)))  # patch 4 px * scale 2
    np.testing.assert_allclose(pixels[8:16, 8:16], np.broadcast_to(GREY[:3], (8, 8, 3)))
    np.testing.assert_allclose(pixels[8:16, 0:8], grey)  # a single patch: the image shows through
    np.testing.assert_allclose(pixels[16:, :], grey)
    coarse = np.zeros((5, 5), dtype=np.int32)  # every patch one group: its colour everywhere
    coarse[4, 4] = PRUNED
    pixels = panel_pixels(image, coarse, (28, 28))
    np.testing.assert_allclose(pixels[27, 27], GREY[:3])  # centre 27.5 * 5 / 28 = 4.9: the last patch
    np.testing.assert_allclose(pixels[22, 22], GREY[:3])  # centre 22.5 * 5 / 28 = 4.02: the last patch too
    np.testing.assert_allclose(pixels[21, 21], merged)  # centre 21.5 * 5 / 28 = 3.84: patch 3, merged
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    np.testing.assert_allclose(panel_pixels(rgb, None, (28, 28))[5, 5], [1.0, 0.0, 0.0])
    rgb[::2, ::2] = 0  # sampled down to 14 x 14 at the pixels' centres: every other pixel, the odd ones
    np.testing.assert_allclose(panel_pixels(rgb, None, (14, 14)), np.broadcast_to([1.0, 0.0, 0.0], (14, 14, 3)))


def test_group_borders_surround_merged_and_pruned_patches_only():
    from bench.tokenmap import group_borders

    labels = np.array([[0, 0, 2], [3, 4, PRUNED]], dtype=np.int32)
    segments = group_borders(labels, height=2.0, width=3.0)
    assert sorted(map(tuple, map(tuple, segments))) == sorted([
        ((2.0, 0.0), (2.0, 1.0)),  # merged 0 | single 2
        ((0.0, 1.0), (1.0, 1.0)), ((1.0, 1.0), (2.0, 1.0)),  # merged 0 over singles 3 and 4
        ((2.0, 1.0), (2.0, 2.0)),  # single 4 | pruned
        ((2.0, 1.0), (3.0, 1.0)),  # single 2 over pruned
    ])  # none between the singles 3 and 4


def test_a_token_map_png_shows_the_input_and_each_panel(tmp_path):
    """The written grid: an input panel (black image) and a panel of pruned patches (flat grey), each 28 pixels
    enlarged 4 times (about 1.1 inch at 110 dpi) and drawn one to one, as whole areas of the PNG."""
    import matplotlib.image

    from bench import tokenmap

    image = np.zeros((1, 28, 28), dtype=np.uint8)
    pruned = np.full((1, 7, 7), PRUNED, dtype=np.int32)
    tokenmap.compose(tmp_path / "grid.png", image, [("pruned", pruned)], "Token maps: a test")
    pixels = matplotlib.image.imread(tmp_path / "grid.png")[..., :3]
    panel = 112 ** 2
    is_grey = np.all(np.abs(pixels - 0.7) < 0.01, axis=-1).sum()
    is_black = np.all(pixels < 0.01, axis=-1).sum()
    assert 0.9 * panel < is_grey <= panel and 0.9 * panel < is_black <= 1.1 * panel, (is_grey, is_black, panel)  # frames, text
    maps = {"images": np.zeros((2, 28, 28), dtype=np.uint8), "labels": np.full((2, 3, 7, 7), PRUNED, dtype=np.int32),
            "layers": np.array([1, 3, 5])}
    tokenmap.save_run_png(tmp_path / "run.png", maps, "a run", depth=8)
    pixels = matplotlib.image.imread(tmp_path / "run.png")[..., :3]
    is_grey = np.all(np.abs(pixels - 0.7) < 0.01, axis=-1).sum()
    assert 0.9 * 6 * panel < is_grey <= 6 * panel, (is_grey, panel)


def test_an_unreadable_token_map_leaves_its_column_out_of_the_grid(sweep_results, tmp_path):
    """A tokens/<key>.npz cut short (a copy interrupted), empty, damaged inside or a plain .npy: that run's column is
    left out, as for a missing file; numpy's EOFError, zipfile's BadZipFile and zlib's error used to stop
    report.py with a traceback."""
    import io
    import shutil

    from bench.tokenmap import load_maps

    results, _ = sweep_results
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    keys = {r["run"]["method"]: r["key"] for r in read_all(copy)[0]}
    good = (copy / "tokens" / f"{keys['tome']}.npz").read_bytes()
    damaged = bytearray(good)
    damaged[200:202] = bytes(b ^ 0xFF for b in damaged[200:202])
    array = io.BytesIO()
    np.save(array, np.arange(3))
    for broken in (good[:300], b"", bytes(damaged), array.getvalue()):
        path = copy / "tokens" / f"{keys['tome']}.npz"
        path.write_bytes(broken)
        with pytest.raises(ValueError, match="token maps"):
            load_maps(path)
        df, _, _, _, _ = report.load_all(copy)
        ((caption, png),) = measurements.token_grids(df, copy, report.GROUP, report.sort_group, report._group_title,
                                                      out_dir=tmp_path)
        assert png.is_file() and caption.startswith("Token maps: ")
    assert report.main([str(copy), "--out", str(tmp_path / "md" / "board.md")]) == 0


def test_token_grids_of_one_model_on_other_data_say_which_is_which(sweep_results, tmp_path):
    """--all keeps an earlier config's other images (another subset or crop) in a group of its own: each grid's
    caption and title must say which data it shows, not "Token maps: <model> (random init)" twice."""
    import shutil

    from bench.pipeline.records import record_path, write_record

    results, _ = sweep_results
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    for record in read_all(results)[0]:  # the same runs with another crop: a second group of the same model
        record["key"] = record["run"]["key"] = record["key"] + "-crop"
        record["run"]["data"]["transform"]["crop_pct"] = 0.875
        write_record(record_path(copy, record["key"]), record)
        shutil.copy(results / "tokens" / f"{record['key'][:-5]}.npz", copy / "tokens" / f"{record['key']}.npz")
    df, _, _, _, _ = report.load_all(copy, everything=True)
    assert df.groupby(report.GROUP).ngroups == 2 and df["data"].str.split(" \\[").str[0].nunique() == 1
    titles = []
    import bench.tokenmap as tokenmap

    original = tokenmap.compose
    tokenmap.compose = lambda path, images_, columns, title: titles.append(title) or original(path, images_, columns,
                                                                                            title)
    try:
        written = measurements.token_grids(df, copy, report.GROUP, report.sort_group, report._group_title)
    finally:
        tokenmap.compose = original
    captions = sorted(caption for caption, _ in written)
    assert len(set(captions)) == 2 and len(set(titles)) == 2
    assert "crop_pct 0.875" in captions[0] and "crop_pct 1.0" in captions[1]
    assert all(title.startswith(caption) for caption, title in zip(captions, sorted(titles), strict=True))


def test_a_long_title_is_wrapped_inside_the_figure(tmp_path, monkeypatch):
    """DiffRate's schedules in one run's title over four panels: the title ran past both edges of the PNG (the
    model and the method's name cut off); wrapped, every line lies inside the figure."""
    import bench.tokenmap as tokenmap

    kept = []
    monkeypatch.setattr(tokenmap, "_save_figure", lambda fig, path: kept.append(fig))
    labels = np.zeros((2, 3, 7, 7), dtype=np.int32)
    maps = {"images": np.zeros((2, 28, 28), dtype=np.uint8), "labels": labels, "layers": np.array([0, 1, 2])}
    title = "tiny: diffrate (prune_kept_num=[49, 40, 30, 30], merge_kept_num=[49, 35, 25, 25], target_flops=None)"
    tokenmap.save_run_png(tmp_path / "run.png", maps, title, depth=4)
    tokenmap.compose(tmp_path / "grid.png", maps["images"], [("a", labels[:, -1])], "Token maps: " + title)
    for fig in kept:
        renderer = fig.canvas.get_renderer()
        box, width = fig._suptitle.get_window_extent(renderer), fig.bbox.width
        assert 0 <= box.x0 and box.x1 <= width, (box, width)
        assert "diffrate" in fig._suptitle.get_text() and fig._suptitle.get_text().count("\n") >= 1


def test_compile_and_out_of_memory_are_noted(sweep_results, tmp_path):
    from bench.pipeline.records import record_path, write_record

    results, _ = sweep_results
    for number, record in enumerate(read_all(results)[0]):
        method = record["run"]["method"]
        for entry in record["metrics"]["throughput"]:
            entry.update(compile=True, graph_breaks=2 if method == "tome" else 0, compile_s=10.0 + number)
        if method == "tome":
            record["metrics"]["throughput"].append({"batch_size": 16, "auto": True, "out_of_memory": True})
        write_record(record_path(tmp_path, record["key"]), record)
    df, tp, _, _, _ = report.load_all(tmp_path)
    assert len(tp) == 10 and tp["out_of_memory"].sum() == 1
    lines = measurements.speed_section(df, tp, report.GROUP, report.sort_group, report._group_title)
    note = lines[-2]
    assert "graph breaks: baseline 0, tome (r=4) 2, topk (keep_rate=0.5, layers=[1]) 0" in note
    assert "out of memory at batch size 16" in note
    assert "p50 ms (bs 8)" in "\n".join(lines)  # the largest *measured* size, not the one that ran out
    assert measurements.plot_throughput(df, tp, tmp_path / "t.png", report.GROUP, report.sort_group)
    assert ", torch.compile" in report._conditions(df)  # the main table's footnote says the runs were compiled
    assert "torch.compile" not in report._conditions(report.load_all(results)[0])
    report.write_csv(df, tmp_path / "leaderboard.csv")  # the main batch size's compile time and graph breaks
    csv = pd.read_csv(tmp_path / "leaderboard.csv").set_index("method")
    for record in read_all(tmp_path)[0]:
        first = record["metrics"]["throughput"][0]
        row = csv.loc[record["run"]["method"]]
        assert (row["compile_s"], row["graph_breaks"]) == (first["compile_s"], first["graph_breaks"])
    assert csv.loc["tome", "graph_breaks"] == 2


def test_figure_labels_add_the_weights_only_where_groups_would_read_alike():
    """Before and after fine-tuning: one model label and data, two weights files; the figures' legend and titles
    must tell them apart, as the markdown's headers do."""
    before = ("vit", "fashion_mnist (subset 300) [1x28x28 bicubic, ...]", "fmnist_vit.pth")
    after = ("vit", "fashion_mnist (subset 300) [1x28x28 bicubic, ...]", "ft_tome.pth")
    other = ("deit-s", "imagenet [3x224x224 bicubic, ...]", "random init")
    assert measurements.figure_labels([before, after, other]) == {
        before: "vit on fashion_mnist (subset 300) (fmnist_vit.pth)",
        after: "vit on fashion_mnist (subset 300) (ft_tome.pth)",
        other: "deit-s on imagenet",
    }
    assert measurements.figure_labels([before, other])[before] == "vit on fashion_mnist (subset 300)"
    # the same images through another crop (--all: an earlier config's), same weights: the whole data label
    cropped = ("vit", "fashion_mnist (subset 300) [1x28x28 bicubic, crop_pct 0.875 ...]", "fmnist_vit.pth")
    labels = measurements.figure_labels([before, cropped, other])
    assert labels[cropped] == "vit on fashion_mnist (subset 300) [1x28x28 bicubic, crop_pct 0.875 ...] (fmnist_vit.pth)"
    assert labels[before] == "vit on fashion_mnist (subset 300) [1x28x28 bicubic, ...] (fmnist_vit.pth)"
    assert labels[other] == "deit-s on imagenet"


def test_forward_with_features_is_forward_and_pre_logits_of_one_pass():
    vit = tiny_vit()
    batch = images(3, size=28, channels=1)
    for model in (bench.apply(vit, "tome", r=5), bench.apply(tiny_vit(), "topk", keep_rate=0.5, layers=[1])):
        logits, features = model.forward_with_features(batch)
        torch.testing.assert_close(logits, model(batch), atol=0, rtol=0)
        torch.testing.assert_close(features, model(batch, pre_logits=True), atol=0, rtol=0)
        assert features.shape == (3, 32) and not torch.equal(features[:, :10], logits)
