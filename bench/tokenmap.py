"""Token maps: which input patches ended up in which output token, drawn over the image.

From a source map (``ForwardInfo.source`` / ``layer_sources``: (B, N, N0), output tokens x input tokens,
1 where an output token covers an input token) ``group_labels`` gives every patch the index of the output
token that covers it, or ``PRUNED`` (-1) when none does (the patch was dropped). ``patch_colours`` colours
each group of two or more patches (merged, pooled or fused tokens) with its own colour (that of its first
patch: the same in every panel while that patch stays its first), leaves single patches transparent (the
image shows through) and greys out pruned patches; ``draw`` puts that over the image with the group borders.
Light: numpy and matplotlib only (``report.py`` composes the grids).

The tokens stage keeps, per run, ``tokens/<key>.npz`` (the images as shown, the labels after each reducing
layer) and ``tokens/<key>.png``; ``compose`` draws one grid from several runs' final-layer labels.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PRUNED = -1
GREY = (0.7, 0.7, 0.7, 1.0)  # RGBA of a pruned patch: flat, the image does not show through
MERGED_ALPHA = 0.6
_GOLDEN = 0.6180339887498949


def group_labels(source: Any, mask: Any, num_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """(B, gh, gw) int: for each patch, the index of the output token covering it (the first one, in the
    unexpected case of several), ``PRUNED`` where no real output token covers it. ``source``: (B, N, N0)
    with ``N0 = num_prefix + gh * gw``; ``mask`` (B, N) bool or None: padded output tokens (False) cover
    nothing."""
    src = np.asarray(source, dtype=np.float32) > 0
    batch, _, total = src.shape
    if total != num_prefix + grid[0] * grid[1]:
        raise ValueError(f"source has {total} input tokens; {num_prefix} prefix + {grid[0]}x{grid[1]} patches expected")
    if mask is not None:
        src = src & np.asarray(mask, dtype=bool)[:, :, None]
    patches = src[:, :, num_prefix:]  # (B, N, P)
    labels = np.where(patches.any(axis=1), patches.argmax(axis=1), PRUNED)
    return labels.reshape(batch, *grid).astype(np.int32)


def group_colour(anchor: int) -> tuple[float, float, float, float]:
    """The colour of the group whose first patch (row-major) is ``anchor``: hues spaced by the golden ratio,
    never repeating, so a group keeps its colour from panel to panel for as long as its first patch stays its
    first (a group that absorbs one with a lower first patch takes that one's colour)."""
    red, green, blue = colorsys.hsv_to_rgb((anchor * _GOLDEN) % 1.0, 0.8, 0.95)
    return (red, green, blue, MERGED_ALPHA)


def patch_colours(labels: np.ndarray) -> np.ndarray:
    """(gh, gw, 4) RGBA for one image's labels: each group of >= 2 patches its own colour (that of its first
    patch, ``group_colour``), single patches transparent, pruned patches ``GREY``."""
    labels = np.asarray(labels)
    out = np.zeros((*labels.shape, 4), dtype=np.float64)
    out[labels == PRUNED] = GREY
    groups, first, counts = np.unique(labels.reshape(-1), return_index=True, return_counts=True)
    for group, anchor, count in zip(groups, first, counts, strict=True):
        if group != PRUNED and count >= 2:
            out[labels == group] = group_colour(int(anchor))
    return out


def draw(ax: Any, image: np.ndarray, labels: np.ndarray | None = None, title: str | None = None,
         note: str | None = None) -> None:
    """``image`` (H, W) or (H, W, 3) uint8 with, if given, the colours of ``labels`` (gh, gw) and the borders
    of the merged groups and pruned regions (not between two single patches)."""
    from matplotlib.collections import LineCollection

    height, width = image.shape[:2]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest",
              extent=(0, width, height, 0))
    if labels is not None:
        rows, cols = labels.shape
        ax.imshow(patch_colours(labels), interpolation="nearest", extent=(0, width, height, 0))
        values, counts = np.unique(labels, return_counts=True)
        single = set(values[(counts == 1) & (values != PRUNED)].tolist())
        dy, dx = height / rows, width / cols
        segments = []
        for i in range(rows):
            for j in range(cols):
                here = labels[i, j]
                if j + 1 < cols and here != labels[i, j + 1] and not {here, labels[i, j + 1]} <= single:
                    segments.append([((j + 1) * dx, i * dy), ((j + 1) * dx, (i + 1) * dy)])
                if i + 1 < rows and here != labels[i + 1, j] and not {here, labels[i + 1, j]} <= single:
                    segments.append([(j * dx, (i + 1) * dy), ((j + 1) * dx, (i + 1) * dy)])
        ax.add_collection(LineCollection(segments, colors="black", linewidths=0.6))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)
    if note:
        ax.set_xlabel(note, fontsize=6, labelpad=1)


def display_image(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) float image (normalised for the model) as uint8 (H, W) or (H, W, 3), min-max scaled."""
    image = np.asarray(image, dtype=np.float64)
    low, high = image.min(), image.max()
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    pixels = np.round(255 * scaled).astype(np.uint8)
    return pixels[0] if pixels.shape[0] == 1 else pixels[:3].transpose(1, 2, 0)


# ----------------------------------------------------------------------------------------- files


def save_maps(path: str | Path, images: np.ndarray, labels: np.ndarray, layers: Sequence[int],
              indices: Sequence[int]) -> None:
    """``images`` (K, H, W[, 3]) uint8, ``labels`` (K, L, gh, gw) after the blocks ``layers``, ``indices``:
    which eval images (written atomically)."""
    from bench.pipeline.files import atomic_file

    with atomic_file(path, binary=True) as handle:
        np.savez_compressed(handle, images=images, labels=labels, layers=np.asarray(layers, dtype=np.int32),
                            indices=np.asarray(indices, dtype=np.int64))


def load_maps(path: str | Path) -> dict[str, np.ndarray]:
    """``save_maps``'s arrays. ``ValueError`` for a file that is not such an archive, however it breaks (empty:
    numpy's ``EOFError``; cut short: ``zipfile.BadZipFile``; a damaged member: ``zlib.error``; a plain ``.npy``: an
    array, no archive), so that ``report.py`` leaves that run's column out instead of failing; ``OSError`` for a
    file that cannot be read, ``KeyError`` for an archive without one of the arrays."""
    import zipfile
    import zlib

    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: an array, not an archive of token maps")
        with data:
            return {name: data[name] for name in ("images", "labels", "layers", "indices")}
    except (EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path}: not a readable archive of token maps ({error})") from error


def _save_figure(fig: Any, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    from bench.pipeline.files import atomic_file

    with atomic_file(path, binary=True) as handle:
        fig.savefig(handle, dpi=110, format="png")
    plt.close(fig)


def _suptitle(fig: Any, title: str, fontsize: float) -> None:
    """``title`` over ``fig``, wrapped to the figure's width: one line of a long label (DiffRate's schedules, a
    group's data and transform) ran past both edges of a figure a few panels wide, cutting off the model and the
    method it names. About 0.6 em per character of matplotlib's default sans-serif."""
    import textwrap

    per_line = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    fig.suptitle("\n".join(textwrap.wrap(title, per_line, break_on_hyphens=False)), fontsize=fontsize)


def _figure(rows: int, cols: int) -> tuple[Any, np.ndarray]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols + 0.3, 1.35 * rows + 0.5), squeeze=False)
    return fig, axes


def save_run_png(path: str | Path, maps: dict[str, np.ndarray], title: str, depth: int) -> None:
    """One run's grid: a row per image; the input, then the token map after each reducing layer."""
    images, labels, layers = maps["images"], maps["labels"], list(maps["layers"])
    fig, axes = _figure(len(images), 1 + len(layers))
    for row, image in enumerate(images):
        draw(axes[row, 0], image, None, "input" if row == 0 else None)
        for col, layer in enumerate(layers):
            name = "final" if len(layers) == 1 and layer == depth - 1 else f"after block {layer}"
            groups = len(np.setdiff1d(np.unique(labels[row, col]), [PRUNED]))
            draw(axes[row, col + 1], image, labels[row, col], name if row == 0 else None, f"{groups} patch tokens")
    _suptitle(fig, title, 8)
    fig.tight_layout()
    _save_figure(fig, path)


def compose(path: str | Path, images: np.ndarray, columns: Sequence[tuple[str, np.ndarray]], title: str) -> None:
    """Rows = images; columns = the input, then per run its final-layer labels (``(title, (K, gh, gw))``)."""
    fig, axes = _figure(len(images), 1 + len(columns))
    for row, image in enumerate(images):
        draw(axes[row, 0], image, None, "input" if row == 0 else None)
        for col, (name, labels) in enumerate(columns):
            draw(axes[row, col + 1], image, labels[row], name if row == 0 else None)
    _suptitle(fig, title, 9)
    fig.tight_layout()
    _save_figure(fig, path)
