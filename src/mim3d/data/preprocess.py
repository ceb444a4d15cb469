"""The one definition of CT preprocessing shared by pre-training and fine-tuning.

Both paths read a case with :func:`mim3d.data.readers.read_volume`, which orients it to RAS
(:func:`mim3d.data.readers.to_ras`), then:

* **spacing**: :func:`resample_to_spacing` - trilinear (images) or nearest (labels) resampling
  to a voxel size; the first voxel's centre and the axis directions are kept and the new grid
  spans the old voxel centres (``round((n - 1) * old / new) + 1`` voxels per axis, MONAI's
  ``Spacing`` convention), so points past the last old centre take the edge value;
* **HU window**: :func:`window_hu` - ``hu_window`` mapped linearly to [0, 1], clipped.

Trilinear resampling on this grid is separable, so it may run in two passes: the pre-training
store keeps axes much coarser than the target (thick slices, :func:`stored_spacing`) at their
source spacing and interpolates them when a crop is read (:func:`axis_weights`,
:func:`interpolate_axis`); the result equals one pass up to the int16 rounding in between.

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

__all__ = ["KEEP_COARSER", "axis_weights", "interpolate_axis", "resample_to_grid",
           "resample_to_spacing", "spacing_grid", "stored_spacing", "window_hu"]

#: An axis whose source spacing is at least this multiple of the target stays at its source
#: spacing in the store (see :func:`stored_spacing`). Below it the bytes saved (under 17 %)
#: would not pay for interpolating every crop read.
KEEP_COARSER = 1.2
_TILE = 32  # output voxels per matrix product in interpolate_axis (a band of about 17 sources)


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


def stored_spacing(source: Sequence[float], target: Sequence[float]) -> tuple[float, ...]:
    """Spacing a store keeps: ``target``, except axes at least :data:`KEEP_COARSER` coarser."""
    return tuple(float(s) if float(s) >= KEEP_COARSER * float(t) else float(t)
                 for s, t in zip(source, target, strict=True))


def axis_weights(first: int, count: int, step: float, n_src: int) -> tuple[int, np.ndarray]:
    """Linear interpolation along one axis onto :func:`spacing_grid`'s grid.

    Output voxel ``i`` (``first <= i < first + count``) lies at source position ``i * step``
    (both grids start at the first voxel's centre); positions past the last source voxel take
    its value, as ``mode="nearest"`` does in :func:`resample_to_spacing`.

    Args:
        first, count: the output voxels wanted.
        step: source voxels per output voxel (target spacing / source spacing).
        n_src: source voxels along the axis.

    Returns:
        ``(s0, weights)``: the first source voxel used and float32 weights of shape
        ``(n_band, count)``, so ``out[k] = sum_j src[s0 + j] * weights[j, k]``.
    """
    pos = np.arange(first, first + count, dtype=np.float64) * float(step)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_src - 1)
    frac = np.where(lo >= n_src - 1, 0.0, np.clip(pos - lo, 0.0, 1.0))
    hi = np.minimum(lo + 1, n_src - 1)
    s0 = int(lo.min())
    weights = np.zeros((int(hi.max()) - s0 + 1, count), dtype=np.float32)
    cols = np.arange(count)
    np.add.at(weights, (lo - s0, cols), 1.0 - frac)
    np.add.at(weights, (hi - s0, cols), frac)
    return s0, weights


def interpolate_axis(src: np.ndarray, axis: int, weights: np.ndarray) -> np.ndarray:
    """Apply :func:`axis_weights` along ``axis`` of ``src``; returns a new float32 array.

    The product runs in tiles of :data:`_TILE` output voxels, each against only the band of
    sources it uses: along the contiguous last axis that is about 3x faster than gathering
    neighbours (a 192^3 crop from 97 thick slices: 10 ms on one core).
    """
    src = np.ascontiguousarray(src, dtype=np.float32)
    n = src.shape[axis]
    pre, post = int(np.prod(src.shape[:axis])), int(np.prod(src.shape[axis + 1:]))
    if weights.shape[0] != n:
        raise ValueError(f"interpolate_axis: {weights.shape[0]} weight rows for {n} voxels")
    count = weights.shape[1]
    flat = src.reshape(pre, n, post)
    out = np.empty((pre, count, post), dtype=np.float32)
    for k0 in range(0, count, _TILE):
        w = weights[:, k0:k0 + _TILE]
        rows = np.flatnonzero(w.any(axis=1))
        j0, j1 = int(rows[0]), int(rows[-1]) + 1
        band = np.ascontiguousarray(w[j0:j1])
        if post == 1:
            out[:, k0:k0 + _TILE, 0] = flat[:, j0:j1, 0] @ band
        else:
            out[:, k0:k0 + _TILE] = np.matmul(np.ascontiguousarray(band.T), flat[:, j0:j1])
    return out.reshape(*src.shape[:axis], count, *src.shape[axis + 1:])


def window_hu(arr: np.ndarray, hu_window: Sequence[float], *,
              overwrite: bool = False) -> np.ndarray:
    """Map HU linearly so ``hu_window`` becomes [0, 1], clipping outside. Returns float32.

    ``overwrite=True`` windows a float32 ``arr`` in place (a crop its caller gives up); other
    dtypes are converted into a new array either way.
    """
    lo, hi = float(hu_window[0]), float(hu_window[1])
    # one allocation (none when overwriting a float32 array), then in place
    out = np.asarray(arr, dtype=np.float32) if overwrite else np.array(arr, dtype=np.float32)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)
