"""A deliberately naive, spec-literal second implementation of every token-reduction method.

Written from the semantics in ``docs/methods.md`` only (not from the project's ``methods/``/``bench/`` code, nor from the
authors' repositories), to cross-check the project's fast batched implementation. Everything here works
on ONE image at a time, computes the full (N x N) attention explicitly, and implements the reductions
with plain Python lists and loops: clarity over speed.

    logits = reference_forward(vit, images, "tome", r=3)
    info = reference_tokens(vit, images, "ppt", r=8, threshold=1e-3)
    info["tokens_in"], info["tokens_out"], info["pooled_fraction"], info["variances"]

Readings of the spec taken where it is silent (all of them only matter for distilled models or edge cases):
- "patch tokens" are the non-prefix tokens (index >= p, p = 1 class token, or 2 with a distillation token).
  PPT scores, their normalisation and variance, and EViT's top-k are over these tokens only; prefix tokens
  are always kept, first, in their original order (class, distillation).
- The r cap at a PPT layer is ``(N - p) // 2`` (the spec's ``(N - 1) // 2`` for a class token only), so that
  both branches remove the same number of tokens; for even N with p = 2 the two formulas agree anyway.
- EViT keeps ``ceil(keep_rate * (N - p))`` patch tokens; when nothing is dropped the layer returns its tokens
  unchanged (original order, no fused token), as EViT's own code does.
- Register tokens (DINOv2 / ViT ``reg4``) are prefix tokens like the distillation token: ToMe's alternating
  split puts them on both sides; prefix rows and columns are excluded from matching.
- Models without a class token pool by average: the pooled feature weights each token by its size over the
  original patch count; without prefix tokens ToMe's surviving A tokens keep their similarity order.
- ToMe's ``metric`` is the keys after ``attn.k_norm`` (the keys the attention actually uses), averaged over heads.
"""

from __future__ import annotations

import math
from typing import Any

import torch

METHODS = ("baseline", "tome", "ppt", "pruning", "pooling", "evit", "topk")
DEFAULTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "tome": {"inflection": 0, "prop_attn": True},
    "ppt": {"layers": [3, 6, 9], "threshold": 7e-5, "prop_attn": True},
    "pruning": {"layers": [3, 6, 9], "prop_attn": True},
    "pooling": {"layers": [3, 6, 9], "prop_attn": True},
    "evit": {"keep_rate": 0.7, "layers": [3, 6, 9]},
    "topk": {"keep_rate": 0.7, "layers": [3, 6, 9]},
}


# ----------------------------------------------------------------------------------------------- schedules

def tome_schedule(r: int | list[int], depth: int, inflection: float = 0) -> list[int]:
    """ToMe's per-layer r (before the per-layer cap)."""
    if isinstance(r, (list, tuple)):
        values = [int(v) for v in r]
        if len(values) > depth:
            raise ValueError(f"r list of length {len(values)} for a model of depth {depth}")
        return values + [0] * (depth - len(values))
    lo = int(r * (1 - inflection))
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1)
    return [int(lo + step * i) for i in range(depth)]


# ----------------------------------------------------------------------------------------------- attention

def explicit_attention(attn_module, x: torch.Tensor, size: list[float] | None):
    """timm ``Attention`` on one image ``x`` (N, C), written out with the full N x N matrix.

    ``size``: per-token sizes for proportional attention (``log(size_j)`` added to key j's logits), or None.
    Returns (output (N, C), attention (H, N, N) post-softmax, keys (H, N, d) after k_norm, values (H, N, d)).
    """
    if getattr(attn_module, "gate", None) is not None:
        raise NotImplementedError("gated attention is not covered by the reference")
    n_tokens = x.shape[0]
    heads = attn_module.num_heads
    head_dim = attn_module.head_dim
    qkv = attn_module.qkv(x)  # (N, 3 * H * d)
    qkv = qkv.reshape(n_tokens, 3, heads, head_dim)
    q = qkv[:, 0].transpose(0, 1)  # (H, N, d)
    k = qkv[:, 1].transpose(0, 1)
    v = qkv[:, 2].transpose(0, 1)
    q = attn_module.q_norm(q)
    k = attn_module.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn_module.scale  # (H, N, N)
    if size is not None:
        bias = torch.tensor([math.log(s) for s in size], dtype=x.dtype)
        logits = logits + bias[None, None, :]
    attn = logits.softmax(dim=-1)
    out = attn @ v  # (H, N, d)
    out = out.transpose(0, 1).reshape(n_tokens, heads * head_dim)
    out = attn_module.norm(out)
    out = attn_module.proj(out)
    return out, attn, k, v


# ----------------------------------------------------------------------------------------------- reductions

def tome_merge(tokens: list[torch.Tensor], sizes: list[float], sources: list[set[int]], metric: torch.Tensor,
               r: int, p: int):
    """Bipartite soft matching on one image. ``tokens``: list of (C,) vectors; ``sizes``: their sizes;
    ``sources``: the input patches each stands for; ``metric``: (N, d). Returns the three lists reduced."""
    n_tokens = len(tokens)
    r = min(r, (n_tokens - p) // 2)
    if r <= 0:
        return tokens, sizes, sources
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a_pos = list(range(0, n_tokens, 2))
    b_pos = list(range(1, n_tokens, 2))
    similarity = (unit[a_pos] @ unit[b_pos].T).tolist()  # cosine similarity, len(A) x len(B)
    best_value = []
    best_index = []
    for ai in range(len(a_pos)):
        values = list(similarity[ai])
        if a_pos[ai] < p:  # prefix tokens on the A side (class token, registers at even positions) never merge
            values = [-math.inf] * len(values)
        for bj in range(len(b_pos)):
            if b_pos[bj] < p:  # prefix tokens on the B side (distillation token, ...) receive nothing
                values[bj] = -math.inf
        j = max(range(len(values)), key=lambda t: values[t])
        best_value.append(values[j])
        best_index.append(j)
    order = sorted(range(len(a_pos)), key=lambda t: -best_value[t])
    merged = order[:r]
    # with prefix tokens the surviving A tokens return to position order (so the prefix stays first);
    # without any (global-average-pool models) they stay in descending order of their best similarity
    kept = sorted(order[r:]) if p else order[r:]
    assert all(ai in kept for ai in range(len(a_pos)) if a_pos[ai] < p), "prefix tokens must never be merged"

    b_sum = [tokens[b] * sizes[b] for b in b_pos]
    b_size = [sizes[b] for b in b_pos]
    b_source = [set(sources[b]) for b in b_pos]
    for ai in merged:
        a = a_pos[ai]
        j = best_index[ai]
        b_sum[j] = b_sum[j] + tokens[a] * sizes[a]
        b_size[j] = b_size[j] + sizes[a]
        b_source[j] |= sources[a]
    b_tokens = [b_sum[j] / b_size[j] for j in range(len(b_pos))]

    a_tokens = [tokens[a_pos[ai]] for ai in kept]
    a_sizes = [sizes[a_pos[ai]] for ai in kept]
    a_source = [sources[a_pos[ai]] for ai in kept]
    a_prefix, b_prefix = (p + 1) // 2, p // 2

    # the prefix tokens in their original order (alternating A, B), then the remaining A, then the remaining B
    def order_tokens(a_list, b_list):
        prefix = [a_list[i // 2] if i % 2 == 0 else b_list[i // 2] for i in range(p)]
        return prefix + a_list[a_prefix:] + b_list[b_prefix:]

    return order_tokens(a_tokens, b_tokens), order_tokens(a_sizes, b_size), order_tokens(a_source, b_source)


def ppt_scores(attn: torch.Tensor, v: torch.Tensor, p: int) -> list[float]:
    """Normalised PPT importance of the patch tokens (index >= p): sum over heads of attn[h, 0, i]
    times the L2 norm of token i's (all-heads) value vector, normalised to sum to 1."""
    heads, n_tokens, _ = attn.shape
    cls_attention = attn[:, 0, :].sum(dim=0).tolist()  # summed over heads, (N,)
    value_norm = v.transpose(0, 1).reshape(n_tokens, -1).norm(dim=-1).tolist()  # heads concatenated
    raw = [cls_attention[i] * value_norm[i] for i in range(p, n_tokens)]
    total = sum(raw)
    return [s / total for s in raw]


def unbiased_variance(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return math.nan  # undefined (as torch.var): "v < threshold" is then false, i.e. pruning
    mean = sum(values) / n
    return sum((s - mean) ** 2 for s in values) / (n - 1)


def ppt_prune(tokens: list[torch.Tensor], sizes: list[float], sources: list[set[int]], scores: list[float],
              r: int, p: int):
    """Keep the N - r highest scoring tokens in descending score order; prefix tokens (score 2) first."""
    n_tokens = len(tokens)
    full = [2.0] * p + list(scores)
    order = sorted(range(n_tokens), key=lambda t: -full[t])  # stable: class before distillation token
    keep = order[: n_tokens - r]
    assert keep[:p] == list(range(p))
    return [tokens[i] for i in keep], [sizes[i] for i in keep], [sources[i] for i in keep]


def evit_reduce(tokens: list[torch.Tensor], sizes: list[float], sources: list[set[int]], attn: torch.Tensor,
                keep_rate: float, p: int, fuse: bool):
    heads, n_tokens, _ = attn.shape
    cls_attn = (attn[:, 0, :].sum(dim=0) / heads).tolist()  # mean over heads, (N,)
    patches = list(range(p, n_tokens))
    keep = math.ceil(keep_rate * (n_tokens - p))
    if keep >= len(patches):  # nothing to drop: the layer leaves the tokens as they are (no re-sorting)
        return tokens, sizes, sources
    order = sorted(patches, key=lambda i: -cls_attn[i])
    kept = order[:keep]
    dropped = order[keep:]
    new_tokens = tokens[:p] + [tokens[i] for i in kept]
    new_sizes = sizes[:p] + [sizes[i] for i in kept]
    new_sources = sources[:p] + [sources[i] for i in kept]
    if fuse and dropped:
        fused = tokens[dropped[0]] * 0
        fused_size = 0.0
        fused_source: set[int] = set()
        for i in dropped:
            fused = fused + tokens[i] * cls_attn[i]
            fused_size += sizes[i]
            fused_source |= sources[i]
        new_tokens.append(fused)
        new_sizes.append(fused_size)
        new_sources.append(fused_source)
    return new_tokens, new_sizes, new_sources


def head_and_sources(vit, tokens: list[torch.Tensor], sizes: list[float], sources: list[set[int]], n_input: int,
                     p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one image's final tokens, and the (N, N0) boolean map from output to input tokens.

    Average-pool heads weight each token by its size over the sum of those sizes (the original number of
    patches after merges, ToMe's rule for MAE; fewer after pruning); class-token heads read token 0."""
    x = vit.norm(torch.stack(tokens)[None])
    if vit.global_pool == "avg":
        pooled = sum(x[0, t] * sizes[t] for t in range(p, len(tokens))) / sum(sizes[p:])
        logits = vit.head(vit.fc_norm(pooled[None]))[0]
    else:
        logits = vit.forward_head(x)[0]
    source = torch.zeros(len(sources), n_input, dtype=torch.bool)
    for t, members in enumerate(sources):
        source[t, sorted(members)] = True
    return logits, source


def stack_traces(traces: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-image traces (each with logits, tokens_in / tokens_out, size, source) as one batch: the images must
    agree on the token counts; logits, sizes (B, N, 1) and sources (B, N, N0) are stacked."""
    for trace in traces:
        assert trace["tokens_in"] == traces[0]["tokens_in"] and trace["tokens_out"] == traces[0]["tokens_out"], \
            "images disagree on token counts"
    return {
        "logits": torch.stack([t["logits"] for t in traces]),
        "tokens_in": traces[0]["tokens_in"],
        "tokens_out": traces[0]["tokens_out"],
        "size": torch.stack([t["size"] for t in traces])[..., None],
        "source": torch.stack([t["source"] for t in traces]),
    }


# ----------------------------------------------------------------------------------------------- one image

def _params(vit, method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    merged = dict(DEFAULTS[method])
    merged.update(params)
    unknown = set(merged) - set(DEFAULTS[method]) - ({"r"} if method in ("tome", "ppt", "pruning", "pooling") else set())
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)} for {method}")
    if method == "pruning":
        merged["threshold"] = 0.0
    if method == "pooling":
        merged["threshold"] = math.inf
    return merged


def reference_single(vit, image: torch.Tensor, method: str, **params: Any) -> dict[str, Any]:
    """Run ``vit`` with ``method`` on one image (C, H, W). Returns logits, token counts and per-layer info."""
    params = _params(vit, method, params)
    depth = len(vit.blocks)
    p = vit.num_prefix_tokens  # class, distillation and register tokens (0 for global-average-pool models)

    x = vit.patch_embed(image[None])
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)[0]  # (N, C)
    tokens = [x[i] for i in range(x.shape[0])]
    sizes = [1.0] * len(tokens)
    sources = [{i} for i in range(len(tokens))]

    prop_attn = method in ("tome", "ppt", "pruning", "pooling") and params["prop_attn"]
    schedule = tome_schedule(params["r"], depth, params["inflection"]) if method == "tome" else None
    layers = set(params.get("layers", []))

    tokens_in, tokens_out = [], []
    branch: dict[int, str] = {}
    variances: dict[int, float] = {}
    for i, blk in enumerate(vit.blocks):
        x = torch.stack(tokens)
        tokens_in.append(len(tokens))
        attn_out, attn, k, v = explicit_attention(blk.attn, blk.norm1(x), sizes if prop_attn else None)
        x = x + blk.drop_path1(blk.ls1(attn_out))
        tokens = [x[t] for t in range(x.shape[0])]

        if method == "tome" and schedule[i] > 0:
            tokens, sizes, sources = tome_merge(tokens, sizes, sources, k.mean(dim=0), schedule[i], p)
        elif method in ("ppt", "pruning", "pooling") and i in layers:
            n_tokens = len(tokens)
            r = min(params["r"], (n_tokens - p) // 2)
            scores = ppt_scores(attn, v, p)
            variances[i] = unbiased_variance(scores)
            if variances[i] < params["threshold"]:
                branch[i] = "pool"
                if r > 0:
                    tokens, sizes, sources = tome_merge(tokens, sizes, sources, k.mean(dim=0), r, p)
            else:
                branch[i] = "prune"
                if r > 0:
                    tokens, sizes, sources = ppt_prune(tokens, sizes, sources, scores, r, p)
        elif method in ("evit", "topk") and i in layers:
            tokens, sizes, sources = evit_reduce(tokens, sizes, sources, attn, params["keep_rate"], p,
                                                  fuse=method == "evit")

        tokens_out.append(len(tokens))
        x = torch.stack(tokens)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        tokens = [x[t] for t in range(x.shape[0])]

    logits, source = head_and_sources(vit, tokens, sizes, sources, tokens_in[0], p)
    return {
        "logits": logits,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "branch": branch,
        "variances": variances,
        "size": torch.tensor(sizes, dtype=logits.dtype),
        "source": source,
    }


# ----------------------------------------------------------------------------------------------- batch API

@torch.no_grad()
def reference_trace(vit, images: torch.Tensor, method: str, **params: Any) -> list[dict[str, Any]]:
    """``reference_single`` for every image of the batch, one at a time."""
    if vit.training:
        raise ValueError("the reference is defined for eval mode only")
    return [reference_single(vit, images[b], method, **params) for b in range(images.shape[0])]


def reference_forward(vit, images: torch.Tensor, method: str, **params: Any) -> torch.Tensor:
    """Logits (B, num_classes) of ``vit`` with ``method``, computed image by image."""
    return torch.stack([t["logits"] for t in reference_trace(vit, images, method, **params)])


def summarize(traces: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch-level view of per-image traces: token counts per layer (equal for all images by construction),
    PPT's pooled fraction and per-image variances per PPT layer, final sizes (B, N, 1)."""
    tokens_in = traces[0]["tokens_in"]
    tokens_out = traces[0]["tokens_out"]
    for t in traces:
        assert t["tokens_in"] == tokens_in and t["tokens_out"] == tokens_out, "images disagree on token counts"
    pooled_fraction = {
        layer: sum(t["branch"][layer] == "pool" for t in traces) / len(traces) for layer in traces[0]["branch"]
    }
    variances = {layer: [t["variances"][layer] for t in traces] for layer in traces[0]["variances"]}
    return {
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "pooled_fraction": pooled_fraction,
        "variances": variances,
        "size": torch.stack([t["size"] for t in traces])[..., None],
        "source": torch.stack([t["source"] for t in traces]),
        "logits": torch.stack([t["logits"] for t in traces]),
    }


def reference_tokens(vit, images: torch.Tensor, method: str, **params: Any) -> dict[str, Any]:
    """Per-layer token counts (``tokens_in``/``tokens_out``), PPT's per-layer ``pooled_fraction`` and
    ``variances`` (per image), final ``size`` (B, N, 1), ``source`` (B, N, N0) boolean map from output tokens
    to the input tokens they stand for (in output order), and ``logits``."""
    return summarize(reference_trace(vit, images, method, **params))
