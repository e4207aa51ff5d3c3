"""A deliberately naive, spec-literal second implementation of ``dpcknn``, ``kmedoids`` and ``static``.

Written from ``docs/methods.md`` (dpcknn, kmedoids, static) only (not from ``methods/``), ONE image at a time, full explicit
attention (``tests.reference_impl.explicit_attention``), distances and clustering with plain Python loops over
tokens. The random draws the spec defines for a whole batch are inputs here:

* ``dpcknn``: ``noise[i]`` is the (B, Np) tensor drawn by ``torch.rand`` at the i-th clustering layer; image b
  uses row b (``batch_draws`` reproduces the draws after ``torch.manual_seed``);
* ``kmedoids`` with ``equal_weight``: ``first_medoids[i]`` is the first medoid of the i-th layer
  (``np.random.choice(Np, 1)``, shared by the batch).

    trace = reference_single(vit, image, "dpcknn", noise_rows=[...], keep_rate=0.7)
    trace["logits"], trace["tokens_attn"], trace["source"]

Readings taken where the spec is silent: distances are the plain Euclidean formula ``sqrt(sum (a - b)^2)`` in
the model's dtype (the spec's ``cdist`` numerics only matter in fp32 near-ties); a static radius larger than an
earlier one does not bring pruned patches back.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from tests.reference_impl import explicit_attention

DEFAULTS: dict[str, dict[str, Any]] = {
    "dpcknn": {"keep_rate": 0.7, "layers": [3, 6, 9], "k_neighbors": 5, "equal_weight": True},
    "kmedoids": {"keep_rate": 0.7, "layers": [3, 6, 9], "cluster_iters": 3, "equal_weight": False},
    "static": {"heuristic_pattern": "l1", "layers": [3, 6, 9], "not_contiguous": False, "keep_rate": 0.7,
               "min_radius": 1.0},
}


def targets(keep_rate: float, patches: int, count: int) -> list[int]:
    """K_i = int(P0 * keep_rate ** (i + 1))."""
    return [int(patches * keep_rate ** (i + 1)) for i in range(count)]


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum().sqrt())


def distance_matrix(tokens: list[torch.Tensor]) -> list[list[float]]:
    n = len(tokens)
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            d[i][j] = d[j][i] = distance(tokens[i], tokens[j])
    return d


# ----------------------------------------------------------------------------------------------- DPC-KNN

def dpcknn_step(patches: list[torch.Tensor], sources: list[set[int]], clusters: int, k: int, noise: list[float]):
    """Returns the merged tokens (centre order) and their sources."""
    n = len(patches)
    scale = math.sqrt(patches[0].shape[0])
    d = [[v / scale for v in row] for row in distance_matrix(patches)]
    rho = []
    for i in range(n):
        nearest = sorted(d[i])[:k]
        rho.append(math.exp(-sum(v * v for v in nearest) / k) + 1e-6 * noise[i])
    largest = max(max(row) for row in d)
    delta = []
    for i in range(n):
        denser = [d[i][j] for j in range(n) if rho[j] > rho[i]]
        delta.append(min(denser) if denser else largest)
    score = [delta[i] * rho[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:clusters]
    cluster_of = []
    for i in range(n):
        best = 0
        for c in range(1, clusters):
            if d[centres[c]][i] < d[centres[best]][i]:
                best = c
        cluster_of.append(best)
    for c, centre in enumerate(centres):
        cluster_of[centre] = c
    merged, merged_sources = [], []
    for c in range(clusters):
        members = [i for i in range(n) if cluster_of[i] == c]
        total = torch.zeros_like(patches[0])
        for i in members:
            total = total + patches[i]
        merged.append(total / (len(members) + 1e-6))
        merged_sources.append(set().union(*(sources[i] for i in members)))
    return merged, merged_sources


# ----------------------------------------------------------------------------------------------- K-Medoids

def kmedoids_step(patches: list[torch.Tensor], weights: list[float] | None, clusters: int, iterations: int,
                  first: int | None) -> list[int]:
    """The medoid indices, in slot order. ``weights`` None: equal weights and the spread initialisation."""
    n = len(patches)
    d = distance_matrix(patches)
    if weights is None:
        weights = [1.0] * n
        medoids = [first]
        for _ in range(1, clusters):
            reach = [0.0 if t in medoids else max(d[t][m] for m in medoids) for t in range(n)]
            medoids.append(max(range(n), key=lambda t: (reach[t], -t)))  # first on ties
    else:
        medoids = sorted(range(n), key=lambda t: -weights[t])[:clusters]
    row_cost = [sum(d[i][j] * weights[i] for j in range(n)) for i in range(n)]
    for _ in range(iterations):
        slot_of = [min(range(clusters), key=lambda c: (d[i][medoids[c]], c)) for i in range(n)]
        for c in range(clusters):
            members = [i for i in range(n) if slot_of[i] == c]
            medoids[c] = min(members, key=lambda i: (row_cost[i], i)) if members else 0
    return medoids


# ----------------------------------------------------------------------------------------------- static

def static_distances(side: int, pattern: str) -> list[np.float32]:
    coords = [np.float32(v) for v in torch.linspace(-side // 2, side // 2, side, dtype=torch.float32).tolist()]
    z = []
    for r in range(side):
        for s in range(side):
            a, b = coords[r], coords[s]
            if pattern == "l1":
                z.append(np.float32(abs(a) + abs(b)))
            elif pattern == "l2":
                z.append(np.float32(np.sqrt(np.float32(a * a) + np.float32(b * b))))
            else:
                z.append(max(abs(a), abs(b)))
    return z


def static_radii(patches: int, params: dict[str, Any]) -> dict[int, np.float32]:
    side = math.isqrt(patches)
    z = static_distances(side, params["heuristic_pattern"])
    layers = sorted(params["layers"])
    if params["not_contiguous"]:
        values = sorted(set(z))
        radii = {}
        for layer, target in zip(layers, targets(params["keep_rate"], patches, len(layers)), strict=True):
            counts = [sum(1 for v in z if v <= u) for u in values]
            best = min(range(len(values)), key=lambda i: (abs(target - counts[i]), i))
            radii[layer] = values[best]
        return radii
    start, end = layers[0], layers[-1]
    r_min = params["min_radius"]
    if r_min is None or r_min <= 0:
        r_min = z[(side // 2) * side + side // 2]
    t = [np.float32(v) for v in torch.linspace(float(z[0]), float(r_min), end - start + 3,
                                               dtype=torch.float32).tolist()]
    return {b: t[b] if start == 0 else t[b - start + 1] for b in range(start, end + 1)}


# ----------------------------------------------------------------------------------------------- one image

def reference_single(vit, image: torch.Tensor, method: str, noise_rows: list[list[float]] | None = None,
                     first_medoids: list[int] | None = None, **params: Any) -> dict[str, Any]:
    params = {**DEFAULTS[method], **params}
    p = vit.num_prefix_tokens
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image[None]))))[0]
    tokens = [x[i] for i in range(x.shape[0])]
    sources = [{i} for i in range(len(tokens))]
    patches0 = len(tokens) - p
    layers = sorted(params["layers"])
    counts = targets(params["keep_rate"], patches0, len(layers)) if method != "static" else None
    radii = static_radii(patches0, params) if method == "static" else None
    z = static_distances(math.isqrt(patches0), params["heuristic_pattern"]) if method == "static" else None

    tokens_attn, tokens_mlp = [], []
    prev_attn = None
    for i, blk in enumerate(vit.blocks):
        if method in ("dpcknn", "kmedoids") and i in layers:
            index = layers.index(i)
            patches, patch_sources = tokens[p:], sources[p:]
            if method == "dpcknn":
                merged, merged_sources = dpcknn_step(patches, patch_sources, counts[index], params["k_neighbors"],
                                                     noise_rows[index])
                tokens, sources = tokens[:p] + merged, sources[:p] + merged_sources
            else:
                weights = None
                if not params["equal_weight"]:
                    weights = [float(prev_attn[:, :, j].sum()) for j in range(p, len(tokens))]
                first = first_medoids[index] if params["equal_weight"] else None
                medoids = kmedoids_step(patches, weights, counts[index], params["cluster_iters"], first)
                tokens = tokens[:p] + [patches[m] for m in medoids]
                sources = sources[:p] + [patch_sources[m] for m in medoids]
        if method == "static" and i in radii:
            keep = [t for t in range(p, len(tokens)) if z[min(sources[t]) - p] <= radii[i]]
            tokens = tokens[:p] + [tokens[t] for t in keep]
            sources = sources[:p] + [sources[t] for t in keep]
        x = torch.stack(tokens)
        tokens_attn.append(len(tokens))
        out, prev_attn, _, _ = explicit_attention(blk.attn, blk.norm1(x), None)
        x = x + blk.drop_path1(blk.ls1(out))
        tokens_mlp.append(x.shape[0])
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        tokens = [x[t] for t in range(x.shape[0])]

    logits = vit.forward_head(vit.norm(torch.stack(tokens)[None]))[0]
    source = torch.zeros(len(sources), patches0 + p, dtype=torch.bool)
    for t, src in enumerate(sources):
        source[t, sorted(src)] = True
    return {"logits": logits, "tokens_attn": tokens_attn, "tokens_mlp": tokens_mlp, "source": source}


def batch_draws(method: str, batch: int, patches0: int, seed: int, dtype: torch.dtype, **params: Any):
    """The spec's random draws for a batch after seeding: dpcknn ``torch.rand(B, Np_i)`` per layer (Np_i = the
    patch tokens entering the i-th clustering layer), kmedoids/equal_weight ``np.random.choice(Np_i, 1)``."""
    params = {**DEFAULTS[method], **params}
    counts = targets(params["keep_rate"], patches0, len(params["layers"]))
    entering = [patches0, *counts[:-1]]
    if method == "dpcknn":
        torch.manual_seed(seed)
        return {"noise": [torch.rand(batch, n, dtype=dtype) for n in entering]}
    if method == "kmedoids" and params["equal_weight"]:
        np.random.seed(seed)
        return {"first": [int(np.random.choice(n, 1)[0]) for n in entering]}
    return {}


@torch.no_grad()
def reference_batch(vit, images: torch.Tensor, method: str, seed: int = 0, **params: Any) -> list[dict[str, Any]]:
    """``reference_single`` for every image, with the batch's draws after ``seed``."""
    patches0 = vit.patch_embed.num_patches
    draws = batch_draws(method, images.shape[0], patches0, seed, images.dtype, **params)
    traces = []
    for b in range(images.shape[0]):
        noise_rows = [row[b].tolist() for row in draws["noise"]] if "noise" in draws else None
        traces.append(reference_single(vit, images[b], method, noise_rows=noise_rows,
                                       first_medoids=draws.get("first"), **params))
    return traces
