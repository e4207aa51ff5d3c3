"""The attention of a timm block, run on ``scaled_dot_product_attention`` in every case, returning the
signals the active method needs from it.

Proportional attention (ToMe/PPT) adds ``log(size_j)`` to the logit of key j: that is an additive float
mask, so the fused kernel stays. Signals that need the class token's attention compute only that row
(q[:, :, 0] against all keys), never the N x N matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import CLS_ATTN, METRIC, PPT_SCORE


def size_bias(size: torch.Tensor | None) -> torch.Tensor | None:
    """The additive mask (B, 1, 1, N) of proportional attention, or None before any reduction."""
    if size is None:
        return None
    return size.log()[:, None, None, :, 0]


def attention(
    attn: nn.Module,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    needs: frozenset[str],
    num_prefix: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """timm's ``Attention.forward`` (q/k norm, attention-output norm and gate honoured) with an additive
    ``bias``, plus the requested signals."""
    batch, num_tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)  # autocast runs q/k in half precision; the mask must match
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    out = out.transpose(1, 2).reshape(batch, num_tokens, -1)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))

    signals: dict[str, torch.Tensor] = {}
    if METRIC in needs:
        signals[METRIC] = k.mean(dim=1)
    if CLS_ATTN in needs or PPT_SCORE in needs:
        cls_row = class_attention(q, k, bias, attn.scale)  # (B, H, N)
        if CLS_ATTN in needs:
            signals[CLS_ATTN] = cls_row.mean(dim=1)
        if PPT_SCORE in needs:
            signals[PPT_SCORE] = ppt_score(cls_row, v, num_prefix)
    return out, signals


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
