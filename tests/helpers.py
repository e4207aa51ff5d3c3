"""Small models for tests: DeiT-shaped timm ViTs with random weights (MACs and token schedules do not
depend on weights), perturbed so that attention is far from uniform and methods' choices matter."""

from __future__ import annotations

import timm
import torch


def small_vit(name: str = "vit_small_patch16_224", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {"pretrained": False, "img_size": 64, "patch_size": 8, "num_classes": 10, **kwargs}
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model


def images(n: int, size: int = 64, seed: int = 1, channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
