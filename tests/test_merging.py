"""PiToMe, ToFu and DiffRate (fixed schedules) against the naive reference ``tests/reference_merging.py``, and the
spec's token schedules and MAC figures on real DeiT-Ti/S/B geometry (random weights: counts do not depend on them).

Reference comparisons run in float64 on small perturbed ViTs (``tests/test_reference.py``'s models): logits,
token counts per block, token order (via sources) and sizes. The authors' code itself was compared outside the
test suite (see the report of issue 12); these tests pin the semantics the spec states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import timm
import torch

import bench
import methods
from methods.base import ReductionContext
from methods.diffrate import SCHEDULES, published_targets
from methods.pitome import merged_count
from tests.reference_merging import reference_merging
from tests.test_reference import get_images, get_model

ATOL64 = 1e-8


def compare(model_name: str, method: str, check_order: bool = True, **params) -> dict:
    vit = get_model(model_name)
    images = get_images()
    ref = reference_merging(vit, images, method, **params)
    model = bench.apply(vit, method, track_source=True, **params)
    with torch.no_grad():
        logits = model(images)
    info = bench.forward_stats(model)
    diff = (logits - ref["logits"]).abs().max().item()
    assert diff <= ATOL64, f"{method} {params} on {model_name}: max abs logit diff {diff:.3e}"
    assert info.tokens_in == ref["tokens_in"] and info.tokens_mlp == ref["tokens_out"]
    assert info.tokens_out == info.tokens_mlp  # every reduction happens between the attention and the MLP
    assert ref["tokens_out"][-1] < ref["tokens_in"][0], "the case must reduce something"
    if method == "tofu":
        assert info.size is None  # ToFu has no sizes at all
    else:
        torch.testing.assert_close(info.size, ref["size"], rtol=0, atol=1e-10)
    got = info.source != 0
    if check_order:
        mismatch = (got != ref["source"]).any(dim=-1)
        assert not mismatch.any(), f"token order/sources differ at (image, token) {mismatch.nonzero().tolist()[:8]}"
    p = vit.num_prefix_tokens
    for t in range(p):  # prefix tokens untouched and first
        assert torch.equal(got[:, t], torch.nn.functional.one_hot(torch.tensor(t), got.shape[-1]).bool().expand(
            got.shape[0], -1))
    return ref


# ------------------------------------------------------------------------------------------ vs reference

RATIO_CASES = [
    ("p8", 0.9125),
    ("p8", 0.8),
    ("p8", 0.6),
    ("p8", 0.51),
    ("p16", 0.9),
    ("p16", 0.7),
    ("dist8", 0.9125),
    ("dist8", 0.6),
    ("dist16", 0.8),
    ("ls", 0.85),
    ("qkn", 0.75),
    ("gap", 0.8),  # no prefix token: ToFu's surviving A tokens keep their matching order
    ("reg", 0.51),  # class + 4 register tokens, N = 69: ToFu's cap (N - p) // 2 binds (33 -> 32)
]


@pytest.mark.parametrize("method", ["pitome", "tofu"])
@pytest.mark.parametrize(("model_name", "ratio"), RATIO_CASES, ids=[f"{m}-{r}" for m, r in RATIO_CASES])
def test_ratio_methods_match_the_reference(method, model_name, ratio):
    ref = compare(model_name, method, ratio=ratio)
    p = get_model(model_name).num_prefix_tokens
    for n_in, n_out in zip(ref["tokens_in"], ref["tokens_out"], strict=True):
        count = n_in - p if method == "pitome" else n_in  # PiToMe leaves the prefix out of T, ToFu does not
        r = merged_count(count, ratio)
        assert n_out == n_in - (min(r, (n_in - p) // 2) if method == "tofu" else max(r, 0))


DIFFRATE_CASES = [
    ("p8", [65, 60, 52, 52, 40, 38, 30, 30, 22, 20, 12, 6], [63, 56, 52, 44, 40, 33, 30, 25, 22, 15, 12, 3]),
    ("p8", [65] * 12, [40, 20, 10, 5, 3, 2, 2, 2, 2, 2, 2, 2]),  # merging only; 1-token groups at the end
    ("p8", [50, 40, 30, 20, 10, 8, 8, 8, 8, 8, 6, 4], [65] * 12),  # pruning only
    ("p8", [65, 65, 60, 70, 50, 50, 44, 44, 30, 30, 20, 20], [65, 62, 58, 66, 48, 50, 40, 47, 30, 25, 20, 10]),
    ("p16", [17, 15, 13, 13, 11, 9, 9, 7, 7, 5, 4, 3], [16, 14, 13, 11, 10, 9, 8, 7, 6, 5, 3, 2]),
    ("dist8", [66, 60, 52, 52, 40, 38, 30, 30, 22, 20, 12, 6], [63, 56, 52, 44, 40, 33, 30, 25, 22, 15, 12, 3]),
    ("ls", [65, 60, 52, 52, 40, 38, 30, 30, 22, 20, 12, 6], [63, 56, 52, 44, 40, 33, 30, 25, 22, 15, 12, 3]),
    ("qkn", [65, 60, 52, 52, 40, 38, 30, 30, 22, 20, 12, 6], [63, 56, 52, 44, 40, 33, 30, 25, 22, 15, 12, 3]),
]


@pytest.mark.parametrize(("model_name", "prune", "merge"), DIFFRATE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(DIFFRATE_CASES)])
def test_diffrate_matches_the_reference(model_name, prune, merge):
    ref = compare(model_name, "diffrate", prune_kept_num=prune, merge_kept_num=merge)
    n = ref["tokens_in"][0]
    for i, n_out in enumerate(ref["tokens_out"]):
        n = min(n, prune[i], merge[i])
        assert n_out == n
    covered = ref["source"].sum(dim=-1, keepdim=True).to(ref["size"].dtype)
    if merge != [65] * 12:  # similarity-weighted sizes: below the number of patches a merged token covers
        assert (ref["size"] < covered - 1e-6).any() and (ref["size"] > 1).any()
    else:  # pruning keeps sizes
        assert torch.equal(ref["size"], torch.ones_like(ref["size"]))


def test_diffrate_sizes_are_unclamped_and_negative_sizes_give_nan():
    """A destination's size grows by c_t s_t; a negative similarity lowers it. Below zero, log(size) is NaN in the
    next attention and the logits become NaN, exactly as in the reference code (no clamp at evaluation).
    Construction: blank images, one patch at +v, the 15 others at -v (positions dominate: cosines near -1
    across the groups). With one destination besides the class token (M = 2), the lone patch as destination gets
    size 1 - 15 * (~1) < 0; the same model with the signs swapped ranks another patch first (the class query is
    unchanged, the lone token's key flips), whose size is 1 + 14 - 1 > 0."""
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval().double()
    direction = torch.randn(vit.embed_dim, generator=torch.Generator().manual_seed(0)) * 20
    images = torch.zeros(2, 3, 64, 64, dtype=torch.float64)
    outcomes = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            vit.pos_embed.zero_()
            vit.pos_embed[0, 1] = sign * direction
            vit.pos_embed[0, 2:] = -sign * direction
        for merge in (2, 3):
            model = bench.apply(vit, "diffrate", prune_kept_num=[17] * 12, merge_kept_num=[merge] * 12)
            with torch.no_grad():
                logits = model(images)
            outcomes.append((merge, bench.forward_stats(model).size[0, 1:, 0].tolist(), bool(torch.isnan(logits).all()),
                             bool(torch.isfinite(logits).all())))
    negative = [o for o in outcomes if o[0] == 2 and o[1][0] < 0]
    assert len(negative) == 1, outcomes  # exactly one sign puts the lone patch first
    assert -14.5 < negative[0][1][0] < -13.5 and negative[0][2], outcomes
    positive = [o for o in outcomes if o[0] == 2 and o[1][0] > 0]
    assert 13 < positive[0][1][0] < 14.5 and positive[0][3], outcomes
    # a third destination takes the majority: every size positive, logits finite
    assert all(min(o[1]) > 0 and o[3] for o in outcomes if o[0] == 3), outcomes


def test_each_image_alone_equals_the_batch():
    vit = get_model("p8")
    images = get_images()
    for method, params in [("pitome", {"ratio": 0.8}), ("tofu", {"ratio": 0.8}),
                           ("diffrate", {"prune_kept_num": DIFFRATE_CASES[0][1], "merge_kept_num": DIFFRATE_CASES[0][2]})]:
        model = bench.apply(vit, method, **params)
        with torch.no_grad():
            together = model(images)
            alone = torch.cat([model(images[i : i + 1]) for i in range(images.shape[0])])
        assert (together - alone).abs().max() <= ATOL64, method


def test_counts_use_the_literal_float_form():
    """floor(T - T*ratio), not floor((1 - ratio) * T): they differ at T = 160, ratio 0.9 (16, not 15)."""
    assert merged_count(160, 0.9) == 16 and math.floor((1 - 0.9) * 160) == 15
    assert merged_count(196, 0.9125) == 17 and merged_count(197, 0.9125) == 17
    # PiToMe: T = 160 patch tokens (10 x 16); ToFu: N = 160 tokens (159 = 3 x 53 patches + class token)
    for method, size, first in (("pitome", (80, 128), 161), ("tofu", (24, 424), 160)):
        vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=8).eval()
        model = bench.apply(vit, method, ratio=0.9)
        with torch.no_grad():
            model(torch.randn(1, 3, *size))
        tokens = bench.forward_stats(model).tokens_in
        assert tokens[:2] == [first, first - 16], method


# ------------------------------------------------------------------------------------------ DeiT geometry

@pytest.fixture(scope="module")
def deit():
    """Random-init DeiT-Ti and DeiT-S (fp32, eval); MAC counts do not depend on weights."""
    torch.manual_seed(0)
    return {name: timm.create_model(f"deit_{name}_patch16_224", pretrained=False).eval() for name in ("tiny", "small")}


def _counts(vit, method, **params):
    model = bench.apply(vit, method, **params)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    return model, bench.forward_stats(model)


SCHEDULE_CASES = [
    ("pitome", [197, 180, 165, 151, 138, 127, 116, 106, 97, 89, 82, 75], 69),
    ("tofu", [197, 180, 165, 151, 138, 126, 115, 105, 96, 88, 81, 74], 68),
]


@pytest.mark.parametrize(("method", "tokens", "last"), SCHEDULE_CASES, ids=[c[0] for c in SCHEDULE_CASES])
def test_deit_s_token_schedule_at_the_default_ratio(deit, method, tokens, last):
    model, info = _counts(deit["small"], method)
    assert model.method.params["ratio"] == 0.9125
    assert info.tokens_in == tokens and info.tokens_out == [*tokens[1:], last]


# Analytic GMACs of the spec (DeiT-S / DeiT-Ti), without the methods' similarity work.
MAC_CASES = [
    ("pitome", 0.9, 2.60, 0.70), ("pitome", 0.9125, 2.76, 0.75), ("pitome", 0.925, 2.99, 0.81),
    ("pitome", 0.95, 3.44, 0.93), ("pitome", 0.975, 4.01, 1.09),
    ("tofu", 0.9, 2.59, 0.70), ("tofu", 0.9125, 2.75, 0.74), ("tofu", 0.925, 2.98, 0.80), ("tofu", 0.95, 3.44, 0.93),
]


@pytest.mark.parametrize(("method", "ratio", "small", "tiny"), MAC_CASES, ids=[f"{c[0]}-{c[1]}" for c in MAC_CASES])
def test_analytic_macs_match_the_spec(deit, method, ratio, small, tiny):
    for name, gmacs in (("small", small), ("tiny", tiny)):
        model, info = _counts(deit[name], method, ratio=ratio)
        analytic = bench.analytic_macs(model, info.tokens_attn, info.tokens_mlp) / 1e9
        assert abs(analytic - gmacs) / gmacs < 0.01, (name, analytic, gmacs)


def _similarity_macs(method: str, tokens: list[int], vit) -> int:
    """The matrix products a method adds to pick its merges (torchprofile counts them)."""
    head_dim = vit.embed_dim // vit.blocks[0].attn.num_heads
    if method == "pitome":  # T x T cosines of the patch tokens' keys
        return sum((n - 1) ** 2 * head_dim for n in tokens)
    if method == "tofu":  # ToMe's A x B cosines
        return sum(((n + 1) // 2) * (n // 2) * head_dim for n in tokens)
    raise ValueError(method)


@pytest.mark.parametrize("method", ["pitome", "tofu"])
def test_torchprofile_counts_blocks_plus_similarity(deit, method):
    vit = deit["small"]
    model, info = _counts(vit, method)
    counted = bench.count_macs(model)
    analytic = bench.analytic_macs(model, info.tokens_attn, info.tokens_mlp)
    similarity = _similarity_macs(method, info.tokens_in, vit)
    assert (0.01e9 < similarity < 0.02e9) if method == "pitome" else (0.002e9 < similarity < 0.005e9)  # PiToMe: ~0.015 G
    assert abs(counted - analytic - similarity) / counted < 0.001
    assert abs(counted - analytic) / counted < 0.01


# Analytic GFLOPs as DiffRate's own code counts them (calculate_flop_inference), printed by the reference code for
# each published schedule; the README gives DeiT-S 2.9 -> 2.905 and DeiT-B 11.5 -> 11.517.
DIFFRATE_GMACS = {
    (192, 0.6): 0.6549, (192, 0.7): 0.7266, (192, 0.8): 0.8088, (192, 0.9): 0.9021, (192, 1.0): 1.0036,
    (384, 2.3): 2.3272, (384, 2.5): 2.5047, (384, 2.7): 2.7092, (384, 2.9): 2.9053, (384, 3.1): 3.1080,
}


@pytest.mark.parametrize(("width", "target"), list(DIFFRATE_GMACS), ids=[f"{w}-{t}" for w, t in DIFFRATE_GMACS])
def test_diffrate_published_schedules(deit, width, target):
    vit = deit["tiny" if width == 192 else "small"]
    model, info = _counts(vit, "diffrate", target_flops=target)
    prune, merge = SCHEDULES[(width, target)]
    expected, n = [], 197
    for p_kept, m_kept in zip(prune, merge, strict=True):
        n = min(n, p_kept, m_kept)
        expected.append(n)
    assert info.tokens_mlp == expected
    analytic = bench.analytic_macs(model, info.tokens_attn, info.tokens_mlp) / 1e9
    assert abs(analytic - DIFFRATE_GMACS[(width, target)]) / DIFFRATE_GMACS[(width, target)] < 0.001


def test_diffrate_schedules_are_the_published_table():
    """``SCHEDULES`` is the spec's table (docs/methods.md#diffrate), entry by entry. The counts and MACs above see
    only ``min(P, M)``: a prune count above its block's merge count (DeiT-S 2.9, block 2: 190 > 176) decides which
    tokens are merged rather than dropped, so a slip there changed neither."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "methods.md").read_text()
    rows = re.findall(r"^\| DeiT-(Ti|S|B) ([0-9.]+) \| ([0-9 ]+) \| ([0-9 ]+) \|$", text, flags=re.M)
    widths = {"Ti": 192, "S": 384, "B": 768}
    table = {(widths[m], float(t)): (tuple(map(int, p.split())), tuple(map(int, q.split()))) for m, t, p, q in rows}
    assert len(table) == 15 and table == SCHEDULES


def test_diffrate_deit_s_default_torchprofile(deit):
    model, info = _counts(deit["small"], "diffrate")
    assert model.method.params["target_flops"] == 2.9
    counted = bench.count_macs(model)
    analytic = bench.analytic_macs(model, info.tokens_attn, info.tokens_mlp)
    assert abs(analytic / 1e9 - 2.905) / 2.905 < 0.01
    # plus the sources x destinations cosines over C at each merging block
    similarity = sum((p - m) * m * 384 for p, m in zip(info.tokens_in, info.tokens_mlp, strict=True) if m < p)
    assert abs(counted - analytic - similarity) / counted < 0.001


def test_diffrate_deit_b_readme_schedule():
    vit = timm.create_model("deit_base_patch16_224", pretrained=False).eval()
    model = bench.apply(vit, "diffrate", target_flops=11.5)
    analytic = bench.analytic_macs(model) / 1e9  # one forward on one image
    assert abs(analytic - 11.517) / 11.517 < 0.001
    assert bench.forward_stats(model).tokens_mlp == [197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3]


# ------------------------------------------------------------------------------------------ parameters

@dataclass(frozen=True)
class _WidthContext(ReductionContext):
    embed_dim: int = 0


def test_diffrate_budget_choices_are_the_model_s_published_targets():
    method = methods.build("diffrate")
    assert methods.registered()["diffrate"].budget_knob.kind == "choice"
    for width, expected in ((192, [0.6, 0.7, 0.8, 0.9, 1.0]), (384, [2.3, 2.5, 2.7, 2.9, 3.1]),
                            (768, [8.7, 10.0, 10.4, 11.5, 12.5])):
        assert method.budget_choices(_WidthContext(12, 1, 197, embed_dim=width)) == expected == published_targets(width)
    # the way out is a fixed entry: prune_kept_num / merge_kept_num beside a budget are refused (they replace the knob)
    with pytest.raises(ValueError, match="published schedules exist only for DeiT-Ti/S/B.* no budget to calibrate "
                                         r"\(a fixed schedule: prune_kept_num and merge_kept_num with target_flops: null"):
        method.budget_choices(_WidthContext(12, 1, 65, embed_dim=384))
    with pytest.raises(ValueError, match="width 512"):
        method.budget_choices(_WidthContext(12, 1, 197, embed_dim=512))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"target_flops": 2.8}, "'target_flops' must be a published DiffRate schedule (DeiT-Ti: 0.6, 0.7, 0.8, 0.9, 1.0;"),
        ({"prune_kept_num": [197] * 12}, "'prune_kept_num' and 'merge_kept_num' go together"),
        ({"prune_kept_num": [197] * 12, "merge_kept_num": [197] * 11}, "one entry per block each"),
        ({"prune_kept_num": [197, 0], "merge_kept_num": [197, 3]}, "'prune_kept_num' must be a non-empty list of token"),
    ],
)
def test_diffrate_invalid_parameters(params, message):
    with pytest.raises(ValueError) as error:
        methods.build("diffrate", **params)
    assert message in str(error.value)


def test_diffrate_explicit_lists_override_target_flops():
    method = methods.build("diffrate", target_flops=2.9, prune_kept_num=[65] * 12, merge_kept_num=[60] * 12)
    assert method.params == {"target_flops": None, "prune_kept_num": [65] * 12, "merge_kept_num": [60] * 12}


def test_diffrate_schedule_must_fit_the_model(deit):
    small_model = get_model("p8")
    with pytest.raises(ValueError, match="target_flops=2.9 selects a published schedule for DeiT-Ti/S/B"):
        bench.apply(small_model, "diffrate")
    with pytest.raises(ValueError, match="list 11 blocks, but the model has 12"):
        bench.apply(small_model, "diffrate", prune_kept_num=[65] * 11, merge_kept_num=[60] * 11)
    with pytest.raises(ValueError, match="include 2: every count must keep a patch token besides the 2 prefix"):
        bench.apply(get_model("dist8"), "diffrate", prune_kept_num=[66] * 12, merge_kept_num=[2] * 12)
    with pytest.raises(ValueError, match="target_flops=0.7 is a DeiT-Ti schedule, but the model is DeiT-S: allowed"):
        methods.build("diffrate", target_flops=0.7).check(_WidthContext(12, 1, 197, embed_dim=384))
    # a DeiT-S schedule on DeiT-Ti: refused when the method is attached (the context knows the width)
    with pytest.raises(ValueError, match="target_flops=2.9 is a DeiT-S schedule, but the model is DeiT-Ti: allowed"):
        bench.apply(deit["tiny"], "diffrate", target_flops=2.9)


def test_diffrate_published_schedule_refuses_images_of_another_size(deit):
    """A published schedule counts 197 tokens: images of another size (the harness embeds any multiple of the patch)
    give another count, which the schedule's absolute counts would silently cut (256 x 256: 257 tokens, 60 of them
    dropped at block 0, which no published schedule reduces)."""
    model = bench.apply(deit["tiny"], "diffrate", target_flops=0.7)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
        with pytest.raises(ValueError, match=r"target_flops=0.7 selects a published schedule for DeiT-Ti/S/B \(12 blocks, "
                                             r"197 tokens, one class token\); these images give 257 tokens \(16x16"):
            model(torch.randn(1, 3, 256, 256))
        # explicit lists are the user's counts: they run at any size
        explicit = bench.apply(deit["tiny"], "diffrate", prune_kept_num=[197] * 12, merge_kept_num=[150] * 12)
        explicit(torch.randn(1, 3, 256, 256))
    assert bench.forward_stats(explicit).tokens_mlp == [150] * 12


@pytest.mark.parametrize("method", ["pitome", "tofu"])
def test_ratio_is_checked(method):
    for bad in (0.5, 1.2, True, "0.9"):
        with pytest.raises(ValueError, match=r"'ratio' must be a number in \(0.5, 1\]"):
            methods.build(method, ratio=bad)
    knob = methods.registered()[method].budget_knob
    assert (knob.name, knob.kind, knob.cheaper, knob.low, knob.high) == ("ratio", "float", "lower", 0.5, 1.0)
    model = bench.apply(get_model("p8"), method, ratio=1)
    with torch.no_grad():
        model(get_images(2))
    assert bench.forward_stats(model).tokens_out == [65] * 12


def test_pitome_first_half_keeps_unmerged_a_tokens_in_descending_match_order():
    """Spec step 5: at a block i < ceil(L/2) the A tokens that stay come in descending order of their best match,
    "not re-sorted by position". The model-level comparisons cannot see that order: every later PiToMe block ranks
    its tokens by energy, whatever their order, so a re-sort by position there left the logits and the final token
    order unchanged. Pinned on one block against the reference step, token by token."""
    from methods.base import TokenState
    from tests.reference_merging import pitome_step

    gen = torch.Generator().manual_seed(11)
    p, patches, dim = 1, 24, 8
    x = torch.randn(1, p + patches, dim, generator=gen, dtype=torch.float64)
    metric = torch.randn(1, p + patches, dim, generator=gen, dtype=torch.float64)
    ctx = ReductionContext(depth=12, num_prefix=p, num_tokens=p + patches)
    method = methods.build("pitome", ratio=0.8)  # r = floor(24 - 19.2) = 4 of 12 A tokens merge, 8 stay
    got, _ = method.reduce(0, TokenState(x=x.clone()), {"metric": metric}, ctx)
    sources = [{t} for t in range(p + patches)]
    tokens, sizes, _ = pitome_step(list(x[0]), [1.0] * (p + patches), sources, metric[0], 0, 12, 0.8, p)
    assert got.x.shape[1] == len(tokens) == p + patches - 4
    torch.testing.assert_close(got.x[0], torch.stack(tokens), rtol=0, atol=1e-12)
    assert got.size[0, :, 0].tolist() == sizes
