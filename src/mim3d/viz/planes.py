"""Radiological display of RAS volumes: the three planes, their orientation and their markers.

mim3d keeps every volume in RAS array order (axis 0 towards the patient's Right, 1 Anterior,
2 Superior; :mod:`mim3d.data.readers`). Radiologists read slices in the radiological convention:

* axial: the patient's right on the image's left, anterior up (seen from the feet);
* coronal: the patient's right on the image's left, superior up (seen from the front);
* sagittal: anterior on the image's left, superior up (seen from the patient's left).

In all three the horizontal array axis therefore runs from its high end (image left) to its low
end, and the vertical axis from its high end (top) to its low end. :func:`display_plane` applies
exactly that, so a picture is drawn with ``imshow(origin="upper")`` and no axis games, and
:func:`box_to_display` maps voxel boxes onto the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from mim3d.fileio import write_atomically

__all__ = ["VIEWS", "View", "box_to_display", "display_plane", "draw_plane", "figure_rgb",
           "hu_window_of", "save_figure", "slice_title", "spacing_of", "window_caption"]


@dataclass(frozen=True)
class View:
    """One display plane of a RAS volume.

    Attributes:
        name: ``axial``, ``coronal`` or ``sagittal``.
        slice_axis: RAS axis held fixed (2, 1, 0).
        h_axis: RAS axis running across the image (its high end on the left).
        v_axis: RAS axis running up the image (its high end at the top).
        markers: anatomical direction at the image's (left, right, top, bottom) edge.
    """

    name: str
    slice_axis: int
    h_axis: int
    v_axis: int
    markers: tuple[str, str, str, str]


VIEWS: tuple[View, ...] = (
    View("axial", 2, 0, 1, ("R", "L", "A", "P")),
    View("coronal", 1, 0, 2, ("R", "L", "S", "I")),
    View("sagittal", 0, 1, 2, ("A", "P", "S", "I")),
)
_AXIS_LETTER = ("x", "y", "z")


def display_plane(vol: np.ndarray, view: View, index: int) -> np.ndarray:
    """Slice ``index`` of a RAS volume as displayed: row 0 is the top, column 0 the left.

    Args:
        vol: ``(X, Y, Z)`` or ``(X, Y, Z, C)`` array in RAS order (C: e.g. RGBA channels).
        view: the plane.
        index: slice number along ``view.slice_axis``.

    Returns:
        ``(V, H)`` (or ``(V, H, C)``) array, ``V``/``H`` the sizes of the view's vertical and
        horizontal axes, flipped so both high ends come first (see the module docstring).
    """
    plane = np.take(vol, index, axis=view.slice_axis)  # the two remaining axes keep their order
    remaining = [a for a in range(3) if a != view.slice_axis]
    order = (remaining.index(view.v_axis), remaining.index(view.h_axis), *range(2, plane.ndim))
    return np.transpose(plane, order)[::-1, ::-1]


def box_to_display(box: np.ndarray, view: View, shape: Sequence[int]) -> tuple[float, float,
                                                                                float, float]:
    """A voxel box ``[start, stop)`` per RAS axis as ``(left, top, width, height)`` in pixels.

    Pixel edges follow ``imshow``'s convention: pixel ``c`` spans ``[c - 0.5, c + 0.5]``.

    Args:
        box: ``(3, 2)`` voxel box.
        view: the plane it is drawn on.
        shape: ``(X, Y, Z)`` of the volume the box lives in.
    """
    (h0, h1), (v0, v1) = box[view.h_axis], box[view.v_axis]
    h_size, v_size = shape[view.h_axis], shape[view.v_axis]
    return (h_size - h1 - 0.5, v_size - v1 - 0.5, float(h1 - h0), float(v1 - v0))


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm per array axis: the lengths of the affine's first three columns."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise ValueError(f"affine has shape {a.shape} or non-finite values; give the 4x4 "
                         "voxel-to-world matrix of the volume")
    sp = np.linalg.norm(a[:3, :3], axis=0)
    if (sp <= 0).any():
        raise ValueError(f"affine has a zero-length axis (spacing {sp.tolist()})")
    return float(sp[0]), float(sp[1]), float(sp[2])


def hu_window_of(data: Any) -> tuple[float, float] | None:
    """The HU window a :class:`mim3d.config.DataConfig` maps to [0, 1] (``None`` if it does not)."""
    if getattr(data, "normalization", "window") != "window":
        return None
    lo, hi = data.hu_window
    return float(lo), float(hi)


def window_caption(hu_window: Sequence[float] | None) -> str:
    """How grey values map to HU, e.g. ``HU window [-175, 250] (W 425, L 37.5)``."""
    if hu_window is None:
        return "grey: preprocessed intensities 0 to 1 (HU window not given)"
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return f"HU window [{lo:g}, {hi:g}] (W {hi - lo:g}, L {(lo + hi) / 2:g})"


def draw_plane(ax: Any, layers: Sequence[tuple[np.ndarray, dict]], view: View, *,
               spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str | None = None,
               marker_size: float = 9.0, markers: bool = True) -> None:
    """Draw displayed planes (:func:`display_plane`) on ``ax`` with the view's markers.

    Args:
        ax: matplotlib Axes.
        layers: ``(image, imshow keyword arguments)`` drawn bottom to top.
        view: the plane, for the markers and the pixel aspect.
        spacing: voxel size in mm per RAS axis, so that a pixel is drawn at its true shape.
        title: Axes title.
        marker_size: font size of the R/L, A/P, S/I markers.
        markers: draw them (off for volumes that are not in RAS order, e.g. rotated views).
    """
    import matplotlib.patheffects as pe

    aspect = float(spacing[view.v_axis]) / float(spacing[view.h_axis])
    for image, kwargs in layers:
        ax.imshow(image, origin="upper", interpolation="nearest", aspect=aspect, **kwargs)
    left, right, top, bottom = view.markers
    stroke = [pe.withStroke(linewidth=2.2, foreground="black")]
    for text, x, y, ha, va in ((left, 0.015, 0.5, "left", "center"),
                               (right, 0.985, 0.5, "right", "center"),
                               (top, 0.5, 0.985, "center", "top"),
                               (bottom, 0.5, 0.015, "center", "bottom")) if markers else ():
        ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="#ffe14d",
                fontsize=marker_size, weight="bold", path_effects=stroke)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)


def slice_title(view: View, index: int, size: int, affine: np.ndarray | None = None,
                voxel: Sequence[float] | None = None) -> str:
    """``axial 34/80 (z = 12.5 mm)``: the slice number and, given an affine, its position."""
    text = f"{view.name} {index + 1}/{size}"
    if affine is not None and voxel is not None:
        point = np.asarray(affine, dtype=np.float64) @ np.append(np.asarray(voxel, float), 1.0)
        axis = view.slice_axis
        text += f" ({_AXIS_LETTER[axis]} = {point[axis]:.1f} mm)"
    return text


def figure_rgb(fig: Any) -> np.ndarray:
    """``(H, W, 3)`` uint8 pixels of a matplotlib figure (rendered headless with Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Any, path: str | PathLike) -> Path:
    """Write a matplotlib Figure as PNG (atomically, see :func:`mim3d.fileio.write_atomically`)."""
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
