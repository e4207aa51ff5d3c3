"""K-Medoids token clustering, as benchmarked by Haurum et al., "Which Tokens to Use? Investigating Token
Reduction in Vision Transformers" (ICCVW 2023, arXiv 2308.04657; TokenReduction ``models/kmedoids.py``).
Semantics: ``docs/methods.md#kmedoids``.

At the start of each block of ``layers`` (each >= 1), the patch tokens are clustered around ``K_i`` medoids
(``K_i = int(P0 * keep_rate ** (i + 1))``) by ``cluster_iters`` rounds of assignment and medoid update, the
medoids initialised from the attention each token received in the previous block (or, with ``equal_weight``,
from a random first medoid and far-away tokens). The medoid tokens themselves are kept, in slot order: the
final assignment is never used, so this prunes to the medoids (prefix tokens kept first).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from methods.base import PREV_ATTN, START, BudgetKnob, Method, ReductionContext, Step, register, take
from methods.dpcknn import cluster_count, keep_rate_value, schedule

MASK_VALUE = 1_000_000.0  # every distance of a token outside the slot, in the medoid update (reference value)


def attention_received(prev_attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, Np): post-softmax attention each patch token received in the previous block, summed over heads,
    then over every query (prefix queries included)."""
    return prev_attn.sum(dim=1).sum(dim=1)[:, num_prefix:]


def spread_medoids(patches: torch.Tensor, clusters: int, first: int) -> torch.Tensor:
    """``equal_weight`` initialisation (B, K): medoid 0 is ``first``; medoid k is the token whose largest
    distance to the medoids chosen so far is the largest (those medoids' own rows set to 0; first on ties)."""
    batch = patches.shape[0]
    medoids = torch.full((batch, 1), first, dtype=torch.long, device=patches.device)
    for chosen in range(1, clusters):
        centres = take(patches, medoids)
        dist = torch.cdist(patches, centres)  # (B, Np, chosen)
        dist = dist.scatter(1, medoids[..., None].expand(-1, -1, chosen), 0.0)
        medoids = torch.cat([medoids, dist.amax(dim=-1).argmax(dim=-1)[:, None]], dim=1)
    return medoids


def fit_medoids(patches: torch.Tensor, medoids: torch.Tensor, weights: torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` rounds on (B, Np, C) patches from the initial ``medoids`` (B, K): assign every token to
    the slot of its nearest medoid (first slot on ties), then give every slot the member with the smallest
    ``sum_j w_i * D[i, j]`` over ALL tokens j (an empty slot gets token 0). The slots of one round share
    that round's assignment, so they are updated together."""
    batch, count, _ = patches.shape
    dist = torch.cdist(patches, patches)  # fp32 default compute mode, as the reference
    row_cost = (dist * weights[..., None]).sum(dim=-1)  # (B, Np): w_i * sum_j D[i, j], summed as products
    # a non-member's cost in the reference: a row of MASK_VALUE entries, summed the same way
    outside = torch.full((count,), MASK_VALUE, dtype=dist.dtype, device=dist.device).sum()
    for _ in range(iterations):
        assignment = dist.gather(2, medoids[:, None, :].expand(-1, count, -1)).argmin(dim=-1)  # (B, Np)
        medoids = cheapest_members(assignment, row_cost, outside, medoids.shape[1])
    return medoids


def cheapest_members(assignment: torch.Tensor, row_cost: torch.Tensor, outside: torch.Tensor,
                     clusters: int) -> torch.Tensor:
    """The reference's medoid update, ``argmin`` over j of the (B, K, Np) cost ``row_cost[j]`` if token j is in
    slot k else ``outside`` (first index on ties), without building that matrix: two segment minima over the
    Np tokens (compiled for the CPU 0.04-0.13 ms faster per layer of the quickstart's model, the same indices). The
    first index at the slot's minimum is its cheapest member, or its first non-member where ``outside`` is
    not above every member's cost (an empty slot: token 0): the second minimum starts from that non-member, so
    the medoids are the reduction's own output. On a GPU the matrix itself: one fused kernel, where
    the minima's launches made DeiT-S at batch 64 5 % slower (docs/gpu_h200.md section 13)."""
    batch, count = assignment.shape
    if assignment.device.type != "cpu":
        slots = torch.arange(clusters, device=assignment.device)[None, :, None]
        return torch.where(assignment[:, None, :] == slots, row_cost[:, None, :], outside).argmin(dim=-1)
    position = torch.arange(count, device=assignment.device).expand(batch, -1)
    # the first non-member of each slot: token 0, unless it is a member; then the first token assigned elsewhere
    # (none: Np, when every token is in that slot)
    elsewhere = torch.where(assignment != assignment[:, :1], position, count).amin(dim=1, keepdim=True)
    slots = torch.arange(clusters, device=assignment.device)
    non_member = torch.where(slots == assignment[:, :1], elsewhere, 0)  # (B, K)
    has_outside = non_member < count
    cheapest = row_cost.new_full((batch, clusters), math.inf).scatter_reduce(1, assignment, row_cost, "amin")
    lowest = torch.where(has_outside, torch.minimum(cheapest, outside), cheapest)  # the slot's minimum cost
    at_lowest = torch.where(row_cost == lowest.gather(1, assignment), position, count)
    # the first member at the minimum, or the first non-member where that is the minimum, as the reduction's own
    # output: a pointwise step after it made compiled K-Medoids 1.3-1.8 % slower, eager 1.1 %
    start = torch.where(has_outside & (lowest == outside), non_member, count)
    return start.scatter_reduce(1, assignment, at_lowest, "amin")


@register("kmedoids")
class KMedoids(Method):
    """docs/methods.md#kmedoids"""

    defaults = {"keep_rate": 0.7, "layers": [3, 6, 9], "cluster_iters": 3, "equal_weight": False}
    budget_knob = BudgetKnob("keep_rate", kind="float", cheaper="lower")
    # The reference's blocks write the softmax out. Its medoid choices are discrete in near-equal attention sums
    # (near-uniform attention of a random-init DeiT-S): the fused kernel's last-bit differences in earlier
    # blocks flipped them (0.29 logit difference measured), the explicit softmax matches the reference exactly.
    attention = "explicit"

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        layers = self._layers(params["layers"])
        if layers[0] < 1:
            raise self._error(f"parameter 'layers' must hold blocks >= 1 (K-Medoids clusters after the first block, as "
                              f"its reference: its medoid weights are the attention of the block before), got "
                              f"{params['layers']!r}")
        iters = params["cluster_iters"]
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise self._error(f"parameter 'cluster_iters' must be an integer >= 0, got {iters!r}")
        return {"keep_rate": keep_rate_value(self, params["keep_rate"]), "layers": layers, "cluster_iters": iters,
                "equal_weight": self._bool("equal_weight", params["equal_weight"])}

    def check(self, ctx: ReductionContext) -> None:
        self._check_layers(ctx)

    def step(self, layer: int, ctx: ReductionContext) -> Step | None:
        if layer not in self.params["layers"]:
            return None
        return Step(START) if self.params["equal_weight"] else Step(START, frozenset({PREV_ATTN}))

    def reduce(self, layer, tokens, signals, ctx):
        clusters = cluster_count(self, layer, ctx)
        patches = tokens.x[:, ctx.num_prefix:]
        if self.params["equal_weight"]:
            first = first_medoid(patches.shape[1])
            medoids = spread_medoids(patches, clusters, first)
            weights = patches.new_ones(patches.shape[:2])
        else:
            weights = attention_received(signals[PREV_ATTN], ctx.num_prefix).to(patches.dtype)
            medoids = weights.topk(clusters, dim=1).indices
        medoids = fit_medoids(patches, medoids, weights, self.params["cluster_iters"])
        prefix = torch.arange(ctx.num_prefix, device=medoids.device).expand(medoids.shape[0], -1)
        return tokens.gather(torch.cat([prefix, medoids + ctx.num_prefix], dim=1)), None

    def extra_macs(self, tokens_in: list[int], ctx: ReductionContext, dim: int) -> int:
        """Work outside what torchprofile traces: ``cdist`` (Np^2 * C per layer, Np = patch tokens entering it;
        with ``equal_weight`` also the initialisation's distances to 1..K-1 medoids, Np * C * K(K-1)/2)."""
        return overhead_macs(tokens_in, self.params, ctx.num_prefix, ctx.num_tokens - ctx.num_prefix, dim)


@torch.compiler.disable
def first_medoid(count: int) -> int:
    """The first medoid with ``equal_weight``: numpy's global generator, one draw per layer shared by the batch (the
    reference's draw). Outside any compiled graph (one graph break per layer): traced into it, the draw's guard
    failed under ``inference_mode`` (a crash of every compiled forward) and was a break of its own under no_grad."""
    return int(np.random.choice(count, 1)[0])


def overhead_macs(tokens_in: list[int], params: dict[str, Any], num_prefix: int, patches: int, dim: int) -> int:
    """``cdist`` MACs of K-Medoids at its layers (``tokens_in``: tokens entering each block)."""
    targets = schedule(params["keep_rate"], patches, len(params["layers"]))
    total = 0
    for layer, target in zip(params["layers"], targets, strict=True):
        count, clusters = tokens_in[layer] - num_prefix, max(target, 1)
        total += count * count * dim
        if params["equal_weight"]:
            total += count * dim * clusters * (clusters - 1) // 2
    return total
