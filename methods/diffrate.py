"""DiffRate: Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers", ICCV 2023
(arXiv 2305.17997); reference code OpenGVLab/DiffRate (evaluation branch, ``--load_compression_rate``).

A fixed schedule of token counts per block (class token included): after the attention, the patch tokens are
sorted by class attention (descending), the first ``prune_kept_num[i]`` tokens are kept, and the tokens beyond
``merge_kept_num[i]`` are merged into their most similar kept token (cosine of x). A destination becomes the
plain mean of itself and its sources, while its size grows by the sources' sizes weighted by their similarity
(not clamped: sizes may fall below 1, even below 0). Proportional attention is always on. ``target_flops``
selects one of the authors' published schedules for DeiT-Ti/S/B; the rate search itself is not included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from methods.base import CLS_ATTN, BudgetKnob, Method, ReductionContext, TokenState, register

# The published schedules (compression_rate.json of the reference repository), keyed by (width, target GFLOPs):
# tokens kept after pruning / after merging at blocks 0..11 of a 12-block DeiT with 197 tokens.
SCHEDULES: dict[tuple[int, float], tuple[tuple[int, ...], tuple[int, ...]]] = {
    (384, 2.3): ((197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3), (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3)),
    (384, 2.5): ((197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3), (197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3)),
    (384, 2.7): ((197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3), (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3)),
    (384, 2.9): ((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3), (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)),
    (384, 3.1): ((197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3), (197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3)),
    (192, 0.6): ((197, 196, 180, 157, 130, 107, 86, 73, 63, 51, 40, 3), (197, 187, 167, 139, 114, 90, 76, 66, 57, 45, 37, 3)),
    (192, 0.7): ((197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3), (197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3)),
    (192, 0.8): ((197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3), (197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3)),
    (192, 0.9): ((197, 197, 196, 190, 182, 166, 141, 125, 113, 105, 99, 3), (197, 196, 194, 188, 172, 147, 129, 115, 107, 103, 96, 3)),
    (192, 1.0): ((197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21), (197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21)),
    (768, 8.7): ((197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3), (197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3)),
    (768, 10.0): ((197, 194, 182, 168, 148, 129, 113, 101, 82, 49, 25, 3), (197, 186, 174, 156, 137, 117, 105, 90, 66, 31, 19, 3)),
    (768, 10.4): ((197, 196, 188, 174, 156, 141, 121, 103, 90, 58, 25, 3), (197, 190, 184, 164, 145, 131, 107, 94, 74, 31, 21, 3)),
    (768, 11.5): ((197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3), (197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3)),
    (768, 12.5): ((197, 197, 196, 192, 184, 170, 154, 139, 129, 94, 58, 3), (197, 196, 194, 190, 176, 160, 145, 131, 115, 68, 47, 3)),
}
MODELS = {192: "DeiT-Ti", 384: "DeiT-S", 768: "DeiT-B"}  # 12 blocks, 197 tokens (224 x 224, patch 16)
DEPTH, TOKENS = 12, 197


def published_targets(width: int) -> list[float]:
    """The ``target_flops`` values published for a DeiT of this width, ascending."""
    return sorted(target for w, target in SCHEDULES if w == width)


def _published(target: float) -> tuple[int, tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """(width, schedule) of a published ``target_flops`` (the values are distinct across the three models)."""
    for (width, value), schedule in SCHEDULES.items():
        if math.isclose(value, target, rel_tol=0, abs_tol=1e-9):
            return width, schedule
    return None


def kept_counts(prune: list[int], merge: list[int], num_tokens: int) -> list[int]:
    """Tokens leaving each block: ``min(N, P, M)`` applied block after block."""
    counts, n = [], num_tokens
    for p_kept, m_kept in zip(prune, merge, strict=True):
        n = min(n, p_kept, m_kept)
        counts.append(n)
    return counts


def diffrate_reduce(tokens: TokenState, cls_attn: torch.Tensor, prune_kept: int, merge_kept: int,
                    num_prefix: int) -> TokenState:
    """Sort the patch tokens by class attention (descending, after the prefix tokens), keep the first
    ``prune_kept``, then merge every token beyond ``merge_kept`` into its most similar non-prefix token among
    the first ``merge_kept`` (plain mean; sizes grow by similarity x size)."""
    batch = cls_attn.shape[0]
    ranked = torch.sort(cls_attn[:, num_prefix:], dim=1, descending=True)[1] + num_prefix
    prefix = torch.arange(num_prefix, device=ranked.device).expand(batch, num_prefix)
    keep = min(prune_kept, tokens.x.shape[1])
    tokens = tokens.gather(torch.cat([prefix, ranked], dim=1)[:, :keep])
    if merge_kept >= keep:
        return tokens
    x, size, source = tokens.x, tokens.sizes(), tokens.source
    metric = x.detach()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric[:, merge_kept:] @ metric[:, :merge_kept].transpose(-1, -2)
    similarity[..., :num_prefix].fill_(-math.inf)
    best, target = similarity.max(dim=-1)  # (B, S): value c_t and destination of every source
    dst = target[..., None]

    def merged(t: torch.Tensor, sources: torch.Tensor, mode: str) -> torch.Tensor:
        width = t.shape[-1]
        return t[:, :merge_kept].scatter_reduce(1, dst.expand(-1, -1, width), sources, reduce=mode)

    return TokenState(
        x=merged(x, x[:, merge_kept:], "mean"),
        size=merged(size, size[:, merge_kept:] * best[..., None], "sum"),
        source=None if source is None else merged(source, source[:, merge_kept:], "amax"),
    )


@register("diffrate")
class DiffRate(Method):
    """docs/methods.md#diffrate"""

    defaults = {"target_flops": 2.9, "prune_kept_num": None, "merge_kept_num": None}
    budget_knob = BudgetKnob("target_flops", kind="choice", cheaper="lower")

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        lists = {key: params[key] for key in ("prune_kept_num", "merge_kept_num")}
        if (lists["prune_kept_num"] is None) != (lists["merge_kept_num"] is None):
            raise self._error("parameters 'prune_kept_num' and 'merge_kept_num' go together: give both or neither")
        for key, value in lists.items():
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not value or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value
            ):
                raise self._error(f"parameter {key!r} must be a non-empty list of token counts >= 1, got {value!r}")
            lists[key] = list(value)
        if lists["prune_kept_num"] is not None:
            if len(lists["prune_kept_num"]) != len(lists["merge_kept_num"]):
                raise self._error("parameters 'prune_kept_num' and 'merge_kept_num' must have one entry per block each")
            return {"target_flops": None, **lists}  # the explicit lists override target_flops (honest run keys)
        target = params["target_flops"]
        if isinstance(target, bool) or not isinstance(target, (int, float)) or _published(target) is None:
            allowed = "; ".join(f"{MODELS[w]}: {', '.join(map(str, published_targets(w)))}" for w in MODELS)
            raise self._error(f"parameter 'target_flops' must be a published DiffRate schedule ({allowed}), got {target!r}")
        return {"target_flops": float(target), **lists}

    @property
    def prop_attn(self) -> bool:
        return True  # DiffRate always adds log(size) (sizes start at one, so block 0 is plain attention)

    @property
    def explicit(self) -> bool:
        return self.params["prune_kept_num"] is not None

    def schedule(self) -> tuple[list[int], list[int]]:
        """(prune_kept_num, merge_kept_num): the explicit lists, or the published schedule of ``target_flops``."""
        if self.explicit:
            return self.params["prune_kept_num"], self.params["merge_kept_num"]
        _, (prune, merge) = _published(self.params["target_flops"])
        return list(prune), list(merge)

    def check(self, ctx: ReductionContext) -> None:
        prune, merge = self.schedule()
        if self.explicit:
            if len(prune) != ctx.depth:
                raise self._error(f"prune_kept_num / merge_kept_num list {len(prune)} blocks, but the model has "
                                  f"{ctx.depth} (one count per block)")
            low = min(prune + merge)
            if low <= ctx.num_prefix:
                raise self._error(f"prune_kept_num / merge_kept_num include {low}: every count must keep a patch token "
                                  f"besides the {ctx.num_prefix} prefix token(s) (allowed: >= {ctx.num_prefix + 1})")
            return
        self._check_published(ctx, lambda: f"this model has {ctx.depth} blocks, {ctx.num_tokens} tokens, "
                                           f"{ctx.num_prefix} prefix token(s)")
        if getattr(ctx, "embed_dim", None):  # the width, where the harness provides it; else checked in reduce
            self.check_width(ctx.embed_dim)

    def _check_published(self, ctx: ReductionContext, found: Callable[[], str]) -> None:
        """A published schedule counts the tokens of a 224 x 224 DeiT: refuse another geometry, at ``bench.apply`` and
        in a forward whose images give another token count (``found()`` says what was found instead; formatted only
        then: ``signals`` checks every block of every forward)."""
        if not self.explicit and (ctx.depth, ctx.num_tokens, ctx.num_prefix) != (DEPTH, TOKENS, 1):
            raise self._error(
                f"target_flops={self.params['target_flops']} selects a published schedule for DeiT-Ti/S/B (12 blocks, "
                f"197 tokens, one class token); {found()}: give prune_kept_num and merge_kept_num instead")

    def check_width(self, width: int) -> None:
        """A published schedule belongs to one model: its ``target_flops`` must be one of that width's values."""
        if self.explicit:
            return
        own = _published(self.params["target_flops"])[0]
        if width != own:
            name = MODELS.get(width)
            allowed = ", ".join(map(str, published_targets(width))) if name else "none (not a DeiT-Ti/S/B)"
            raise self._error(f"target_flops={self.params['target_flops']} is a {MODELS[own]} schedule, but the model "
                              f"is {name or f'{width} wide'}: allowed target_flops: {allowed}")

    def budget_choices(self, ctx: ReductionContext) -> list[float]:
        """The published ``target_flops`` of this model. Needs the model's width on the context (``embed_dim``);
        reads nothing else of ``self`` (the calibrator calls it on an uninitialised instance)."""
        width = getattr(ctx, "embed_dim", None)
        if (ctx.depth, ctx.num_tokens, ctx.num_prefix) != (DEPTH, TOKENS, 1) or width not in MODELS:
            raise self._error(f"published schedules exist only for DeiT-Ti/S/B (12 blocks, 197 tokens, width 192/384/768);"
                              f" this model: {ctx.depth} blocks, {ctx.num_tokens} tokens, width {width}: no budget "
                              "to calibrate (a fixed schedule: prune_kept_num and merge_kept_num with target_flops: null"
                              ", an entry of its own)")
        return published_targets(width)

    def signals(self, layer: int, ctx: ReductionContext) -> frozenset[str]:
        # in a forward, ``ctx`` counts the tokens of its images: another input size is another count
        self._check_published(ctx, lambda: f"these images give {ctx.num_tokens} tokens ({ctx.grid[0]}x{ctx.grid[1]} "
                                           "patches)")
        prune, merge = self.schedule()
        counts = kept_counts(prune, merge, ctx.num_tokens)
        entering = ctx.num_tokens if layer == 0 else counts[layer - 1]
        return frozenset({CLS_ATTN}) if counts[layer] < entering else frozenset()

    def reduce(self, layer, tokens, signals, ctx):
        self.check_width(tokens.x.shape[-1])
        prune, merge = self.schedule()
        return diffrate_reduce(tokens, signals[CLS_ATTN], prune[layer], merge[layer], ctx.num_prefix), None
