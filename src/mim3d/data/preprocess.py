"""The one definition of CT preprocessing shared by pre-training and fine-tuning.

Both paths read a case with :func:`mim3d.data.readers.read_volume`, which orients it to RAS
(:func:`mim3d.data.readers.to_ras`), then:

* **spacing**: :func:`resample_to_spacing` - trilinear (images) or nearest (labels) resampling
  to a voxel size; the first voxel's centre and the axis directions are kept and the new grid
  spans the old voxel centres (``round((n - 1) * old / new) + 1`` voxels per axis, MONAI's
  ``Spacing`` convention), so points past the last old centre take the edge value;
* **HU window**: :func:`window_hu` - ``hu_window`` mapped linearly to [0, 1], clipped.

The pre-training store (:mod:`mim3d.data.casework`, :mod:`mim3d.data.intensity`) calls these on
numpy arrays; the fine-tuning pipeline (:mod:`mim3d.data.transforms`) calls them through the
MONAI dictionary transforms of :mod:`mim3d.data.steps`. This module needs numpy and scipy only.
The store keeps int16 HU, so its windowed values differ from the fine-tuning path's by the
rounding only: at most ``0.5 / (hi - lo)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["resample_to_grid", "resample_to_spacing", "spacing_grid", "window_hu"]


def spacing_grid(shape: Sequence[int], affine: np.ndarray,
                 spacing: Sequence[float]) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` of the grid at ``spacing`` that starts at the first voxel's centre."""
    affine = np.asarray(affine, float)
    step = np.asarray(spacing, float) / np.linalg.norm(affine[:3, :3], axis=0)  # in old voxels
    out = tuple(max(1, int(np.round((n - 1) / s + 1.0))) for n, s in zip(shape, step, strict=True))
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * step[None, :]
    return out, new_affine


def _interpolate(array: np.ndarray, matrix: np.ndarray, offset: np.ndarray | float,
                 shape: Sequence[int], order: int) -> np.ndarray:
    """``out[i] = array[matrix @ i + offset]``; trilinear gives float32, nearest keeps the dtype."""
    src = array.astype(np.float32, copy=False) if order == 1 else array
    return ndimage.affine_transform(src, matrix, offset=offset, output_shape=tuple(shape),
                                    order=order, mode="nearest", prefilter=False)


def resample_to_spacing(array: np.ndarray, affine: np.ndarray, spacing: Sequence[float], *,
                        order: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample an ``(X, Y, Z)`` volume to ``spacing`` (see the module docstring for the grid).

    Args:
        array: (X, Y, Z) volume.
        affine: its 4x4 voxel-to-world matrix.
        spacing: target voxel size in mm along the array axes.
        order: 1 = trilinear (images, float32 output), 0 = nearest (labels, dtype kept).

    Returns:
        ``(array, affine)`` on the new grid; unchanged when the spacing already matches.
    """
    affine = np.asarray(affine, float)
    old = np.linalg.norm(affine[:3, :3], axis=0)
    if np.allclose(old, np.asarray(spacing, float), rtol=1e-4, atol=0):
        return array, affine
    shape, new_affine = spacing_grid(array.shape, affine, spacing)
    step = np.asarray(spacing, float) / old  # exact diagonal: no round trip through inv(affine)
    return _interpolate(array, step, 0.0, shape, order), new_affine


def resample_to_grid(array: np.ndarray, affine: np.ndarray, out_affine: np.ndarray,
                     out_shape: Sequence[int], *, order: int) -> np.ndarray:
    """Resample an ``(X, Y, Z)`` volume onto another grid of the same world space.

    Args:
        array: (X, Y, Z) volume with voxel-to-world matrix ``affine``.
        affine, out_affine: 4x4 matrices of the source and target grids.
        out_shape: target (X, Y, Z).
        order: 1 = trilinear, 0 = nearest.

    Returns:
        The volume on the target grid (edge values continue outside the source).
    """
    m = np.linalg.inv(np.asarray(affine, float)) @ np.asarray(out_affine, float)
    linear = m[:3, :3]
    diagonal = np.allclose(linear, np.diag(np.diag(linear)), atol=1e-9)
    return _interpolate(array, np.diag(linear) if diagonal else linear, m[:3, 3], out_shape,
                        order)


def window_hu(arr: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """Map HU linearly so ``hu_window`` becomes [0, 1], clipping outside. Returns float32."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    out = np.array(arr, dtype=np.float32, copy=True)  # one allocation, then in place
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)
