"""MAC counts: torchprofile on one image (the papers' convention: their "GFLOPs" are GMACs), an analytic
count from the tokens each block actually saw, and torchprofile averaged over real images for methods
whose reduction depends on the input."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from timm.layers import AttentionPoolLatent
from torch import nn
from torchprofile import profile_macs

from bench.sdpa import sdpa_backend
from bench.vit import ForwardInfo, ReducedViT, embedded_size


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for."""
    vit = model.vit if isinstance(model, ReducedViT) else model
    return embedded_size(vit.patch_embed)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def count_image(model: nn.Module, input_size: Sequence[int] | None = None) -> torch.Tensor:
    """The fixed random image (C, H, W) that one-image counts trace: of ``input_size``, by default the model's
    own (MACs do not depend on weights; for data-dependent methods see ``data_macs``)."""
    size = tuple(input_size) if input_size is not None else model_input_size(model)
    return torch.randn(size, generator=torch.Generator().manual_seed(0))


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for a count, then every module back in its own mode: ``model.train(was)`` would set
    all of them to the outer module's flag (a wrapper built around an eval ViT, or a model with frozen BatchNorm,
    came back with dropout, drop path and BatchNorm in training mode)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def count_macs(model: nn.Module, input_size: Sequence[int] | None = None, image: torch.Tensor | None = None) -> int:
    """torchprofile's MAC count of one forward on one image (``image``, (C, H, W), or a fixed random one
    of ``input_size``, by default the model's own: (3, 224, 224) for DeiT). MACs do not depend on weights;
    for data-dependent methods they depend on the image: see ``data_macs``. Nor on the attention kernel: the
    trace runs under PyTorch's choice (``sdpa_backend("auto")``), so a run pinned to ``explicit`` attention
    counts what the same run on SDPA counts (written out, the ``* scale`` would add B x H x N^2 MACs)."""
    if image is None:
        image = count_image(model, input_size)
    with evaluating(model), warnings.catch_warnings(), torch.no_grad(), sdpa_backend("auto"):
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent branches and ops without MACs
        return int(profile_macs(model, image[None].to(_device(model))))


def data_macs(model: nn.Module, images: Iterable[torch.Tensor]) -> float:
    """torchprofile MACs averaged over real images (each (C, H, W)), traced one at a time."""
    counts = [count_macs(model, image=image) for image in images]
    if not counts:
        raise ValueError("data_macs needs at least one image")
    return sum(counts) / len(counts)


def _linear_macs(module: nn.Module) -> int:
    """MACs of every ``nn.Linear`` in ``module`` for one token (row)."""
    return sum(layer.in_features * layer.out_features for layer in module.modules() if isinstance(layer, nn.Linear))


def analytic_macs(
    model: nn.Module,
    tokens_attn: Sequence[int] | ForwardInfo | None = None,
    tokens_mlp: Sequence[int] | None = None,
    *,
    info: ForwardInfo | None = None,
) -> int:
    """MACs from token counts, nanoGPT-style, as a cross-check of the counter: per block
    ``4*N*C^2 + 2*N^2*C`` for attention over N tokens (``ForwardInfo.tokens_attn``) and the MLP's linear layers
    over N' tokens (``tokens_mlp``): ``2*N'*C*hidden`` (= 8*N'*C^2) for timm's ``Mlp``, ``3*N'*C*hidden`` for a
    SwiGLU (``SwiGLU``, ``SwiGLUPacked``: AIMv2, DINOv2-g), plus patch embedding (its projection, where there is
    one: a hybrid ViT's CNN backbone is not counted, 119 of 435 MMACs of ``vit_tiny_r_s16_p8_224``) and head (an
    attention pool's too, ``global_pool='map'``: SigLIP). A block whose
    START reduction first computed q and k over the unreduced tokens (``tokens_probe``) adds
    ``2*N*C^2 + N^2*C`` for them; a block that reused given attention probabilities (``probs_given``, MCTF's
    one-step-ahead) spends only ``2*N'*C^2 + N'^2*C`` (values, probabilities times values, projection).
    Pass a ``ForwardInfo`` (positionally or as ``info``) or the two count lists; without either, those of a
    forward on one image are used. Similarities and clustering a method computes are not included."""
    vit = model.vit if isinstance(model, ReducedViT) else model
    if isinstance(tokens_attn, ForwardInfo):
        info, tokens_attn = tokens_attn, None
    if info is None and tokens_attn is None and isinstance(model, ReducedViT):
        count_input = count_image(model)
        with evaluating(model), torch.no_grad():
            model(count_input[None].to(_device(model)))
        info = model.last_forward
    depth = len(vit.blocks)
    dense = vit.patch_embed.num_patches + vit.num_prefix_tokens
    probe, given = [0] * depth, [False] * depth
    if info is not None:
        tokens_attn, tokens_mlp = info.tokens_attn, info.tokens_mlp
        probe = info.tokens_probe or probe
        given = info.probs_given or given
        patches = info.tokens_in[0] - vit.num_prefix_tokens
    else:
        tokens_attn = tokens_attn if tokens_attn is not None else [dense] * depth
        patches = vit.patch_embed.num_patches
    tokens_mlp = tokens_mlp if tokens_mlp is not None else tokens_attn
    dim = vit.embed_dim
    proj = vit.patch_embed.proj  # an Identity where a hybrid's backbone gives the tokens' width (ViTamin, MCi)
    macs = 0
    if isinstance(proj, nn.Conv2d):
        macs = patches * dim * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    for block, n_attn, n_mlp, n_probe, reused in zip(vit.blocks, tokens_attn, tokens_mlp, probe, given, strict=True):
        mlp = _linear_macs(block.mlp)  # per token: fc1 + fc2 of timm's Mlp (2 C hidden); SwiGLU's gate is a third
        macs += 2 * n_probe * dim * dim + n_probe * n_probe * dim
        if reused:
            macs += 2 * n_attn * dim * dim + n_attn * n_attn * dim
        else:
            macs += 4 * n_attn * dim * dim + 2 * n_attn * n_attn * dim
        macs += n_mlp * mlp
    pool = getattr(vit, "attn_pool", None)
    if isinstance(pool, AttentionPoolLatent):  # SigLIP's map head: keys and values of every token (a method is
        # refused there), its queries' attention over them, its linear layers on the latents
        keys = patches + (vit.num_prefix_tokens if vit.pool_include_prefix else 0)
        macs += keys * pool.kv.in_features * pool.kv.out_features + pool.latent_len * keys * pool.kv.out_features
        macs += pool.latent_len * (_linear_macs(pool) - pool.kv.in_features * pool.kv.out_features)
    for head in (vit.head, getattr(vit, "head_dist", None)):
        if isinstance(head, nn.Linear):
            macs += head.in_features * head.out_features
    return macs
