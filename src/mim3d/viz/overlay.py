"""A label map drawn over its CT: three radiological planes, an HU window and a legend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from mim3d.viz.planes import (
    VIEWS,
    display_plane,
    draw_plane,
    save_figure,
    slice_title,
    spacing_of,
    window_caption,
)

__all__ = ["LABEL_ALPHA", "label_colour", "label_overlay_figure", "save_label_overlay"]

#: Opacity of the label colours over the CT (the anatomy stays readable underneath).
LABEL_ALPHA = 0.45


def label_colour(label: int) -> tuple[float, float, float]:
    """RGB colour of label id ``label`` >= 1: fixed per id, so pictures of a model agree."""
    from matplotlib import colormaps

    if label <= 20:
        return tuple(colormaps["tab20"]((label - 1) % 20)[:3])
    # Beyond 20 ids, golden-ratio hues keep neighbouring ids apart.
    return tuple(colormaps["hsv"]((label * 0.618034) % 1.0)[:3])


def _label_rgba(plane: np.ndarray) -> np.ndarray:
    """``(V, H, 4)`` float32 colours of a displayed label plane ``(V, H)``; 0 is transparent."""
    rgba = np.zeros(plane.shape + (4,), dtype=np.float32)
    for label in np.unique(plane):
        if label > 0:
            rgba[plane == label] = (*label_colour(int(label)), LABEL_ALPHA)
    return rgba


def _check(image_hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Integer labels of the image's shape, or a ValueError saying what is wrong."""
    if image_hu.ndim != 3:
        raise ValueError(f"the CT has shape {image_hu.shape}; give one 3D (X, Y, Z) volume")
    if labels.shape != image_hu.shape:
        raise ValueError(f"the label map has shape {labels.shape} but the CT {image_hu.shape}; "
                         "give labels on the CT's own grid")
    if labels.dtype.kind == "f" and (not np.isfinite(labels).all()
                                     or (labels != np.round(labels)).any()):
        raise ValueError("the label map holds non-integer values; give integer class ids")
    if labels.dtype.kind not in "iuf":
        raise ValueError(f"the label map has dtype {labels.dtype}; give integer class ids")
    if labels.min() < 0:
        raise ValueError(f"the label map holds negative ids ({int(labels.min())})")
    # Integer maps are used as they are (a 512^2 x 300 map must not be copied to int64).
    return labels.astype(np.int32) if labels.dtype.kind == "f" else labels


def _slice_index(labels: np.ndarray, axis: int) -> int:
    """Slice along ``axis`` with the most labelled voxels (the middle one if none is)."""
    area = (labels > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    return int(area.argmax()) if area.any() else labels.shape[axis] // 2


def _legend_names(present: Sequence[int], class_names: Mapping[int, str] | Sequence[str]
                  ) -> list[str]:
    names = class_names if isinstance(class_names, Mapping) else dict(enumerate(class_names))
    return [f"{k} {names.get(k, names.get(str(k), 'unnamed'))}" for k in present]


def label_overlay_figure(image_hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, *,
                         hu_window: Sequence[float],
                         class_names: Mapping[int, str] | Sequence[str],
                         title: str = "labels over CT") -> Any:
    """The matplotlib Figure of :func:`save_label_overlay` (for tests and notebooks)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image_hu = np.asarray(image_hu)
    labels = _check(image_hu, np.asarray(labels))
    spacing = spacing_of(affine)
    picked = [_slice_index(labels, axis) for axis in range(3)]
    present = [int(k) for k in np.flatnonzero(np.bincount(labels.ravel())) if k > 0]
    ncol = min(7, max(1, len(present)))
    legend_inches = 0.2 + 0.18 * -(-max(1, len(present)) // ncol)
    fig = Figure(figsize=(13, 5.4 + legend_inches), dpi=100)
    lo, hi = float(hu_window[0]), float(hu_window[1])
    for ax, view in zip(fig.subplots(1, 3), VIEWS):
        index = picked[view.slice_axis]
        layers = [(display_plane(image_hu, view, index), {"cmap": "gray", "vmin": lo, "vmax": hi}),
                  (_label_rgba(display_plane(labels, view, index)), {})]
        draw_plane(ax, layers, view, spacing=spacing,
                   title=slice_title(view, index, image_hu.shape[view.slice_axis], affine, picked))
    handles = [Patch(facecolor=(*label_colour(k), LABEL_ALPHA + 0.3), label=name)
               for k, name in zip(present, _legend_names(present, class_names))]
    if not handles:
        handles = [Patch(facecolor="none", edgecolor="none", label="no labelled voxel")]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, fontsize=8,
               bbox_to_anchor=(0.5, 0.0), handlelength=1.2, columnspacing=1.2, labelspacing=0.3)
    fig.suptitle(f"{title}; {window_caption((lo, hi))}; radiological convention", fontsize=10)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 0.96))
    return fig


def save_label_overlay(image_hu: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                       out_png: str | PathLike, *, hu_window: Sequence[float],
                       class_names: Mapping[int, str] | Sequence[str],
                       title: str = "labels over CT") -> Path:
    """Draw a label map over its CT on three planes, each the one with most labels, as PNG.

    Radiological convention with R/L, A/P, S/I markers; each slice's title gives its number and
    world position; the HU window is written on the figure; the legend names every label
    present (colour fixed per id by :func:`label_colour`). The PNG is written atomically.

    Args:
        image_hu: ``(X, Y, Z)`` CT in HU, RAS order (as :func:`mim3d.data.readers.read_volume`).
        labels: ``(X, Y, Z)`` integer class ids on the same grid; 0 is background.
        affine: ``(4, 4)`` RAS voxel-to-world matrix (for the pixel aspect and positions).
        out_png: PNG to write (parent folders are created).
        hu_window: ``(low, high)`` HU shown from black to white, e.g. the model card's window.
        class_names: id -> name, as a mapping (int or str keys) or a sequence indexed by id.
        title: first words of the figure title.

    Returns:
        The PNG path.

    Raises:
        ValueError: shapes disagree, labels are not non-negative integers or the affine is bad.
    """
    fig = label_overlay_figure(image_hu, labels, affine, hu_window=hu_window,
                               class_names=class_names, title=title)
    return save_figure(fig, out_png)
