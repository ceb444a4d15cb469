"""The prediction report of ``mim3d predict --report FILE.json``.

It records the input (path, format, DICOM series and how it was chosen, grid), the model (its
description, preset and weights hash), the preprocessing the run applies, the device, wall
time per stage (``read``: reading + preprocessing, ``inference``: the sliding window,
``postprocess``: arg-max + inverse preprocessing, ``write``: the output files), and per
predicted label its voxel count and volume in mL on the original grid.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["REPORT_FORMAT", "StageTimer", "label_volumes", "preprocessing_of"]

REPORT_FORMAT = "mim3d-predict-report"


class StageTimer:
    """Wall-clock seconds per named stage (``with timer.stage("inference"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0)
                                       + time.perf_counter() - start, 4)


def label_volumes(labels: np.ndarray, affine: np.ndarray,
                  classes: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Voxel count and volume of every class, on the grid of ``labels``.

    Args:
        labels: ``(X, Y, Z)`` integer label map.
        affine: its 4x4 voxel-to-world matrix (mm); a voxel's volume is ``|det(affine[:3, :3])|``.
        classes: ``{"id": name}`` of the foreground classes (absent ones get 0).

    Returns:
        ``{name: {"id", "voxels", "volume_ml"}}`` in id order.
    """
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist()))
    out = {}
    for key in sorted(classes, key=int):
        n = int(found.get(int(key), 0))
        out[classes[key]] = {"id": int(key), "voxels": n, "volume_ml": round(n * voxel_ml, 4)}
    return out


def preprocessing_of(cfg: Any) -> dict[str, Any]:
    """The preprocessing of a downstream config, as the run applied it before the network."""
    data, task = cfg.data, cfg.task
    return {"orientation": "RAS",
            "spacing_mm": list(data.spacing) if data.spacing is not None else None,
            "normalization": data.normalization,
            "hu_window": list(data.hu_window) if data.normalization == "window" else None,
            "crop_foreground": True, "pad_to": list(task.roi), "roi": list(task.roi),
            "sliding_window": {"overlap": task.sw_overlap, "mode": "gaussian"}
            if task.task == "seg" else None,
            "in_channels": task.in_channels}
