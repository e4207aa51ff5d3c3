"""MCTF: Lee, Choi, Kim, "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision
Transformers", CVPR 2024 (arXiv 2403.10030); behaviour of the authors' code mlvlab/MCTF.

At each block of ``layers``, r' tokens are fused by a bidirectional bipartite matching of the residual stream
x, weighted by three criteria: similarity (cosine of x), informativeness (1 / attention received) and size.
Fused groups are pooled with attention-and-size weights. With ``one_step_ahead`` 1 the fusion happens at the
start of the block, with the block's own attention computed on the unfused tokens, and that attention is
fused along with the tokens (no new softmax); 2 recomputes the attention on the fused tokens; 0 fuses the
block's output with its attention. See docs/methods.md#mctf.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from methods.base import (
    ATTN,
    END,
    START,
    BudgetKnob,
    Method,
    ReductionContext,
    Rows,
    Step,
    TokenState,
    add_at,
    register,
)
from methods.ops import survivors

MIN_TOKENS = 10  # the reference never fuses below 10 tokens (its ``N - 10`` term)


def fused_count(r: int | float, num_tokens: int, num_prefix: int) -> int:
    """r' at a fusion over ``num_tokens`` tokens: int r: ``min(r, N - 10, (N - p)//2)``; fraction r:
    ``min(int((N - p) * r), (N - p)//2)``, none when N <= 10. <= 0 means no fusion."""
    num_tokens = int(num_tokens)  # a 0-d tensor while torchprofile traces the model
    cap = (num_tokens - num_prefix) // 2
    if isinstance(r, float):
        return 0 if num_tokens <= MIN_TOKENS else min(int((num_tokens - num_prefix) * r), cap)
    return min(r, num_tokens - MIN_TOKENS, cap)


def _arange(batch: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device).expand(batch, n)


def mctf_groups(
    x: torch.Tensor, received: torch.Tensor, size: torch.Tensor | None, r: int, num_prefix: int,
    tau_sim: float, tau_info: float, tau_size: float, bidirection: bool,
) -> tuple[torch.Tensor, int]:
    """The multi-criteria bipartite matching. ``received`` (B, N): attention each token receives (mean over
    heads and queries). Returns ``slot`` (B, N): the output token each input token is fused into, and the
    output count. Output order: prefix tokens, remaining A tokens by position, remaining B tokens in the
    B -> A order (by position without ``bidirection``)."""
    batch, num_tokens, _ = x.shape
    device = x.device
    unit = x / x.norm(dim=-1, keepdim=True)
    a, b = unit[:, ::2], unit[:, 1::2]
    num_a, num_b = a.shape[1], b.shape[1]
    if tau_sim:
        scores = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)
    else:
        scores = x.new_ones(batch, num_a, num_b)
    if tau_info > 0:
        info = 1 / received
        info = info / info.amax(dim=1, keepdim=True)
        scores = scores * (info[:, ::2, None] * info[:, None, 1::2]) ** (1 / tau_info)
    if tau_size and size is not None:
        small = 1 / size[..., 0]
        small = small / small.amax(dim=1, keepdim=True)
        scores = scores * (small[:, ::2, None] * small[:, None, 1::2]) ** (1 / tau_size)
    a_prefix, b_prefix = (num_prefix + 1) // 2, num_prefix // 2
    if a_prefix:
        scores[:, :a_prefix].fill_(-math.inf)
    if b_prefix:
        scores[:, :, :b_prefix].fill_(-math.inf)

    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    # A -> B: the r1 A tokens with the best matches fuse into their best B.
    best, target = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    kept_a, src_a = order[:, r1:], order[:, :r1]
    dst_b = target.gather(1, src_a)
    if num_prefix:
        kept_a = survivors(order, r1)
    num_kept_a, num_kept_b = num_a - r1, num_b - r2

    b_slot = torch.empty(batch, num_b, dtype=torch.long, device=device)
    if bidirection:
        # B -> A: every B token's best among the remaining A tokens; the r2 best fuse into it.
        back = scores.gather(1, kept_a[..., None].expand(-1, -1, num_b)).transpose(1, 2)
        best_back, target_back = back.max(dim=-1)
        order_back = best_back.sort(dim=-1, descending=True).indices
        kept_b, src_b = order_back[:, r2:], order_back[:, :r2]
        b_slot.scatter_(1, kept_b, num_kept_a + _arange(batch, num_kept_b, device))
        b_slot.scatter_(1, src_b, target_back.gather(1, src_b))  # index in kept_a = its output slot
    else:
        b_slot.copy_(num_kept_a + _arange(batch, num_b, device))
    a_slot = torch.empty(batch, num_a, dtype=torch.long, device=device)
    a_slot.scatter_(1, kept_a, _arange(batch, num_kept_a, device))
    a_slot.scatter_(1, src_a, b_slot.gather(1, dst_b))  # follows its B token if that one moved on to A

    slot = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    slot[:, ::2], slot[:, 1::2] = a_slot, b_slot
    num_out = num_kept_a + num_kept_b
    if b_prefix:  # a prefix token on the B side: move every prefix token to the front, in original order
        key = (num_prefix + _arange(batch, num_out, device)).scatter(1, slot[:, :num_prefix],
                                                                     _arange(batch, num_prefix, device))
        slot = key.argsort(dim=1).argsort(dim=1).gather(1, slot)
    return slot, num_out


def mctf_fuse(
    tokens: TokenState, slot: torch.Tensor, num_out: int, weight: torch.Tensor, probs: torch.Tensor | None
) -> TokenState:
    """Pool every group: ``x_G = sum(w x) / sum(w)``, sizes added, sources united. With ``probs`` (B, H, N, N)
    also the fused attention (one-step-ahead): keys summed per group, queries averaged with the weights w."""
    x = tokens.x
    batch, num_tokens, _ = x.shape

    rows = Rows(slot)  # flattened once for the three pools

    def pool(t: torch.Tensor) -> torch.Tensor:
        return add_at(t.new_zeros(batch, num_out, t.shape[-1]), rows, t, inplace=True)

    norm = pool(weight)
    size = pool(tokens.sizes())
    source = None
    if tokens.source is not None:
        index = slot[..., None].expand(-1, -1, tokens.source.shape[-1])
        source = tokens.source.new_zeros(batch, num_out, tokens.source.shape[-1]).scatter_reduce(
            1, index, tokens.source, reduce="amax")
    attn_probs = None
    if probs is not None:
        heads = probs.shape[1]
        by_key = probs.new_zeros(batch, heads, num_tokens, num_out).scatter_add(
            3, slot[:, None, None, :].expand(-1, heads, num_tokens, -1), probs)
        weighted = by_key * weight[:, None]  # (under autocast the weights may be wider than probs)
        attn_probs = weighted.new_zeros(batch, heads, num_out, num_out).scatter_add(
            2, slot[:, None, :, None].expand(-1, heads, -1, num_out), weighted) / norm[:, None]
    return TokenState(x=pool(x * weight) / norm, size=size, source=source, attn_probs=attn_probs)


@register("mctf")
class MCTF(Method):
    """docs/methods.md#mctf"""

    defaults = {
        "r": 16,
        "layers": list(range(1, 12)),
        "prop_attn": True,
        "one_step_ahead": 1,
        "tau_sim": 1,
        "tau_info": 20,
        "tau_size": 40,
        "bidirection": True,
        "pooling_type": 1,
    }
    budget_knob = BudgetKnob("r", kind="int", cheaper="higher")

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        r = params["r"]
        if isinstance(r, float):
            if not 0 < r < 1:
                raise self._error(f"parameter 'r' must be an integer >= 0 or a fraction in (0, 1), got {r!r}")
        else:
            try:
                r = self._count("r", r)
            except ValueError:
                raise self._error(f"parameter 'r' must be an integer >= 0 or a fraction in (0, 1), got {r!r}") from None
        valid: dict[str, Any] = {"r": r, "layers": self._layers(params["layers"]),
                                 "prop_attn": self._bool("prop_attn", params["prop_attn"])}
        for key, allowed in (("one_step_ahead", (0, 1, 2)), ("pooling_type", (0, 1))):
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
                raise self._error(f"parameter {key!r} must be one of {', '.join(map(str, allowed))}, got {value!r}")
            valid[key] = int(value)
        for key in ("tau_sim", "tau_info", "tau_size"):
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise self._error(f"parameter {key!r} must be a number >= 0 (0 disables it), got {value!r}")
            valid[key] = value
        valid["bidirection"] = self._bool("bidirection", params["bidirection"])
        return valid

    def check(self, ctx: ReductionContext) -> None:
        self._check_layers(ctx)

    def check_budget(self, ctx: ReductionContext) -> None:
        if isinstance(self.params["r"], int):
            self._check_r(self.params["r"], ctx)

    def schedule(self, ctx: ReductionContext) -> list[int]:
        """r' of every block (0: plain): the count depends only on the token count, known in advance."""
        counts, num_tokens = [], int(ctx.num_tokens)
        for layer in range(ctx.depth):
            r = max(fused_count(self.params["r"], num_tokens, ctx.num_prefix), 0) if layer in self.params["layers"] else 0
            counts.append(r)
            num_tokens = num_tokens - r
        return counts

    def step(self, layer: int, ctx: ReductionContext) -> Step | None:
        if self.schedule(ctx)[layer] <= 0:
            return None
        return Step(START if self.params["one_step_ahead"] else END, frozenset({ATTN}))

    def reduce(self, layer, tokens, signals, ctx):
        r = fused_count(self.params["r"], tokens.x.shape[1], ctx.num_prefix)
        if r <= 0:
            return tokens, None
        p = self.params
        probs = signals[ATTN]
        with torch.no_grad():  # the matching and the pooling weights are not differentiated (as the reference)
            received = probs.mean(dim=(1, 2))  # attention each token receives
            slot, num_out = mctf_groups(tokens.x, received, tokens.size, r, ctx.num_prefix, p["tau_sim"],
                                        p["tau_info"], p["tau_size"], p["bidirection"])
            size = tokens.sizes()
            weight = received[..., None] * (size / size.amax(dim=1, keepdim=True)) if p["pooling_type"] == 1 else size
        fused = mctf_fuse(tokens, slot, num_out, weight, probs if p["one_step_ahead"] == 1 else None)
        return fused, None
