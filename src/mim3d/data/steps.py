"""MONAI dictionary transforms over :mod:`mim3d.data.preprocess`, for the fine-tuning pipeline.

:class:`LoadVolumed` reads with :func:`mim3d.data.readers.read_volume` (RAS, as the store),
:class:`ResampleToSpacingd` resamples with :func:`~mim3d.data.preprocess.resample_to_spacing` and
is invertible (``Invertd`` maps predictions back onto the scan's grid), :class:`WindowHUd` applies
:func:`~mim3d.data.preprocess.window_hu`. None of them is random, so ``CacheDataset`` caches them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import TraceKeys

from mim3d.data.preprocess import resample_to_grid, resample_to_spacing, window_hu
from mim3d.data.volume import ImageReadError, Volume

__all__ = ["AFFINE_TOL_MM", "LoadVolumed", "Reader", "ResampleToSpacingd", "WindowHUd"]

#: Largest affine difference (mm) between grids that count as the same voxel grid.
AFFINE_TOL_MM = 1e-3
PathLike = str | os.PathLike
Reader = Callable[[str], Volume]


def _default_reader(path: str) -> Volume:
    # Looked up at call time so tests can monkeypatch ``readers.read_volume`` and so that importing
    # this module does not pull in SimpleITK/pydicom until data is actually read.
    from mim3d.data import readers

    return readers.read_volume(path)


def _channels_first(array: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """``(X, Y, Z)`` -> ``(1, X, Y, Z)``; ``(X, Y, Z, ...)`` -> ``(C, X, Y, Z)``, C = the rest."""
    array = np.asarray(array, dtype=dtype)
    if array.ndim < 3:
        raise ImageReadError(f"image has {array.ndim} dims {array.shape}; a 3D volume is needed")
    flat = array.reshape(*array.shape[:3], -1)
    return np.ascontiguousarray(np.moveaxis(flat, -1, 0))


class LoadVolumed(MapTransform):
    """Read images with :func:`mim3d.data.readers.read_volume` into channel-first MetaTensors.

    A value that is a list/tuple of paths is read file by file and stacked as channels (BraTS:
    T1, T1ce, T2, FLAIR); all files must share shape and affine. The result is a
    :class:`monai.data.MetaTensor` of shape ``(C, X, Y, Z)`` whose ``affine`` is the RAS+ mm
    voxel-to-world matrix (the reader's orientation, the same as the store's).
    """

    def __init__(self, keys: Sequence[str] | str, *, reader: Reader | None = None,
                 dtype: np.dtype | type = np.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reader = reader
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.load(d[key])
        return d

    def load(self, paths: PathLike | Sequence[PathLike]) -> MetaTensor:
        """Read one path or a list of co-registered paths into ``(C, X, Y, Z)``.

        A single 4D file ``(X, Y, Z, C)`` (MSD BrainTumour) gives its C channels; a list of
        3D files gives one channel per file.
        """
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not items:
            raise ImageReadError("an empty list of image paths was given: list at least one file")
        read = self.reader or _default_reader
        vols = [read(str(p)) for p in items]
        first = vols[0]
        for vol in vols[1:]:
            if vol.shape != first.shape or not np.allclose(vol.affine, first.affine,
                                                           atol=AFFINE_TOL_MM):
                raise ImageReadError(
                    f"{vol.source}: grid {vol.shape} does not match {first.source} {first.shape}; "
                    "channels of one case must be co-registered (resample them first)")
        array = np.concatenate([_channels_first(v.array, self.dtype) for v in vols])
        meta = {
            "filename_or_obj": first.source if len(vols) == 1 else [v.source for v in vols],
            "original_affine": first.affine.copy(),
            "spatial_shape": np.asarray(first.shape[:3]),
            "space": "RAS",
            # MONAI's convention: a 3D file gets a new channel axis; stacked files use axis 0.
            "original_channel_dim": "no_channel" if array.shape[0] == 1 else 0,
        }
        affine = torch.as_tensor(first.affine, dtype=torch.float64)
        return MetaTensor(torch.from_numpy(array), affine=affine, meta=meta)


def _like(img: MetaTensor, array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """A MetaTensor holding ``array`` on ``affine`` with ``img``'s other meta and history."""
    meta = {k: v for k, v in img.meta.items() if k != "affine"}
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)),
                      affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta,
                      applied_operations=list(img.applied_operations))


class ResampleToSpacingd(MapTransform, InvertibleTransform):
    """:func:`resample_to_spacing` on ``(C, X, Y, Z)`` MetaTensors; invertible for ``Invertd``.

    Args:
        keys: the image (and label) keys.
        spacing: target voxel size in mm.
        modes: per key, ``"bilinear"`` (order 1) or ``"nearest"`` (order 0, for labels).
        allow_missing_keys: skip absent keys (inference items have no label).
    """

    def __init__(self, keys: Sequence[str] | str, spacing: Sequence[float],
                 modes: Sequence[str] | str = "bilinear", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spacing = tuple(float(s) for s in spacing)
        self.modes = (modes,) * len(self.keys) if isinstance(modes, str) else tuple(modes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.modes):
            img = d[key]
            affine, order = img.affine.numpy(), 1 if mode == "bilinear" else 0
            out = [resample_to_spacing(c, affine, self.spacing, order=order)
                   for c in img.detach().cpu().numpy()]
            d[key] = _like(img, np.stack([a for a, _ in out]).astype(np.float32, copy=False),
                           out[0][1])
            # "mode" is the key Invertd(nearest_interp=True) rewrites to "nearest"
            self.push_transform(d[key], orig_size=tuple(img.shape[1:]),
                                extra_info={"mode": mode, "affine": affine.tolist()})
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resample back onto the grid each key had before (its recorded shape and affine)."""
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            info = self.pop_transform(img)
            extra = info[TraceKeys.EXTRA_INFO]
            old_affine, old_shape = np.asarray(extra["affine"]), info[TraceKeys.ORIG_SIZE]
            order = 1 if extra["mode"] == "bilinear" else 0
            affine = img.affine.numpy()
            out = np.stack([resample_to_grid(c, affine, old_affine, old_shape, order=order)
                            for c in img.detach().cpu().numpy()])
            d[key] = _like(img, out.astype(np.float32, copy=False), old_affine)
        return d


class WindowHUd(MapTransform):
    """:func:`window_hu` on an image key (float32 result, meta kept)."""

    def __init__(self, keys: Sequence[str] | str, hu_window: Sequence[float]) -> None:
        super().__init__(keys)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            d[key] = _like(img, window_hu(img.detach().cpu().numpy(), self.hu_window),
                           img.affine.numpy())
        return d
