"""The attention of a timm block, returning the signals the active method needs from it.

By default it runs on ``scaled_dot_product_attention``: proportional attention (ToMe/PPT) adds
``log(size_j)`` to the logit of key j and padding (ragged batches) adds ``-inf``, both in one additive float
mask, so the fused kernel stays. Signals that need the class token's attention compute only that row
(q[:, :, 0] against all keys), never the N x N matrix. The full matrix is computed (and then also used for
the output, so nothing is computed twice) only where a method asks for it (``ATTN``) or where its numerics
require it (``mode`` ``explicit`` / ``policy``), and in every block inside ``sdpa_backend("explicit")`` (the
experiment's ``sdpa_backend: explicit``, ``bench/sdpa.py``). See ``docs/methods.md#the-block-loop``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.sdpa import written_out
from methods.base import ATTN, CLS_ATTN, METRIC, PPT_SCORE

POLICY_EPS = 1e-6  # ATS's softmax epsilon (docs/methods.md#ats)


def key_bias(size: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The additive mask (B, 1, 1, N): ``log(size)`` (proportional attention) and ``-inf`` for padded keys;
    None when neither applies (the dense path stays exactly timm's)."""
    bias = None if size is None else size.log().reshape(size.shape[0], 1, 1, size.shape[1])
    if mask is not None:
        pad = torch.zeros(mask.shape, dtype=torch.float32 if bias is None else bias.dtype, device=mask.device)
        pad = pad.masked_fill(~mask, float("-inf"))[:, None, None, :]
        bias = pad if bias is None else bias + pad
    return bias


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where ``t`` already has it: every block's no-op conversions were dispatches
    of their own, which eager between the blocks cost more than their nothing (docs/benchmark.md)."""
    return t if t.dtype == dtype else t.to(dtype)


_PARTS = {"qkv": (0, 3), "qk": (0, 2), "v": (2, 3)}  # which thirds of timm's fused qkv weight


def project(attn: nn.Module, x: torch.Tensor, parts: str = "qkv") -> list[torch.Tensor]:
    """The block's ``parts`` (``qkv``, ``qk`` or ``v``) of ``x`` (B, N, C), each (B, H, N, d), q and k after
    ``q_norm``/``k_norm``. Only the requested parts are projected (their MACs only)."""
    batch, num_tokens, _ = x.shape
    first, last = _PARTS[parts]
    width = attn.num_heads * attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if (first, last) != (0, 3):
        weight = weight[first * width : last * width]
        bias = None if bias is None else bias[first * width : last * width]
    out = F.linear(x, weight, bias).reshape(batch, num_tokens, last - first, attn.num_heads, attn.head_dim)
    named = dict(zip(parts, out.permute(2, 0, 3, 1, 4).unbind(0), strict=True))
    if "q" in named:
        named["q"] = attn.q_norm(named["q"])
    if "k" in named:
        named["k"] = attn.k_norm(named["k"])
    return [named[p] for p in parts]


def probabilities(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, mode: str = "explicit",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The post-softmax attention (B, H, N, N), written out.

    ``explicit``: ``softmax((q k^T) * scale + bias)`` in the working dtype. ``policy`` (ATS): in float32,
    ``p = (exp(l - max) + eps/n) / (sum exp(l - max) + eps)`` over the image's real keys (``n`` of them,
    max and sum over those only), exactly 0 for padded keys."""
    if mode == "policy":
        # the official ATS numerics: logits in (at least) float32, exp and normalisation in float32
        work = torch.promote_types(q.dtype, torch.float32)
        logits = (q.to(work) @ k.to(work).transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias.to(work)
        real = None if mask is None else mask[:, None, None, :]
        if real is not None:
            logits = logits.masked_fill(~real, float("-inf"))
        shifted = (logits - logits.amax(dim=-1, keepdim=True)).float().exp()
        if mask is None:
            leak = POLICY_EPS / q.shape[2]  # a Python number: rounded to float32 by the add, no tensor from the host
        else:
            leak = (POLICY_EPS / mask.sum(dim=-1).double()).float()[:, None, None, None]
        probs = (shifted + leak) / (shifted.sum(dim=-1, keepdim=True) + POLICY_EPS)
        if real is not None:
            probs = probs.masked_fill(~real, 0.0)
        return probs.to(work)  # kept in float32 (or float64) for the signals, also under autocast
    if bias is not None and q.device.type == "cpu" and torch.compiler.is_compiling():
        return biased_logits(q, k, cast(bias, q.dtype), scale).softmax(dim=-1)
    logits = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + cast(bias, logits.dtype)
    return logits.softmax(dim=-1)


def biased_logits(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``(q k^T) * scale + bias`` (B, H, Nq, Nk) by one ``baddbmm``: the product's own epilogue scales it and adds
    the bias (rounded once there, where eager rounds the scaled product and the sum: ~1e-6 on the output). Used
    compiled for the CPU, where inductor fuses the written-out ``+ bias`` and softmax into a kernel that makes
    three passes over the logits instead of one per row: 0.55 against 0.43 ms per attention at batch 64, 3 heads,
    40 tokens (a block without a bias: 0.42); compiled ToMe r=5 on the quickstart's model 3.5 % faster."""
    batch, heads, queries, width = q.shape
    keys = k.shape[2]
    logits = torch.baddbmm(bias.expand(batch, heads, queries, keys).reshape(batch * heads, queries, keys),
                           q.reshape(batch * heads, queries, width),
                           k.reshape(batch * heads, keys, width).transpose(-2, -1), alpha=scale)
    return logits.view(batch, heads, queries, keys)


def output(attn: nn.Module, x: torch.Tensor, heads_out: torch.Tensor) -> torch.Tensor:
    """The block's attention output from the per-head results (B, H, N, d): attention-output norm, gate,
    projection (timm's ``Attention.forward`` after the attention itself)."""
    batch, _, num_tokens, _ = heads_out.shape
    out = heads_out.transpose(1, 2).reshape(batch, num_tokens, -1)
    out = getattr(attn, "norm", nn.Identity())(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def attention(
    attn: nn.Module,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    needs: frozenset[str],
    num_prefix: int,
    mode: str = "fused",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """timm's ``Attention.forward`` (q/k norm, attention-output norm and gate honoured) with an additive
    ``bias``, plus the requested signals. ``mode``: ``fused`` (SDPA unless ``ATTN`` is needed or the kernel
    is pinned to ``explicit``), ``explicit`` or ``policy`` (see ``probabilities``); ``mask`` (B, N): real
    tokens, for the policy softmax."""
    q, k, v = project(attn, x)
    if bias is not None:
        bias = cast(bias, q.dtype)  # autocast runs q/k in half precision; the mask must match
    probs = None
    if mode != "fused" or ATTN in needs or written_out():
        # The keys as their own (B, H, N, d) tensor, in every written-out block (dense ones too): ``q @ k^T``
        # multiplies them as a transposed view instead of copying them transposed itself (same products, same
        # values), and ToMe's metric (their mean over heads) reads them contiguous: 44 against 70 us at batch 64,
        # 3 heads, 50 tokens (docs/benchmark.md, "Fewer dispatches between the blocks").
        k = k.contiguous()
        probs = probabilities(q, k, bias, attn.scale, "explicit" if mode == "fused" else mode, mask)
        heads_out = cast(attn.attn_drop(probs), v.dtype) @ v
    else:
        dropout = attn.attn_drop.p if attn.training else 0.0
        heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    out = output(attn, x, heads_out)

    signals: dict[str, torch.Tensor] = {}
    if ATTN in needs:
        signals[ATTN] = probs
    if METRIC in needs:
        signals[METRIC] = k.mean(dim=1)
    if CLS_ATTN in needs or PPT_SCORE in needs:
        cls_row = probs[:, :, 0] if probs is not None else class_attention(q, k, bias, attn.scale)  # (B, H, N)
        if CLS_ATTN in needs:
            signals[CLS_ATTN] = cls_row.mean(dim=1)
        if PPT_SCORE in needs:
            signals[PPT_SCORE] = ppt_score(cls_row, v, num_prefix)
    return out, signals


def attention_before(
    attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, needs: frozenset[str], mode: str = "fused",
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Signals of a block's attention on ``x`` computed before a START reduction: q and k only (``ATTN``:
    the full post-softmax attention; ``METRIC``: keys averaged over heads)."""
    q, k = project(attn, x, "qk")
    if bias is not None:
        bias = cast(bias, q.dtype)
    signals: dict[str, torch.Tensor] = {}
    if ATTN in needs:
        k = k.contiguous()  # as in ``attention``'s written-out blocks
        signals[ATTN] = probabilities(q, k, bias, attn.scale, "explicit" if mode == "fused" else mode, mask)
    if METRIC in needs:
        signals[METRIC] = k.mean(dim=1)
    return signals


def attention_from_probs(attn: nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """A block's attention output with given post-softmax probabilities (B, H, N, N) (MCTF's one-step-ahead:
    the attention merged along with the tokens): only the values of ``x`` are projected."""
    (v,) = project(attn, x, "v")
    return output(attn, x, attn.attn_drop(cast(probs, v.dtype)) @ v)


def class_attention(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Post-softmax attention of query 0 to every key, per head: (B, H, N)."""
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)[:, :, 0]


def ppt_score(cls_row: torch.Tensor, v: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """PPT's importance of each patch token: class attention summed over heads, times the L2 norm of the
    token's value over all heads together; normalised over the patch tokens to sum to 1. (B, N - p)."""
    batch, _, num_tokens, _ = v.shape
    value_norm = v.transpose(1, 2).reshape(batch, num_tokens, -1).norm(dim=-1)  # (B, N)
    score = cls_row.sum(dim=1)[:, num_prefix:] * value_norm[:, num_prefix:]
    return score / score.sum(dim=-1, keepdim=True)
