"""The project's methods against the independent, naive reference in ``tests/reference_impl.py``.

Small random-weight timm ViTs whose attention is sharpened (qkv weights x3 plus noise, fixed seed) so that
every method's choices are non-trivial. Comparisons run in float64 (model and images) so that near-ties in
ToMe's matching or PPT's threshold cannot flip between two correct implementations; one test also checks the
spec's fp32 tolerance (max abs logit difference <= 1e-4).
"""

from __future__ import annotations

import math

import pytest
import timm
import torch

import bench
import methods
from tests.helpers import perturb as _perturb
from tests.reference_impl import reference_forward, reference_tokens, tome_schedule

ATOL = 1e-4  # the spec's fp32 tolerance; float64 runs must agree far more tightly
ATOL64 = 1e-8
BATCH = 6


MODEL_SPECS = {
    # 16 patches + class token (N = 17)
    "p16": ("vit_tiny_patch16_224", {}),
    # 64 patches + class token (N = 65)
    "p8": ("vit_tiny_patch16_224", {"patch_size": 8}),
    # DeiT distilled: class + distillation token (N = 66 / 18)
    "dist8": ("deit_tiny_distilled_patch16_224", {"patch_size": 8}),
    "dist16": ("deit_tiny_distilled_patch16_224", {}),
    # LayerScale (DeiT-III style)
    "ls": ("vit_tiny_patch16_224", {"patch_size": 8, "init_values": 0.1}),
    # q/k normalisation and attention output (scale) norm
    "qkn": ("vit_tiny_patch16_224", {"patch_size": 8, "qk_norm": True, "scale_attn_norm": True}),
    # four register tokens after the class token (DINOv2 / ViT reg4 style): 5 prefix tokens (N = 69)
    "reg": ("vit_tiny_patch16_224", {"patch_size": 8, "reg_tokens": 4}),
    # no class token, global average pooling (MAE style): 0 prefix tokens (N = 64)
    "gap": ("vit_tiny_patch16_224", {"patch_size": 8, "class_token": False, "global_pool": "avg"}),
}

_CACHE: dict[str, torch.nn.Module] = {}


def get_model(name: str) -> torch.nn.Module:
    """float64, eval-mode model (built once per session)."""
    if name not in _CACHE:
        arch, kwargs = MODEL_SPECS[name]
        torch.manual_seed(1234)
        vit = timm.create_model(arch, pretrained=False, img_size=64, num_classes=10, **kwargs)
        _CACHE[name] = _perturb(vit, seed=list(MODEL_SPECS).index(name)).eval().double()
    return _CACHE[name]


def get_images(batch: int = BATCH, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(batch, 3, 64, 64, generator=g).to(dtype)


def prefix(vit) -> int:
    return vit.num_prefix_tokens


# ------------------------------------------------------------------------------------------ threshold choice

def _median_gap(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return (v[mid - 1] + v[mid]) / 2


def mixed_threshold(vit, images, layer: int, **params) -> float:
    """A PPT threshold at the median of the per-image score variances at ``layer`` (variances at a later
    layer depend on the threshold through earlier decisions: iterate a few times)."""
    layers = params.get("layers", [3, 6, 9])
    first = reference_tokens(vit, images, "ppt", **{**params, "threshold": 0.0})
    threshold = _median_gap(first["variances"][layers[0]])
    for _ in range(4):
        info = reference_tokens(vit, images, "ppt", **{**params, "threshold": threshold})
        if 0 < info["pooled_fraction"][layer] < 1:
            break
        threshold = _median_gap(info["variances"][layer])
    return threshold


def assert_robust_threshold(info: dict, threshold: float) -> None:
    """No image's variance is so close to the threshold that rounding could flip its branch."""
    for layer, values in info["variances"].items():
        for v in values:
            assert abs(v - threshold) > 1e-6 * threshold, f"variance {v} too close to threshold at layer {layer}"


# ------------------------------------------------------------------------------------------ comparison

def run_project(vit, images, method: str, track_source: bool = False, **params):
    model = bench.apply(vit, method, track_source=track_source, **params)
    model.eval()
    with torch.no_grad():
        logits = model(images)
    return logits, bench.forward_stats(model)


def compare(model_name: str, method: str, atol: float = ATOL64, check_order: bool = True, **params) -> dict:
    vit = get_model(model_name)
    images = get_images()
    ref = reference_tokens(vit, images, method, **params)
    logits, info = run_project(vit, images, method, track_source=True, **params)
    diff = (logits - ref["logits"]).abs().max().item()
    assert diff <= atol, f"{method} {params} on {model_name}: max abs logit diff {diff:.3e}"
    assert list(info.tokens_in) == ref["tokens_in"], f"tokens_in {info.tokens_in} != reference {ref['tokens_in']}"
    assert list(info.tokens_out) == ref["tokens_out"], f"tokens_out {info.tokens_out} != reference {ref['tokens_out']}"
    if method in ("ppt", "pruning", "pooling"):
        project_frac = {int(k): v["pooled_fraction"] for k, v in info.stats.items() if "pooled_fraction" in v}
        assert project_frac == pytest.approx(ref["pooled_fraction"]), (project_frac, ref["pooled_fraction"])
    if method in ("tome", "pooling", "ppt"):
        assert info.size is not None, "merging methods must propagate token sizes"
        assert info.size.shape == ref["size"].shape
        torch.testing.assert_close(info.size.to(ref["size"].dtype), ref["size"])
    # which input tokens every output token stands for, in output order (token order matters: ToMe's
    # alternating split at later layers, the class/distillation positions read by the head)
    assert info.source is not None and info.source.shape == ref["source"].shape
    if check_order:
        mismatch = ((info.source != 0) != ref["source"]).any(dim=-1)
        assert not mismatch.any(), f"token sources/order differ at (image, token) {mismatch.nonzero().tolist()[:10]}"
    else:  # the same set of tokens, in any order
        def canonical(src):
            return [sorted(tuple(row.nonzero().flatten().tolist()) for row in img) for img in src]
        assert canonical(info.source != 0) == canonical(ref["source"])
    return ref


# ------------------------------------------------------------------------------------------ tests

def test_registry_has_all_methods():
    assert set(methods.names()) >= {"baseline", "tome", "ppt", "pruning", "pooling", "evit", "topk"}


@pytest.mark.parametrize("model_name", list(MODEL_SPECS))
def test_baseline(model_name):
    vit = get_model(model_name)
    images = get_images(2)
    with torch.no_grad():
        timm_logits = vit(images)
    ref = reference_forward(vit, images, "baseline")
    assert (ref - timm_logits).abs().max().item() <= ATOL64  # the reference's block loop is faithful
    compare(model_name, "baseline")


TOME_CASES = [
    ("p16", {"r": 3}),
    ("p8", {"r": 3}),
    ("p8", {"r": [8, 0, 4, 2, 6, 1]}),
    ("p8", {"r": 3, "inflection": -1}),
    ("p8", {"r": 4, "inflection": 0.5}),
    ("p8", {"r": 3, "inflection": 0.5}),  # lo = int(1.5) = 1 (truncated, not rounded): 1 1 1 2 2 2 3 3 3 4 4 5
    ("p8", {"r": 3, "prop_attn": False}),
    ("p16", {"r": 15}),  # above the cap (N - 1) // 2 at every layer, below the number of patches
    ("p8", {"r": 63}),
    ("dist8", {"r": 3}),
    ("dist8", {"r": 5, "inflection": -1}),
    ("dist16", {"r": 15}),
    ("ls", {"r": 4}),
    ("qkn", {"r": 4}),
]


@pytest.mark.parametrize(("model_name", "params"), TOME_CASES, ids=[f"{m}-{p}" for m, p in TOME_CASES])
def test_tome(model_name, params):
    ref = compare(model_name, "tome", **params)
    vit = get_model(model_name)
    schedule = tome_schedule(params["r"], len(vit.blocks), params.get("inflection", 0))
    for n_in, n_out, r in zip(ref["tokens_in"], ref["tokens_out"], schedule, strict=True):
        assert n_out == n_in - min(r, (n_in - prefix(vit)) // 2)


@pytest.mark.parametrize("r", [40, 63])
def test_tome_r_cap_equals_capped_schedule(r):
    """r larger than the cap gives the same as r = cap at each layer."""
    vit = get_model("p8")
    images = get_images()
    big, info = run_project(vit, images, "tome", r=r)
    caps = [n_in - n_out for n_in, n_out in zip(info.tokens_in, info.tokens_out, strict=True)]
    assert caps == [(n - 1) // 2 for n in info.tokens_in]
    explicit, _ = run_project(vit, images, "tome", r=caps)
    torch.testing.assert_close(big, explicit, rtol=0, atol=ATOL64)


PPT_CASES = [
    # (model, params, layer at whose median the threshold is set)
    ("p8", {"r": 8}, 3),
    ("p8", {"r": 8}, 6),
    ("p8", {"r": 12, "prop_attn": False}, 3),
    ("p8", {"r": 6, "layers": [2, 5, 8, 10]}, 5),
    ("p8", {"r": 63}, 3),
    ("dist8", {"r": 8}, 3),
    ("dist8", {"r": 8}, 6),
    ("ls", {"r": 8}, 3),
    ("qkn", {"r": 8}, 6),
]


@pytest.mark.parametrize(("model_name", "params", "layer"), PPT_CASES,
                         ids=[f"{m}-{p}-median@{layer}" for m, p, layer in PPT_CASES])
def test_ppt_mixed_batch(model_name, params, layer):
    vit = get_model(model_name)
    images = get_images()
    threshold = mixed_threshold(vit, images, layer, **params)
    ref = compare(model_name, "ppt", threshold=threshold, **params)
    assert 0 < ref["pooled_fraction"][layer] < 1, "the batch must take both branches"
    assert_robust_threshold(ref, threshold)
    for n_in, n_out, i in zip(ref["tokens_in"], ref["tokens_out"], range(len(vit.blocks)), strict=True):
        if i in params.get("layers", [3, 6, 9]):
            assert n_out == n_in - min(params["r"], (n_in - 1) // 2)
        else:
            assert n_out == n_in


@pytest.mark.parametrize(("method", "params"), [("tome", {"r": 1000}), ("ppt", {"r": 1000, "threshold": 1e-4}),
                                                ("pruning", {"r": 1000}), ("pooling", {"r": 1000})])
def test_huge_r_is_capped(method, params):
    compare("p16", method, **params)


def test_ppt_variance_is_unbiased():
    """A threshold between one image's biased (divide by n) and unbiased (divide by n - 1) variance:
    that image must go to pruning (v >= threshold)."""
    vit = get_model("p8")
    images = get_images()
    params = {"r": 8, "layers": [3]}
    variances = reference_tokens(vit, images, "ppt", threshold=0.0, **params)["variances"][3]
    n = vit.patch_embed.num_patches
    chosen = None
    for m in sorted(range(len(variances)), key=lambda i: variances[i]):
        t = variances[m] * (1 - 0.5 / n)
        others = [v for i, v in enumerate(variances) if i != m]
        if all(abs(v - t) > 0.05 * t for v in others) and any(v < t for v in others):
            chosen = (m, t)
            break
    assert chosen is not None
    m, threshold = chosen
    ref = compare("p8", "ppt", threshold=threshold, **params)
    expected = sum(v < threshold for v in variances) / len(variances)
    assert ref["pooled_fraction"][3] == pytest.approx(expected)
    biased = [v * (n - 1) / n for v in variances]
    assert sum(v < threshold for v in biased) / len(biased) != pytest.approx(expected)


def test_ppt_default_threshold():
    compare("p8", "ppt", r=8)


PRUNE_POOL_CASES = [
    ("pruning", "p8", {"r": 8}),
    ("pruning", "p8", {"r": 10, "layers": [1, 2, 7]}),
    ("pruning", "p16", {"r": 15}),
    ("pruning", "dist8", {"r": 8}),
    ("pruning", "dist16", {"r": 3}),
    ("pruning", "qkn", {"r": 8}),
    ("pooling", "p8", {"r": 8}),
    ("pooling", "p8", {"r": 10, "layers": [1, 2, 7], "prop_attn": False}),
    ("pooling", "p16", {"r": 15}),
    ("pooling", "dist8", {"r": 8}),
    ("pooling", "dist16", {"r": 3}),
    ("pooling", "ls", {"r": 8}),
]


@pytest.mark.parametrize(("method", "model_name", "params"), PRUNE_POOL_CASES,
                         ids=[f"{a}-{m}-{p}" for a, m, p in PRUNE_POOL_CASES])
def test_pruning_pooling(method, model_name, params):
    ref = compare(model_name, method, **params)
    expected = 1.0 if method == "pooling" else 0.0
    assert set(ref["pooled_fraction"].values()) == {expected}


def test_pooling_equals_tome_at_ppt_layers():
    vit = get_model("p8")
    images = get_images()
    pooled, info = run_project(vit, images, "pooling", r=8)
    removed = [n_in - n_out for n_in, n_out in zip(info.tokens_in, info.tokens_out, strict=True)]
    assert removed == [8 if i in (3, 6, 9) else 0 for i in range(len(vit.blocks))]
    tome, _ = run_project(vit, images, "tome", r=removed)
    torch.testing.assert_close(pooled, tome, rtol=0, atol=ATOL64)
    # the reference agrees with itself too
    torch.testing.assert_close(reference_forward(vit, images, "pooling", r=8),
                               reference_forward(vit, images, "tome", r=removed), rtol=0, atol=ATOL64)


def test_ppt_threshold_extremes_equal_pruning_and_pooling():
    vit = get_model("p8")
    images = get_images()
    ppt0, _ = run_project(vit, images, "ppt", r=8, threshold=0.0)
    prune, _ = run_project(vit, images, "pruning", r=8)
    torch.testing.assert_close(ppt0, prune, rtol=0, atol=ATOL64)
    ppt_inf, _ = run_project(vit, images, "ppt", r=8, threshold=math.inf)
    pool, _ = run_project(vit, images, "pooling", r=8)
    torch.testing.assert_close(ppt_inf, pool, rtol=0, atol=ATOL64)


EVIT_CASES = [
    (method, model_name, params)
    for method in ("evit", "topk")
    for model_name, params in [
        ("p8", {"keep_rate": 0.5}),
        ("p8", {"keep_rate": 0.7}),
        ("p8", {"keep_rate": 0.6, "layers": [1, 4, 7, 10]}),
        ("p16", {"keep_rate": 0.5}),
        ("ls", {"keep_rate": 0.7}),
        ("qkn", {"keep_rate": 0.5}),
    ]
]


@pytest.mark.parametrize(("method", "model_name", "params"), EVIT_CASES,
                         ids=[f"{a}-{m}-{p}" for a, m, p in EVIT_CASES])
def test_evit_topk(method, model_name, params):
    ref = compare(model_name, method, **params)
    layers = params.get("layers", [3, 6, 9])
    for i, (n_in, n_out) in enumerate(zip(ref["tokens_in"], ref["tokens_out"], strict=True)):
        if i in layers:
            kept = 1 + math.ceil(params["keep_rate"] * (n_in - 1))
            assert n_out == kept + (1 if method == "evit" and kept < n_in else 0)
        else:
            assert n_out == n_in


EXPLICIT_CASES = [("p8", "baseline", {}), ("qkn", "tome", {"r": 4}), ("dist8", "ppt", {"r": 8}),
                  ("dist8", "evit", {"keep_rate": 0.5}), ("reg", "topk", {"keep_rate": 0.7})]


@pytest.mark.parametrize(("model_name", "method", "params"), EXPLICIT_CASES,
                         ids=[f"{m}-{a}" for m, a, _ in EXPLICIT_CASES])
def test_explicit_attention_kernel_matches_the_reference(model_name, method, params):
    """``sdpa_backend: explicit``: no SDPA call in any block (the profiled forward), and the same tokens,
    sources, sizes and logits as the naive reference (class attention and PPT scores read from the written-out
    matrix instead of their own row)."""
    from bench.sdpa import kernels_used, sdpa_backend

    model = bench.apply(get_model(model_name), method, **params)
    with sdpa_backend("explicit"):
        assert kernels_used(model, get_images(2)) == []
        compare(model_name, method, **params)
    assert kernels_used(model, get_images(2)) != []  # outside the pin: SDPA again


ALL_LAYERS = list(range(12))
EDGE_CASES = [
    # reduce at every layer down to the floor: the cap (N - p) // 2 reaches 0 with prefix tokens only left
    ("dist8", "tome", {"r": 63}),
    ("dist8", "pruning", {"r": 63, "layers": ALL_LAYERS}),
    ("dist8", "pooling", {"r": 63, "layers": ALL_LAYERS}),
    ("p8", "pruning", {"r": 63, "layers": ALL_LAYERS}),
    ("dist8", "evit", {"keep_rate": 0.5, "layers": ALL_LAYERS}),
    ("dist8", "topk", {"keep_rate": 0.5, "layers": ALL_LAYERS}),
    ("p16", "evit", {"keep_rate": 0.3, "layers": ALL_LAYERS}),
    # a fused token standing for a single dropped token
    ("p16", "evit", {"keep_rate": 0.9, "layers": ALL_LAYERS}),
    ("dist16", "evit", {"keep_rate": 0.7}),
    # reduction only at the last layer, and at the first
    ("p16", "tome", {"r": [0] * 11 + [5]}),
    ("dist16", "tome", {"r": [7]}),
    ("dist16", "ppt", {"r": 1, "threshold": 1e-3, "layers": [0, 11]}),
]


@pytest.mark.filterwarnings("ignore:.*degrees of freedom is <= 0")  # PPT on one patch token (project warns)
@pytest.mark.parametrize(("model_name", "method", "params"), EDGE_CASES,
                         ids=[f"{a}-{m}-{p}" for m, a, p in EDGE_CASES])
def test_edge_cases(model_name, method, params):
    compare(model_name, method, **params)


NOTHING_DROPPED = [("evit", 0.97), ("evit", 1.0), ("topk", 0.97)]


@pytest.mark.parametrize(("method", "keep_rate"), NOTHING_DROPPED)
def test_evit_nothing_dropped(method, keep_rate):
    """keep = ceil(k * (N - 1)) = N - 1: no token dropped, no fused token, the tokens in their original order
    (EViT's own code returns them untouched), same logits and token counts."""
    ref = compare("p16", method, keep_rate=keep_rate)
    assert ref["tokens_out"] == ref["tokens_in"]


@pytest.mark.parametrize(("method", "keep_rate"), NOTHING_DROPPED)
def test_evit_nothing_dropped_keeps_token_order(method, keep_rate):
    """When keep = N - 1 there is nothing to drop: like EViT's own code, the layer returns the tokens
    untouched (not re-sorted by attention). Logits are the same either way (test above)."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval()
    model = bench.apply(vit, method, track_source=True, keep_rate=keep_rate)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    source = bench.forward_stats(model).source
    assert torch.equal(source, torch.eye(17).expand(2, -1, -1))


FP32_CASES = [
    ("tome", {"r": 3}),
    ("ppt", {"r": 8, "threshold": None}),
    ("pooling", {"r": 8}),
    ("pruning", {"r": 8}),
    ("evit", {"keep_rate": 0.7}),
    ("topk", {"keep_rate": 0.5}),
]


@pytest.mark.parametrize(("method", "params"), FP32_CASES, ids=[f"{a}-{p}" for a, p in FP32_CASES])
def test_fp32_within_spec_tolerance(method, params):
    """The project's fp32 forward agrees with the float64 reference to the spec's 1e-4."""
    vit64 = get_model("p8")
    images64 = get_images()
    if params.get("threshold", 0) is None:
        params = {**params, "threshold": mixed_threshold(vit64, images64, 3, r=params["r"])}
    ref = reference_tokens(vit64, images64, method, **params)
    vit32 = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10,
                                       patch_size=8), seed=0)
    vit32.load_state_dict({k: v.float() for k, v in vit64.state_dict().items()})
    logits, info = run_project(vit32.eval(), images64.float(), method, **params)
    assert logits.dtype == torch.float32
    diff = (logits.double() - ref["logits"]).abs().max().item()
    assert diff <= ATOL, f"fp32 {method} {params}: max abs logit diff {diff:.3e}"
    assert list(info.tokens_out) == ref["tokens_out"]


BACKBONE_CASES = [
    ("reg", "tome", {"r": 5}),
    ("reg", "ppt", {"r": 8, "threshold": None}),
    ("reg", "pruning", {"r": 8}),
    ("reg", "pooling", {"r": 8}),
    ("reg", "evit", {"keep_rate": 0.6}),
    ("reg", "topk", {"keep_rate": 0.6}),
    ("gap", "tome", {"r": 5}),
    ("gap", "tome", {"r": 3, "inflection": -1}),
    ("gap", "pooling", {"r": 10, "layers": [1, 5]}),
]


@pytest.mark.parametrize(("model_name", "method", "params"), BACKBONE_CASES,
                         ids=[f"{a}-{m}-{p}" for a, m, p in BACKBONE_CASES])
def test_register_and_average_pool_backbones(model_name, method, params):
    """Register tokens are protected like the class token; without a class token the head pools the merged
    tokens weighted by their size. Logits, counts and token order agree with the reference."""
    vit = get_model(model_name)
    if params.get("threshold", 0) is None:
        params = {**params, "threshold": mixed_threshold(vit, get_images(), 3, r=params["r"])}
    ref = compare(model_name, method, **params)
    assert ref["tokens_out"][-1] < ref["tokens_in"][0]
    prefix = get_model(model_name).num_prefix_tokens
    assert prefix == (5 if model_name == "reg" else 0)
    # the prefix tokens come out first, each standing for itself only
    assert torch.equal(ref["source"][:, :prefix, :prefix], torch.eye(prefix, dtype=torch.bool).expand(BATCH, -1, -1))
    assert not ref["source"][:, :prefix, prefix:].any()
