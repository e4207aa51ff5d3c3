"""A naive, spec-literal ATS (Adaptive Token Sampling) on ONE image at a time, for cross-checking ``methods/ats.py``.

Written from ``docs/methods.md#ats``, not from the project's code: the block loop, the
attention, the scores and the sampling are written out with the full N x N attention, Python lists and loops.

Precision. The model runs in float64, except where the spec requires float32 to reproduce the reference's
discrete choices, exactly where the reference code itself (run in float64) switches to float32: the attention of
EVERY block is the policy softmax ``p = (exp(l - max) + eps/N) / (sum exp(l - max) + eps)`` (eps = 1e-6, N = the
image's token count, ``eps/N`` a Python double as in the reference) with ``l - max`` computed in the model's dtype
and ``exp``, sum and division in float32; ``p`` is then used in float64. The sampling follows the reference's
arithmetic for a float64 model: scores, cumulative sums and ``G`` in float64 (plain Python floats, summed in token
order), ``u = linspace(0, 1, K)`` and ``u * (K - 1)`` in float32, the rest in float64. A reference computing the
attention entirely in float64 would differ from the reference code by ~1e-7 relative in the scores and could make
another choice at a near-tie.

Readings where the spec is silent (checked against the reference code at batch size 1):
- K = the number of patch tokens entering block 0 (N0 - 1 = 196 at 224/16; N0 - p with p prefix tokens).
- Duplicates are removed by comparing each sorted pick with the next one and the largest with the number 1
  (the reference's padding value): when the only picked position is 1 (two patches left), nothing is kept.
  With one patch left (the reference crashes: G = 0/0) nothing is kept either (position 0 is never picked).
"""

from __future__ import annotations

import math
from typing import Any

import torch

EPS = 1e-6
DEFAULT_LAYERS = [3, 4, 5, 6, 7, 8, 9, 10, 11]


def policy_attention(attn_module, x: torch.Tensor):
    """The block's attention on one image ``x`` (N, C) with ATS's fp32 policy softmax.
    Returns (output (N, C), probabilities (H, N, N) in x's dtype, values (H, N, d))."""
    n_tokens = x.shape[0]
    heads, head_dim = attn_module.num_heads, attn_module.head_dim
    qkv = attn_module.qkv(x).reshape(n_tokens, 3, heads, head_dim)
    q = attn_module.q_norm(qkv[:, 0].transpose(0, 1))
    k = attn_module.k_norm(qkv[:, 1].transpose(0, 1))
    v = qkv[:, 2].transpose(0, 1)
    logits = (q @ k.transpose(-2, -1)) * attn_module.scale  # (H, N, N), in x's dtype
    shifted = (logits - logits.max(dim=-1, keepdim=True).values).float().exp()  # float32 from here
    probs = (shifted + EPS / n_tokens) / (shifted.sum(dim=-1, keepdim=True) + EPS)
    probs = probs.to(x.dtype)
    out = (probs @ v).transpose(0, 1).reshape(n_tokens, heads * head_dim)
    out = attn_module.proj(attn_module.norm(out))
    return out, probs, v


def significance(probs: torch.Tensor, v: torch.Tensor, p: int) -> list[float]:
    """s_j = (sum over heads of A[h, 0, j]) * ||v_j|| for patch tokens j >= p, divided by their sum."""
    heads, n_tokens, _ = probs.shape
    raw = []
    for j in range(p, n_tokens):
        attention = 0.0
        for h in range(heads):
            attention += float(probs[h, 0, j])
        norm = math.sqrt(sum(float(c) ** 2 for c in v[:, j, :].reshape(-1)))
        raw.append(attention * norm)
    total = sum(raw)
    return [s / total for s in raw]


def sample(scores: list[float], num_samples: int) -> list[int]:
    """Inverse transform sampling: the patch indices kept, in ascending significance."""
    m = len(scores)
    if m < 2:
        return []  # one patch: position 0 is never picked
    order = sorted(range(m), key=lambda j: scores[j])  # ascending significance
    cdf, total = [], 0.0
    for j in order:
        total += scores[j]
        cdf.append(total)
    g = [(f - cdf[0]) / (cdf[-1] - cdf[0]) for f in cdf]
    y0 = min(value for value in g if value > 0)
    u32 = torch.linspace(0, 1, num_samples, dtype=torch.float32)
    picks = []
    for i in range(num_samples):
        u_scaled = float(u32[i] * (num_samples - 1))  # float32, as the reference computes it
        y = y0 + (u_scaled - y0 * i) / (num_samples - 1)
        best = 0
        for position in range(1, m):
            if abs(y - g[position]) < abs(y - g[best]):  # strict: the lowest position wins ties
                best = position
        picks.append(best)
    picks.sort()
    kept = []
    for t, position in enumerate(picks):
        following = picks[t + 1] if t + 1 < len(picks) else 1  # the reference pads with the value 1
        if following != position:
            kept.append(position)
    return [order[position] for position in kept]


def reference_single(vit, image: torch.Tensor, layers: list[int] | None = None) -> dict[str, Any]:
    """ATS on one image (C, H, W). Returns logits, per-block token counts (attention / MLP), the original index
    of every final token, and per ATS block the scores and the kept patch indices (entering-token indices)."""
    layers = DEFAULT_LAYERS if layers is None else layers
    p = vit.num_prefix_tokens
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image[None]))))[0]
    num_samples = x.shape[0] - p
    origin = list(range(x.shape[0]))
    tokens_attn, tokens_mlp, decisions = [], [], {}
    for index, block in enumerate(vit.blocks):
        tokens_attn.append(x.shape[0])
        out, probs, v = policy_attention(block.attn, block.norm1(x))
        x = x + block.drop_path1(block.ls1(out))
        if index in layers and x.shape[0] > p:
            scores = significance(probs, v, p)
            kept = sample(scores, num_samples)
            decisions[index] = {"scores": scores, "kept": kept}
            rows = list(range(p)) + [p + j for j in kept]
            x = torch.stack([x[r] for r in rows])
            origin = [origin[r] for r in rows]
        tokens_mlp.append(x.shape[0])
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    logits = vit.forward_head(vit.norm(x[None]))[0]
    return {"logits": logits, "tokens_attn": tokens_attn, "tokens_mlp": tokens_mlp, "origin": origin,
            "decisions": decisions}


@torch.no_grad()
def reference_ats(vit, images: torch.Tensor, layers: list[int] | None = None) -> list[dict[str, Any]]:
    """``reference_single`` for every image of the batch, one at a time (eval mode only)."""
    if vit.training:
        raise ValueError("the reference is defined for eval mode only")
    return [reference_single(vit, images[b], layers) for b in range(images.shape[0])]
