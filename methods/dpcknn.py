"""DPC-KNN token merging: the clustering-based token merging (CTM) of Zeng et al., "Not All Tokens Are Equal:
Human-centric Visual Analysis via Token Clustering Transformer" (TCFormer, CVPR 2022), as benchmarked by Haurum
et al., "Which Tokens to Use? Investigating Token Reduction in Vision Transformers" (ICCVW 2023,
arXiv 2308.04657; the TokenReduction code). Semantics: ``docs/methods.md#dpcknn``.

At the start of each block of ``layers`` (before ``norm1``), the patch tokens of the residual stream are
clustered by density peaks (k-nearest-neighbour density, distance to the nearest denser token) into ``K_i``
clusters, ``K_i = int(P0 * keep_rate ** (i + 1))`` of the original ``P0`` patches, and each cluster is
replaced by the plain mean of its members (prefix tokens set aside, first, unchanged).

This file also holds the TokenReduction keep-rate schedule shared by ``kmedoids``, ``static`` and ``random``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from methods.base import START, BudgetKnob, Method, ReductionContext, Step, TokenState, add_at, register

MERGE_EPS = 1e-6  # added to every cluster's total weight (TokenReduction's merge; quirk kept)
NOISE_SCALE = 1e-6  # tie-break noise on the densities


# --------------------------------------------------------------------------------------------------
# TokenReduction's keep-rate schedule (dpcknn, kmedoids, static, random)
# --------------------------------------------------------------------------------------------------
def keep_rate_value(method: Method, value: Any) -> float:
    """One float in (0, 1]: TokenReduction's per-layer lists are not accepted (its code crashes on them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise method._error(f"parameter 'keep_rate' must be one number in (0, 1], got {value!r}")
    return float(value)


def schedule(keep_rate: float, patches: int, count: int) -> list[int]:
    """Patch tokens kept at the i-th reducing layer: ``int(patches * keep_rate ** (i + 1))``, relative to the
    original patch count (Python double arithmetic, truncated)."""
    return [int(patches * keep_rate ** (index + 1)) for index in range(count)]


def layer_target(method: Method, layer: int, ctx: ReductionContext) -> int:
    """``K_i`` of block ``layer`` (one of the method's sorted ``layers``)."""
    layers = method.params["layers"]
    return schedule(method.params["keep_rate"], ctx.num_tokens - ctx.num_prefix, len(layers))[layers.index(layer)]


def cluster_count(method: Method, layer: int, ctx: ReductionContext) -> int:
    """``K_i`` of a clustering layer, at least 1: where the schedule truncates to 0 the reference code crashes;
    one cluster keeps every keep rate valid (a budget search may probe any of them)."""
    return max(layer_target(method, layer, ctx), 1)


# --------------------------------------------------------------------------------------------------
# DPC-KNN clustering and merging
# --------------------------------------------------------------------------------------------------
def smallest_values(dist: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` smallest entries of every row of ``dist``, ascending: ``dist.topk(count, dim=-1,
    largest=False).values``. Compiled for the CPU, by ``count`` passes over each row that inductor fuses (the
    t-th value is the (t-1)-th again while more than t entries are <= it, else the smallest entry above it):
    each is an entry of the row, so the values are topk's bit for bit, repeated entries included (finite
    distances; a NaN would spread). ATen's ``topk``, which inductor calls as it is, took 0.46-0.76 ms per
    call on the quickstart's 64 x Np rows of Np (Np = 38-49) compiled, the passes 0.20-0.25 ms; eager keeps
    ``topk`` (there the passes made the density 7 % slower: 1.27 against 1.19 ms at Np = 49)."""
    if not (dist.device.type == "cpu" and torch.compiler.is_compiling()):
        return dist.topk(count, dim=-1, largest=False).values
    value = dist.amin(dim=-1, keepdim=True)
    values = [value]
    for rank in range(1, count):
        repeated = (dist <= value).sum(dim=-1, keepdim=True) > rank
        above = torch.where(dist > value, dist, math.inf).amin(dim=-1, keepdim=True)
        value = torch.where(repeated, value, above)
        values.append(value)
    return torch.cat(values, dim=-1)


def dpc_knn_centres(patches: torch.Tensor, clusters: int, neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peaks clustering of ``patches`` (B, Np, C) into ``clusters`` groups.

    Returns ``centres`` (B, K): the centre tokens by descending ``delta * rho``, and ``assignment`` (B, Np): the
    cluster (0..K-1, index into ``centres``) of every token. Draws the tie-break noise ``torch.rand(B, Np)`` from
    the global generator (the reference code's only random draw)."""
    batch, count, dim = patches.shape
    dist = torch.cdist(patches, patches) / dim**0.5  # fp32 default compute mode: the mm formula beyond 25 tokens
    nearest = smallest_values(dist, neighbours)
    density = (-(nearest**2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * NOISE_SCALE
    # delta_i: distance to the nearest denser token (row i), or the image's largest distance
    denser = density[:, None, :] > density[:, :, None]
    largest = dist.flatten(1).amax(dim=-1)[:, None, None]
    delta = torch.where(denser, dist, largest).amin(dim=-1)
    centres = (delta * density).topk(clusters, dim=-1).indices  # descending score
    centre_rows = dist.gather(1, centres[..., None].expand(-1, -1, count))  # (B, K, Np): D[centre, i]
    assignment = centre_rows.transpose(1, 2).contiguous().argmin(dim=-1)  # first centre on ties (along the last,
    # contiguous dimension: 4.5x faster on CPU than along dim 1)
    slots = torch.arange(clusters, device=patches.device).expand(batch, -1)
    return centres, assignment.scatter(1, centres, slots)  # every centre in its own cluster


def merge_clusters(tokens: TokenState, assignment: torch.Tensor, clusters: int, num_prefix: int) -> TokenState:
    """Replace the patch tokens by their cluster means ``sum_i x_i / (n_c + 1e-6)`` (equal weights), after the
    prefix tokens; sizes add up, sources are united."""
    patches = tokens.x[:, num_prefix:]
    batch, _, dim = patches.shape
    members = torch.zeros(batch, clusters, 1, device=patches.device, dtype=patches.dtype)
    members.scatter_add_(1, assignment[..., None], torch.ones_like(patches[..., :1]))
    share = 1.0 / (members + MERGE_EPS).gather(1, assignment[..., None])  # each token's weight in its mean
    merged = add_at(patches.new_zeros(batch, clusters, dim), assignment, patches * share)
    sizes = tokens.sizes()
    size = add_at(sizes.new_zeros(batch, clusters, 1), assignment, sizes[:, num_prefix:])
    source = None
    if tokens.source is not None:
        patch_source = tokens.source[:, num_prefix:]
        union = patch_source.new_zeros(batch, clusters, patch_source.shape[-1]).scatter_reduce_(
            1, assignment[..., None].expand(-1, -1, patch_source.shape[-1]), patch_source, reduce="amax")
        source = torch.cat([tokens.source[:, :num_prefix], union], dim=1)
    return TokenState(
        x=torch.cat([tokens.x[:, :num_prefix], merged], dim=1),
        size=torch.cat([sizes[:, :num_prefix], size], dim=1),
        source=source,
        mask=None,
    )


@register("dpcknn")
class DPCKNN(Method):
    """docs/methods.md#dpcknn"""

    defaults = {"keep_rate": 0.7, "layers": [3, 6, 9], "k_neighbors": 5, "equal_weight": True}
    budget_knob = BudgetKnob("keep_rate", kind="float", cheaper="lower")

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        k = params["k_neighbors"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise self._error(f"parameter 'k_neighbors' must be an integer >= 1, got {k!r}")
        if not self._bool("equal_weight", params["equal_weight"]):
            raise self._error(
                "parameter 'equal_weight': false needs the learned per-layer token scores of the reference code, "
                "which are trained during fine-tuning and cannot be loaded yet (allowed: true)"
            )
        return {"keep_rate": keep_rate_value(self, params["keep_rate"]), "layers": self._layers(params["layers"]),
                "k_neighbors": k, "equal_weight": True}

    def check(self, ctx: ReductionContext) -> None:
        self._check_layers(ctx)

    def step(self, layer: int, ctx: ReductionContext) -> Step | None:
        return Step(START) if layer in self.params["layers"] else None

    def reduce(self, layer, tokens, signals, ctx):
        clusters = cluster_count(self, layer, ctx)
        patches = tokens.x[:, ctx.num_prefix:]
        # more neighbours than tokens (the reference crashes): every token is a neighbour
        neighbours = min(self.params["k_neighbors"], patches.shape[1])
        _, assignment = dpc_knn_centres(patches, clusters, neighbours)
        return merge_clusters(tokens, assignment, clusters, ctx.num_prefix), None

    def extra_macs(self, tokens_in: list[int], ctx: ReductionContext, dim: int) -> int:
        """Work outside what torchprofile traces: the pairwise distances (``cdist``, Np^2 * C MACs per layer,
        Np = patch tokens entering the layer; ``tokens_in`` = ``ForwardInfo.tokens_in``)."""
        return overhead_macs(tokens_in, self.params["layers"], ctx.num_prefix, dim)


def overhead_macs(tokens_in: list[int], layers: list[int], num_prefix: int, dim: int) -> int:
    """``cdist`` MACs of DPC-KNN: ``Np^2 * C`` at each clustering layer."""
    return sum((tokens_in[layer] - num_prefix) ** 2 * dim for layer in layers)
