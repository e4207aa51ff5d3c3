"""The block loop's reduction points (START / MID / END), the full-attention signals, padding masks, the
attention-probabilities override and size-weighted average pooling, each checked against timm's own blocks
run by hand (toy methods defined here, not registered)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench
from methods.base import ATTN, END, MID, PREV_ATTN, START, Method, Step, TokenState
from tests.helpers import images, small_vit
from tests.reference_impl import explicit_attention
from tests.test_harness import SETTINGS


class KeepFirst(Method):
    """Keeps the first ``keep`` tokens at ``point`` of block ``layer``; records the signals it was given."""

    name = "keep-first"
    defaults = {"layer": 2, "keep": 20, "point": MID, "signals": frozenset()}

    def step(self, layer, ctx):
        return Step(self.params["point"], self.params["signals"]) if layer == self.params["layer"] else None

    def reduce(self, layer, tokens, signals, ctx):
        ctx.scratch.setdefault("signals", []).append(signals)
        index = torch.arange(self.params["keep"]).expand(tokens.x.shape[0], -1)
        return tokens.gather(index), None


def manual(vit, x, layer, keep, point):
    """timm's own blocks, keeping the first ``keep`` tokens at ``point`` of block ``layer``."""
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for i, block in enumerate(vit.blocks):
        if i == layer and point == START:
            h = h[:, :keep]
        h = h + block.ls1(block.attn(block.norm1(h)))
        if i == layer and point == MID:
            h = h[:, :keep]
        h = h + block.ls2(block.mlp(block.norm2(h)))
        if i == layer and point == END:
            h = h[:, :keep]
    return vit.forward_head(vit.norm(h))


@pytest.mark.parametrize("point", [START, MID, END])
def test_each_reduction_point_is_where_it_says(point):
    vit, x = small_vit(init_values=0.1), images(3)
    model = bench.apply(vit, KeepFirst(point=point))
    with torch.no_grad():
        got = model(x)
        expected = manual(vit, x, 2, 20, point)
        other = manual(vit, x, 2, 20, MID if point == START else START)
    assert (got - expected).abs().max() < 1e-5
    # before the attention the kept tokens see fewer keys; MID and END differ only in the MLP's token count
    # (the MLP is per token), which the counts below tell apart
    assert (got - other).abs().max() > 1e-3
    info = bench.forward_stats(model)
    assert info.tokens_in[2] == 65 and info.tokens_in[3] == 20
    assert info.tokens_attn[2] == (20 if point == START else 65)
    assert info.tokens_mlp[2] == (65 if point == END else 20)
    assert info.tokens_out[2] == 20


def test_attn_signal_is_the_blocks_post_softmax_attention():
    """At MID, ATTN is the attention the block used (the explicit path gives the same output as SDPA)."""
    vit, x = small_vit(qk_norm=True), images(2)
    seen = []

    class Spy(KeepFirst):
        def reduce(self, layer, tokens, signals, ctx):
            seen.append(signals[ATTN])
            return tokens, None

    with torch.no_grad():
        logits = bench.apply(vit, Spy(layer=1, point=MID, signals=frozenset({ATTN})))(x)
        dense = vit(x)
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        h = vit.blocks[0](h)
        expected = torch.stack([explicit_attention(vit.blocks[1].attn, vit.blocks[1].norm1(h[i]), None)[1]
                                for i in range(2)])
    assert seen[0].shape == (2, vit.blocks[1].attn.num_heads, 65, 65)
    assert (seen[0] - expected).abs().max() < 1e-5
    assert (logits - dense).abs().max() < 1e-4  # explicit attention at block 1 changes nothing else


def test_start_attn_is_computed_on_the_unreduced_tokens_and_prev_attn_is_the_previous_block():
    vit, x = small_vit(), images(2)
    seen = {}

    class Spy(KeepFirst):
        def reduce(self, layer, tokens, signals, ctx):
            seen[layer] = dict(signals)
            return super().reduce(layer, tokens, signals, ctx)

    with torch.no_grad():
        bench.apply(vit, Spy(layer=3, point=START, signals=frozenset({ATTN, PREV_ATTN})))(x)
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block in vit.blocks[:2]:
            h = block(h)
        prev = torch.stack([explicit_attention(vit.blocks[2].attn, vit.blocks[2].norm1(h[i]), None)[1] for i in range(2)])
        h = vit.blocks[2](h)
        this = torch.stack([explicit_attention(vit.blocks[3].attn, vit.blocks[3].norm1(h[i]), None)[1] for i in range(2)])
    assert (seen[3][PREV_ATTN] - prev).abs().max() < 1e-5
    assert (seen[3][ATTN] - this).abs().max() < 1e-5


def test_attention_probabilities_override_replaces_the_softmax():
    """A START reduction that returns the block's own attention as ``attn_probs`` leaves the output unchanged;
    returning a uniform attention changes it to exactly the uniform-attention block."""
    vit, x = small_vit(), images(2)

    class Reuse(Method):
        name = "reuse"
        defaults = {"uniform": False}

        def step(self, layer, ctx):
            return Step(START, frozenset({ATTN})) if layer == 4 else None

        def reduce(self, layer, tokens, signals, ctx):
            probs = signals[ATTN]
            if self.params["uniform"]:
                probs = torch.full_like(probs, 1.0 / probs.shape[-1])
            return TokenState(x=tokens.x, size=tokens.size, source=tokens.source, attn_probs=probs), None

    with torch.no_grad():
        same = bench.apply(vit, Reuse())(x)
        uniform = bench.apply(vit, Reuse(uniform=True))(x)
        dense = vit(x)
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for i, block in enumerate(vit.blocks):
            if i == 4:
                v = block.attn.qkv(block.norm1(h)).reshape(2, 65, 3, block.attn.num_heads, -1)[:, :, 2]
                out = v.mean(dim=1, keepdim=True).expand(-1, 65, -1, -1).reshape(2, 65, -1)
                h = h + block.attn.proj(out)
                h = h + block.mlp(block.norm2(h))
            else:
                h = block(h)
        expected_uniform = vit.forward_head(vit.norm(h))
    assert (same - dense).abs().max() < 1e-4
    assert (uniform - expected_uniform).abs().max() < 1e-4
    assert (uniform - dense).abs().max() > 1e-2


def test_padded_tokens_never_influence_real_ones():
    """Masking tokens out (ragged batches) equals removing them, image by image."""
    vit, x = small_vit(), images(2)

    class Pad(Method):
        name = "pad"
        defaults = {}

        def step(self, layer, ctx):
            return Step(MID) if layer == 2 else None

        def reduce(self, layer, tokens, signals, ctx):
            mask = torch.ones(tokens.x.shape[:2], dtype=torch.bool)
            mask[0, 40:] = False  # image 0 keeps 40 tokens, image 1 all 65
            garbage = tokens.x.clone()
            garbage[0, 40:] = 1e3  # whatever sits in padded slots must not matter
            return TokenState(x=garbage, size=tokens.size, source=tokens.source, mask=mask), None

    with torch.no_grad():
        padded = bench.apply(vit, Pad())(x)
        first = manual(vit, x[:1], 2, 40, MID)
        second = vit(x[1:])
    assert (padded[0] - first[0]).abs().max() < 1e-5
    assert (padded[1] - second[0]).abs().max() < 1e-5


def test_average_pooling_weights_tokens_by_size():
    """No class token, global average pool: after merging, the pooled feature is the size-weighted sum of
    the tokens over the original patch count; the dense model equals timm's mean."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, patch_size=8, num_classes=10,
                            class_token=False, global_pool="avg").eval()
    x = images(2)
    model = bench.apply(vit, "tome", track_source=True, r=3)
    with torch.no_grad():
        assert torch.equal(bench.apply(vit, "baseline")(x), vit(x))
        logits = model(x)
        features = model.forward_features(x)
        info = bench.forward_stats(model)
        expected = vit.head(vit.fc_norm((features * info.size).sum(dim=1) / 64))
        plain_mean = vit.forward_head(features)
    assert 1 < info.tokens_out[-1] < 64
    assert (logits - expected).abs().max() < 1e-5
    assert (logits - plain_mean).abs().max() > 1e-3, "size weighting must differ from timm's plain mean"


@pytest.mark.parametrize("class_token, method, params", [
    (False, "random", {"keep_rate": 0.5, "layers": [1]}),
    (False, "static", {"keep_rate": 0.5, "layers": [1], "not_contiguous": True}),
    (False, "kmedoids", {"keep_rate": 0.5, "layers": [1]}),
    (True, "topk", {"keep_rate": 0.5, "layers": [1]}),
    (True, "pruning", {"r": 20, "layers": [1]}),
])
def test_average_pooling_of_pruned_tokens_is_timms_mean_of_those_left(class_token, method, params):
    """Tokens dropped (sizes 1, their sum below the patch count): the head averages the tokens left, as timm's
    own head does on the shorter sequence (user test 13: the sum over the original count shrank it to 5/16)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, patch_size=8, num_classes=10,
                            class_token=class_token, global_pool="avg", fc_norm=False).eval()
    model = bench.apply(vit, method, **params)
    with torch.no_grad():
        logits = model(images(2))
        features = model.forward_features(images(2))
    assert features.shape[1] - int(class_token) < 64
    torch.testing.assert_close(logits, vit.forward_head(features), atol=1e-5, rtol=1e-5)


def test_differential_attention_is_refused_in_one_line():
    """timm's DiffAttention has a qkv but computes two softmaxes (user test 13: every method, baseline too, was a
    reshape error at the first forward)."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                            attn_layer="diff")
    for method, params in (("baseline", {}), ("tome", {"r": 2})):
        with pytest.raises(ValueError) as refused:
            bench.apply(vit, method, **params)
        assert str(refused.value) == ("block 0 of VisionTransformer attends with DiffAttention, not timm's Attention "
                                      "(one softmax of q k^T over the tokens, which the harness computes itself); "
                                      "allowed: ViTs built with attn_layer='attn'")


def test_patch_dropout_is_refused_for_a_reducing_method():
    """timm's patch dropout drops tokens before block 0 in training (user test 13: static's layer schedule was an
    IndexError); the dense model keeps it."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                            patch_drop_rate=0.25)
    bench.apply(vit, "baseline")
    with pytest.raises(ValueError) as refused:
        bench.apply(vit, "static", layers=[1])
    assert str(refused.value) == ("method 'static': this model drops patch tokens before the first block in training "
                                  "(patch_drop_rate=0.25), which the method's token counts do not expect; allowed: "
                                  "patch_drop_rate 0")


@pytest.mark.parametrize("pool", ["map", pytest.param("prr", marks=pytest.mark.skipif(
    not hasattr(timm.layers, "AttentionPoolPrr"), reason="this timm has no 'prr' pool (1.0.25 has none; 1.0.31 has)"))])
def test_attention_pool_heads_are_refused_with_a_reason(pool):
    """timm's two attention pools (``map``: SigLIP's AttentionPoolLatent; ``prr``: AttentionPoolPrr), each named as
    the model has it (the line said global_pool='map' for a 'prr' head)."""
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, patch_size=8, num_classes=10,
                            class_token=False, global_pool=pool)
    bench.apply(vit, "baseline")
    with pytest.raises(ValueError, match=f"attention-pool head \\(global_pool='{pool}'\\) attends over all output"):
        bench.apply(vit, "tome", r=4)


def test_signals_not_available_at_a_point_are_refused():
    with pytest.raises(ValueError, match="not available at the start"):
        bench.apply(small_vit(), KeepFirst(point=START, signals=frozenset({"cls_attn"})))
    with pytest.raises(ValueError, match="not available at the mid"):
        bench.apply(small_vit(), KeepFirst(point=MID, signals=frozenset({PREV_ATTN})))


# Every method but ATS, which synchronises once per ATS block (its padded width): a graph break, documented.
@pytest.mark.parametrize("method", sorted(set(SETTINGS) - {"ats", "baseline"}))
def test_forward_has_no_host_synchronisation(method):
    """Dynamo breaks the graph at every host synchronisation (``.item()``, ``bool(tensor)``, ``nonzero``):
    none may happen inside these methods' forward (each costs a GPU stall)."""
    model = bench.apply(small_vit(), method, **SETTINGS[method])
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(images(4))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


class DeviceLog(TorchDispatchMode):
    """Every operation whose inputs or outputs include a tensor off ``device``."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device, self.off = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out])]
        self.off += [str(func) for t in flat if isinstance(t, torch.Tensor) and t.device.type != self.device]
        return out


@pytest.mark.parametrize("method", sorted(set(SETTINGS) - {"ats"}))
def test_forward_creates_nothing_on_the_host(method, monkeypatch):
    """On a GPU, a tensor a forward builds on the CPU (from Python data, or a CPU generator's draws) has to be
    copied over: a synchronising copy that a CUDA graph cannot replay (``bench.throughput.capture`` refuses
    it). On the meta device, every operation of the forward must stay on it and ``torch.tensor`` must not be
    called (fixed patterns are ``Method.constants``, moved with the model). ATS reads its padded width."""
    built = []
    model = bench.apply(small_vit().to("meta"), method, **SETTINGS[method])
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *args, _original=original, **kwargs: built.append(args) or
                            _original(*args, **kwargs))
    x, log = images(4).to("meta"), DeviceLog("meta")
    with torch.no_grad(), log:
        logits = model(x)
    assert logits.shape == (4, 10) and logits.device.type == "meta"
    assert log.off == [] and built == [], (log.off[:5], built[:2])
