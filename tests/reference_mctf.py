"""A deliberately naive, spec-literal second implementation of MCTF (``docs/methods.md#mctf``), to
cross-check ``methods/mctf.py``.

One image at a time, float64, Python lists and loops: tokens are a list of (C,) vectors, sizes a list of
floats, sources a list of sets, and the fusion is written as explicit groups (a surviving token and the list of
tokens fused into it). Written from the spec text, not from the project's code nor the authors'.

    logits = mctf_reference_forward(vit, images, r=16, one_step_ahead=1)
    info = mctf_reference_trace(vit, image, r=4)   # logits, tokens per block, sizes, sources

Readings of the spec for prefix tokens (not covered by the reference code; docs/methods.md#prefix-tokens):
p prefix tokens (class, distillation) are never sources nor destinations in either direction, come first
in the output in their original order, and the counts use ``N - p`` where the spec writes ``N - 1``. Without any
prefix token (a global-pool ViT) the surviving A tokens keep their matching order (the code sorts them only when
it protects tokens).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tests.reference_impl import explicit_attention, head_and_sources, stack_traces

DEFAULTS: dict[str, Any] = {
    "r": 16, "layers": list(range(1, 12)), "prop_attn": True, "one_step_ahead": 1, "tau_sim": 1, "tau_info": 20,
    "tau_size": 40, "bidirection": True, "pooling_type": 1,
}


def fused_count(r: int | float, n: int, p: int) -> int:
    """r' over n tokens (<= 0: no fusion)."""
    if isinstance(r, float):
        if n <= 10:
            return 0
        return min(int((n - p) * r), (n - p) // 2)
    return min(r, n - 10, (n - p) // 2)


def _best(values: list[float]) -> tuple[float, int]:
    """(max, first index of the max)."""
    j = 0
    for t in range(1, len(values)):
        if values[t] > values[j]:
            j = t
    return values[j], j


def fuse(tokens: list[torch.Tensor], sizes: list[float], sources: list[set[int]], attn: torch.Tensor, r: int,
         p: int, params: dict[str, Any], fused_size_known: bool):
    """One MCTF fusion of one image. ``attn`` (H, N, N) post-softmax. ``fused_size_known``: a fusion happened
    before (W_size is 1 before the first). Returns tokens, sizes, sources, the fused attention (H, N', N')."""
    n = len(tokens)
    heads = attn.shape[0]
    # attention received by token j: mean over heads and queries
    probs = attn.tolist()
    received = [sum(probs[h][i][j] for h in range(heads) for i in range(n)) / (heads * n) for j in range(n)]
    inv_g = [1 / g for g in received]
    u = [v / max(inv_g) for v in inv_g]
    inv_s = [1 / s for s in sizes]
    v = [t / max(inv_s) for t in inv_s]
    unit = [t / t.norm() for t in tokens]

    a_pos = list(range(0, n, 2))
    b_pos = list(range(1, n, 2))

    def weight(i: int, j: int) -> float:  # i in A, j in B (token positions)
        if i < p or j < p:
            return -math.inf
        w = 1.0
        if params["tau_sim"]:
            w *= ((torch.dot(unit[i], unit[j]).item() + 1) / 2) ** (1 / params["tau_sim"])
        if params["tau_info"] > 0:
            w *= (u[i] * u[j]) ** (1 / params["tau_info"])
        if params["tau_size"] and fused_size_known:
            w *= (v[i] * v[j]) ** (1 / params["tau_size"])
        return w

    W = {(i, j): weight(i, j) for i in a_pos for j in b_pos}
    if params["bidirection"]:
        r1, r2 = r // 2, r - r // 2
    else:
        r1, r2 = r, 0

    groups: dict[int, list[int]] = {t: [t] for t in range(n)}  # surviving token -> members
    # A -> B
    best_a = {i: _best([W[i, j] for j in b_pos]) for i in a_pos}
    a_order = sorted(a_pos, key=lambda i: -best_a[i][0])
    for i in a_order[:r1]:
        j = b_pos[best_a[i][1]]
        groups[j] += groups.pop(i)
    # re-sorted by position where there is a prefix; without one the matching order stays (the code sorts only
    # when it protects tokens, as ToMe's)
    a_left = sorted(a_order[r1:]) if p else a_order[r1:]
    # B -> A
    if params["bidirection"]:
        best_b = {j: _best([W[i, j] for i in a_left]) for j in b_pos}
        b_order = sorted(b_pos, key=lambda j: -best_b[j][0])
        for j in b_order[:r2]:
            i = a_left[best_b[j][1]]
            groups[i] += groups.pop(j)
        b_left = b_order[r2:]
    else:
        b_left = list(b_pos)
    out_order = list(range(p)) + [i for i in a_left if i >= p] + [j for j in b_left if j >= p]
    assert sorted(out_order) == sorted(groups)

    max_size = max(sizes)
    w = [sizes[t] if params["pooling_type"] == 0 else received[t] * sizes[t] / max_size for t in range(n)]
    new_tokens, new_sizes, new_sources = [], [], []
    membership = torch.zeros(len(out_order), n, dtype=attn.dtype)  # 1 where token m belongs to group g
    query_weight = torch.zeros(len(out_order), n, dtype=attn.dtype)  # w_m / sum of w over m's group
    for g, t in enumerate(out_order):
        members = groups[t]
        total = sum(w[m] for m in members)
        x = tokens[members[0]] * 0
        for m in members:
            x = x + tokens[m] * w[m]
            membership[g, m] = 1.0
            query_weight[g, m] = w[m] / total
        new_tokens.append(x / total)
        new_sizes.append(sum(sizes[m] for m in members))
        new_sources.append(set().union(*(sources[m] for m in members)))
    # P'[h, G, G'] = sum_{i in G} w_i sum_{j in G'} P[h, i, j] / sum_{i in G} w_i
    fused_attn = query_weight[None] @ attn @ membership.T[None]
    return new_tokens, new_sizes, new_sources, fused_attn


def _heads_out(attn_module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The attention output with given probabilities (H, N, N): values of x, heads concatenated, norm, proj."""
    _, _, _, values = explicit_attention(attn_module, x, None)
    out = (probs @ values).transpose(0, 1).reshape(x.shape[0], -1)
    return attn_module.proj(attn_module.norm(out))


def mctf_reference_trace(vit, image: torch.Tensor, **params: Any) -> dict[str, Any]:
    """MCTF on one image (C, H, W): logits, token counts entering / leaving each block, sizes, sources."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}")
    params = {**DEFAULTS, **params}
    p = vit.num_prefix_tokens
    osa = params["one_step_ahead"]
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image[None]))))[0]
    tokens = [x[t] for t in range(x.shape[0])]
    sizes = [1.0] * len(tokens)
    sources = [{t} for t in range(len(tokens))]
    fused_before = False
    tokens_in, tokens_out = [], []
    for layer, blk in enumerate(vit.blocks):
        tokens_in.append(len(tokens))
        active = layer in params["layers"]
        r = fused_count(params["r"], len(tokens), p) if active else 0
        attn_sizes = sizes if params["prop_attn"] else None
        x = torch.stack(tokens)
        if r > 0 and osa in (1, 2):
            _, probs, _, _ = explicit_attention(blk.attn, blk.norm1(x), attn_sizes)
            tokens, sizes, sources, fused_attn = fuse(tokens, sizes, sources, probs, r, p, params, fused_before)
            fused_before = True
            x = torch.stack(tokens)
            if osa == 1:
                attn_out = _heads_out(blk.attn, blk.norm1(x), fused_attn)
            else:
                attn_out, _, _, _ = explicit_attention(blk.attn, blk.norm1(x), sizes if params["prop_attn"] else None)
        else:
            attn_out, probs, _, _ = explicit_attention(blk.attn, blk.norm1(x), attn_sizes)
        x = x + blk.drop_path1(blk.ls1(attn_out))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        tokens = [x[t] for t in range(x.shape[0])]
        if r > 0 and osa == 0:
            tokens, sizes, sources, _ = fuse(tokens, sizes, sources, probs, r, p, params, fused_before)
            fused_before = True
        tokens_out.append(len(tokens))
    logits, source = head_and_sources(vit, tokens, sizes, sources, tokens_in[0], vit.num_prefix_tokens)
    return {"logits": logits, "tokens_in": tokens_in, "tokens_out": tokens_out,
            "size": torch.tensor(sizes, dtype=logits.dtype), "source": source}


@torch.no_grad()
def mctf_reference(vit, images: torch.Tensor, **params: Any) -> dict[str, Any]:
    """``mctf_reference_trace`` for every image, one at a time; logits / sizes / sources stacked."""
    if vit.training:
        raise ValueError("the reference is defined for eval mode only")
    traces = [mctf_reference_trace(vit, images[b], **params) for b in range(images.shape[0])]
    return stack_traces(traces)


def mctf_reference_forward(vit, images: torch.Tensor, **params: Any) -> torch.Tensor:
    return mctf_reference(vit, images, **params)["logits"]
