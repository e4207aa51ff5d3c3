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


def perturb(vit: torch.nn.Module, seed: int, biases: bool = False) -> torch.nn.Module:
    """Sharpen attention and randomise norm / LayerScale parameters and the prefix tokens, so nothing is
    trivially uniform (``biases``: also the projection and MLP biases)."""
    g = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor, std: float) -> torch.Tensor:
        return std * torch.randn(t.shape, generator=g)

    with torch.no_grad():
        for blk in vit.blocks:
            w = blk.attn.qkv.weight
            w.mul_(3).add_(noise(w, 0.02))
            if blk.attn.qkv.bias is not None:
                blk.attn.qkv.bias.add_(noise(blk.attn.qkv.bias, 0.1))
            if biases:
                for lin in (blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                    lin.bias.add_(noise(lin.bias, 0.05))
            for mod in (blk.attn.q_norm, blk.attn.k_norm, blk.attn.norm):
                if isinstance(mod, torch.nn.LayerNorm):
                    mod.weight.add_(noise(mod.weight, 0.3))
                    mod.bias.add_(noise(mod.bias, 0.1))
            for ls in (blk.ls1, blk.ls2):
                if hasattr(ls, "gamma"):
                    ls.gamma.copy_(0.1 + noise(ls.gamma, 0.5))
        for name in ("cls_token", "dist_token", "reg_token"):
            token = getattr(vit, name, None)
            if token is not None:
                token.add_(noise(token, 0.5))
    return vit


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll ``condition`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
