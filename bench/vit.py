"""The one block loop: a timm VisionTransformer with a token-reduction method applied.

A method reduces a block's tokens at one of three points (``docs/methods.md#the-block-loop``):

    x, size = method.reduce(...)                          # START: before norm1 (DPC-KNN, static, MCTF, ...)
    x = x + drop_path1(ls1(attn(norm1(x), log(size))))    # attention over N tokens
    x, size = method.reduce(x, size, signals of this attention)   # MID: ToMe, PPT, EViT, ... (the default)
    x = x + drop_path2(ls2(mlp(norm2(x))))                # MLP over N' tokens
    x, size = method.reduce(...)                          # END: after the MLP (MCTF without one-step-ahead)

The method is asked once per forward which point each block uses and which signals it needs
(``Method.step``); only those signals are computed. All per-forward state (sizes, sources, masks, token
counts, statistics, the method's scratch) lives in local variables of ``_run``; the result of the last forward
is published once at its end (``last_forward``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from bench.attention import attention, attention_before, attention_from_probs, key_bias
from methods.base import (
    ATTN,
    CLS_ATTN,
    END,
    MID,
    POINTS,
    PPT_SCORE,
    PREV_ATTN,
    START,
    START_SIGNALS,
    Method,
    ReductionContext,
    Step,
    TokenState,
)


@dataclass(frozen=True)
class ForwardInfo:
    """What one forward pass did (counts are per batch: the padded count when images keep different
    numbers of tokens; ``mask`` then says which are real).

    ``tokens_in[i]``: tokens entering block i; ``tokens_attn[i]``: tokens its attention ran over (after a START
    reduction); ``tokens_mlp[i]``: tokens its MLP ran over (after a MID reduction); ``tokens_out[i]``: tokens
    leaving it (after an END reduction). ``stats[i]``: the method's statistics at block i (e.g. PPT's pooled
    fraction; values may be 0-d tensors: no host synchronisation inside the forward). ``source``: (B, N, N0)
    map from output tokens to input tokens, when tracking was on. ``size``: (B, N, 1). ``mask``: (B, N).
    ``tokens_probe[i]``: tokens whose q and k a START reduction computed before reducing (0: none);
    ``probs_given[i]``: block i reused attention probabilities handed over by its START reduction.
    ``layer_sources[i]``: ``(source, mask)`` as they left block i, for every block whose reduction step reduced
    (only when tracking was on): the token maps after each reducing layer.
    """

    tokens_in: list[int]
    tokens_out: list[int]
    tokens_attn: list[int] = field(default_factory=list)
    tokens_mlp: list[int] = field(default_factory=list)
    stats: dict[int, dict[str, float | torch.Tensor]] = field(default_factory=dict)
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    layer_sources: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    tokens_probe: list[int] = field(default_factory=list)
    probs_given: list[bool] = field(default_factory=list)

    def __repr__(self) -> str:
        """Counts and statistics as they are, tensors by their shape (a DeiT forward's ``size`` is 197 rows an
        image: printing it whole buried the counts)."""
        def show(value: Any) -> str:
            if isinstance(value, torch.Tensor):
                return f"{value.item():.4g}" if value.dim() == 0 else f"tensor{tuple(value.shape)}"
            if isinstance(value, dict):
                return "{" + ", ".join(f"{k!r}: {show(v)}" for k, v in value.items()) + "}"
            if isinstance(value, tuple):
                return "(" + ", ".join(show(v) for v in value) + ")"
            return repr(value)

        return f"ForwardInfo({', '.join(f'{f.name}={show(getattr(self, f.name))}' for f in fields(self))})"


class ReducedViT(nn.Module):
    """Wraps a timm ``VisionTransformer`` (the ``vit`` submodule, untouched) and applies ``method``."""

    def __init__(self, vit: VisionTransformer, method: Method, track_source: bool = False) -> None:
        super().__init__()
        check_supported(vit)
        self.vit = vit
        # the wrapper is in the ViT's mode: count_macs / analytic_macs put a model back into the mode it reports, so
        # a wrapper of an eval ViT that said "training" turned the ViT's BatchNorm, dropout and drop path on
        self.training = vit.training
        self.method = method
        self.track_source = track_source
        self.last_forward: ForwardInfo | None = None
        self.context = ReductionContext(
            depth=len(vit.blocks),
            num_prefix=vit.num_prefix_tokens,
            num_tokens=vit.patch_embed.num_patches + vit.num_prefix_tokens,
            img_size=tuple(vit.patch_embed.img_size),
            patch_size=patch_stride(vit.patch_embed),
            grid=tuple(vit.patch_embed.grid_size),
            embed_dim=vit.embed_dim,
            resizable=not hybrid(vit.patch_embed),
        )
        method.check(self.context)
        size = method.input_size(self.context)
        if size is not None:  # the method feeds the blocks images of its own size: refused now, not at the forward
            check_embeds(vit.patch_embed, size)
        # the method's constant tensors, as non-persistent buffers (moved with the model, not in checkpoints)
        device = next(vit.parameters()).device
        self._constant_names = []
        for name, value in method.constants(self.context).items():
            self.register_buffer(f"constant_{name}", value.to(device), persistent=False)
            self._constant_names.append(name)
        steps = self._steps(self.context)
        needs = set().union(*(step.signals for step in steps if step is not None))
        if needs & {CLS_ATTN, PPT_SCORE} and not getattr(vit, "has_class_token", vit.cls_token is not None):
            raise ValueError(f"model {model_name(vit)}: method {method.name!r} scores tokens by the class token's "
                             "attention; this model has none")
        if any(step is not None for step in steps):
            check_pooling(vit, method.name)
            if getattr(vit.patch_drop, "prob", 0) > 0:  # timm's PatchDropout: drops tokens before block 0 in training
                raise ValueError(f"method {method.name!r}: this model drops patch tokens before the first block in "
                                 f"training (patch_drop_rate={vit.patch_drop.prob}), which the method's token "
                                 "counts do not expect; allowed: patch_drop_rate 0")

    # The timm attributes users reach for keep working on the wrapper.
    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.vit, "pretrained_cfg", {})

    def _steps(self, ctx: ReductionContext) -> list[Step | None]:
        steps = [self.method.step(layer, ctx) for layer in range(ctx.depth)]
        for layer, step in enumerate(steps):
            if step is None:
                continue
            if step.point not in POINTS:
                raise ValueError(f"method {self.method.name!r}: block {layer} reduces at {step.point!r}; allowed: "
                                 f"{', '.join(POINTS)}")
            early = step.signals - START_SIGNALS if step.point == START else step.signals & {PREV_ATTN}
            if early:
                raise ValueError(f"method {self.method.name!r}: signal {sorted(early)[0]!r} is not available at the "
                                 f"{step.point} of block {layer}")
        return steps

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, TokenState]:
        vit, method = self.vit, self.method
        size = method.input_size(self.context)
        if size is not None and tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = vit.norm_pre(vit.patch_drop(embed(vit, images)))
        ctx = ReductionContext(depth=self.context.depth, num_prefix=self.context.num_prefix, num_tokens=x.shape[1],
                               img_size=self.context.img_size, patch_size=self.context.patch_size,
                               grid=input_grid(vit.patch_embed, images.shape[-2:]), embed_dim=self.context.embed_dim,
                               constants={name: getattr(self, f"constant_{name}") for name in self._constant_names})
        steps = self._steps(ctx)
        source = None
        if self.track_source:
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        tokens = TokenState(x=x, size=None, source=source)
        counts: dict[str, list] = {"in": [], "attn": [], "mlp": [], "out": [], "probe": [], "given": []}
        stats: dict[int, dict] = {}
        layer_sources: dict[int, tuple] = {}
        previous_attn = None  # block l-1's attention, kept only when block l asks for it
        for layer, block in enumerate(vit.blocks):
            step = steps[layer]
            point = step.point if step is not None else None
            needs = step.signals if step is not None else frozenset()
            keep_attn = layer + 1 < ctx.depth and steps[layer + 1] is not None and PREV_ATTN in steps[layer + 1].signals
            counts["in"].append(int(tokens.x.shape[1]))
            entering_mask = tokens.mask  # a step that removed nothing draws no token map (it equals the one before)

            counts["probe"].append(int(tokens.x.shape[1]) if point == START and needs - {PREV_ATTN} else 0)
            if point == START:
                signals = {}
                if needs - {PREV_ATTN}:
                    signals = attention_before(block.attn, block.norm1(tokens.x), self._bias(tokens), needs,
                                               method.attention, tokens.mask)
                if PREV_ATTN in needs:
                    signals[PREV_ATTN] = previous_attn
                tokens = self._reduce(layer, tokens, signals, ctx, stats)
            previous_attn = None

            counts["attn"].append(int(tokens.x.shape[1]))
            normed = block.norm1(tokens.x)
            counts["given"].append(tokens.attn_probs is not None)
            if tokens.attn_probs is not None:
                out, signals = attention_from_probs(block.attn, normed, tokens.attn_probs), {}
                tokens.attn_probs = None
            else:
                block_needs = (needs if point in (MID, END) else frozenset()) | ({ATTN} if keep_attn else frozenset())
                out, signals = attention(block.attn, normed, self._bias(tokens), block_needs, ctx.num_prefix,
                                         method.attention, tokens.mask)
                if keep_attn:
                    previous_attn = signals[ATTN]
            tokens.x = tokens.x + block.drop_path1(block.ls1(out))

            if point == MID:
                tokens = self._reduce(layer, tokens, signals, ctx, stats)
            counts["mlp"].append(int(tokens.x.shape[1]))
            tokens.x = tokens.x + block.drop_path2(block.ls2(block.mlp(block.norm2(tokens.x))))
            if point == END:
                tokens = self._reduce(layer, tokens, signals, ctx, stats)
            counts["out"].append(int(tokens.x.shape[1]))
            if step is not None and tokens.source is not None and (
                    counts["out"][-1] != counts["in"][-1] or tokens.mask is not entering_mask):
                layer_sources[layer] = (tokens.source, tokens.mask)
        self.last_forward = ForwardInfo(
            tokens_in=counts["in"],
            tokens_out=counts["out"],
            tokens_attn=counts["attn"],
            tokens_mlp=counts["mlp"],
            stats=stats,
            size=tokens.size,
            source=tokens.source,
            mask=tokens.mask,
            layer_sources=layer_sources,
            tokens_probe=counts["probe"],
            probs_given=counts["given"],
        )
        return vit.norm(tokens.x), tokens

    def _bias(self, tokens: TokenState) -> torch.Tensor | None:
        return key_bias(tokens.size if self.method.prop_attn else None, tokens.mask)

    def _reduce(self, layer: int, tokens: TokenState, signals: dict, ctx: ReductionContext, stats: dict) -> TokenState:
        tokens, layer_stats = self.method.reduce(layer, tokens, signals, ctx)
        if layer_stats:
            stats[layer] = layer_stats
        return tokens

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised output tokens (B, N', C) of the reduced model. On an average-pool model whose method
        gives tokens sizes or padding, ``forward_head`` of these alone pools them unweighted (timm's mean); the
        model's own pooling (``forward``, ``forward_with_features``) weights them by size."""
        return self._run(images)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, tokens: TokenState | None = None) -> torch.Tensor:
        """timm's head. With ``tokens`` (the state that produced ``x``) average pooling weights each token by
        its size and ignores padding: the sum of the size-weighted patch tokens over the sum of their sizes.
        Where the sizes add up to the original patch count (merging: ToMe's rule for MAE) that is the original
        count; where tokens were dropped, the mean of those that remain (as timm's mean of a shorter sequence);
        with nothing reduced, timm's mean."""
        vit = self.vit
        reduced = tokens is not None and (tokens.size is not None or tokens.mask is not None)
        if not reduced or not pools_by_size(vit):
            return vit.forward_head(x, pre_logits=pre_logits)
        first = 0 if getattr(vit, "pool_include_prefix", False) else vit.num_prefix_tokens
        weight = tokens.sizes()[:, first:]
        if tokens.mask is not None:
            weight = weight * tokens.mask[:, first:, None].to(weight.dtype)
        pooled = (x[:, first:] * weight).sum(dim=1) / weight.sum(dim=1)
        pooled = vit.head_drop(vit.fc_norm(pooled))
        return pooled if pre_logits else vit.head(pooled)

    def forward(self, images: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x, tokens = self._run(images)
        return self.forward_head(x, pre_logits=pre_logits, tokens=tokens)

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(images), forward(images, pre_logits=True))`` from one pass through the blocks."""
        x, tokens = self._run(images)
        return self.forward_head(x, tokens=tokens), self.forward_head(x, pre_logits=True, tokens=tokens)


def embed(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch and position embedding with prefix tokens: timm's own at the model's input size; at another size
    (a multiple of the patch size) the position embeddings are resampled the way timm resamples them for
    ``dynamic_img_size`` models (bicubic, prefix embeddings unchanged)."""
    patch = vit.patch_embed
    if tuple(images.shape[-2:]) == tuple(patch.img_size):
        return vit._pos_embed(patch(images))
    check_embeds(patch, images.shape[-2:])
    grid = patch.proj(images)
    x = patch.norm(grid.flatten(2).transpose(1, 2))
    tokens = (vit.cls_token, getattr(vit, "dist_token", None), getattr(vit, "reg_token", None))
    prefix = [token.expand(x.shape[0], -1, -1) for token in tokens if token is not None]
    if vit.pos_embed is None:
        return torch.cat([*prefix, x], dim=1)
    pos = resample_abs_pos_embed(vit.pos_embed, new_size=list(grid.shape[-2:]), old_size=patch.grid_size,
                                 num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens)
    if vit.no_embed_class:
        x = torch.cat([*prefix, x + pos], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + pos
    return vit.pos_drop(x)


def hybrid(patch: nn.Module) -> bool:
    """A hybrid embedding: a CNN backbone before the patch projection (timm's ``HybridEmbed``, ``vit_*_r_*``)."""
    return hasattr(patch, "backbone")


def embedded_size(patch: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the images ``patch`` was built to embed. C: its first convolution's input (a hybrid's CNN stem;
    its projection takes the backbone's features: 64 channels for ``vit_tiny_r_s16_p8_224``, not the image's 3)."""
    channels = next(module for module in patch.modules() if isinstance(module, nn.Conv2d)).in_channels
    return (int(channels), *(int(side) for side in patch.img_size))


def check_embeds(patch: nn.Module, size: Any) -> None:
    """Refuse an input size (H, W) other than the model's that ``embed`` cannot embed: one that is not a multiple
    of the patch size, or any other size for a hybrid embedding (a CNN backbone before the projection)."""
    height, width = size
    if (height, width) == tuple(patch.img_size):
        return
    if hybrid(patch):
        raise ValueError(f"input {height}x{width}: this model's {type(patch).__name__} runs a CNN backbone before "
                         f"its patch projection; the harness embeds inputs of other sizes for plain patch embeddings "
                         f"only; allowed here: {patch.img_size[0]}x{patch.img_size[1]}")
    if height % patch.patch_size[0] or width % patch.patch_size[1]:
        raise ValueError(f"input {height}x{width} is not a multiple of the patch size {tuple(patch.patch_size)}")


def patch_stride(patch: nn.Module) -> tuple[int, int]:
    """Input pixels per patch token (H, W): the patch size; for a hybrid embedding (a CNN backbone before the
    projection) the model's input size over its grid of tokens."""
    if hybrid(patch):
        return tuple(size // count for size, count in zip(patch.img_size, patch.grid_size, strict=True))
    return tuple(patch.patch_size)


def input_grid(patch: nn.Module, size: Any) -> tuple[int, int]:
    """(rows, cols) of patch tokens ``embed`` makes of an input of ``size`` (H, W)."""
    if tuple(size) == tuple(patch.img_size):
        return tuple(patch.grid_size)
    stride = patch_stride(patch)
    return size[0] // stride[0], size[1] // stride[1]


def check_supported(model: nn.Module) -> None:
    """The harness drives timm's ViT blocks itself: refuse models whose blocks it does not know."""
    if not isinstance(model, VisionTransformer):
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")  # timm's model name, if timm's
        raise ValueError(f"bench.apply needs a timm VisionTransformer (ViT / DeiT / distilled DeiT), got "
                         f"{type(model).__name__}{f' ({name})' if name else ''}")
    if len(model.blocks) == 0:  # nothing to reduce, and every method's layer check read "allowed: 0..-1"
        raise ValueError(f"{model_name(model)} has no blocks (depth 0); allowed: a depth of at least 1")
    for index, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        missing = [name for name in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2") if not hasattr(block, name)]
        if attn is None or not hasattr(attn, "qkv") or missing:
            raise ValueError(
                f"block {index} of {type(model).__name__} is a {type(block).__name__}, not a timm ViT Block "
                f"(norm1 / attn.qkv / ls1 / mlp expected; missing {missing or ['attn.qkv']})"
            )
        if not isinstance(attn, Attention):  # e.g. DiffAttention (attn_layer='diff'): a qkv, but another computation
            raise ValueError(
                f"block {index} of {type(model).__name__} attends with {type(attn).__name__}, not timm's Attention "
                "(one softmax of q k^T over the tokens, which the harness computes itself); allowed: ViTs built "
                "with attn_layer='attn'"
            )


def pools_by_size(vit: nn.Module) -> bool:
    """Whether ``vit``'s head averages the tokens (``global_pool: avg``, no attention pool), so that a reduced
    model pools them weighted by size (``ReducedViT.forward_head``): the rule named by a run's ``pool_rule``."""
    return getattr(vit, "attn_pool", None) is None and getattr(vit, "global_pool", None) == "avg"


def model_name(vit: nn.Module) -> str:
    """The timm architecture a refusal names (``vit_small_patch16_224``), else the model's class."""
    return getattr(vit, "default_cfg", {}).get("architecture") or type(vit).__name__


def check_pooling(vit: VisionTransformer, method: str) -> None:
    """Reduced tokens reach the head through the class token, or through size-weighted average pooling;
    other heads are refused (their rule for merged tokens is not defined)."""
    name = model_name(vit)
    if vit.attn_pool is not None:
        raise ValueError(f"model {name}: its attention-pool head (global_pool={vit.global_pool!r}) attends over all "
                         f"output tokens; method {method!r} changes that set, which has no defined rule: use a "
                         "class-token or average-pool ViT")
    if vit.global_pool not in ("token", "avg", ""):
        raise ValueError(f"model {name}: global_pool={vit.global_pool!r} is not supported with token reduction "
                         f"(method {method!r}); allowed: token, avg, '' (no pooling)")
