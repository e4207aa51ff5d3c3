"""MAC counts: torchprofile on one image (the papers' convention: their "GFLOPs" are GMACs), an analytic
count from the tokens each block actually saw, and torchprofile averaged over real images for methods
whose reduction depends on the input."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torchprofile import profile_macs

from bench.vit import ReducedViT


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for."""
    vit = model.vit if isinstance(model, ReducedViT) else model
    height, width = vit.patch_embed.img_size
    return (vit.patch_embed.proj.in_channels, height, width)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def count_macs(model: nn.Module, input_size: Sequence[int] | None = None, image: torch.Tensor | None = None) -> int:
    """torchprofile's MAC count of one forward on one image (``image``, (C, H, W), or a fixed random one
    of ``input_size``, by default the model's own: (3, 224, 224) for DeiT). MACs do not depend on weights;
    for data-dependent methods they depend on the image: see ``data_macs``."""
    if image is None:
        size = tuple(input_size) if input_size is not None else model_input_size(model)
        image = torch.randn(size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about data-dependent branches and ops without MACs
            return int(profile_macs(model, image[None].to(_device(model))))
    finally:
        model.train(was_training)


def data_macs(model: nn.Module, images: Iterable[torch.Tensor]) -> float:
    """torchprofile MACs averaged over real images (each (C, H, W)), traced one at a time."""
    counts = [count_macs(model, image=image) for image in images]
    if not counts:
        raise ValueError("data_macs needs at least one image")
    return sum(counts) / len(counts)


def analytic_macs(
    model: nn.Module, tokens_attn: Sequence[int] | None = None, tokens_mlp: Sequence[int] | None = None
) -> int:
    """MACs from token counts, nanoGPT-style, as a cross-check of the counter: per block
    ``4*N*C^2 + 2*N^2*C`` for attention over N tokens (``ForwardInfo.tokens_attn``) and ``2*N'*C*hidden``
    (= 8*N'*C^2) for the MLP over N' tokens (``tokens_mlp``), plus patch embedding and head. Without counts,
    those of a forward on one image are used. Work a method adds outside the blocks' linear layers and
    attention (similarities, clustering) is not included."""
    vit = model.vit if isinstance(model, ReducedViT) else model
    tokens_in, tokens_out = tokens_attn, tokens_mlp
    if tokens_in is None:
        if isinstance(model, ReducedViT):
            count_input = torch.randn(model_input_size(model), generator=torch.Generator().manual_seed(0))
            was_training = model.training
            model.eval()
            with torch.no_grad():
                model(count_input[None].to(_device(model)))
            model.train(was_training)
            tokens_in, tokens_out = model.last_forward.tokens_attn, model.last_forward.tokens_mlp
        else:
            dense = vit.patch_embed.num_patches + vit.num_prefix_tokens
            tokens_in = tokens_out = [dense] * len(vit.blocks)
    if tokens_out is None:
        tokens_out = tokens_in
    dim = vit.embed_dim
    proj = vit.patch_embed.proj
    macs = vit.patch_embed.num_patches * dim * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    for block, n_attn, n_mlp in zip(vit.blocks, tokens_in, tokens_out, strict=True):
        hidden = block.mlp.fc1.out_features
        macs += 4 * n_attn * dim * dim + 2 * n_attn * n_attn * dim + 2 * n_mlp * dim * hidden
    for head in (vit.head, getattr(vit, "head_dist", None)):
        if isinstance(head, nn.Linear):
            macs += head.in_features * head.out_features
    return macs
