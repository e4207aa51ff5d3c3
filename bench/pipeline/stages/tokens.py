"""``tokens``: token maps of ``tokens.images`` fixed eval images (a seeded draw: every run of an experiment
shows the same images). One forward with source tracking on gives the map after each reducing layer
(``ForwardInfo.layer_sources``; the final map for a method that never reduces). Written as
``<results>/tokens/<key>.npz`` (the images as shown, the labels, for ``report.py``'s grid) and
``<results>/tokens/<key>.png`` (this run: input, then one panel per reducing layer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import bench
from bench.pipeline.context import StageContext
from bench.throughput import autocast
from bench.tokenmap import PRUNED, display_image, group_labels, save_maps, save_run_png


def draw_indices(size: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices of a data set of ``size`` images, the same for every run with ``seed``."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return [int(index) for index in order[: min(count, size)]]


def patch_grid(model: Any) -> tuple[int, int]:
    """(rows, cols) of patches the model embeds (after a method's input resize)."""
    context = model.context
    height, width = model.method.input_size(context) or context.img_size
    return height // context.patch_size[0], width // context.patch_size[1]


def token_maps(model: Any, batch: torch.Tensor, dtype: str,
               note: Callable[[Any], None] | None = None) -> tuple[list[int], np.ndarray]:
    """``(layers, labels (K, L, gh, gw))``: the maps after each reducing block of ``model``'s method (the
    final map, at the last block, when it never reduces). ``note``: given the forward's ``ForwardInfo``."""
    tracked = bench.apply(model.vit, model.method, track_source=True).eval()
    with torch.inference_mode(), autocast(batch.device, dtype):
        tracked(batch)
    info = tracked.last_forward
    if note is not None:
        note(info)
    layers = sorted(info.layer_sources) or [len(info.tokens_out) - 1]
    sources = [info.layer_sources[layer] for layer in layers] if info.layer_sources else [(info.source, info.mask)]
    grid, prefix = patch_grid(tracked), tracked.context.num_prefix
    labels = [group_labels(source.float().cpu(), None if mask is None else mask.cpu(), prefix, grid)
              for source, mask in sources]
    return layers, np.stack(labels, axis=1)


def run(ctx: StageContext) -> dict[str, Any]:
    run = ctx.run
    val = ctx.val_set()
    indices = draw_indices(len(val), run.tokens["images"], run.seed)
    images = [val[index][0] for index in indices]
    # its counts are the record's tokens_per_layer where no stage before it ran a forward (user test 18)
    layers, labels = token_maps(ctx.model, torch.stack(images).to(ctx.device), run.dtype, note=ctx.note_tokens)
    maps = {"images": np.stack([display_image(image.numpy()) for image in images]), "labels": labels,
            "layers": np.asarray(layers), "indices": np.asarray(indices)}
    folder = ctx.results_dir / "tokens"
    save_maps(folder / f"{run.key}.npz", **maps)
    title = f"{run.model_label}: {run.method}" + (f" ({run.params_label})" if run.params_label else "")
    save_run_png(folder / f"{run.key}.png", maps, title, depth=len(ctx.model.vit.blocks))
    patch_tokens = [[len(set(np.unique(labels[k, i]).tolist()) - {PRUNED}) for i in range(len(layers))]
                    for k in range(len(indices))]
    return {"images": len(indices), "indices": indices, "layers": layers, "patch_tokens": patch_tokens,
            "png": f"tokens/{run.key}.png", "maps": f"tokens/{run.key}.npz"}
