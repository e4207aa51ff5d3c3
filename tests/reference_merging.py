"""A deliberately naive, spec-literal second implementation of PiToMe, ToFu and DiffRate (fixed schedule).

Written from ``docs/methods.md`` (pitome, tofu, diffrate) only (not from ``methods/``), to cross-check the project's batched
implementation. ONE image at a time, the full attention written out (``explicit_attention``), token bookkeeping
with Python lists, loops and Python floats:

    info = reference_merging(vit, images, "pitome", ratio=0.9125)
    info["logits"], info["tokens_in"], info["tokens_out"], info["size"], info["source"]

Readings taken where the spec is silent (they matter only for distilled models or tiny token counts):
- every prefix token (class, distillation) is treated as the class token: never merged, pruned or merged into,
  kept first in its original order; "patch tokens" are the others (PiToMe's T = N - p; DiffRate sorts only them
  and excludes every prefix token as a destination; ToFu protects prefix rows (A side) and columns (B side));
- ToFu's r is also capped at (N - p) // 2 (it binds only for ratios near 0.5 with two prefix tokens);
- ToFu without any prefix token (a global-pool ViT): the surviving A tokens keep their matching order, as ToMe's;
- DiffRate sorts at every block, as its code does (a block that reduces nothing is order-independent).
Ties in a sort keep the lower index first (Python's stable sort); float64 inputs make ties unlikely.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tests.reference_impl import explicit_attention, head_and_sources, stack_traces

DEFAULTS: dict[str, dict[str, Any]] = {
    "pitome": {"ratio": 0.9125},
    "tofu": {"ratio": 0.9125},
    "diffrate": {},  # prune_kept_num and merge_kept_num (explicit lists) are required here
}


def cosine_matrix(vectors: torch.Tensor) -> list[list[float]]:
    """Pairwise cosines of the rows of ``vectors`` (n, d), as nested Python lists."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    return (unit @ unit.T).tolist()


def argmax_first(values: list[float]) -> int:
    best = 0
    for j, value in enumerate(values):
        if value > values[best]:
            best = j
    return best


def elu(z: float) -> float:
    return z if z > 0 else math.exp(z) - 1


# ------------------------------------------------------------------------------------------------ PiToMe

def pitome_step(tokens, sizes, sources, metric, layer: int, depth: int, ratio: float, p: int):
    """Spec steps 1-7 on one image; ``metric`` (N, d) keys averaged over heads."""
    count = len(tokens) - p
    r = math.floor(count - count * ratio)
    if r <= 0:
        return tokens, sizes, sources
    sim = cosine_matrix(metric[p:])
    margin = 0.75 - 0.75 * layer / depth
    energy = [sum(elu(sim[j][t] - margin) for t in range(count)) / count for j in range(count)]
    ranked = sorted(range(count), key=lambda j: -energy[j])  # o_0 (highest energy) ... o_{T-1}
    groups: dict[int, list[int]] = {}  # destination -> patch tokens merged into it
    if layer < math.ceil(depth / 2):  # energy-split bipartite over all T tokens
        a_set, b_set = ranked[0::2], ranked[1::2]
        best = []
        for a in a_set:
            k = argmax_first([sim[a][b] for b in b_set])
            best.append((sim[a][b_set[k]], b_set[k]))
        by_value = sorted(range(len(a_set)), key=lambda i: -best[i][0])
        for i in by_value[:r]:
            groups.setdefault(best[i][1], []).append(a_set[i])
        kept = [a_set[i] for i in by_value[r:]]
        destinations = b_set
    else:  # energy-protected merge of the 2r highest
        a_set, b_set = ranked[0 : 2 * r : 2], ranked[1 : 2 * r : 2]
        for a in a_set:
            groups.setdefault(b_set[argmax_first([sim[a][b] for b in b_set])], []).append(a)
        kept = ranked[2 * r :]
        destinations = b_set
    patch = [(tokens[p + j], sizes[p + j], sources[p + j]) for j in range(count)]
    out = list(zip(tokens[:p], sizes[:p], sources[:p], strict=True)) + [patch[j] for j in kept]
    for d in destinations:
        members = [d, *groups.get(d, [])]
        total = sum(patch[j][1] for j in members)
        x = sum((patch[j][0] * patch[j][1] for j in members[1:]), patch[d][0] * patch[d][1]) / total
        out.append((x, total, set().union(*(patch[j][2] for j in members))))
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


# ------------------------------------------------------------------------------------------------ ToFu

def tofu_step(tokens, sizes, sources, metric, layer: int, depth: int, ratio: float, p: int):
    """Spec steps 1-5 on one image; ``metric`` (N, d) keys averaged over heads."""
    n_tokens = len(tokens)
    r = min(math.floor(n_tokens - n_tokens * ratio), (n_tokens - p) // 2)
    if r <= 0:
        return tokens, sizes, sources
    sim = cosine_matrix(metric)
    a_pos, b_pos = list(range(0, n_tokens, 2)), list(range(1, n_tokens, 2))
    best = []
    for a in a_pos:
        row = [-math.inf if (a < p or b < p) else sim[a][b] for b in b_pos]
        k = argmax_first(row)
        best.append((row[k], b_pos[k]))
    by_value = sorted(range(len(a_pos)), key=lambda i: -best[i][0])
    selected = by_value[:r]
    # re-sorted by position where there is a prefix; without one the code's order stays (ToMe's quirk, as coded)
    kept = sorted(a_pos[i] for i in by_value[r:]) if p else [a_pos[i] for i in by_value[r:]]
    new = {t: (tokens[t], sources[t]) for t in range(n_tokens)}
    if layer > depth // 2:  # MLERP as coded
        groups: dict[int, list[int]] = {}
        for i in selected:
            groups.setdefault(best[i][1], []).append(a_pos[i])
        for b, members in groups.items():
            mean = sum((tokens[a] for a in members), tokens[b]) / (1 + len(members))
            largest = max([float(tokens[b].norm())] + [float(tokens[a].norm()) for a in members])
            x = mean * (largest / float(tokens[b].norm()))
            new[b] = (x, set(sources[b]).union(*(sources[a] for a in members)))
    order = list(range(p)) + [a for a in kept if a >= p] + [b for b in b_pos if b >= p]
    return [new[t][0] for t in order], [sizes[t] for t in order], [new[t][1] for t in order]


# ------------------------------------------------------------------------------------------------ DiffRate

def diffrate_step(tokens, sizes, sources, attn: torch.Tensor, prune_kept: int, merge_kept: int, p: int):
    """Spec steps 1-3 on one image; ``attn`` (H, N, N) post-softmax (size bias included)."""
    heads = attn.shape[0]
    cls_attn = [sum(attn[h, 0, j].item() for h in range(heads)) / heads for j in range(len(tokens))]
    order = list(range(p)) + sorted(range(p, len(tokens)), key=lambda j: -cls_attn[j])
    order = order[:prune_kept]
    tokens, sizes, sources = [tokens[t] for t in order], [sizes[t] for t in order], [sources[t] for t in order]
    if merge_kept >= len(tokens):
        return tokens, sizes, sources
    sim = cosine_matrix(torch.stack(tokens))
    new_x = [[tokens[d]] for d in range(merge_kept)]
    new_size = list(sizes[:merge_kept])
    new_source = [set(sources[d]) for d in range(merge_kept)]
    for t in range(merge_kept, len(tokens)):
        row = [-math.inf if d < p else sim[t][d] for d in range(merge_kept)]
        d = argmax_first(row)
        new_x[d].append(tokens[t])
        new_size[d] += row[d] * sizes[t]
        new_source[d] |= sources[t]
    return [sum(xs[1:], xs[0]) / len(xs) for xs in new_x], new_size, new_source


# ------------------------------------------------------------------------------------------------ one image

def reference_single(vit, image: torch.Tensor, method: str, **params: Any) -> dict[str, Any]:
    params = {**DEFAULTS[method], **params}
    depth, p = len(vit.blocks), vit.num_prefix_tokens
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image[None]))))[0]
    tokens = [x[i] for i in range(x.shape[0])]
    sizes = [1.0] * len(tokens)
    sources = [{i} for i in range(len(tokens))]
    tokens_in, tokens_out = [], []
    for i, blk in enumerate(vit.blocks):
        tokens_in.append(len(tokens))
        x = torch.stack(tokens)
        bias = sizes if method == "diffrate" else None  # proportional attention: DiffRate only
        attn_out, attn, k, _ = explicit_attention(blk.attn, blk.norm1(x), bias)
        x = x + blk.drop_path1(blk.ls1(attn_out))
        tokens = [x[t] for t in range(x.shape[0])]
        if method == "pitome":
            tokens, sizes, sources = pitome_step(tokens, sizes, sources, k.mean(dim=0), i, depth, params["ratio"], p)
        elif method == "tofu":
            tokens, sizes, sources = tofu_step(tokens, sizes, sources, k.mean(dim=0), i, depth, params["ratio"], p)
        elif method == "diffrate":
            tokens, sizes, sources = diffrate_step(tokens, sizes, sources, attn, params["prune_kept_num"][i],
                                                   params["merge_kept_num"][i], p)
        else:
            raise ValueError(f"unknown method {method!r}")
        tokens_out.append(len(tokens))
        x = torch.stack(tokens)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        tokens = [x[t] for t in range(x.shape[0])]
    logits, source = head_and_sources(vit, tokens, sizes, sources, tokens_in[0], vit.num_prefix_tokens)
    return {"logits": logits, "tokens_in": tokens_in, "tokens_out": tokens_out,
            "size": torch.tensor(sizes, dtype=logits.dtype), "source": source}


@torch.no_grad()
def reference_merging(vit, images: torch.Tensor, method: str, **params: Any) -> dict[str, Any]:
    """Per-image reference over a batch: logits (B, classes), token counts per block (equal for every image),
    final sizes (B, N, 1) and sources (B, N, N0) in output order."""
    if vit.training:
        raise ValueError("the reference is defined for eval mode only")
    traces = [reference_single(vit, images[b], method, **params) for b in range(images.shape[0])]
    return stack_traces(traces)
