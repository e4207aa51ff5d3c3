"""The fast CPU paths of issue 14 point 6 give the values of the operations they replace.

``take`` / ``add_at`` (row copies and row sums by ``index_select`` / ``index_add`` over the flattened batch)
against ``gather`` / ``scatter_add`` with expanded indices;
PiToMe's ELU against the exact ELU; ``ScheduleOnly`` (the speed-up ceiling of ``benchmark_methods.py``)
against the token counts it replays and against the dense model."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
from bench.pipeline.files import REPO
from bench.throughput import ScheduleOnly
from methods.base import FEW_ROWS, add_at, take
from methods.pitome import elu
from tests.helpers import images, small_vit


def _batch(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _index(seed: int, batch: int, count: int, high: int) -> torch.Tensor:
    return torch.randint(0, high, (batch, count), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(4, 9, 5), (3, 7, 1), (2, 6, 6, 3)])
def test_take_equals_gather_per_image(shape):
    t = _batch(0, *shape)
    index = _index(1, shape[0], 5, shape[1])
    expected = t.gather(1, index.view(*index.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *shape[2:]))
    assert torch.equal(take(t, index), expected)
    # image 1 takes its own rows, not image 0's (the per-image offset)
    assert torch.equal(take(t, index)[1, 0], t[1, index[1, 0]])


def test_take_of_a_non_contiguous_tensor():
    t = _batch(2, 4, 10, 6)[:, 1:]  # prefix tokens cut off: a strided view
    index = _index(3, 4, 4, 9)
    assert torch.equal(take(t, index), t.gather(1, index[..., None].expand(-1, -1, 6)))


def test_add_at_equals_scatter_add_with_repeated_targets():
    t, src = _batch(4, 3, 8, 5), _batch(5, 3, 12, 5) * 1e3  # magnitudes apart: the order of the sum shows
    index = _index(6, 3, 12, 3)  # 12 rows into 3 targets: many repeats
    expected = t.scatter_add(1, index[..., None].expand(-1, -1, 5), src)
    assert torch.equal(add_at(t, index, src), expected)
    assert not torch.equal(add_at(t, index, src), t)
    fresh = t.clone()
    assert add_at(fresh, index, src, inplace=True) is fresh
    assert torch.equal(fresh, expected)


def test_add_at_in_place_writes_into_the_tensor_or_refuses():
    index, src = _index(8, 3, 2, 4), _batch(9, 3, 2, 5)
    base = _batch(7, 3, 8, 5)
    strided = base[:, ::2]  # rows of one image merge into one dimension: a view aliases them
    expected = strided.scatter_add(1, index[..., None].expand(-1, -1, 5), src)
    add_at(strided, index, src, inplace=True)
    assert torch.equal(base[:, ::2], expected)  # written through to the storage, not into a copy
    transposed = _batch(10, 3, 5, 4).transpose(1, 2)  # (3, 4, 5) that no view can flatten
    with pytest.raises(RuntimeError):
        add_at(transposed, index, src, inplace=True)


def test_take_and_add_at_backpropagate_like_gather_and_scatter_add():
    t, src = _batch(10, 3, 8, 5).requires_grad_(), _batch(11, 3, 6, 5).requires_grad_()
    index, rows = _index(12, 3, 6, 8), _index(13, 3, 4, 8)
    weight = _batch(14, 3, 4, 5)

    def loss(fast: bool) -> torch.Tensor:
        if fast:
            out = take(add_at(t, index, src), rows)
        else:
            out = t.scatter_add(1, index[..., None].expand(-1, -1, 5), src).gather(1, rows[..., None].expand(-1, -1, 5))
        return (out * weight).sum()

    fast = torch.autograd.grad(loss(True), (t, src))
    slow = torch.autograd.grad(loss(False), (t, src))
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


def _captured_graph(fn, *args) -> tuple[torch.Tensor, list[str]]:
    """``fn(*args)`` under ``torch.compile`` with a backend that keeps dynamo's graph: its result and the
    operators the graph calls."""
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return out, [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op in ("call_function", "call_method")]


def test_a_pooling_compiled_for_the_cpu_keeps_atens_index_add():
    """Under torch.compile on the CPU, ``add_at`` of a pooling (as many rows added as the result has: MCTF,
    DPC-KNN) calls the opaque ``tokenbench::add_rows`` (ATen's index_add), not an index_add inductor would
    decompose into per-element atomic adds; a few merged rows (ToMe) are selections inductor fuses (next test).
    Same values."""
    t, src = _batch(20, 4, 6, 8), _batch(21, 4, 9, 8) * 1e3
    pool_index, merge_index = _index(22, 4, 9, 6), _index(23, 4, 2, 6)
    expected = t.scatter_add(1, pool_index[..., None].expand(-1, -1, 8), src)
    pooled, ops = _captured_graph(lambda a, i, b: add_at(a.clone(), i, b, inplace=True), t, pool_index, src)
    assert "tokenbench.add_rows.default" in ops and not any("index_add" in op for op in ops)
    assert torch.equal(pooled, expected)
    merged, ops = _captured_graph(lambda a, i, b: add_at(a, i, b), t, merge_index, src[:, :2])
    assert "tokenbench.add_rows.default" not in ops and not any("index_add" in op for op in ops)
    assert torch.equal(merged, t.scatter_add(1, merge_index[..., None].expand(-1, -1, 8), src[:, :2]))
    # inductor itself: the operator runs as ATen's kernel, the sums in eager's order (bit for bit)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, i, b: add_at(a, i, b) * 2.0, fullgraph=True)
    assert torch.equal(compiled(t, pool_index, src), expected * 2.0)
    torch._dynamo.reset()


@pytest.mark.parametrize("rows", [1, 5, FEW_ROWS, pytest.param(FEW_ROWS + 1, marks=pytest.mark.xfail(
    torch.__version__ < "2.14", strict=False, reason="inductor's index_add sums in another order than eager's at torch "
    "2.5.1 (measured; versions between 2.5.1 and 2.14.1 not checked)"))])
def test_a_few_rows_added_compiled_for_the_cpu_are_index_adds_sums_in_order(rows):
    """Compiled for the CPU (inductor), ``add_at`` of up to ``FEW_ROWS`` rows is a chain of selections, not an
    ``index_add`` (inductor's atomic adds, which end the loop nest); beyond it, the ``index_add``. Either way every
    row gets eager ``index_add``'s sums bit for bit: several rows into one target, added in k order (values whose
    sum depends on the order: 1e8, 1, -1e8), and a NaN or an infinity of ``src`` only in its own target's row."""
    batch, count, width = 3, rows + 4, 8
    t, src = _batch(50, batch, count, width), _batch(51, batch, rows, width)
    index = _index(52, batch, rows, count)
    index[0, : min(rows, 3)] = 2  # the first three rows of image 0 into one target, in this order
    src[0, : min(rows, 3)] = torch.tensor([1e8, 1.0, -1e8][: min(rows, 3)])[:, None]
    src[1, 0, 3], src[2, 0, 5] = float("nan"), float("inf")
    expected = t.reshape(-1, width).index_add(0, (index + torch.arange(batch)[:, None] * count).flatten(),
                                              src.reshape(-1, width)).view(batch, count, width)
    _, ops = _captured_graph(lambda a, i, b: add_at(a, i, b), t, index, src)
    assert any("index_add" in op for op in ops) == (rows > FEW_ROWS), ops
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, i, b: add_at(a, i, b) * 2.0, fullgraph=True)
    assert torch.equal(compiled(t, index, src).nan_to_num(), (expected * 2.0).nan_to_num())
    assert compiled(t, index, src).isnan().sum() == expected.isnan().sum() == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("kept", [1, 7, 24, 25])
def test_surviving_tokens_compiled_for_the_cpu_are_sorted_without_a_sort(kept):
    """Compiled for the CPU, the surviving tokens of a matching are put back in their original order by counting
    (``methods.ops.survivors``), not by ATen's sort: the values of ``order[:, r:].sort(dim=1).values`` exactly, for
    every row (the smallest and largest kept, the removed ones at either end, and a row that keeps them all)."""
    from methods.ops import survivors

    generator = torch.Generator().manual_seed(60 + kept)
    order = torch.stack([torch.randperm(25, generator=generator) for _ in range(9)])
    r = 25 - kept
    order[0] = torch.cat([torch.arange(r), torch.arange(r, 25).flip(0)])  # the largest kept, in reverse
    order[1] = torch.cat([torch.arange(kept, 25), torch.arange(kept)])  # the smallest kept, in order
    order[2] = torch.cat([torch.arange(kept, 25).flip(0), torch.arange(kept).flip(0)])  # both in reverse
    expected = torch.stack([row[r:].sort().values for row in order])
    assert torch.equal(survivors(order, r), expected)  # eager: the sort itself
    compiled, ops = _captured_graph(lambda o: survivors(o, r), order)
    assert torch.equal(compiled, expected) and not any("sort" in op for op in ops), ops
    torch._dynamo.reset()
    inductor = torch.compile(lambda o: survivors(o, r) * 2, fullgraph=True)
    assert torch.equal(inductor(order), expected * 2)
    torch._dynamo.reset()


def test_compiled_proportional_attention_on_the_cpu_is_one_baddbmm_with_the_same_probabilities():
    """Compiled for the CPU, a written-out attention with a key bias (ToMe's ``log(size)``, padding's -inf) takes
    its logits from one ``baddbmm`` (scale and bias in the product's epilogue); the probabilities are eager's up to
    float rounding, for every query and key (including a padded key: exactly 0), and a block without a bias keeps
    the written-out product. Eager runs the reference arithmetic, which this checks against."""
    from bench.attention import key_bias, probabilities

    q, k = _batch(30, 3, 2, 7, 4), _batch(31, 3, 2, 7, 4)
    size = torch.randint(1, 5, (3, 7, 1), generator=torch.Generator().manual_seed(32)).float()
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 6] = False
    bias = key_bias(size, mask)
    eager = probabilities(q, k, bias, 0.5)
    compiled, ops = _captured_graph(lambda a, b, c: probabilities(a, b, c, 0.5), q, k, bias)
    assert any("baddbmm" in op for op in ops)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    assert torch.equal(compiled[1, :, :, 6], torch.zeros(2, 7))
    reference = ((q @ k.transpose(-2, -1)) * 0.5 + size.log()[:, None, None, :, 0]).masked_fill(
        ~mask[:, None, None, :], float("-inf")).softmax(dim=-1)  # the official arithmetic, written here
    torch.testing.assert_close(compiled, reference, rtol=0, atol=1e-6)
    _, plain = _captured_graph(lambda a, b: probabilities(a, b, None, 0.5), q, k)
    assert not any("baddbmm" in op for op in plain)


def test_dpcknn_nearest_distances_compiled_for_the_cpu_are_topks_values_without_topk():
    """Compiled for the CPU, DPC-KNN's k smallest distances per row come from passes inductor fuses, not ATen's
    ``topk``; the values are topk's bit for bit, ascending, a repeated distance counted as often as it occurs."""
    from methods.dpcknn import smallest_values

    dist = torch.cdist(_batch(40, 3, 9, 4), _batch(40, 3, 9, 4))
    dist[0, 2, [1, 4, 6]] = dist[0, 2, 3].item()  # a distance four times in one row
    dist[1, 5] = 0.25  # a row of equal entries
    dist[2, 7, :5] = torch.tensor([0.5, 0.5, 0.1, 0.5, 0.1])
    for k in (1, 3, 5, 9):
        expected = dist.topk(k, dim=-1, largest=False).values
        assert torch.equal(smallest_values(dist, k), expected)
        compiled, ops = _captured_graph(lambda d, k=k: smallest_values(d, k), dist)
        assert torch.equal(compiled, expected)
        assert not any("topk" in op for op in ops)
    torch._dynamo.reset()
    inductor = torch.compile(lambda d: smallest_values(d, 5) * 2.0, fullgraph=True)
    assert torch.equal(inductor(dist), dist.topk(5, dim=-1, largest=False).values * 2.0)
    torch._dynamo.reset()


def test_the_compiled_pooling_backpropagates_like_scatter_add():
    t, src = _batch(24, 3, 5, 4).requires_grad_(), _batch(25, 3, 7, 4).requires_grad_()
    index, weight = _index(26, 3, 7, 5), _batch(27, 3, 5, 4)
    torch._dynamo.reset()
    fast = torch.compile(lambda a, b: (add_at(a, index, b) * weight).sum(), backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(fast(t, src), (t, src))
    torch._dynamo.reset()
    slow = (t.scatter_add(1, index[..., None].expand(-1, -1, 4), src) * weight).sum()
    for a, b in zip(grads, torch.autograd.grad(slow, (t, src)), strict=True):
        assert torch.equal(a, b)


def test_elu_is_the_correctly_rounded_elu():
    x = torch.linspace(-4, 2, 20001, dtype=torch.float32)
    exact = F.elu(x.double())  # float64: 29 more bits than the float32 result
    ulp = (x.abs().clamp(min=1e-30).log2().floor() - 23).exp2().double()  # a float32 ulp near each input's scale
    err = (elu(x).double() - exact).abs()
    # within half a float32 ulp of the value's own magnitude: correctly rounded (exp(x) - 1 in float32 is not)
    value_ulp = torch.where(exact.abs() > 0, (exact.abs().log2().floor() - 23).exp2(), ulp)
    assert bool((err <= 0.5 * value_ulp).all())
    naive = (x.exp() - 1).where(x <= 0, x).double()
    assert not bool(((naive - exact).abs() <= 0.5 * value_ulp).all())
    assert torch.equal(elu(x.double()), exact)
    assert elu(x).dtype == torch.float32


def test_schedule_only_runs_each_block_on_the_counts_it_replays():
    vit = small_vit()
    batch = images(3)
    model = bench.apply(vit, "tome", r=6)
    with torch.inference_mode():
        model(batch)
    info = model.last_forward
    assert info.tokens_mlp != info.tokens_attn  # something to replay
    seen = {"attn": [], "mlp": []}
    hooks = [block.norm1.register_forward_hook(lambda m, i, o: seen["attn"].append(o.shape[1])) for block in vit.blocks]
    hooks += [block.mlp.register_forward_hook(lambda m, i, o: seen["mlp"].append(o.shape[1])) for block in vit.blocks]
    with torch.inference_mode():
        bench.apply(vit, ScheduleOnly(info))(batch)
    for hook in hooks:
        hook.remove()
    assert seen == {"attn": info.tokens_attn, "mlp": info.tokens_mlp}


def test_schedule_only_without_reduction_is_the_dense_model():
    vit = small_vit()
    batch = images(2)
    dense = bench.apply(vit, "baseline")
    with torch.inference_mode():
        expected = dense(batch)
        got = bench.apply(vit, ScheduleOnly(dense.last_forward))(batch)
    assert torch.equal(got, expected)


def test_benchmark_takes_a_data_dependent_methods_macs_over_the_timed_batch(capsys):
    """ATS's MACs depend on the image: the MAC-ideal speed-up uses their mean over the timed batch (as the
    leaderboard uses the mean over real images), not the one random image a plain count traces."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import benchmark_methods
    finally:
        sys.path.pop(0)
    assert benchmark_methods.main(["--model", "quickstart", "--runs", "1", "--warmup", "0", "--batch-size", "4",
                                   "--only", "ats"]) == 0
    printed = [float(line[49:57]) for line in capsys.readouterr().out.splitlines() if line.startswith("ats ")]  # GMACs
    vit, settings, batch, _ = benchmark_methods.quickstart(4, torch.device("cpu"))
    expected = [bench.data_macs(bench.apply(vit, name, **params), batch) / 1e9 for name, params, _ in settings
                if name == "ats"]
    one_image = [bench.count_macs(bench.apply(vit, name, **params)) / 1e9 for name, params, _ in settings if name == "ats"]
    assert printed == [round(value, 3) for value in expected] != [round(value, 3) for value in one_image]


def test_benchmark_skips_a_method_whose_reference_setting_does_not_fit_the_model(capsys):
    """DeiT-Ti: DiffRate's default schedule is DeiT-S's; one line says why, the other methods go on (no traceback)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import benchmark_methods
    finally:
        sys.path.pop(0)
    assert benchmark_methods.main(["--model", "deit_tiny_patch16_224", "--device", "cpu", "--runs", "1",
                                   "--warmup", "0", "--batch-size", "2", "--only", "diffrate"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("diffrate")]
    assert "skipped: method 'diffrate': target_flops=2.9 is a DeiT-S schedule, but the model is DeiT-Ti" in line


def test_benchmark_prints_the_ceiling_next_to_the_mac_ideal_speedup():
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_methods.py"), "--model", "quickstart", "--runs", "2",
         "--warmup", "0", "--batch-size", "4", "--only", "tome", "static"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert " ".join(header.split()[-10:]) == "MAC-ideal of ideal ceiling of ideal own ms fixed room"
    rows = [line.split() for line in out.splitlines() if line.startswith(("tome ", "static "))]
    assert [row[0] for row in rows] == ["tome", "tome", "static", "static"]  # --only: the quickstart's two budgets
    for row in rows:
        ideal, of_ideal, ceiling, of_ceiling, own_ms, fixed, room = row[-7:]
        assert math.isfinite(float(fixed)) and math.isfinite(float(room))
        assert ideal.endswith("x") and ceiling.endswith("x")
        ideal, ceiling = float(ideal[:-1]), float(ceiling[:-1])
        assert ideal > 1.1  # from MACs; the timings at batch 4 get no bound (a loaded machine moves them anywhere)
        assert float(of_ceiling) == pytest.approx(ceiling / ideal, abs=0.015)  # of the 2-decimal printed values
        assert math.isfinite(float(own_ms)) and math.isfinite(float(of_ideal))
        assert len(of_ideal.split(".")[1]) == 3 and len(of_ceiling.split(".")[1]) == 3
    # a row's label: the method and its parameters as printed, before its 12 columns of figures ("static keep_rate=
    # 0.753, layers=[1, 3, 5], not_contiguous=True": its first two words alone were not the label the summary names)
    shares = {" ".join(row[:-12]): float(row[-6]) for row in rows}
    summary = out.splitlines()[-1]
    assert summary.startswith("at 0.9 of the MAC-ideal speed-up: ")
    reached = int(summary.split(": ")[1].split(" of ")[0])
    # the line counts unrounded shares; a printed 0.900 may be either side
    assert sum(share >= 0.9005 for share in shares.values()) <= reached <= sum(share >= 0.8995 for share in shares.values())
    assert summary.split(": ")[1].split(" runs")[0].endswith("of 4")
    # the share's interval: the speed-up's printed interval over the MAC-ideal speed-up (2 decimals each)
    tops = [float(row[-8].split("-")[1].rstrip(")")) / float(row[-7].rstrip("x")) for row in rows]
    within = int(summary.split(" runs (")[1].split(" whose")[0])
    assert sum(top >= 0.91 for top in tops) <= within <= sum(top >= 0.89 for top in tops)
    below, _, overhead = summary.partition("; below: ")[2].partition("; of these, ")
    for part in below.split("; ") if below else []:
        share, interval = part.split()[-2:]
        low, high = (float(value) for value in interval.strip("()").split("-"))
        assert low <= float(share) <= high
    # eager: the runs below 0.9 named as kept from it by per-operation overhead are those whose printed
    # own ms - fixed is within their room (2 decimals each: 0.01 either way)
    assert bool(below) == bool(overhead)
    named = overhead.partition("): ")[2]
    growing = {" ".join(row[:-12]): (float(row[-3]) - float(row[-2]), float(row[-1])) for row in rows}
    for label, (own, room) in growing.items():
        if f"{label} " in below and own <= room - 0.02:
            assert f"{label} (" in named, (label, own, room, summary)
        elif f"{label} " in below and own >= room + 0.02:
            assert f"{label} (" not in named, (label, own, room, summary)


def test_benchmark_quickstart_times_30_rounds_unless_told(monkeypatch, capsys):
    """--model quickstart: 30 timed rounds by default (a row's interval about +-1% of its speed-up); --runs
    still sets them."""
    script = benchmark_script()
    rounds = []
    monkeypatch.setattr(script, "time_method", lambda *args: rounds.append(args[-1].runs) or script.Reached(1.0, 1.0, 1.0))
    assert script.main(["--model", "quickstart", "--only", "tome"]) == 0
    assert script.main(["--model", "quickstart", "--only", "tome", "--runs", "7"]) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("quickstart, ")]
    assert rounds == [30, 30, 7, 7]  # baseline and tome's two budgets: the baseline row is one of them
    assert [line.split(", ")[5] for line in headers] == ["30 timed runs after 3 warm-up", "7 timed runs after 3 warm-up"]


def test_benchmark_names_the_runs_below_whose_growing_own_cost_is_within_the_room(monkeypatch, capsys):
    """Eager, with the clock replaced (every other step real): batch 64 rounds of 33 ms for the method, 27 for
    its ceiling, 50 for the dense model; batch 1, 3.5 and 2 ms (fixed: 1.5). ToMe r=5 (MAC-ideal ~1.73x) is
    then below 0.9 with 6 ms of own cost, of which 4.5 grow with the batch: within its room (50 / (0.9 x 1.73)
    - 27, about 5 ms), so per-operation overhead, not its arithmetic, keeps it from 0.9."""
    import bench.throughput

    script = benchmark_script()
    clock = {(64, 3): [0.033, 0.027, 0.050], (1, 2): [0.0035, 0.002]}
    monkeypatch.setattr(bench.throughput, "_time_rounds", lambda models, batch, dtype, warmup, runs: [
        [seconds] * runs for seconds in clock[(batch.shape[0], len(models))]])
    assert script.main(["--model", "quickstart", "--only", "tome", "--runs", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line.split() for line in lines if line.startswith("tome ") and " r=5 " in line)
    assert [row[-3], row[-2]] == ["6.00", "1.50"]  # own ms, fixed
    summary = lines[-1]
    assert "; below: tome r=5 " in summary and " r=3 " not in summary.partition("; below: ")[2]
    named = summary.partition("per-operation overhead keeps them from 0.9): ")[2]
    assert named.startswith("tome r=5 (4.50 of ") and 4.5 < float(named.split()[4]) < 5.5, summary


def test_benchmark_share_summary_counts_unrounded_shares_and_names_the_others():
    """Reached: the unrounded share; within reach: the top of its 95% interval (0.9 itself counts); the others
    listed with their share and its interval; measured eager, those whose own cost growing with the batch is
    within the room (equal counts) named."""
    script = benchmark_script()
    compiled = {"tome r=5": script.Reached(0.8996, 0.8812, 0.90004), "pruning r=12": script.Reached(0.9, 0.89, 0.91),
                "ppt r=12": script.Reached(0.8951, 0.8849, 0.9), "mctf r=6": script.Reached(0.78049, 0.7701, 0.7911)}
    head = ("at 0.9 of the MAC-ideal speed-up: 1 of 4 runs (3 whose 95% interval reaches it); below: "
            "tome r=5 0.900 (0.881-0.900); ppt r=12 0.895 (0.885-0.900); mctf r=6 0.780 (0.770-0.791)")
    assert script.share_summary(compiled) == head
    assert script.share_summary({"static": script.Reached(1.02, 1.0, 1.03)}) == (
        "at 0.9 of the MAC-ideal speed-up: 1 of 1 runs (1 whose 95% interval reaches it)")
    eager = {label: reached._replace(growing_ms=growing, room_ms=room) for (label, reached), (growing, room) in
             zip(compiled.items(), [(3.26, 1.44), (0.9, 1.4), (3.671, 3.67), (3.17, 3.17)], strict=True)}
    assert script.share_summary(eager) == head + (
        "; of these, own cost growing with the batch within the room (per-operation overhead keeps them from "
        "0.9): mctf r=6 (3.17 of 3.17 ms)")
    del eager["mctf r=6"]
    assert script.share_summary(eager).endswith("keeps them from 0.9): none")


def benchmark_script():
    """scripts/benchmark_methods.py as a module (it is a script, not in a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_methods", REPO / "scripts" / "benchmark_methods.py")
    script = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "scripts"))  # its ``import _repo``
    try:
        spec.loader.exec_module(script)
    finally:
        sys.path.pop(0)
    return script


def test_benchmark_compile_times_the_three_models_compiled_afresh_per_method(monkeypatch, capsys):
    """``--compile``: method, ceiling and dense model go through the pipeline's ``compiled`` (recorded here
    instead of compiling, which the pipeline's own compile tests exercise), after a dynamo reset per method."""
    script = benchmark_script()
    passed, resets = [], []
    monkeypatch.setattr(script, "compiled", lambda model: passed.append(model) or model)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(len(passed)))
    assert script.main(["--model", "quickstart", "--runs", "1", "--warmup", "0", "--batch-size", "4",
                        "--only", "tome", "--compile"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("1 timed runs after 0 warm-up, torch.compile (inductor), attention: explicit")
    assert [row.split()[0] for row in out.splitlines() if row.startswith("tome ")] == ["tome", "tome"]
    assert resets == [0, 3]  # before each method's three models
    methods_passed = [model.method.name for model in passed]
    assert methods_passed == ["tome", "schedule-only", "baseline"] * 2


@pytest.mark.parametrize("argv, message", [
    (["--model", "nosuchmodel"], "--model 'nosuchmodel' is not a timm model name"),
    (["--model", "resnet18"], "needs a timm VisionTransformer"),
    (["--runs", "0"], "argument --runs: 0 is below 1"),
    (["--batch-size", "0"], "argument --batch-size: 0 is below 1"),
    (["--warmup", "-1"], "argument --warmup: -1 is below 0"),
    (["--threads", "two"], "argument --threads: 'two' is not an integer"),
    (["--device", "bogus"], "--device 'bogus'"),
])
def test_benchmark_refuses_bad_arguments_in_one_line(argv, message, capsys):
    """Each was a traceback after the model was built (or, ``--warmup -1``, accepted): one line, exit 2."""
    with pytest.raises(SystemExit) as stop:
        benchmark_script().main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_benchmark_refuses_a_gpu_index_this_machine_lacks(monkeypatch, capsys):
    """``--device cuda:1`` with one GPU was a CUDA error after the model was built: one line, exit 2."""
    script = benchmark_script()
    monkeypatch.setattr(script.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(script.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as stop:
        script.main(["--device", "cuda:1"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--device 'cuda:1': this machine has 1 CUDA device(s), cuda:0 to cuda:0")


def test_benchmark_room_and_fixed_cost_columns(monkeypatch):
    """``room``: the own cost that would leave 0.9 of the MAC-ideal speed-up; ``fixed``: the own cost timed at
    batch 1 (method and ceiling only)."""
    from bench.sdpa import written_out

    script = benchmark_script()
    # dense 100 ms, ceiling 60 ms, 1.5x fewer MACs: 0.9 of 1.5x is 1.35x, i.e. 74.07 ms, so 14.07 ms of room
    assert script.room_ms(0.100, 0.060, 1.5) == pytest.approx(14.074, abs=1e-3)
    assert script.room_ms(0.100, 0.080, 1.5) < 0  # the ceiling itself is under 0.9
    calls = []
    real = script.compare_many

    def spy(models, batch, *args):
        calls.append(([model.method.name for model in models], batch.shape[0], args[-1], written_out()))
        return real(models, batch, *args)

    monkeypatch.setattr(script, "compare_many", spy)
    assert script.main(["--model", "quickstart", "--runs", "2", "--warmup", "0", "--batch-size", "4",
                        "--only", "static"]) == 0
    # per setting: the three models at the batch size, then method and ceiling at batch 1 with 5x the runs, all
    # with the quickstart's attention kernel (written out)
    assert calls == [(["static", "schedule-only", "baseline"], 4, 2, True),
                     (["static", "schedule-only"], 1, 10, True)] * 2
    calls.clear()
    assert script.main(["--model", "quickstart", "--runs", "2", "--warmup", "0", "--batch-size", "4",
                        "--only", "static", "--sdpa-backend", "auto"]) == 0
    assert {call[-1] for call in calls} == {False}


def test_rows_flattened_once_serve_tensors_of_several_widths():
    """One ``Rows`` used on tensors of different N gives each its own row numbers (the cache is per N)."""
    from methods.base import Rows

    rows = Rows(_index(4, 3, 2, 5))
    wide, narrow = _batch(5, 3, 7, 4), _batch(6, 3, 5, 2)
    assert torch.equal(take(wide, rows), take(wide, rows.index))
    assert torch.equal(take(narrow, rows), take(narrow, rows.index))
    assert torch.equal(add_at(narrow, rows, _batch(7, 3, 2, 2)), add_at(narrow, rows.index, _batch(7, 3, 2, 2)))
    assert sorted(rows._flat) == [5, 7]


def test_pruning_attends_without_a_bias_and_matches_ppt_when_every_image_prunes(monkeypatch):
    """Pruning keeps every size at 1 (log 1 = 0): its attention runs without an additive mask, and its logits
    are PPT's with proportional attention on when PPT prunes every image (threshold 0)."""
    import bench.attention

    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    vit, x = small_vit(), images(3, size=64)
    pruning = bench.apply(vit, "pruning", r=8, layers=[1, 3])
    ppt = bench.apply(vit, "ppt", r=8, layers=[1, 3], threshold=0.0)
    with torch.no_grad():
        monkeypatch.setattr(bench.attention.F, "scaled_dot_product_attention", spy)
        pruned = pruning(x)
        assert len(masks) == len(vit.blocks) and all(mask is None for mask in masks)
        masks.clear()
        reference = ppt(x)
    assert any(mask is not None for mask in masks)  # PPT's sizes may differ from 1: it adds log(size)
    assert pruning.last_forward.tokens_out == ppt.last_forward.tokens_out
    torch.testing.assert_close(pruned, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("script", ["benchmark_methods.py", "gpu_check.py"])
def test_the_scripts_import_their_own_checkout(tmp_path, script):
    """Another checkout's bench/ earlier on the path (a second clone sharing one environment, whose editable install
    points elsewhere): the scripts still import this checkout's."""
    import os
    import subprocess
    import sys

    from bench.pipeline.files import REPO

    fake = tmp_path / "other" / "bench"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the bench of another checkout')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "other")}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-500:]
