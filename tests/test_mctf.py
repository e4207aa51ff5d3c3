"""MCTF (methods/mctf.py) against the naive per-image reference (tests/reference_mctf.py), and the spec's token
schedules and MAC figures on DeiT-T / DeiT-S geometry (docs/methods.md#mctf)."""

from __future__ import annotations

import pytest
import timm
import torch

import bench
import methods
from methods.base import END, START, BudgetKnob
from methods.mctf import fused_count
from tests.helpers import perturb
from tests.reference_mctf import fused_count as reference_count
from tests.reference_mctf import mctf_reference

ATOL64 = 1e-9
BATCH = 3

MODEL_SPECS = {
    "p8": ("vit_tiny_patch16_224", {"patch_size": 8}),  # 64 patches + class token (N = 65)
    "p16": ("vit_tiny_patch16_224", {}),  # N = 17: the N - 10 term of the cap
    "dist8": ("deit_tiny_distilled_patch16_224", {"patch_size": 8}),  # class + distillation token (N = 66)
    "ls": ("vit_tiny_patch16_224", {"patch_size": 8, "init_values": 0.1}),  # LayerScale
    "qkn": ("vit_tiny_patch16_224", {"patch_size": 8, "qk_norm": True, "scale_attn_norm": True}),
    # no class token, average pool: no prefix token, the surviving A tokens keep their matching order (N = 64)
    "gap": ("vit_tiny_patch16_224", {"patch_size": 8, "class_token": False, "global_pool": "avg"}),
}
_CACHE: dict[str, torch.nn.Module] = {}


def get_model(name: str) -> torch.nn.Module:
    """float64, eval mode, built once."""
    if name not in _CACHE:
        arch, kwargs = MODEL_SPECS[name]
        torch.manual_seed(4321)
        vit = timm.create_model(arch, pretrained=False, img_size=64, num_classes=10, **kwargs)
        _CACHE[name] = perturb(vit, seed=list(MODEL_SPECS).index(name), biases=True).eval().double()
    return _CACHE[name]


def get_images(batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def run_project(vit, images, **params):
    model = bench.apply(vit, "mctf", track_source=True, **params)
    with torch.no_grad():
        logits = model(images)
    return logits, bench.forward_stats(model)


CASES = [
    ("p8", {}),  # the DeiT-S defaults: r 16 at blocks 1..11 (65 49 33 17 10)
    ("p8", {"r": 4}),
    ("p8", {"r": 4, "one_step_ahead": 0}),
    ("p8", {"r": 4, "one_step_ahead": 2}),
    ("p8", {"r": 5, "pooling_type": 0}),
    ("p8", {"r": 5, "pooling_type": 0, "one_step_ahead": 0}),
    ("p8", {"r": 5, "pooling_type": 0, "one_step_ahead": 2}),
    ("p8", {"r": 4, "bidirection": False}),
    ("p8", {"r": 3, "bidirection": False, "one_step_ahead": 2, "prop_attn": False}),
    ("p8", {"r": 4, "prop_attn": False}),
    ("p8", {"r": 4, "tau_sim": 0}),
    ("p8", {"r": 4, "tau_info": 0, "tau_size": 0}),
    ("p8", {"r": 4, "tau_sim": 2, "tau_info": 5, "tau_size": 10}),
    ("p8", {"r": 0.35, "layers": [3, 6, 9]}),  # MCTF-Fast: a fraction of the patch tokens
    ("p8", {"r": 0.2, "layers": [0, 1, 2, 3, 4, 5], "one_step_ahead": 0}),
    ("p8", {"r": 1}),  # r' = 1: with bidirection only the B -> A step fuses
    ("p8", {"r": 2, "layers": [0, 11]}),
    ("p16", {}),  # 17 -> 10: r' = N - 10
    ("dist8", {"r": 4}),
    ("dist8", {"r": 5, "one_step_ahead": 0}),
    ("dist8", {"r": 4, "bidirection": False, "one_step_ahead": 2}),
    ("ls", {"r": 4}),
    ("qkn", {"r": 4, "one_step_ahead": 2}),
    ("gap", {"r": 4}),
    ("gap", {"r": 5, "one_step_ahead": 0, "pooling_type": 0}),
    ("gap", {"r": 4, "bidirection": False, "one_step_ahead": 2}),
]


@pytest.mark.parametrize(("model_name", "params"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_equals_the_reference(model_name, params):
    vit = get_model(model_name)
    images = get_images()
    ref = mctf_reference(vit, images, **params)
    logits, info = run_project(vit, images, **params)
    diff = (logits - ref["logits"]).abs().max().item()
    assert diff <= ATOL64, f"max abs logit diff {diff:.3e}"
    assert info.tokens_in == ref["tokens_in"]
    assert info.tokens_out == ref["tokens_out"]
    assert ref["tokens_out"][-1] < ref["tokens_in"][0]  # something was fused
    torch.testing.assert_close(info.size, ref["size"])
    # which input tokens every output token stands for, in output order
    assert torch.equal(info.source != 0, ref["source"])
    # the fused model is not the dense one (the comparison is not vacuous)
    with torch.no_grad():
        assert (vit(images) - logits).abs().max().item() > 1e-3


def test_prefix_tokens_are_never_fused_and_stay_first():
    vit = get_model("dist8")
    _, info = run_project(vit, get_images(), r=8)
    assert info.tokens_out[-1] < 66
    for token in range(2):
        expected = torch.zeros(info.source.shape[-1], dtype=info.source.dtype)
        expected[token] = 1
        assert torch.equal(info.source[:, token], expected.expand(BATCH, -1))
    assert torch.equal(info.size[:, :2], torch.ones_like(info.size[:, :2]))


@pytest.mark.parametrize("params", [{"r": 4}, {"r": 4, "one_step_ahead": 0}], ids=["osa1", "osa0"])
def test_each_image_alone_equals_the_batch(params):
    vit = get_model("p8")
    images = get_images()
    batch_logits, _ = run_project(vit, images, **params)
    for b in range(BATCH):
        alone, _ = run_project(vit, images[b : b + 1], **params)
        assert (alone[0] - batch_logits[b]).abs().max().item() < 1e-12


def test_one_step_ahead_variants_differ_and_use_their_points():
    vit = get_model("p8")
    images = get_images()
    results = {osa: run_project(vit, images, r=4, one_step_ahead=osa) for osa in (0, 1, 2)}
    # 1 reuses the fused attention, 2 recomputes it: the logits differ (by far more than rounding)
    assert (results[1][0] - results[2][0]).abs().max().item() > 1e-4
    assert (results[0][0] - results[1][0]).abs().max().item() > 1e-4
    # 1 and 2 fuse before the attention (tokens_attn), 0 after the MLP (tokens_out)
    assert results[1][1].tokens_attn == results[1][1].tokens_out == [65, 61, 57, 53, 49, 45, 41, 37, 33, 29, 25, 21]
    assert results[0][1].tokens_attn == results[0][1].tokens_in
    assert results[0][1].tokens_out == results[1][1].tokens_out
    ctx = bench.apply(vit, "mctf").context
    assert methods.build("mctf").step(1, ctx).point == START
    assert methods.build("mctf", one_step_ahead=0).step(1, ctx).point == END
    assert methods.build("mctf").step(0, ctx) is None  # block 0 is not in the default layers


def test_float32_runs_and_agrees_with_float64():
    vit = get_model("p8")
    images = get_images()
    logits64, info64 = run_project(vit, images, r=4)
    vit32 = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10, patch_size=8)
    vit32.load_state_dict({k: v.float() for k, v in vit.state_dict().items()})
    logits32, info32 = run_project(vit32.eval(), images.float(), r=4)
    assert logits32.dtype == torch.float32
    assert info32.tokens_out == info64.tokens_out
    assert (logits32.double() - logits64).abs().max().item() < 1e-4


def test_r_zero_is_the_dense_model():
    vit = get_model("p8")
    images = get_images()
    logits, info = run_project(vit, images, r=0)
    with torch.no_grad():
        assert (logits - vit(images)).abs().max().item() < 1e-12
    assert info.tokens_out == [65] * 12


def test_budget_knob_is_r_and_larger_is_cheaper():
    assert methods.build("mctf").budget_knob == BudgetKnob("r", kind="int", cheaper="higher")
    vit = get_model("p16")
    counts = [spec_macs(vit, run_project(vit, get_images(1), r=r)[1], 1) for r in (0, 1, 3, 6)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


@pytest.mark.parametrize(
    ("r", "n", "p", "expected"),
    [
        (16, 197, 1, 16), (16, 37, 1, 16), (16, 21, 1, 10), (16, 17, 1, 7), (16, 10, 1, 0), (16, 9, 1, -1),
        (50, 197, 1, 50), (150, 197, 1, 98), (150, 197, 2, 97), (3, 66, 2, 3),
        (0.35, 197, 1, 68), (0.35, 129, 1, 44), (0.35, 85, 1, 29), (0.9, 197, 1, 98), (0.35, 11, 1, 3),
        (0.35, 10, 1, 0),
    ],
)
def test_fused_count(r, n, p, expected):
    assert fused_count(r, n, p) == expected == reference_count(r, n, p)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"r": 16.0}, "'r' must be an integer >= 0 or a fraction in (0, 1), got 16.0"),
        ({"r": 1.5}, "'r' must be an integer >= 0 or a fraction in (0, 1), got 1.5"),
        ({"r": -1}, "'r' must be an integer >= 0 or a fraction in (0, 1), got -1"),
        ({"r": True}, "'r' must be an integer >= 0 or a fraction in (0, 1), got True"),
        ({"one_step_ahead": 3}, "'one_step_ahead' must be one of 0, 1, 2, got 3"),
        ({"one_step_ahead": True}, "'one_step_ahead' must be one of 0, 1, 2, got True"),
        ({"pooling_type": 2}, "'pooling_type' must be one of 0, 1, got 2"),
        ({"pooling_type": 1.0}, "'pooling_type' must be one of 0, 1, got 1.0"),  # an int, as r
        ({"one_step_ahead": 2.0}, "'one_step_ahead' must be one of 0, 1, 2, got 2.0"),
        ({"tau_info": -1}, "'tau_info' must be a number >= 0 (0 disables it), got -1"),
        ({"bidirection": 1}, "'bidirection' must be true or false, got 1"),
        ({"layers": []}, "'layers' must be a non-empty list"),
    ],
)
def test_invalid_parameters(params, message):
    with pytest.raises(ValueError) as error:
        methods.build("mctf", **params)
    assert message in str(error.value)


def test_layers_beyond_the_depth_are_refused():
    with pytest.raises(ValueError, match="include block 12, but the model has 12 blocks"):
        bench.apply(get_model("p16"), "mctf", layers=[3, 12])


# ------------------------------------------------------------------------------------ DeiT geometry, MACs

def spec_macs(vit, info, one_step_ahead: int) -> float:
    """The spec's analytic count from the observed token counts: a one-step-ahead block costs
    2NC^2 + N^2C (q, k, logits over the N unfused tokens) + 2N'C^2 + N'^2C (v, P'V, proj over N') + 8N'C^2;
    one_step_ahead 2 runs a full attention over N' after the q, k probe; every fusion adds the A x B similarity
    (ceil(N/2) * floor(N/2) * C). Plus patch embedding and head."""
    dim = vit.embed_dim
    kernel = vit.patch_embed.proj.kernel_size
    macs = vit.patch_embed.num_patches * dim * 3 * kernel[0] * kernel[1] + dim * vit.num_classes
    for n_in, n_attn, n_mlp, n_out in zip(info.tokens_in, info.tokens_attn, info.tokens_mlp, info.tokens_out,
                                          strict=True):
        if n_attn < n_in:  # fused at the start
            macs += 2 * n_in * dim**2 + n_in**2 * dim + (n_in + 1) // 2 * (n_in // 2) * dim
            if one_step_ahead == 1:
                macs += 2 * n_attn * dim**2 + n_attn**2 * dim
            else:
                macs += 4 * n_attn * dim**2 + 2 * n_attn**2 * dim
        else:
            macs += 4 * n_attn * dim**2 + 2 * n_attn**2 * dim
        macs += 8 * n_mlp * dim**2
        if n_out < n_mlp:  # fused at the end
            macs += (n_mlp + 1) // 2 * (n_mlp // 2) * dim
    return macs / 1e9


DEFAULT_SCHEDULE = [197, 197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37]
FAST_SCHEDULE = [197] * 4 + [129] * 3 + [85] * 3 + [56] * 2
FAST = {"r": 0.35, "layers": [3, 6, 9]}


@pytest.fixture(scope="module")
def deit():
    return {name: timm.create_model(f"deit_{name}_patch16_224", pretrained=False).eval() for name in ("tiny", "small")}


@pytest.mark.parametrize(
    ("model", "params", "schedule", "last", "gmacs", "profile"),
    [
        ("small", {}, DEFAULT_SCHEDULE, 21, 2.59, True),
        ("tiny", {}, DEFAULT_SCHEDULE, 21, 0.71, False),
        ("small", FAST, FAST_SCHEDULE, 56, 2.75, True),
        ("tiny", FAST, FAST_SCHEDULE, 56, 0.75, False),
    ],
    ids=["deit-s", "deit-t", "deit-s-fast", "deit-t-fast"],
)
def test_deit_schedule_and_macs(deit, model, params, schedule, last, gmacs, profile):
    vit = deit[model]
    reduced = bench.apply(vit, "mctf", **params)
    with torch.no_grad():
        reduced(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    info = bench.forward_stats(reduced)
    assert info.tokens_in == schedule
    assert info.tokens_out[-1] == last
    analytic = spec_macs(vit, info, 1)
    assert abs(analytic - gmacs) / gmacs < 0.01, analytic
    if profile:  # torchprofile counts the operations really run (q, k only over the unfused tokens, ...)
        counted = bench.count_macs(reduced) / 1e9
        assert abs(counted - analytic) / analytic < 0.01, (counted, analytic)


@pytest.mark.parametrize("one_step_ahead", [0, 2])
def test_deit_tiny_macs_without_fused_attention(deit, one_step_ahead):
    reduced = bench.apply(deit["tiny"], "mctf", one_step_ahead=one_step_ahead)
    counted = bench.count_macs(reduced) / 1e9
    analytic = spec_macs(deit["tiny"], bench.forward_stats(reduced), one_step_ahead)
    assert abs(counted - analytic) / analytic < 0.01, (counted, analytic)
    assert counted > bench.count_macs(bench.apply(deit["tiny"], "mctf")) / 1e9  # dearer than one-step-ahead 1


@pytest.mark.parametrize("one_step_ahead", [0, 1, 2])
def test_runs_under_autocast(one_step_ahead):
    """fp16/bf16 autocast (the benchmark's GPU setting): attention probabilities are half precision, the residual
    stream and the pooling weights float32."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8).eval()
    model = bench.apply(vit, "mctf", r=4, one_step_ahead=one_step_ahead)
    images = get_images(2).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    with torch.no_grad():
        exact = model(images)
    assert torch.isfinite(logits).all() and bench.forward_stats(model).tokens_out[-1] == 21
    assert (logits.float() - exact).abs().max().item() < 0.5  # bf16 rounding only, same token counts
