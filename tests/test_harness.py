"""The block loop: baseline equals timm, schedules, token order, sizes, caps, batch independence."""


import pytest
import torch

import bench
import methods
from tests.helpers import images, small_vit
from tests.reference_impl import reference_tokens

# One setting per registered method, reducing on the 64-patch test model.
SETTINGS = {
    "baseline": {},
    "ats": {},
    "tome": {"r": 6},
    "ppt": {"r": 12, "threshold": 2e-4},
    "pruning": {"r": 12},
    "pooling": {"r": 12},
    "evit": {"keep_rate": 0.7},
    "topk": {"keep_rate": 0.7},
    "resize": {"img_size": 48},
    "pitome": {"ratio": 0.9},
    "tofu": {"ratio": 0.9},
    "mctf": {"r": 4},
    "dpcknn": {"keep_rate": 0.7}, "kmedoids": {"keep_rate": 0.7}, "static": {"not_contiguous": True}, "random": {"keep_rate": 0.7},
    "diffrate": {"prune_kept_num": [65, 60, 52, 52, 40, 38, 30, 30, 22, 20, 12, 6], "merge_kept_num": [63, 56, 52, 44, 40, 33, 30, 25, 22, 15, 12, 3]},
}


def test_every_registered_method_has_a_test_setting():
    assert sorted(SETTINGS) == methods.names()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"init_values": 0.1},  # LayerScale (DeiT-III)
        {"qk_norm": True},  # q/k norm
    ],
    ids=["deit", "layerscale", "qk_norm"],
)
def test_baseline_equals_plain_timm(kwargs):
    vit = small_vit(**kwargs)
    x = images(3)
    with torch.no_grad():
        expected = vit(x)
        got = bench.apply(vit, "baseline")(x)
    assert torch.equal(got, expected)


def test_baseline_equals_plain_timm_distilled():
    vit = small_vit("deit_tiny_distilled_patch16_224")
    x = images(2)
    with torch.no_grad():
        assert torch.equal(bench.apply(vit, "baseline")(x), vit(x))


def test_apply_shares_weights_and_keeps_the_vit_untouched():
    vit = small_vit()
    model = bench.apply(vit, "tome", r=4)
    assert model.vit is vit
    assert type(vit.blocks[0]).__name__ == "Block"  # no class swapping
    x = images(2)
    with torch.no_grad():
        model(x)
        assert torch.equal(vit(x), bench.apply(vit, "baseline")(x))


def run(method, vit=None, batch=4, **params):
    vit = vit if vit is not None else small_vit()
    model = bench.apply(vit, method, **params)
    with torch.no_grad():
        logits = model(images(batch))
    return logits, bench.forward_stats(model)


def test_tome_schedule_constant_r():
    _, info = run("tome", r=6)
    expected, n = [], 65
    for _ in range(12):
        n -= min(6, (n - 1) // 2)
        expected.append(n)
    assert info.tokens_out == expected
    assert info.tokens_in == [65, *expected[:-1]]


def test_tome_decreasing_schedule_and_lists():
    assert methods.tome.tome_schedule(13, 12, -1.0) == [26, 23, 21, 18, 16, 14, 11, 9, 7, 4, 2, 0]
    assert methods.tome.tome_schedule(4, 12, 0) == [4] * 12
    assert methods.tome.tome_schedule([3, 2], 5) == [3, 2, 0, 0, 0]
    _, info = run("tome", r=[5, 0, 7])
    assert info.tokens_out[:4] == [60, 60, 53, 53]
    assert info.tokens_out[-1] == 53


def test_tome_caps_r_at_half_of_the_non_prefix_tokens():
    _, info = run("tome", r=40)
    # 65 -> 65 - 32 = 33 -> 33 - 16 = 17 -> 9 -> 5 -> 3 -> 2 -> 2 ...
    assert info.tokens_out == [33, 17, 9, 5, 3, 2, 2, 2, 2, 2, 2, 2]


def test_ppt_caps_r_at_layer_token_count():
    _, info = run("ppt", r=40, layers=[0, 1, 2])
    assert info.tokens_out[:3] == [33, 17, 9]


@pytest.mark.parametrize("method", ["ppt", "pruning", "pooling"])
def test_ppt_family_schedule(method):
    _, info = run(method, r=12, layers=[1, 4])
    assert info.tokens_out == [65, 53, 53, 53, 41, 41, 41, 41, 41, 41, 41, 41]
    assert sorted(info.stats) == [1, 4]


def test_ppt_statistics_record_the_branch_per_layer():
    _, pruned = run("pruning", r=4)
    _, pooled = run("pooling", r=4)
    assert {layer: s["pooled_fraction"] for layer, s in pruned.stats.items()} == {3: 0.0, 6: 0.0, 9: 0.0}
    assert {layer: s["pooled_fraction"] for layer, s in pooled.stats.items()} == {3: 1.0, 6: 1.0, 9: 1.0}


@pytest.mark.parametrize(("method", "kept"), [("evit", [65, 47, 35, 26]), ("topk", [65, 46, 33, 24])])
def test_evit_keeps_ceil_of_keep_rate(method, kept):
    _, info = run(method, keep_rate=0.7)
    # block 3: ceil(0.7 * 64) = 45 patches + class token (+ EViT's fused token); then ceil(0.7 * 46) = 33, ...
    assert [info.tokens_out[i] for i in (0, 3, 6, 9)] == kept


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_prefix_tokens_stay_first(method):
    for name, prefix in (("vit_small_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)):
        model = bench.apply(small_vit(name), method, track_source=True, **SETTINGS[method])
        with torch.no_grad():
            model(images(3))
        source = bench.forward_stats(model).source
        for token in range(prefix):
            expected = torch.zeros(source.shape[-1])
            expected[token] = 1
            assert torch.equal(source[:, token], expected.expand(3, -1)), (method, name, token)


@pytest.mark.parametrize("method", ["tome", "pooling"])
def test_merged_sizes_sum_to_the_input_token_count(method):
    model = bench.apply(small_vit(), method, track_source=True, **SETTINGS[method])
    with torch.no_grad():
        model(images(3))
    info = bench.forward_stats(model)
    assert info.tokens_out[-1] < 65
    assert torch.allclose(info.size.sum(dim=(1, 2)), torch.full((3,), 65.0))
    # every input token is covered exactly once, and size = number of covered inputs
    assert torch.equal(info.source.sum(dim=1), torch.ones(3, 65))
    assert torch.equal(info.source.sum(dim=2, keepdim=True), info.size)


def test_evit_fused_token_covers_the_dropped_patches():
    model = bench.apply(small_vit(), "evit", track_source=True, keep_rate=0.5, layers=[2])
    with torch.no_grad():
        model(images(2))
    info = bench.forward_stats(model)
    assert info.tokens_out[-1] == 1 + 32 + 1
    assert torch.equal(info.source.sum(dim=1), torch.ones(2, 65))
    assert torch.equal(info.size[:, -1, 0], torch.full((2,), 32.0))


# random's pattern depends on the position in the batch by definition (tests/test_clustering.py checks it)
@pytest.mark.parametrize("method", sorted(set(SETTINGS) - {"random"}))
def test_results_do_not_depend_on_batch_composition(method):
    vit = small_vit()
    model = bench.apply(vit, method, **SETTINGS[method])
    x = images(6)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
        reversed_batch = model(x.flip(0)).flip(0)
    assert (together - alone).abs().max() < 1e-4
    assert (together - reversed_batch).abs().max() < 1e-4


def test_ppt_mixed_batch_equals_each_image_alone():
    vit = small_vit()
    x = images(8)
    # the per-image score variances at the first PPT layer, from the independent reference implementation;
    # the threshold is their median, so that the batch mixes both branches
    variances = reference_tokens(vit.double(), x.double(), "ppt", r=12, layers=[3, 6], threshold=0.0)["variances"][3]
    vit.float()
    threshold = (sorted(variances)[3] + sorted(variances)[4]) / 2
    model = bench.apply(vit, "ppt", r=12, layers=[3, 6], threshold=threshold)
    with torch.no_grad():
        together = model(x)
        fraction = float(bench.forward_stats(model).stats[3]["pooled_fraction"])
        alone = torch.cat([model(x[i : i + 1]) for i in range(8)])
    assert fraction == 4 / 8, "the batch must mix pooled and pruned images"
    assert (together - alone).abs().max() < 1e-4


def test_entering_twice_gives_the_same_result():
    model = bench.apply(small_vit(), "ppt", r=12)
    x = images(3)
    with torch.no_grad():
        first = model(x)
        model(images(5, seed=9))
        second = model(x)
    assert torch.equal(first, second)


def test_training_mode_backpropagates_through_every_method():
    for method, params in SETTINGS.items():
        vit = small_vit()
        model = bench.apply(vit, method, **params).train()
        loss = model(images(2)).logsumexp(-1).sum()
        loss.backward()
        assert vit.blocks[0].attn.qkv.weight.grad is not None, method
        assert torch.isfinite(vit.blocks[-1].mlp.fc2.weight.grad).all(), method
