"""MAC counts against the published references (DeiT-S, torchprofile, one 224x224 image) and the
analytic cross-check; the throughput function's protocol fields."""

import pytest
import timm
import torch

import bench
import methods
from methods.base import CLS_ATTN


@pytest.fixture(scope="module")
def deit_s():
    # MACs do not depend on weights: a random-init DeiT-S, nothing downloaded.
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


REFERENCES = [
    ("baseline", {}, 4.60),
    ("tome", {"r": 13}, 2.71),
    ("ppt", {"r": 50, "layers": [3, 6, 9], "threshold": 7e-5}, 2.945),
    ("pruning", {"r": 50}, 2.945),
    ("pooling", {"r": 50}, 2.945),
    ("evit", {"keep_rate": 0.7}, 3.03),
]


@pytest.mark.parametrize(("method", "params", "gmacs"), REFERENCES, ids=[r[0] for r in REFERENCES])
def test_deit_s_macs_match_the_published_counts(deit_s, method, params, gmacs):
    macs = bench.count_macs(bench.apply(deit_s, method, **params))
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.01


@pytest.mark.parametrize("method", methods.names())
def test_analytic_count_agrees_with_torchprofile(deit_s, method):
    model = bench.apply(deit_s, method, **methods.registered()[method].paper_params)
    counted = bench.count_macs(model)
    info = bench.forward_stats(model)
    analytic = bench.analytic_macs(model, info)
    assert abs(analytic - counted) / counted < 0.01
    assert analytic == bench.analytic_macs(model)  # without counts: those of a forward on one image


def test_plain_timm_model_counts_like_the_baseline(deit_s):
    assert bench.count_macs(deit_s) == bench.count_macs(bench.apply(deit_s, "baseline"))
    assert bench.analytic_macs(deit_s) == bench.analytic_macs(bench.apply(deit_s, "baseline"))


@pytest.mark.parametrize("count", [bench.count_macs, bench.analytic_macs], ids=["count_macs", "analytic_macs"])
def test_counting_leaves_an_eval_model_in_eval_mode(count):
    """README's order: a forward, then the counts, then more forwards. The wrapper of an eval ViT said it was
    training, so the counters put the shared ViT back into training mode: drop path (and a hybrid's BatchNorm)
    then changed every later forward, ToMe's logits by 0.4 on DeiT-Ti with drop_path_rate 0.1."""
    from tests.helpers import images, small_vit

    vit = small_vit(drop_path_rate=0.5)
    model = bench.apply(vit, "tome", r=4)
    x = images(2)
    with torch.no_grad():
        before = model(x)
        count(model)
        assert not vit.training and not model.training
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("count", [bench.count_macs, bench.analytic_macs], ids=["count_macs", "analytic_macs"])
def test_counting_restores_each_modules_own_mode(count):
    """A model in training mode with one part frozen in eval mode (a frozen block, frozen BatchNorm) comes back as it
    was: ``model.train(was_training)`` after the count had put the frozen part into training mode too."""
    from tests.helpers import small_vit

    model = bench.apply(small_vit(drop_path_rate=0.5), "tome", r=4).train()
    model.vit.blocks[0].eval()
    count(model)
    modes = {name: module.training for name, module in model.named_modules()}
    assert [name for name, training in modes.items() if not training] == [
        name for name, _ in model.named_modules() if name.startswith("vit.blocks.0")]
    assert modes[""] and modes["vit.blocks.1.drop_path1"]


@pytest.mark.parametrize(("name", "reducing"), [
    # a SwiGLU MLP (DINOv2-g, TIPSv2: SwiGLUPacked; AIMv2: SwiGLU) has three linear layers of the hidden width, not
    # fc1 and fc2: the formula read 2 N C x fc1's width (19 % above torchprofile for the packed one) and failed on
    # AIMv2's, which has no fc1 (the macs stage and MAC budgets with it)
    ("vit_giant_patch14_dinov2", ("tome", {"r": 4})), ("aimv2_large_patch14_224", ("tome", {"r": 4})),
    # an attention-pool head (global_pool='map') projects keys and values of every output token: 1.4 % of
    # SigLIP-B/16's MACs, which the formula left out (its dense model and resize run there)
    ("vit_base_patch16_siglip_224", ("resize", {"img_size": 48})), ("test_vit3", ("resize", {"img_size": 48})),
], ids=["swiglu-packed", "swiglu", "attention-pool", "attention-pool-with-prefix"])
def test_analytic_count_of_mlps_and_heads_beyond_vits_agrees_with_torchprofile(name, reducing):
    vit = timm.create_model(name, pretrained=False, img_size=64, patch_size=8, embed_dim=96, num_heads=3, depth=4,
                            num_classes=10).eval()
    for method, params in (("baseline", {}), reducing):
        model = bench.apply(vit, method, **params)
        counted = bench.count_macs(model)
        assert abs(bench.analytic_macs(model) - counted) / counted < 0.01, (method, bench.analytic_macs(model), counted)


@pytest.mark.parametrize("name", ["vitamin_small_224", "vit_tiny_r_s16_p8_224"], ids=["no-projection", "projection"])
def test_analytic_count_of_a_hybrid_is_the_counters_without_its_backbone(name):
    """A hybrid ViT's CNN backbone is not in the formula (documented), its projection is, where it has one: ViTamin
    and MCi embed the backbone's features as they are (an Identity projection), where the formula read the
    projection's channels and failed (the macs stage and MAC budgets with it)."""
    import warnings

    from torchprofile import profile_macs

    vit = timm.create_model(name, pretrained=False, img_size=64, depth=2, num_classes=10).eval()
    model = bench.apply(vit, "tome", r=2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # ops without MACs (pad, ceil)
        backbone = profile_macs(vit.patch_embed.backbone, bench.count_image(model)[None])
    blocks = bench.count_macs(model) - backbone
    assert abs(bench.analytic_macs(model) - blocks) / blocks < 0.01


def test_counts_do_not_depend_on_the_attention_kernel():
    """Written out (``sdpa_backend: explicit``), the attention's ``* scale`` would add B x H x N^2 MACs per block;
    the count is the SDPA one: the quickstart's model (50 tokens, 96 wide, 3 heads, MLP 384, 8 blocks) by hand."""
    from bench.sdpa import sdpa_backend

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1,
                            num_classes=10, embed_dim=96, depth=8, num_heads=3).eval()
    tokens, width = 50, 96
    block = (2 * tokens * width  # two layer norms (torchprofile: one MAC per element)
             + tokens * width * 3 * width + 2 * 3 * tokens * tokens * 32  # qkv; q k^T and attention @ v
             + tokens * width * width + 2 * tokens * width * 4 * width)  # projection; MLP
    dense = 49 * 16 * width + 8 * block + tokens * width + width * 10  # patches, blocks, final norm, head
    for method, params in (("baseline", {}), ("tome", {"r": 3})):
        model = bench.apply(vit, method, **params)
        with sdpa_backend("explicit"):
            explicit = bench.count_macs(model)
        assert explicit == bench.count_macs(model)
    assert bench.count_macs(bench.apply(vit, "baseline")) == dense == 48_234_624


def test_analytic_count_of_dense_models_with_each_kind_of_head_by_hand():
    """The formula's every term, exactly (the cross-checks against torchprofile allow 1 %, which a dropped head
    (0.002 % of DeiT-S) or attention term of a small model passes): patch projection 49 x 96 x (1 x 4 x 4), per block
    4 N C^2 (qkv, projection) + 2 N^2 C (q k^T, attention @ v) + 8 N C^2 (MLP 4C), and the head C x 10; a distilled
    DeiT (two prefix tokens) adds its distillation head, SigLIP its attention pool (``global_pool='map'``)."""
    width, patches = 96, 49
    kwargs = {"pretrained": False, "img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10,
              "embed_dim": width, "num_heads": 3}

    def block(tokens):
        return 4 * tokens * width**2 + 2 * tokens**2 * width + 8 * tokens * width**2

    plain = timm.create_model("vit_tiny_patch16_224", depth=8, **kwargs).eval()
    assert bench.analytic_macs(bench.apply(plain, "baseline")) == patches * 96 * 16 + 8 * block(50) + width * 10
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", depth=2, **kwargs).eval()
    assert bench.analytic_macs(distilled) == patches * 96 * 16 + 2 * block(51) + 2 * width * 10
    # SigLIP's attention-pool head over the 49 patch tokens (no prefix), one latent: keys and values 49 x C x 2C, the
    # latent's q k^T and attention @ v 1 x 49 x 2C, its q, projection and MLP 1 x (C^2 + C^2 + 8 C^2)
    siglip = timm.create_model("vit_base_patch16_siglip_224", depth=2, **kwargs).eval()
    pool = patches * width * 2 * width + patches * 2 * width + 10 * width**2
    assert bench.analytic_macs(siglip) == patches * 96 * 16 + 2 * block(49) + pool + width * 10


def test_counts_do_not_depend_on_weights():
    a = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64)
    torch.manual_seed(5)
    b = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64)
    assert bench.count_macs(bench.apply(a, "tome", r=3)) == bench.count_macs(bench.apply(b, "tome", r=3))


class _AboveUniform(methods.Method):
    """Test-only method (not registered) whose token count depends on the image: at block 1 keep the patch
    tokens whose class attention is above the mean of the patches' (``keep`` fixes that count instead, with
    the same operations traced). A count that depends on the image needs its value on the host: fine here,
    the MACs are traced one image at a time."""

    defaults = {"keep": None}
    data_dependent = True

    def signals(self, layer, ctx):
        return frozenset({CLS_ATTN}) if layer == 1 else frozenset()

    def reduce(self, layer, tokens, signals, ctx):
        patches = signals[CLS_ATTN][:, ctx.num_prefix :]
        above = (patches > patches.mean(dim=1, keepdim=True)).sum(dim=1).amin()
        keep = int(above) if self.params["keep"] is None else self.params["keep"]
        top = patches.topk(keep, dim=1).indices + ctx.num_prefix
        prefix = torch.arange(ctx.num_prefix, device=top.device).expand(top.shape[0], -1)
        return tokens.gather(torch.cat([prefix, top], dim=1)), None


def test_data_averaged_macs_is_the_mean_of_single_image_counts():
    torch.manual_seed(0)  # random weights, but the same ones whatever ran before
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10).eval()
    model = bench.apply(vit, _AboveUniform())
    images = [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    kept = []
    for image in images:
        with torch.no_grad():
            model(image[None])
        kept.append(bench.forward_stats(model).tokens_out[1])
    assert len(set(kept)) > 1  # the images keep different numbers of tokens

    # Each image costs what the same model with that image's count fixed costs, whatever it is fed.
    fixed = {n: bench.count_macs(bench.apply(vit, _AboveUniform(keep=n - 1))) for n in set(kept)}
    expected = [fixed[n] for n in kept]
    assert [bench.count_macs(model, image=image) for image in images] == expected

    averaged = bench.data_macs(model, images)
    assert averaged == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    assert any(averaged != count for count in expected)  # a mean, not one image's count
    with pytest.raises(ValueError, match="at least one image"):
        bench.data_macs(model, [])


def test_throughput_records_the_protocol():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    model = bench.apply(vit, "tome", r=2)
    batch = torch.randn(4, 3, 32, 32)
    result = bench.measure_throughput(model, batch, dtype="bf16", warmup=1, runs=3)
    assert result.batch_size == 4 and result.dtype == "bf16" and result.device == "cpu"
    assert result.threads == torch.get_num_threads() and len(result.times_s) == 3 and result.warmup == 1
    median = sorted(result.times_s)[1]
    assert result.images_per_s == pytest.approx(4 / median)
    assert not model.training
    measured, dense = bench.compare_throughput(model, bench.apply(vit, "baseline"), batch, runs=3, warmup=1)
    assert len(measured.times_s) == len(dense.times_s) == 3
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        bench.measure_throughput(model, batch, dtype="fp8")


def test_the_macs_stage_records_the_clustering_distances_of_the_tokens_entering_each_clustering_layer(tmp_path):
    """DPC-KNN clusters at the start of blocks 1 and 2 of the 4-block test model (49 patches, 32 wide): its cdist
    costs Np^2 x C for the Np patch tokens *entering* each of those blocks, 49 and then 24 (keep_rate 0.5), so the
    record's ``macs.extra`` is (49^2 + 24^2) x 32, and the leaderboard CSV's ``gmacs_extra`` that / 1e9 (the tokens
    leaving those blocks, 24 and 12, would give another number)."""
    import pandas as pd

    from bench.pipeline.records import read_all
    from tests.test_pipeline import bench_main, config, write

    cfg = config(tmp_path, stages=["macs"], grid={"methods": [{"method": "dpcknn", "keep_rate": 0.5, "layers": [1, 2]}]})
    assert bench_main(write(tmp_path, cfg), tmp_path / "results") == 0
    (record,), _ = read_all(tmp_path / "results")
    assert record["tokens_per_layer"]["in"] == [50, 50, 25, 13]  # class token + patches
    assert record["metrics"]["macs"]["extra"] == (49**2 + 24**2) * 32
    csv = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    assert csv["gmacs_extra"].tolist() == pytest.approx([(49**2 + 24**2) * 32 / 1e9])
