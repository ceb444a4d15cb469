"""Intensity normalisations applied on the fly to int16 HU crops (window, z-score, min-max)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from mim3d.config import DataConfig
from mim3d.data import preprocess

__all__ = ["VolumeStats", "minmax", "normalize", "window_hu", "zscore"]


class VolumeStats(Protocol):
    """Whole-volume statistics of one case (a manifest record or an index row)."""

    hu_min: int
    hu_max: int
    hu_mean: float
    hu_std: float


def window_hu(arr: np.ndarray, hu_window: Sequence[float], *,
              overwrite: bool = False) -> np.ndarray:
    """:func:`mim3d.data.preprocess.window_hu` (the window fine-tuning applies too): ``hu_window``
    mapped linearly to [0, 1], clipped. Returns float32 (in place with ``overwrite``)."""
    return preprocess.window_hu(arr, hu_window, overwrite=overwrite)


def zscore(arr: np.ndarray, mean: float | None = None, std: float | None = None) -> np.ndarray:
    """(arr - mean) / std as float32; mean/std default to the array's own."""
    out = np.asarray(arr, dtype=np.float32)
    mean = float(out.mean()) if mean is None else float(mean)
    std = float(out.std()) if std is None else float(std)
    return (out - np.float32(mean)) / np.float32(max(std, 1e-6))


def minmax(arr: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Map [vmin, vmax] to [0, 1] (clipped) as float32; bounds default to the array's range."""
    out = np.asarray(arr, dtype=np.float32)
    vmin = float(out.min()) if vmin is None else float(vmin)
    vmax = float(out.max()) if vmax is None else float(vmax)
    out = (out - np.float32(vmin)) * np.float32(1.0 / max(vmax - vmin, 1e-6))
    return np.clip(out, 0.0, 1.0, out=out)


def normalize(arr: np.ndarray, data: DataConfig, *, record: VolumeStats | None = None,
              overwrite: bool = False) -> np.ndarray:
    """Intensity normalisation of ``data.normalization`` (float32, same shape as ``arr``).

    ``overwrite=True`` lets the window reuse a float32 ``arr`` (a crop the caller gives up).

    ``window`` clips ``data.hu_window`` to [0, 1]. ``zscore`` and ``minmax`` use the whole
    volume's statistics from ``record`` when given (so every crop of a case is scaled alike),
    otherwise those of ``arr`` itself.
    """
    if data.normalization == "window":
        return window_hu(arr, data.hu_window, overwrite=overwrite)
    if data.normalization == "zscore":
        if record is None:
            return zscore(arr)
        return zscore(arr, record.hu_mean, record.hu_std)
    if record is None:
        return minmax(arr)
    return minmax(arr, record.hu_min, record.hu_max)
