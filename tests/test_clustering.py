"""dpcknn, kmedoids, static (against the naive reference in ``tests/reference_clustering.py``) and random.

float64 small random-weight ViTs (64 patches, sharpened attention as in ``tests/test_reference.py``), so that
near-ties cannot flip between two correct implementations; a few cases on real DeiT-T/S geometry assert the
spec's token schedules and block MACs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch

import bench
import methods
from tests.helpers import perturb as _perturb
from tests.reference_clustering import reference_batch

ATOL64 = 1e-6

_MODELS: dict[str, torch.nn.Module] = {}


def model(name: str = "p8") -> torch.nn.Module:
    """float64 perturbed ViT-Ti shapes at 64x64: ``p8`` 64 patches + class, ``dist8`` + distillation token,
    ``ls`` LayerScale."""
    if name not in _MODELS:
        arch, extra = {"p8": ("vit_tiny_patch16_224", {}), "dist8": ("deit_tiny_distilled_patch16_224", {}),
                       "ls": ("vit_tiny_patch16_224", {"init_values": 0.1})}[name]
        torch.manual_seed(4321)
        vit = timm.create_model(arch, pretrained=False, img_size=64, patch_size=8, num_classes=10, **extra)
        _MODELS[name] = _perturb(vit, seed=5).eval().double()
    return _MODELS[name]


def images(batch: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(vit, x, method: str, global_seed: int = 0, **params):
    reduced = bench.apply(vit, method, track_source=True, **params)
    torch.manual_seed(global_seed)
    np.random.seed(global_seed)
    with torch.no_grad():
        logits = reduced(x)
    return logits, bench.forward_stats(reduced)


def assert_matches_reference(vit, x, method: str, seed: int = 0, **params):
    logits, info = run(vit, x, method, seed, **params)
    traces = reference_batch(vit, x, method, seed=seed, **params)
    expected = torch.stack([t["logits"] for t in traces])
    assert (logits - expected).abs().max().item() <= ATOL64, (method, params)
    for b, trace in enumerate(traces):
        assert info.tokens_attn == trace["tokens_attn"], (method, params)
        assert info.tokens_mlp == trace["tokens_mlp"], (method, params)
        assert torch.equal(info.source[b] > 0, trace["source"]), (method, params, b)  # token order and members
    return logits, info


# ------------------------------------------------------------------------------------------------ DPC-KNN

@pytest.mark.parametrize(
    "params",
    [
        {"keep_rate": 0.7},
        {"keep_rate": 0.25, "k_neighbors": 4},  # the last layer sees int(64 * 0.25 ** 2) = 4 patches
        {"keep_rate": 0.5, "k_neighbors": 1},
        {"keep_rate": 0.9, "k_neighbors": 3, "layers": [0, 5, 11]},
        {"keep_rate": 1.0, "layers": [2]},
    ],
    ids=["0.7", "0.25", "k1", "0.9-layers", "1.0"],
)
def test_dpcknn_matches_reference(params):
    assert_matches_reference(model(), images(), "dpcknn", seed=3, **params)


def test_dpcknn_distilled_and_layerscale():
    for name in ("dist8", "ls"):
        logits, info = assert_matches_reference(model(name), images(2), "dpcknn", seed=1, keep_rate=0.5)
        p = model(name).num_prefix_tokens
        assert torch.equal(info.source[:, :p, :p], torch.eye(p, dtype=info.source.dtype).expand(2, -1, -1))


def test_dpcknn_merges_into_means_and_tracks_sizes():
    vit = model()
    logits, info = run(vit, images(2), "dpcknn", keep_rate=0.5, layers=[4])
    assert info.tokens_attn[4] == 1 + 32  # int(64 * 0.5)
    # sizes = members per cluster, every patch in exactly one cluster
    assert torch.equal(info.size[:, 1:, 0], info.source[:, 1:].sum(dim=-1))
    cover = info.source[:, 1:].sum(dim=1)
    assert cover[:, 0].eq(0).all() and cover[:, 1:].eq(1).all()


def test_dpcknn_merge_divides_by_members_plus_the_reference_epsilon():
    """The reference's ``sum(w x) / (sum(w) + 1e-6)`` (quirk kept: every merged token shrinks by n / (n + 1e-6)),
    too small for the logit comparisons above to see (1e-6 relative): pinned on the merge itself, in float64."""
    from methods.base import TokenState
    from methods.dpcknn import merge_clusters

    x = torch.tensor([[[7.0], [1.0], [3.0], [5.0]]], dtype=torch.float64)  # a prefix token, then three patches
    merged = merge_clusters(TokenState(x=x), torch.tensor([[0, 0, 1]]), clusters=2, num_prefix=1)
    assert merged.x[0, :, 0].tolist() == pytest.approx([7.0, 4.0 / (2 + 1e-6), 5.0 / (1 + 1e-6)], rel=1e-12, abs=0)
    assert merged.size[0, :, 0].tolist() == [1.0, 2.0, 1.0]


def test_dpcknn_centres_stay_in_their_own_clusters_with_duplicate_tokens():
    """Spec step 6: "then every centre is forced into its own cluster". Identical patches (a flat image region) are
    at distance 0 from each other; when both are centres (here every token is: K = Np), the nearest-centre rule
    alone sends the later one into the earlier one's cluster and leaves its own slot empty (a zero token)."""
    from methods.dpcknn import dpc_knn_centres

    torch.manual_seed(0)
    patches = torch.tensor([[[0.0, 1.0], [3.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], dtype=torch.float64)
    centres, assignment = dpc_knn_centres(patches, clusters=4, neighbours=2)
    assert sorted(centres[0].tolist()) == [0, 1, 2, 3]
    assert torch.equal(centres.gather(1, assignment), torch.arange(4)[None])  # token i is the centre of its slot


def test_dpcknn_tie_break_noise_is_at_most_1e6():
    """Spec step 3: ``rho += 1e-6 * U``. Tokens 0, 1, -1, 2 + 1e-5 on a line (k = 3): token 0's density
    exp(-2/3) exceeds token 1's by ~3.4e-6, more than any 1e-6 noise can make up, so token 0 is the densest and
    the first centre (delta = the largest distance), token 1 the second. Seed 9 draws U_1 - U_0 = 0.59: noise ten
    times larger would make token 1 the densest and swap the centres."""
    from methods.dpcknn import dpc_knn_centres

    patches = torch.tensor([[[0.0], [1.0], [-1.0], [2.0 + 1e-5]]], dtype=torch.float64)
    torch.manual_seed(9)
    centres, assignment = dpc_knn_centres(patches, clusters=2, neighbours=3)
    assert centres.tolist() == [[0, 1]] and assignment.tolist() == [[0, 1, 0, 1]]


def test_dpcknn_noise_is_the_global_generator_and_nearly_irrelevant():
    vit, x = model(), images(2)
    a, _ = run(vit, x, "dpcknn", global_seed=0)
    b, _ = run(vit, x, "dpcknn", global_seed=0)
    c, _ = run(vit, x, "dpcknn", global_seed=1)
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() < 1e-4
    # one draw of torch.rand(B, Np) per clustering layer, nothing else
    torch.manual_seed(5)
    bench.apply(vit, "dpcknn")(x)
    after = torch.rand(1)
    torch.manual_seed(5)
    for count in (64, 44, 31):  # patches entering: 64, int(64 * 0.7), int(64 * 0.7 ** 2)
        torch.rand(2, count, dtype=torch.float64)
    assert torch.equal(after, torch.rand(1))


def test_dpcknn_image_alone_equals_batch_up_to_noise():
    vit, x = model(), images(3)
    batch, _ = run(vit, x, "dpcknn")
    for b in range(3):
        alone, _ = run(vit, x[b : b + 1], "dpcknn")
        assert (alone[0] - batch[b]).abs().max().item() < 1e-5


def test_dpcknn_refuses_learned_weights_and_lists():
    with pytest.raises(ValueError, match="equal_weight"):
        methods.build("dpcknn", equal_weight=False)
    with pytest.raises(ValueError, match="keep_rate"):
        methods.build("dpcknn", keep_rate=[0.7, 0.7, 0.7])


@pytest.mark.parametrize("method", ["dpcknn", "kmedoids"])
def test_clustering_keeps_one_cluster_where_the_schedule_reaches_zero(method):
    # int(64 * 0.1) = 6, then int(0.64) = 0 and int(0.064) = 0: the reference code crashes; we keep 1 cluster
    # (and DPC-KNN uses all tokens as neighbours when there are fewer than k_neighbors)
    logits, info = run(model(), images(2), method, keep_rate=0.1, layers=[2, 4, 6], **(
        {"k_neighbors": 8} if method == "dpcknn" else {}))
    assert info.tokens_attn == [65] * 2 + [7] * 2 + [2] * 8
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------ K-Medoids

@pytest.mark.parametrize(
    "params",
    [
        {},
        {"keep_rate": 0.25},
        {"keep_rate": 0.9, "cluster_iters": 5, "layers": [1, 2, 10]},
        {"keep_rate": 0.5, "cluster_iters": 0},
        {"equal_weight": True},
        {"equal_weight": True, "keep_rate": 0.5, "cluster_iters": 1, "layers": [1, 6]},
    ],
    ids=["default", "0.25", "0.9-iters5", "iters0", "equal", "equal-0.5"],
)
def test_kmedoids_matches_reference(params):
    assert_matches_reference(model(), images(), "kmedoids", seed=11, **params)


def test_kmedoids_distilled():
    for equal_weight in (False, True):
        logits, info = assert_matches_reference(model("dist8"), images(2), "kmedoids", seed=2,
                                                equal_weight=equal_weight)
        assert torch.equal(info.source[:, :2, :2], torch.eye(2, dtype=info.source.dtype).expand(2, -1, -1))


def test_kmedoids_prunes_to_medoids_and_is_batch_independent():
    vit, x = model(), images(3)
    batch, info = run(vit, x, "kmedoids")
    assert torch.equal(info.size, torch.ones_like(info.size))  # medoids are kept tokens, not averages
    assert torch.equal(info.source.sum(dim=-1), torch.ones_like(info.source.sum(dim=-1)))
    for b in range(3):
        alone, _ = run(vit, x[b : b + 1], "kmedoids")
        assert (alone[0] - batch[b]).abs().max().item() < 1e-10


def test_kmedoids_equal_weight_draws_numpy_once_per_layer():
    vit, x = model(), images(2)
    a, _ = run(vit, x, "kmedoids", global_seed=0, equal_weight=True)
    b, _ = run(vit, x, "kmedoids", global_seed=0, equal_weight=True)
    assert torch.equal(a, b)
    np.random.seed(9)
    torch.manual_seed(0)
    with torch.no_grad():
        bench.apply(vit, "kmedoids", equal_weight=True)(x)
    after = np.random.rand()
    np.random.seed(9)
    for count in (64, 44, 31):
        np.random.choice(count, 1)
    assert after == np.random.rand()


def _masked_argmin(assignment, row_cost, outside, clusters):
    """The reference's medoid update, written out: argmin over the (B, K, Np) costs, a non-member's cost ``outside``."""
    slots = torch.arange(clusters)[None, :, None]
    return torch.where(assignment[:, None, :] == slots, row_cost[:, None, :], outside).argmin(dim=-1)


def test_kmedoids_update_is_the_references_masked_argmin_without_the_cost_matrix():
    """``cheapest_members`` (two segment minima) picks the indices of the reference's (B, K, Np) argmin: ties to the
    first member, empty slots to token 0, members costlier than ``outside`` (the reference then picks a
    non-member), costs equal to it, every token in one slot."""
    from methods.kmedoids import cheapest_members

    gen = torch.Generator().manual_seed(3)
    outside = torch.tensor(40.0)
    cases = 0
    for trial in range(300):
        batch, count = 4, int(torch.randint(2, 12, (1,), generator=gen))
        clusters = int(torch.randint(1, count + 1, (1,), generator=gen))
        used = int(torch.randint(1, clusters + 1, (1,), generator=gen))  # fewer used slots: empty ones
        assignment = torch.randint(0, used, (batch, count), generator=gen)
        if trial % 7 == 0:
            assignment[1] = assignment[1, 0]  # every token in one slot
        row_cost = torch.randint(0, 8, (batch, count), generator=gen).float() * 10  # ties; 40 = outside; 50+ above
        got = cheapest_members(assignment, row_cost, outside, clusters)
        assert torch.equal(got, _masked_argmin(assignment, row_cost, outside, clusters)), (assignment, row_cost)
        cases += bool((row_cost > outside).any())
    assert cases > 200
    # a slot whose members all cost more than outside: the reference takes its first non-member
    assignment, row_cost = torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1.0, 2.0, 50.0, 60.0]])
    assert cheapest_members(assignment, row_cost, outside, 3).tolist() == [[0, 0, 0]]
    assignment = torch.tensor([[1, 1, 0, 1]])
    assert cheapest_members(assignment, torch.tensor([[50.0, 60.0, 70.0, 45.0]]), outside, 2).tolist() == [[0, 2]]


def test_kmedoids_non_member_cost_is_a_row_of_reference_mask_values():
    """``fit_medoids`` gives a non-member the reference's cost, Np entries of 1e6 summed (the test above passes
    ``outside`` in by hand, so it cannot see the value ``fit_medoids`` uses). Four 1-D tokens, two far-apart
    pairs, equal weights, medoids [0, 2]: every row cost (sum of distances, ~6e6) exceeds 4 x 1e6, so the
    reference's masked argmin takes each slot's first non-member (slot 0: token 2, slot 1: token 0); an infinite
    or missing mask would keep the cheapest members (tokens 1 and 2)."""
    from methods.kmedoids import fit_medoids

    patches = torch.tensor([[[0.0], [1.0], [3e6], [3e6 + 1]]], dtype=torch.float64)
    # row costs 6e6 + 2, 6e6, 6e6, 6e6 + 2; assignment [0, 0, 1, 1]
    medoids = fit_medoids(patches, torch.tensor([[0, 2]]), torch.ones(1, 4, dtype=torch.float64), iterations=1)
    assert medoids.tolist() == [[2, 0]]
    # the same tokens ten times closer: every cost (6e5) is below 4e6, the cheapest members win
    medoids = fit_medoids(patches / 10, torch.tensor([[0, 2]]), torch.ones(1, 4, dtype=torch.float64), iterations=1)
    assert medoids.tolist() == [[1, 2]]


def test_kmedoids_validation():
    with pytest.raises(ValueError, match=r"'layers' must hold blocks >= 1 \(K-Medoids clusters after the first block"):
        methods.build("kmedoids", layers=[0, 3], equal_weight=True)
    with pytest.raises(ValueError, match="cluster_iters"):
        methods.build("kmedoids", cluster_iters=-1)


# ------------------------------------------------------------------------------------------------ static

@pytest.mark.parametrize("pattern", ["l1", "l2", "linf"])
@pytest.mark.parametrize(
    "params",
    [
        {"not_contiguous": True, "keep_rate": 0.7},
        {"not_contiguous": True, "keep_rate": 0.25, "layers": [0, 4, 11]},
        {},
        {"layers": [0, 5], "min_radius": 0},
        {"layers": [2, 9], "min_radius": None},
        {"layers": [1, 3], "min_radius": 3.0},
    ],
    ids=["nc-0.7", "nc-0.25", "contiguous", "contig-from0", "contig-null", "contig-r3"],
)
def test_static_matches_reference(pattern, params):
    assert_matches_reference(model(), images(2), "static", heuristic_pattern=pattern, **params)


def test_static_ties_take_the_smallest_radius():
    """``not_contiguous``: "the count closest to K_i (smallest u on ties)". On the 8 x 8 l1 grid the counts are
    4, 12, 24, 40, 52, 60, 64; keep 0.5 aims at 32 (24 and 40 tie), 16 (12), 8 (4 and 12 tie), so 24, 12, 4
    patches stay. The cases above never hit a tie."""
    _, info = assert_matches_reference(model(), images(2), "static", not_contiguous=True, keep_rate=0.5)
    assert info.tokens_attn == [65] * 3 + [25] * 3 + [13] * 3 + [5] * 3


def test_static_odd_grid_keeps_the_reference_asymmetric_coordinates():
    """Spec: ``c = linspace(floor(-P/2), floor(P/2), P)``, asymmetric for odd P (quirk: P = 5 gives -3 .. 2 in steps
    of 1.25, not -2 .. 2). Every grid of the comparisons above is even (8 x 8), where ``-(P // 2)`` agrees."""
    from methods.static import grid_distances
    from tests.reference_clustering import static_distances

    l1 = grid_distances(5, "l1")
    assert l1[0].item() == 6.0 and l1[2 * 5 + 2].item() == 1.0  # corner |-3| + |-3|; centre |-0.5| + |-0.5|
    for side in (5, 7, 9):
        for pattern in ("l1", "linf"):
            assert grid_distances(side, pattern).tolist() == [float(v) for v in static_distances(side, pattern)]
        # l2: torch's float32 sqrt and numpy's differ in the last bit on some patches
        expected = [float(v) for v in static_distances(side, "l2")]
        assert grid_distances(side, "l2").tolist() == pytest.approx(expected, rel=1e-6, abs=0)


def test_static_distilled_and_batch_independent():
    assert_matches_reference(model("dist8"), images(2), "static", not_contiguous=True)
    vit, x = model(), images(3)
    batch, _ = run(vit, x, "static", not_contiguous=True)
    alone, _ = run(vit, x[1:2], "static", not_contiguous=True)
    assert (alone[0] - batch[1]).abs().max().item() < 1e-10


def test_static_patterns_are_buffers_that_move_with_the_model_and_stay_out_of_checkpoints():
    vit, x = copy.deepcopy(model()), images(2)  # a copy: this test moves it to the meta device
    reduced = bench.apply(vit, "static", track_source=True, not_contiguous=True, keep_rate=0.5, layers=[2, 7])
    constants = {name: buffer for name, buffer in reduced.named_buffers() if name.startswith("constant_")}
    assert sorted(constants) == ["constant_keep2_8x8", "constant_keep7_8x8"]
    assert not any(name.startswith("constant_") for name in reduced.state_dict())  # checkpoints unchanged
    with torch.no_grad():
        reduced(x)
    info = bench.forward_stats(reduced)
    first, second = constants["constant_keep2_8x8"], constants["constant_keep7_8x8"]
    assert info.tokens_attn == [65] * 2 + [len(first)] * 5 + [len(second)] * 5 and 65 > len(first) > len(second) > 1
    kept = info.source[:, 1:].argmax(dim=-1)  # original token index of every kept patch, both images alike
    assert first[0] == 0 and torch.equal(kept, first[1:][second[1:] - 1].expand(2, -1))
    reduced.to("meta")
    assert all(reduced.get_buffer(name).device.type == "meta" for name in constants)


def test_static_at_another_input_size_prunes_that_grid_and_refuses_a_non_square_one():
    """Images of another size than the model's: the kept patches are those of a model built for that grid (a
    64-token 4 x 16 grid is not the 8 x 8 one of the same count), and a non-square grid is one error."""
    params = {"not_contiguous": True, "keep_rate": 0.5, "layers": [1, 4], "track_source": True}
    def tiny(**kwargs):
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, patch_size=8, **kwargs).eval()

    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    kept = []
    for vit in (tiny(img_size=64, dynamic_img_size=True), tiny(img_size=96)):  # built for 8 x 8 and for 12 x 12
        reduced = bench.apply(vit, "static", **params)
        with torch.no_grad():
            reduced(x)
        kept.append(reduced.last_forward.source[0, 1:, 1:].argmax(dim=-1))  # original patch of each kept token
    assert len(kept[1]) < 144 // 2 and torch.equal(kept[0], kept[1])
    reduced = bench.apply(tiny(img_size=64, dynamic_img_size=True), "static", **params)
    for height, width in ((32, 128), (24, 40)):  # 4 x 16 (64 patches, as the model's 8 x 8) and 3 x 5
        with pytest.raises(ValueError, match=rf"method 'static': needs a square grid of patch tokens, got "
                                             rf"{height // 8}x{width // 8}"):
            reduced(torch.randn(1, 3, height, width))


def test_static_budget_knob_only_in_its_mode():
    vit = model()
    ctx = bench.apply(vit, "static").context
    methods.build("static", not_contiguous=True, keep_rate=0.5).check_budget(ctx)
    with pytest.raises(ValueError, match="not_contiguous: true"):
        methods.build("static", keep_rate=0.5).check_budget(ctx)
    with pytest.raises(ValueError, match="heuristic_pattern"):
        methods.build("static", heuristic_pattern="l3")


# ------------------------------------------------------------------------------------------------ random

def test_random_is_reproducible_per_seed_and_independent_of_images_and_global_rng():
    vit = model()
    x, y = images(3, seed=1), images(3, seed=2)
    a, info_a = run(vit, x, "random", global_seed=0)
    torch.rand(100)  # whatever ran before
    b, info_b = run(vit, x, "random", global_seed=123)  # the global seed does not matter
    assert torch.equal(a, b) and torch.equal(info_a.source, info_b.source)
    _, info_y = run(vit, y, "random")
    assert torch.equal(info_a.source, info_y.source)  # the pattern never depends on the image
    _, info_seed = run(vit, x, "random", seed=1)
    assert not torch.equal(info_a.source, info_seed.source)


def _spec_keys(seed: int, block: int, image: int, count: int) -> list[int]:
    """docs/methods.md#random, written out with Python integers (no tensor code): the key of each patch
    position of one image at one block."""
    def mix(x: int) -> int:
        x = (((x >> 16) ^ x) * 0x45D9F3B) % 2**32
        x = (((x >> 16) ^ x) * 0x45D9F3B) % 2**32
        return (x >> 16) ^ x

    row = mix((mix((mix(seed) + block) % 2**32) + image) % 2**32)
    return [mix((row + j) % 2**32) for j in range(count)]


def _spec_kept(seed: int, block: int, image: int, count: int, keep: int) -> list[int]:
    keys = _spec_keys(seed, block, image, count)
    return sorted(sorted(range(count), key=lambda j: -keys[j])[:keep])


def test_random_counts_order_and_draws():
    vit, x = model(), images(2)
    _, info = run(vit, x, "random", keep_rate=0.5, layers=[2, 7])
    assert info.tokens_attn == [65] * 3 + [33] * 5 + [17] * 4  # attention of block l sees the previous count
    assert info.tokens_mlp == [65] * 2 + [33] * 5 + [17] * 5
    kept = info.source[:, 1:].argmax(dim=-1) - 1  # original patch index of each kept token
    assert torch.equal(kept, kept.sort(dim=1).values)  # ascending original order
    assert not torch.equal(kept[0], kept[1])  # independent per image
    for image in range(2):  # the spec's keys: block 2 keeps 32 of 64 positions, block 7 16 of those 32
        first = _spec_kept(0, 2, image, 64, 32)
        second = _spec_kept(0, 7, image, 32, 16)
        assert kept[image].tolist() == [first[j] for j in second]
    for row in range(3):  # distinct keys within an image: the top-K set has no ties to break
        assert len(set(_spec_keys(5, row, row, 4096))) == 4096


def test_keep_rate_schedule_follows_the_sorted_layers():
    """``K_i`` belongs to the i-th entry of the *sorted* ``layers`` (spec, shared conventions): ``[9, 3, 6]`` is
    ``[3, 6, 9]``, int(64 * 0.7 ** (i + 1)) = 44, 31, 21 patches. Every other case lists its layers in order, so a
    schedule indexed by the list as written (block 9 first: 44 there, nothing left to prune) passed them all."""
    assert methods.build("random", layers=[9, 3, 6]).params["layers"] == [3, 6, 9]
    _, info = run(model(), images(1), "random", keep_rate=0.7, layers=[9, 3, 6])
    assert info.tokens_mlp == [65] * 3 + [45] * 3 + [32] * 3 + [22] * 3


def test_random_keeps_one_patch_token_where_the_schedule_truncates_to_zero():
    """keep 0.01 on 64 patches: K_i = int(64 * 0.01) = 0. One patch token stays, the spec's largest key; a
    model without a class token (average pool) runs (it was a reshape error with no token left)."""
    vit, x = model(), images(2)
    _, info = run(vit, x, "random", keep_rate=0.01, layers=[2])
    assert info.tokens_mlp == [65] * 2 + [2] * 10
    kept = info.source[:, 1:].argmax(dim=-1)[:, 0] - 1
    assert kept.tolist() == [_spec_kept(0, 2, image, 64, 1)[0] for image in range(2)]
    torch.manual_seed(0)
    pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                               class_token=False, global_pool="avg").eval()
    reduced = bench.apply(pooled, "random", keep_rate=0.01, layers=[1])
    with torch.no_grad():
        logits = reduced(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert bench.forward_stats(reduced).tokens_mlp == [16] + [1] * 11


def test_random_pattern_of_an_image_does_not_depend_on_the_batch_size():
    vit = model()
    x = images(4)
    _, info_all = run(vit, x, "random", keep_rate=0.5, layers=[2, 7])
    _, info_two = run(vit, x[:2], "random", keep_rate=0.5, layers=[2, 7])
    assert torch.equal(info_all.source[:2], info_two.source)  # image b keeps the same tokens in any batch


# ------------------------------------------------------------------------------------------------ DeiT geometry

def _deit(name: str):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def _block_gmacs(vit, method, **params) -> tuple[float, object]:
    reduced = bench.apply(vit, method, **params)
    with torch.no_grad():
        reduced(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    info = bench.forward_stats(reduced)
    return bench.analytic_macs(reduced, info.tokens_attn, info.tokens_mlp) / 1e9, info


SPEC_GMACS = {  # methods-adaptive.md, keep 0.25 / 0.5 / 0.7 / 0.9
    ("deit_small_patch16_224", "dpcknn", ()): [1.555, 2.147, 2.878, 3.914],
    ("deit_small_patch16_224", "kmedoids", ()): [1.555, 2.147, 2.878, 3.914],
    ("deit_small_patch16_224", "random", ()): [1.699, 2.278, 2.980, 3.960],
    ("deit_small_patch16_224", "static", (("heuristic_pattern", "l1"),)): [1.511, 2.063, 2.855, 3.841],
    ("deit_small_patch16_224", "static", (("heuristic_pattern", "l2"),)): [1.577, 2.152, 2.901, 3.890],
    ("deit_small_patch16_224", "static", (("heuristic_pattern", "linf"),)): [1.510, 2.043, 2.926, 3.965],
    ("deit_tiny_patch16_224", "dpcknn", ()): [0.427, 0.581, 0.775, 1.060],
    ("deit_tiny_patch16_224", "random", ()): [0.471, 0.621, 0.808, 1.075],
}


@pytest.mark.parametrize("case", list(SPEC_GMACS), ids=lambda c: f"{c[0][:10]}-{c[1]}-{dict(c[2])}")
def test_block_gmacs_match_the_spec(case):
    name, method, extra = case
    vit = _deit(name)
    params = dict(extra, not_contiguous=True) if method == "static" else dict(extra)
    for keep_rate, expected in zip((0.25, 0.5, 0.7, 0.9), SPEC_GMACS[case], strict=True):
        got, _ = _block_gmacs(vit, method, keep_rate=keep_rate, **params)
        assert abs(got - expected) <= 0.01 * expected, (case, keep_rate, got, expected)


def test_deit_small_token_schedules():
    vit = _deit("deit_small_patch16_224")
    for pattern, expected in (("l1", [137, 93, 69]), ("l2", [141, 97, 69]), ("linf", [145, 101, 65])):
        _, info = _block_gmacs(vit, "static", heuristic_pattern=pattern, not_contiguous=True)
        assert [info.tokens_attn[b] for b in (3, 6, 9)] == expected, pattern
    _, info = _block_gmacs(vit, "static")
    assert info.tokens_attn == [197] * 3 + [185, 157, 137, 85, 61, 25, 13] + [13] * 2
    _, info = _block_gmacs(vit, "dpcknn")
    assert info.tokens_attn == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3  # 1 + 137 / 96 / 67
    _, info = _block_gmacs(vit, "random", keep_rate=0.5)
    assert info.tokens_mlp == [197] * 3 + [99] * 3 + [50] * 3 + [25] * 3  # 1 + 98 / 49 / 24


def test_clustering_overhead_is_reported_separately():
    vit = _deit("deit_small_patch16_224")
    reduced = bench.apply(vit, "dpcknn", keep_rate=0.7)
    with torch.no_grad():
        reduced(torch.randn(1, 3, 224, 224))
    info = bench.forward_stats(reduced)
    assert reduced.method.extra_macs(info.tokens_in, reduced.context, 384) == (196**2 + 137**2 + 96**2) * 384
    kmedoids = methods.build("kmedoids", equal_weight=True)
    init = 196 * 384 * 137 * 136 // 2 + 137 * 384 * 96 * 95 // 2 + 96 * 384 * 67 * 66 // 2
    assert kmedoids.extra_macs(info.tokens_in, reduced.context, 384) == (196**2 + 137**2 + 96**2) * 384 + init
    # torchprofile does not see cdist: its count stays within 1% of the analytic block count
    analytic = bench.analytic_macs(reduced, info.tokens_attn, info.tokens_mlp)
    assert abs(bench.count_macs(reduced) - analytic) <= 0.01 * analytic
