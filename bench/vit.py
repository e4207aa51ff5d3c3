"""The one block loop: a timm VisionTransformer with a token-reduction method applied.

Inside every block, reduction happens between the attention residual and the MLP residual:

    x = x + drop_path1(ls1(attn(norm1(x), log(size))))   # attention over N tokens
    x, size = method.reduce(x, size, signals of this attention)
    x = x + drop_path2(ls2(mlp(norm2(x))))               # MLP over N' tokens

All per-forward state (sizes, sources, token counts, statistics) lives in local variables of
``forward_features``; the result of the last forward is published once at its end (``last_forward``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from bench.attention import attention, size_bias
from methods.base import CLS_ATTN, PPT_SCORE, Method, ReductionContext, TokenState


@dataclass(frozen=True)
class ForwardInfo:
    """What one forward pass did.

    ``tokens_in[i]``: tokens entering block i (its attention); ``tokens_out[i]``: tokens after block i's
    reduction (its MLP). ``stats[i]``: the method's statistics at block i (e.g. PPT's pooled fraction).
    ``source``: (B, N, N0) map from output tokens to input tokens, when tracking was on. ``size``: (B, N, 1).
    """

    batch_size: int
    tokens_in: list[int]
    tokens_out: list[int]
    stats: dict[int, dict[str, float]] = field(default_factory=dict)
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None


class ReducedViT(nn.Module):
    """Wraps a timm ``VisionTransformer`` (the ``vit`` submodule, untouched) and applies ``method``."""

    def __init__(self, vit: VisionTransformer, method: Method, track_source: bool = False) -> None:
        super().__init__()
        check_supported(vit)
        self.vit = vit
        self.method = method
        self.track_source = track_source
        self.last_forward: ForwardInfo | None = None
        self.context = ReductionContext(
            depth=len(vit.blocks),
            num_prefix=vit.num_prefix_tokens,
            num_tokens=vit.patch_embed.num_patches + vit.num_prefix_tokens,
        )
        method.check(self.context)
        needs = set().union(*(method.signals(layer, self.context) for layer in range(self.context.depth)))
        if needs & {CLS_ATTN, PPT_SCORE} and not getattr(vit, "has_class_token", vit.cls_token is not None):
            raise ValueError(f"method {method.name!r} scores tokens by the class token's attention; this model has none")

    # The timm attributes users reach for keep working on the wrapper.
    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.vit, "pretrained_cfg", {})

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        vit, method, ctx = self.vit, self.method, self.context
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        if x.shape[1] != ctx.num_tokens:
            ctx = ReductionContext(depth=ctx.depth, num_prefix=ctx.num_prefix, num_tokens=x.shape[1])
        source = None
        if self.track_source:
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        tokens = TokenState(x=x, size=None, source=source)
        tokens_in, tokens_out, stats = [], [], {}
        for layer, block in enumerate(vit.blocks):
            needs = method.signals(layer, ctx)
            tokens_in.append(int(tokens.x.shape[1]))
            bias = size_bias(tokens.size) if method.prop_attn else None
            out, signals = attention(block.attn, block.norm1(tokens.x), bias, needs, ctx.num_prefix)
            tokens.x = tokens.x + block.drop_path1(block.ls1(out))
            if needs:
                tokens, layer_stats = method.reduce(layer, tokens, signals, ctx)
                if layer_stats:
                    stats[layer] = layer_stats
            tokens.x = tokens.x + block.drop_path2(block.ls2(block.mlp(block.norm2(tokens.x))))
            tokens_out.append(int(tokens.x.shape[1]))
        self.last_forward = ForwardInfo(
            batch_size=x.shape[0],
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            stats=stats,
            size=tokens.size,
            source=tokens.source,
        )
        return vit.norm(tokens.x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.vit.forward_head(x, pre_logits=pre_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def check_supported(model: nn.Module) -> None:
    """The harness drives timm's ViT blocks itself: refuse models whose blocks it does not know."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"bench.apply needs a timm VisionTransformer (ViT / DeiT / distilled DeiT), got {type(model).__name__}"
        )
    for index, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        missing = [name for name in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2") if not hasattr(block, name)]
        if attn is None or not hasattr(attn, "qkv") or missing:
            raise ValueError(
                f"block {index} of {type(model).__name__} is a {type(block).__name__}, not a timm ViT Block "
                f"(norm1 / attn.qkv / ls1 / mlp expected; missing {missing or ['attn.qkv']})"
            )
