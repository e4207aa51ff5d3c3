"""ATS (Adaptive Token Sampling): the project against the naive per-image reference (tests/reference_ats.py),
ragged batches (each image as if alone, padded slots inert), token order (ascending significance), the sampling
rule on hand-worked scores, MACs on DeiT-S geometry, the budget knob."""

import pytest
import timm
import torch

import bench
import methods
from bench.attention import attention, key_bias
from methods.ats import keep_picked, sample_positions
from methods.base import PPT_SCORE, ReductionContext, TokenState
from tests.helpers import images, small_vit
from tests.reference_ats import reference_ats, sample

# Project vs reference in float64. The harness's policy attention computes the logits in float32 while the reference
# (like the authors' code run in float64) computes them in float64 and switches to float32 at the exponential: the
# same choices, logits within ~1e-6 (exactly equal when both use the same numerics, see the report).
TOLERANCE = 1e-5


def _perturb(vit: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Sharpen attention and randomise the norms and the prefix tokens, so that scores are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight.mul_(3).add_(0.02 * torch.randn(block.attn.qkv.weight.shape, generator=g))
            for norm in (block.norm1, block.norm2):
                norm.weight.add_(0.3 * torch.randn(norm.weight.shape, generator=g))
                norm.bias.add_(0.1 * torch.randn(norm.bias.shape, generator=g))
        vit.cls_token.add_(0.5 * torch.randn(vit.cls_token.shape, generator=g))
        if getattr(vit, "dist_token", None) is not None:
            vit.dist_token.add_(0.5 * torch.randn(vit.dist_token.shape, generator=g))
    return vit


def _model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {"pretrained": False, "img_size": 64, "patch_size": 8, "num_classes": 10, **kwargs}
    return _perturb(timm.create_model(name, **kwargs), seed).eval().double()


def _origin(info, b: int) -> list[int]:
    """Original index of every real output token of image b (pruning: one source each), in output order."""
    real = info.mask[b]
    assert torch.equal(real, torch.arange(real.shape[0]) < real.sum()), "real tokens come first"
    source = info.source[b, : int(real.sum())]
    assert torch.equal(source.sum(dim=-1), torch.ones(source.shape[0], dtype=source.dtype))
    return source.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    ("name", "layers"),
    [
        ("vit_small_patch16_224", None),
        ("deit_tiny_patch16_224", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
        ("deit_tiny_patch16_224", [5, 9]),
        ("deit_tiny_distilled_patch16_224", None),
    ],
)
def test_matches_the_reference_image_by_image(name, layers):
    vit = _model(name, seed=len(name) + len(layers or []))
    x = images(4).double()
    params = {} if layers is None else {"layers": layers}
    model = bench.apply(vit, "ats", track_source=True, **params)
    with torch.no_grad():
        logits = model(x)
    info = bench.forward_stats(model)
    references = reference_ats(vit, x, layers)
    for b, ref in enumerate(references):
        assert (logits[b] - ref["logits"]).abs().max() < TOLERANCE, b
        assert _origin(info, b) == ref["origin"], b  # same tokens kept, in the same order (prefix first)
    ats_layers = sorted(info.stats)
    assert ats_layers == (layers or list(range(3, 12)))
    for layer in ats_layers:  # per-image kept counts, averaged over the batch
        expected = sum(ref["tokens_mlp"][layer] for ref in references) / len(references)
        assert float(info.stats[layer]["kept_mean"]) == pytest.approx(expected, abs=1e-6)
    with torch.no_grad():  # one image alone: the harness's counts are that image's own
        model(x[:1])
    alone = bench.forward_stats(model)
    assert alone.tokens_attn == references[0]["tokens_attn"]
    assert alone.tokens_mlp == references[0]["tokens_mlp"]
    assert all(alone.tokens_mlp[i] < alone.tokens_attn[i] for i in ats_layers)  # every ATS block reduced


def test_deit_s_geometry_matches_the_reference():
    vit = _perturb(timm.create_model("deit_small_patch16_224", pretrained=False), seed=3).eval().double()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4)).double()
    model = bench.apply(vit, "ats")
    with torch.no_grad():
        logits = model(x)
    info = bench.forward_stats(model)
    (ref,) = reference_ats(vit, x)
    assert (logits[0] - ref["logits"]).abs().max() < TOLERANCE
    assert info.tokens_attn == ref["tokens_attn"] and info.tokens_mlp == ref["tokens_mlp"]
    assert info.tokens_mlp[:3] == [197, 197, 197] and info.tokens_mlp[3] < 197
    # every ATS block drops at least one patch token
    assert all(info.tokens_mlp[i] < info.tokens_attn[i] for i in range(3, 12))


def test_image_alone_equals_image_in_a_ragged_batch():
    vit = small_vit()
    model = bench.apply(vit, "ats")
    x = images(6)
    counts = []
    with torch.no_grad():
        together = model(x)
        kept = [float(s["kept_mean"]) for s in bench.forward_stats(model).stats.values()]
        alone = []
        for i in range(6):
            alone.append(model(x[i : i + 1]))
            counts.append(bench.forward_stats(model).tokens_mlp)
        reordered = model(x.flip(0)).flip(0)
    alone = torch.cat(alone)
    assert len({tuple(c) for c in counts}) == 6, "the images must keep different counts (a ragged batch)"
    assert (together - alone).abs().max() <= 1e-5
    assert (together - reordered).abs().max() <= 1e-5
    assert kept == pytest.approx([sum(c[layer] for c in counts) / 6 for layer in range(3, 12)])


def test_padded_slots_never_influence_real_tokens():
    vit = _model("deit_tiny_patch16_224")
    block = vit.blocks[4]
    ctx = ReductionContext(depth=12, num_prefix=1, num_tokens=65)
    method = methods.build("ats")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 20, vit.embed_dim, generator=g, dtype=torch.float64)
    mask = torch.arange(20)[None, :] < torch.tensor([[20], [14], [6]])

    def reduced(fill: torch.Tensor):
        state = x.masked_fill(~mask[..., None], 0.0) + fill * (~mask[..., None])
        out, signals = attention(block.attn, block.norm1(state), key_bias(None, mask), frozenset({PPT_SCORE}), 1,
                                 "policy", mask)
        tokens, _ = method.reduce(4, TokenState(x=state + out, mask=mask), signals, ctx)
        return tokens

    zeros = reduced(torch.zeros(()))
    garbage = reduced(1e3 * torch.randn(x.shape, generator=g, dtype=torch.float64))
    assert torch.equal(zeros.mask, garbage.mask)
    assert torch.equal(zeros.x, garbage.x)  # padded slots of the output are zeros in both
    assert torch.equal(zeros.x[~zeros.mask], torch.zeros_like(zeros.x[~zeros.mask]))
    assert zeros.mask.sum(dim=1).tolist() != [zeros.mask.shape[1]] * 3  # ragged output too
    for b, n in enumerate((20, 14, 6)):  # and each image equals itself alone, without padding
        out, signals = attention(block.attn, block.norm1(x[b : b + 1, :n]), None, frozenset({PPT_SCORE}), 1, "policy")
        alone, _ = method.reduce(4, TokenState(x=x[b : b + 1, :n] + out), signals, ctx)
        kept = int(zeros.mask[b].sum())
        assert alone.x.shape[1] == kept
        assert (alone.x[0] - zeros.x[b, :kept]).abs().max() < 1e-6


def test_kept_patches_are_in_ascending_significance():
    vit = _model("vit_small_patch16_224", seed=2)
    model = bench.apply(vit, "ats", track_source=True)
    seen = []
    reduce = model.method.reduce

    def recording_reduce(layer, tokens, signals, ctx):
        out, stats = reduce(layer, tokens, signals, ctx)
        # copies: the harness rebinds the state's x after the MLP
        seen.append((signals[PPT_SCORE], TokenState(tokens.x, source=tokens.source, mask=tokens.mask),
                     TokenState(out.x, source=out.source, mask=out.mask)))
        return out, stats

    model.method.reduce = recording_reduce  # an instance attribute of this test's method only
    with torch.no_grad():
        model(images(3).double())
    assert len(seen) == 9
    for scores, before, after in seen:
        for b in range(3):
            real_before = int(before.mask[b].sum()) if before.mask is not None else before.x.shape[1]
            position = {int(before.source[b, i].argmax()): i for i in range(1, real_before)}
            kept = [position[int(after.source[b, i].argmax())] for i in range(1, int(after.mask[b].sum()))]
            kept_scores = [float(scores[b, i - 1]) for i in kept]
            assert kept_scores == sorted(kept_scores) and len(set(kept)) == len(kept)
            assert 0 < len(kept) < real_before - 1  # the least significant patch is always dropped
            least = min(range(1, real_before), key=lambda i: float(scores[b, i - 1]))
            assert least not in kept
            assert torch.equal(after.x[b, 1 : len(kept) + 1], before.x[b, kept])


def test_sampling_on_hand_worked_scores():
    # Patches 0..4 with scores .30 .05 .40 .10 .15: ascending order 1, 3, 4, 0, 2; G = 0, .105, .263, .579, 1.
    # K = 3 points: y = .105, .553, 1 pick sorted positions 1, 3, 4, i.e. patches 3, 0, 2 (most significant last).
    # Image 2 has two real patches (the reference's duplicate removal drops its lone pick), image 3 one.
    scores = torch.tensor([[0.30, 0.05, 0.40, 0.10, 0.15], [0.7, 0.3, 0, 0, 0], [1.0, 0, 0, 0, 0]])
    real = torch.arange(5)[None, :] < torch.tensor([[5], [2], [1]])
    picked, order = sample_positions(scores, real, 3)
    assert picked.tolist()[0] == [False, True, False, True, True]
    assert not picked[1:].any()
    x = torch.arange(6, dtype=torch.float64)[None, :, None].expand(3, 6, 2)  # token i holds the value i
    tokens = keep_picked(TokenState(x=x), picked, order, num_prefix=1)
    assert tokens.x[0, :, 0].tolist() == [0, 4, 1, 3]  # class token, then patches 3, 0, 2 (+1 for the class)
    assert tokens.mask.tolist() == [[True] * 4, [True, False, False, False], [True, False, False, False]]
    assert tokens.x[1:, 1:].abs().sum() == 0


def test_sampling_equals_the_reference_on_random_scores():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        batch, width = 4, 40
        counts = torch.randint(1, width + 1, (batch,), generator=g)
        counts[0] = width
        sharpness = 10 * torch.rand(batch, 1, generator=g)
        raw = (sharpness * torch.randn(batch, width, generator=g, dtype=torch.float64)).exp()
        real = torch.arange(width)[None, :] < counts[:, None]
        raw = raw * real
        scores = raw / raw.sum(dim=1, keepdim=True)
        num_samples = 48
        picked, order = sample_positions(scores, real, num_samples)
        for b in range(batch):
            kept = [int(order[b, pos]) for pos in range(width) if picked[b, pos]]
            assert kept == sample(scores[b, : counts[b]].tolist(), num_samples), (trial, b)


def test_sample_points_follow_the_reference_order_of_operations():
    """Spec step 4: ``y_i = y0 + (u_i * (K-1) - y0 * i) / (K-1)`` with ``u = linspace(0, 1, K)`` in float32, "in this
    order of operations" (mathematically ``y0 + (1 - y0) i / (K-1)``). At K = 4, ``u_2 * 3`` is 2 - 1.2e-7 in float32,
    so y_2 lies 4e-8 below its exact value. Ten sorted scores with equal gaps g of G (y0 = g) put the midpoint of
    G_6 and G_7 2e-8 below the exact y_2: the reference's y_2 picks sorted position 6, the exact one 7. Random
    scores never come that close to a tie."""
    c = 2e-8
    g = (2 / 3 - c) / (6 + 1 / 6)  # G_m = m g for m <= 8, (G_6 + G_7) / 2 = exact y_2 - c
    scores = torch.tensor([[0.5 * g] + [g] * 8 + [1 - 8 * g]], dtype=torch.float64)  # ascending: position = index
    scores = scores / scores.sum()
    picked, order = sample_positions(scores, None, 4)
    kept = [int(order[0, pos]) for pos in range(10) if picked[0, pos]]
    assert kept == sample(scores[0].tolist(), 4) == [1, 4, 6, 9]  # y = g, ~0.405, ~0.703, 1


def test_policy_softmax_leaks_the_reference_epsilon():
    """The policy softmax ``p = (exp(l - max) + eps/n) / (sum exp(l - max) + eps)``, eps = 1e-6 (spec, ATS numerics).
    Its effect on real attention is ~1e-6 relative, below what the logit comparisons resolve; a key 200 below the
    row maximum (exp underflows to 0 in float32) receives the leak alone: (1e-6 / 2) / (1 + 1e-6), n = 2 real keys
    (with and without a padded third key, which gets exactly 0)."""
    from bench.attention import probabilities

    q = torch.ones(1, 1, 2, 1, dtype=torch.float64)
    k = torch.tensor([0.0, -200.0], dtype=torch.float64).view(1, 1, 2, 1)
    probs = probabilities(q, k, None, 1.0, "policy")
    expected = 0.5e-6 / (1 + 1e-6)
    assert probs[0, 0, :, 1].tolist() == pytest.approx([expected] * 2, rel=1e-6)
    assert probs[0, 0, :, 0].tolist() == pytest.approx([(1 + 0.5e-6) / (1 + 1e-6)] * 2, rel=1e-6)
    padded = torch.cat([k, torch.full((1, 1, 1, 1), 5.0, dtype=torch.float64)], dim=2)
    q3 = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    probs = probabilities(q3, padded, None, 1.0, "policy", mask=torch.tensor([[True, True, False]]))
    assert probs[0, 0, :, 1].tolist() == pytest.approx([expected] * 3, rel=1e-6)
    assert probs[0, 0, :, 2].tolist() == [0.0] * 3


def test_deit_s_macs_torchprofile_and_the_reference_formula():
    torch.manual_seed(0)
    vit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight.mul_(4)
    model = bench.apply(vit, "ats")
    image = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(3))
    counted = bench.count_macs(model, image=image)
    with torch.no_grad():
        model(image[None])
    info = bench.forward_stats(model)
    analytic = bench.analytic_macs(model, info.tokens_attn, info.tokens_mlp)
    assert abs(counted - analytic) / analytic < 0.01
    assert counted < 0.6 * bench.count_macs(bench.apply(vit, "baseline"))
    # The reference code computes attn @ V and the projection only for the kept rows; the harness computes every
    # row, (N - n)(N C + C^2) more per ATS block (docs/methods.md#ats): our count is the larger one.
    c = vit.embed_dim
    reference = bench.analytic_macs(vit)
    for n_attn, n_mlp in zip(info.tokens_attn[3:], info.tokens_mlp[3:], strict=True):
        reference -= 4 * 197 * c * c + 2 * 197**2 * c + 8 * 197 * c * c  # the dense block
        reference += 3 * n_attn * c * c + n_attn**2 * c + n_mlp * n_attn * c + n_mlp * c * c + 8 * n_mlp * c * c
    overhead = analytic - reference
    assert 0.02e9 < overhead < 0.05e9  # about 0.03 G on DeiT-S, over 1% of the total
    pairs = zip(info.tokens_attn[3:], info.tokens_mlp[3:], strict=True)
    assert overhead == sum((n - m) * (n * c + c * c) for n, m in pairs)


def test_parameters_and_budget_knob():
    method = methods.build("ats")
    assert method.params == {"layers": [3, 4, 5, 6, 7, 8, 9, 10, 11]}
    assert method.data_dependent and method.attention == "policy"
    assert method.budget_knob.name == "layers" and method.budget_knob.kind == "choice"
    ctx = ReductionContext(depth=12, num_prefix=1, num_tokens=197)
    choices = method.budget_choices(ctx)
    assert choices[0] == list(range(12)) and choices[3] == list(range(3, 12)) and choices[-1] == [11]
    assert len(choices) == 12
    assert methods.build("ats", layers=[9, 3, 6]).params["layers"] == [3, 6, 9]
    with pytest.raises(ValueError, match="include block 12"):
        bench.apply(small_vit(), "ats", layers=[3, 12])
    with pytest.raises(ValueError, match="unknown parameter 'num_tokens'; allowed: layers"):
        methods.build("ats", num_tokens=100)


def test_under_autocast_the_scores_stay_float32(monkeypatch):
    """docs/methods.md#ats: under autocast q, k and v come from half-precision projections, while the policy softmax
    and hence the scores the sampling reads stay float32 (not rounded to the half dtype)."""
    import methods.ats as ats

    seen = []

    def spy(scores, real, num_samples):
        seen.append(scores.dtype)
        return sample_positions(scores, real, num_samples)

    monkeypatch.setattr(ats, "sample_positions", spy)
    vit = _model("deit_tiny_patch16_224").float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bench.apply(vit, "ats", layers=[3, 6])(images(2, 64))
    assert seen == [torch.float32, torch.float32]
