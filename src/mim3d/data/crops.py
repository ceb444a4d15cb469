"""Boxes out of 3D arrays: in-memory copies and partial reads of C-order ``.npy`` files.

A crop box may start at negative voxels or reach past the array; the part outside is filled
with a pad value (air for CT), so every crop has the requested size. A store array kept at a
coarser spacing on some axes is cropped on the target grid by :func:`read_interpolated`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mim3d.data.preprocess import axis_weights, interpolate_axis

__all__ = ["AIR_HU", "Box", "crop_array", "crop_box", "place", "read_interpolated",
           "read_npy_crop"]

AIR_HU = -1000
#: Source slices (in the array) and destination slices (in the box).
Box = tuple[tuple[slice, ...], tuple[slice, ...]]


def crop_array(arr: np.ndarray, start: Sequence[int], size: Sequence[int],
               pad_value: float) -> np.ndarray:
    """Copy a box out of a 3D array (or memory map), filling the part outside it.

    Args:
        arr: array of shape (X, Y, Z).
        start: first voxel of the box; may be negative.
        size: box size; may extend past the array.
        pad_value: value outside the array.

    Returns:
        A new array of shape ``size`` and ``arr``'s dtype.
    """
    size = tuple(int(s) for s in size)
    box = crop_box(start, size, arr.shape)
    if box is None:
        return np.full(size, pad_value, dtype=arr.dtype)
    return place(arr[box[0]], size, box[1], pad_value)


def read_npy_crop(path: str | Path, start: Sequence[int], size: Sequence[int],
                  pad_value: float = AIR_HU, *, header: np.ndarray | None = None) -> np.ndarray:
    """Read a box of a C-order 3D .npy file, reading only the rows the box touches.

    One ``pread`` per x-plane fetches the box's contiguous (y, all z) block, so the bytes read
    are about (box x) * (box y) * Z, and the kernel's readahead never pulls in the whole file
    (page faults on a memmap do when ``read_ahead_kb`` is large, as on many cloud VMs). Falls
    back to memmap slicing where ``os.preadv`` is missing (Windows) or the file is not C-order.

    Args:
        path: the .npy file.
        start, size, pad_value: as in :func:`crop_array`.
        header: the file already opened with ``np.load(path, mmap_mode="r")`` (saves parsing).

    Returns:
        A new array of shape ``size`` and the file's dtype.
    """
    mm = np.load(path, mmap_mode="r") if header is None else header
    size = tuple(int(s) for s in size)
    if not hasattr(os, "preadv") or mm.ndim != 3 or not mm.flags.c_contiguous:
        return crop_array(mm, start, size, pad_value)
    box = crop_box(start, size, mm.shape)
    if box is None:
        return np.full(size, pad_value, dtype=mm.dtype)
    (sx, sy, sz), (_, n_y, n_z) = box[0], mm.shape
    block = np.empty((sx.stop - sx.start, sy.stop - sy.start, n_z), dtype=mm.dtype)
    row = n_z * mm.dtype.itemsize
    fd = os.open(path, os.O_RDONLY)
    try:
        for k, x in enumerate(range(sx.start, sx.stop)):
            _pread_into(fd, memoryview(block[k]).cast("B"), mm.offset + (x * n_y + sy.start) * row)
    finally:
        os.close(fd)
    if sz == slice(0, n_z) and block.shape == size:
        return block  # the box spans every z: the block is the crop, no second copy
    return place(block[:, :, sz], size, box[1], pad_value)


def read_interpolated(read: Callable[[list[int], list[int]], np.ndarray],
                      stored_shape: Sequence[int], step: Sequence[float], shape: Sequence[int],
                      start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """A box of the target grid from an array stored at a coarser spacing on some axes.

    Args:
        read: ``read(start, size)`` returns that box of the stored array (inside it).
        stored_shape: shape of the stored array.
        step: stored voxels per target voxel on each axis (1.0 where it is stored on the
            target grid, below 1 where it keeps its coarser source spacing).
        shape: the target grid (X, Y, Z).
        start, size, pad_value: as in :func:`crop_array`, on the target grid.

    Returns:
        A new float32 array of shape ``size``: linear interpolation along the coarse axes of
        the stored box that covers the crop (the values are not rounded to integers again).
    """
    size = tuple(int(s) for s in size)
    box = crop_box(start, size, tuple(int(n) for n in shape))
    if box is None:
        return np.full(size, pad_value, dtype=np.float32)
    first, count, weights = [], [], []
    for ax, sl in enumerate(box[0]):
        if float(step[ax]) == 1.0:
            first.append(sl.start)
            count.append(sl.stop - sl.start)
            weights.append(None)
            continue
        s0, w = axis_weights(sl.start, sl.stop - sl.start, float(step[ax]), int(stored_shape[ax]))
        first.append(s0)
        count.append(w.shape[0])
        weights.append(w)
    out = read(first, count)
    for ax, w in enumerate(weights):
        if w is not None:
            out = interpolate_axis(out, ax, w)
    if out.shape == size:
        return out  # interpolation made a fresh array: no second copy
    return place(out, size, box[1], pad_value)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset`` (preadv may return fewer bytes than asked)."""
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at byte {offset + done}: the .npy file is truncated")
        done += n


def crop_box(start: Sequence[int], size: tuple[int, ...], shape: tuple[int, ...]) -> Box | None:
    """Source (in the array) and destination (in the box) slices; None if they do not meet."""
    src, dst = [], []
    for ax in range(3):
        lo = max(int(start[ax]), 0)
        hi = min(int(start[ax]) + size[ax], shape[ax])
        if hi <= lo:
            return None
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(start[ax]), hi - int(start[ax])))
    return tuple(src), tuple(dst)


def place(inside: np.ndarray, size: tuple[int, ...], dst: tuple[slice, ...],
          pad_value: float) -> np.ndarray:
    """Put ``inside`` at ``dst`` of a new ``size`` array filled with ``pad_value``."""
    if inside.shape == size:  # the usual case: no padding, a single copy
        return np.array(inside, copy=True)
    out = np.full(size, pad_value, dtype=inside.dtype)
    out[dst] = inside
    return out
