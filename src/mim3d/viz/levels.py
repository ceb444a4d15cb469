"""The nested MiM levels of one sample: level-1 masks and the boxes of deeper levels."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from mim3d.masking import LevelGeometry, LevelMasks
from mim3d.viz.planes import (
    VIEWS,
    View,
    box_to_display,
    display_plane,
    draw_plane,
    save_figure,
    slice_title,
    window_caption,
)

__all__ = ["MASK_RGBA", "levels_figure", "save_levels_png"]

_LEVEL_COLOURS = ("#ffd700", "#00e5ff", "#ff4fd8", "#7CFC00", "#ff8c00")
#: Colour of masked regions in every mim3d picture: a red tint stays visible over air (black),
#: so a hidden region never reads as empty space.
MASK_RGBA = (1.0, 0.12, 0.08, 0.42)


def _descendants(levels: Sequence[LevelMasks], geometry: Sequence[LevelGeometry],
                 sample: int) -> list[list[int]]:
    """Indices, per level, of the volumes descending from batch ``sample`` (parent-major)."""
    current, out = [sample], []
    for geo in geometry[: len(levels)]:
        out.append(current)
        if geo.gamma:
            current = [i * geo.gamma + j for i in current for j in range(geo.gamma)]
    return out


def _level1_voxel_mask(mask: np.ndarray, geo: LevelGeometry) -> np.ndarray:
    """Nearest-neighbour map of a level-1 token mask ``(N,)`` onto the crop's voxels."""
    grid = mask.reshape(geo.token_grid)
    # Voxel v of an axis of size S lies in token floor(v * g / S) (S need not divide by g).
    idx = [np.arange(s) * g // s for s, g in zip(geo.crop_size, geo.token_grid)]
    return grid[np.ix_(*idx)]


def _colour(level_index: int) -> str:
    """Outline colour of level ``level_index + 1`` (``level_index`` >= 1, 0-based)."""
    return _LEVEL_COLOURS[(level_index - 1) % len(_LEVEL_COLOURS)]


def mask_layer(mask_plane: np.ndarray) -> tuple[np.ndarray, dict]:
    """``(V, H, 4)`` RGBA layer tinting the True pixels of a displayed mask plane."""
    rgba = np.zeros(mask_plane.shape + (4,), dtype=np.float32)
    rgba[mask_plane] = MASK_RGBA
    return rgba, {}


def _draw_view(ax: Any, view: View, crop: np.ndarray, shade: np.ndarray,
               boxes: list[np.ndarray], centre: np.ndarray, spacing: Sequence[float]) -> None:
    """Draw one slice with the level-1 mask tint and the boxes of levels >= 2 it cuts.

    Args:
        ax: matplotlib Axes.
        view: the plane.
        crop: ``S1`` volume in [0, 1]; shade: ``S1`` bool level-1 voxel mask.
        boxes: per level >= 2 (list index 1, 2, ...; index 0 unused), ``(n, 3, 2)`` voxel boxes.
        centre: ``(3,)`` voxel the three slices pass through.
        spacing: voxel size per RAS axis.
    """
    from matplotlib.patches import Rectangle

    s_ax, index = view.slice_axis, int(centre[view.slice_axis])
    layers = [(display_plane(crop, view, index), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}),
              mask_layer(display_plane(shade, view, index))]
    draw_plane(ax, layers, view, spacing=spacing,
               title=slice_title(view, index, crop.shape[s_ax]))
    for lvl in range(1, len(boxes)):
        for b in boxes[lvl]:
            if not b[s_ax, 0] <= index < b[s_ax, 1]:
                continue
            left, top, width, height = box_to_display(b, view, crop.shape)
            # Inset a little so boxes sharing an edge stay distinguishable.
            pad = min(max(crop.shape) / 100, min(width, height) / 8)
            ax.add_patch(Rectangle((left + pad, top + pad), width - 2 * pad, height - 2 * pad,
                                   fill=False, edgecolor=_colour(lvl), linewidth=1.6))


def levels_figure(crop: np.ndarray, levels: list[LevelMasks], geometry: Sequence[LevelGeometry],
                  sample: int = 0, *, hu_window: Sequence[float] | None = None,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Any:
    """The matplotlib Figure of :func:`save_levels_png`."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    crop = np.asarray(crop, dtype=np.float32)
    if crop.shape != tuple(geometry[0].crop_size):
        raise ValueError(f"crop has shape {crop.shape}; expected the level-1 crop size "
                         f"{tuple(geometry[0].crop_size)}")
    owned = _descendants(levels, geometry, sample)
    shade = _level1_voxel_mask(levels[0].mask[sample].cpu().numpy(), geometry[0])
    boxes = [lm.boxes[idx].cpu().numpy() for lm, idx in zip(levels, owned)]
    if len(levels) > 1:
        centre = (boxes[1][0, :, 0] + boxes[1][0, :, 1]) // 2
    else:
        centre = np.asarray(crop.shape) // 2

    fig = Figure(figsize=(12, 5.1), dpi=100)
    for ax, view in zip(fig.subplots(1, 3), VIEWS):
        _draw_view(ax, view, crop, shade, boxes, centre, spacing)
    handles = [Patch(facecolor=MASK_RGBA, label="level-1 masked units")]
    handles += [Patch(facecolor="none", edgecolor=_colour(i), label=f"level-{i + 1} boxes")
                for i in range(1, len(levels))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    ratios = ", ".join(f"L{g.level} {g.n_masked}/{g.n_units} = {g.n_masked / g.n_units:.1%}"
                       for g in geometry[: len(levels)])
    fig.suptitle(f"MiM levels, sample {sample}: level-1 crop {tuple(geometry[0].crop_size)}; "
                 f"masked units {ratios}\n{window_caption(hu_window)}; radiological convention",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return fig


def save_levels_png(crop: np.ndarray, levels: list[LevelMasks],
                    geometry: Sequence[LevelGeometry], path: str | PathLike,
                    sample: int = 0, *, hu_window: Sequence[float] | None = None,
                    spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Path:
    """Draw the nested MiM levels of one sample on three planes (paper Fig. 3/9).

    The level-1 crop is shown in grey (radiological convention, anatomical markers) with its
    masked units tinted red (:data:`MASK_RGBA`); boxes of level 2, 3, ... are outlined in one
    colour per level. Slices pass through the centre of the first level-2 box (the crop centre
    when L = 1); only boxes cut by a slice are drawn on it. The title gives the effective mask
    ratios (whole units) and the HU window.

    Args:
        crop: ``(X, Y, Z)`` RAS level-1 crop, shape ``geometry[0].crop_size``, values in [0, 1].
        levels: output of :func:`mim3d.masking.sample_levels`.
        geometry: output of :func:`mim3d.masking.build_geometry`.
        path: PNG file to write (atomically).
        sample: batch sample to draw.
        hu_window: the HU range mapped to [0, 1], written on the figure (``None``: intensities
            normalised per volume).
        spacing: voxel size of the crop in mm per RAS axis (pixel aspect).

    Returns:
        The PNG path.
    """
    fig = levels_figure(crop, levels, geometry, sample, hu_window=hu_window, spacing=spacing)
    return save_figure(fig, path)
