"""Token maps: which input patches ended up in which output token, drawn over the image.

From a source map (``ForwardInfo.source`` / ``layer_sources``: (B, N, N0), output tokens x input tokens,
1 where an output token covers an input token) ``group_labels`` gives every patch the index of the output
token that covers it, or ``PRUNED`` (-1) when none does (the patch was dropped). ``patch_colours`` colours
each group of two or more patches (merged, pooled or fused tokens) with its own colour (that of its first
patch: the same in every panel while that patch stays its first), leaves single patches transparent (the
image shows through) and greys out pruned patches; ``panel_pixels`` blends that over the image and
``group_borders`` gives the lines around merged groups and pruned regions. A grid of panels is one composed image
in one matplotlib axes (``_grid_png``). Light: numpy and matplotlib only (``report.py`` composes the grids).

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


def panel_pixels(image: np.ndarray, labels: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) float RGB in [0, 1], ``size`` = (h, w): ``image`` ((H, W) or (H, W, 3) uint8) taken at the centres of
    the panel's pixels (nearest: enlarged k times, each image pixel a k x k block), with, if given, the colours of
    ``labels`` (gh, gw) laid over it (``patch_colours``, alpha-blended; a patch covers the panel pixels whose centres
    fall in it, so a grid of another size than the image's patches, the ``resize`` method's, covers it too)."""
    height, width = size

    def centres(count: int, over: int) -> np.ndarray:
        return ((np.arange(count) + 0.5) * over / count).astype(int)

    pixels = np.asarray(image, dtype=np.float64)[centres(height, image.shape[0])[:, None],
                                                  centres(width, image.shape[1])[None, :]] / 255.0
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if labels is not None:
        over = patch_colours(labels)[centres(height, labels.shape[0])[:, None], centres(width, labels.shape[1])[None, :]]
        alpha = over[:, :, 3:]
        pixels = pixels * (1.0 - alpha) + over[:, :, :3] * alpha
    return pixels


def group_borders(labels: np.ndarray, height: float, width: float) -> list[list[tuple[float, float]]]:
    """Line segments, in a (``height``, ``width``) panel's coordinates (y down), between neighbouring patches of
    different groups where at least one of the two is a merged group or pruned (none between two single patches)."""
    rows, cols = labels.shape
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
    return segments


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
        fig.savefig(handle, dpi="figure", format="png")
    plt.close(fig)


def _wrapped(title: str, width_in: float, fontsize: float) -> str:
    """``title`` wrapped to a figure ``width_in`` inches wide: one line of a long label (DiffRate's schedules, a
    group's data and transform) ran past both edges of a figure a few panels wide, cutting off the model and the
    method it names. About 0.6 em per character of matplotlib's default sans-serif."""
    import textwrap

    per_line = max(20, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(title, per_line, break_on_hyphens=False))


DPI = 110
PANEL_IN, GAP_IN, NOTE_IN, MARGIN_IN = 1.1, 0.16, 0.14, 0.1  # a panel's width and the space around it, inches


def _grid_png(path: str | Path, cells: Sequence[Sequence[tuple[np.ndarray, np.ndarray | None]]],
              titles: Sequence[str], notes: Sequence[Sequence[str | None]] | None, title: str, fontsize: float) -> None:
    """A grid of panels (``cells``: rows of ``(image, labels or None)``, the images of one size) as one picture in
    one axes: the panels' pixels composed here (``panel_pixels``), their frames and group borders as two line
    collections, ``titles`` over the first row's columns, ``notes`` under each panel, ``title`` over it all. One
    axes instead of one per panel: matplotlib spent most of a second a run creating and laying out 16-36 axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    rows, cols = len(cells), len(cells[0])
    height, width = cells[0][0][0].shape[:2]
    # a panel of about PANEL_IN * DPI pixels, drawn one to one: a small image enlarged a whole number of times, a
    # large one sampled down (a DeiT grid of 30 runs composed at 224 pixels a panel held 1.1 GB in matplotlib)
    panel_w = width * max(1, round(PANEL_IN * DPI / width)) if width <= PANEL_IN * DPI else round(PANEL_IN * DPI)
    panel_h = max(1, round(panel_w * height / width))
    unit = panel_w / PANEL_IN  # pixels per inch: the figure's dpi
    lines = max([name.count("\n") + 1 for name in titles if name] or [0])  # a label may be wrapped
    gap, head, margin = GAP_IN * unit, (0.06 + lines * 7 * 1.3 / 72) * unit, MARGIN_IN * unit
    note = NOTE_IN * unit if notes is not None else 0.0
    step_x, step_y = panel_w + gap, panel_h + note + gap
    canvas_w = round(2 * margin + cols * panel_w + (cols - 1) * gap)
    canvas_h = round(head + rows * step_y - gap + margin)
    canvas = np.full((canvas_h, canvas_w, 3), 255, dtype=np.uint8)
    frames, borders = [], []
    for row, line in enumerate(cells):
        for col, (image, labels) in enumerate(line):
            x, y = round(margin + col * step_x), round(head + row * step_y)
            canvas[y:y + panel_h, x:x + panel_w] = np.round(255 * panel_pixels(image, labels, (panel_h, panel_w)))
            frames += [[(x, y), (x + panel_w, y)], [(x + panel_w, y), (x + panel_w, y + panel_h)],
                       [(x + panel_w, y + panel_h), (x, y + panel_h)], [(x, y + panel_h), (x, y)]]
            if labels is not None:
                borders += [[(x + a, y + b) for a, b in segment] for segment in group_borders(labels, panel_h, panel_w)]
    width_in = canvas_w / unit
    text = _wrapped(title, width_in, fontsize)
    top_in = (text.count("\n") + 1) * fontsize * 1.45 / 72 + 0.08
    height_in = canvas_h / unit + top_in
    fig = plt.figure(figsize=(width_in, height_in), dpi=unit)
    ax = fig.add_axes((0.0, 0.0, 1.0, (canvas_h / unit) / height_in))
    ax.imshow(canvas, interpolation="nearest", extent=(0, canvas_w, canvas_h, 0))
    ax.add_collection(LineCollection(borders, colors="black", linewidths=0.6))
    ax.add_collection(LineCollection(frames, colors="black", linewidths=0.8))
    for col, name in enumerate(titles):
        if name:
            ax.text(margin + col * step_x + panel_w / 2, head - 3, name, ha="center", va="bottom", fontsize=7)
    for row, line in enumerate(notes or []):
        for col, name in enumerate(line):
            if name:
                ax.text(margin + col * step_x + panel_w / 2, head + row * step_y + panel_h + 2, name, ha="center",
                        va="top", fontsize=6)
    ax.set_xlim(0, canvas_w)
    ax.set_ylim(canvas_h, 0)
    ax.set_axis_off()
    fig.suptitle(text, fontsize=fontsize, y=1.0 - 0.04 / height_in, va="top")
    _save_figure(fig, path)


def save_run_png(path: str | Path, maps: dict[str, np.ndarray], title: str, depth: int) -> None:
    """One run's grid: a row per image; the input, then the token map after each reducing layer."""
    images, labels, layers = maps["images"], maps["labels"], list(maps["layers"])
    names = ["final" if len(layers) == 1 and layer == depth - 1 else f"after block {layer}" for layer in layers]
    cells = [[(image, None)] + [(image, labels[row, col]) for col in range(len(layers))]
             for row, image in enumerate(images)]
    notes = [[None] + [f"{len(np.setdiff1d(np.unique(labels[row, col]), [PRUNED]))} patch tokens"
                       for col in range(len(layers))] for row in range(len(images))]
    _grid_png(path, cells, ["input", *names], notes, title, 8)


def compose(path: str | Path, images: np.ndarray, columns: Sequence[tuple[str, np.ndarray]], title: str) -> None:
    """Rows = images; columns = the input, then per run its final-layer labels (``(title, (K, gh, gw))``)."""
    cells = [[(image, None)] + [(image, labels[row]) for _, labels in columns] for row, image in enumerate(images)]
    _grid_png(path, cells, ["input", *(name for name, _ in columns)], None, title, 9)
