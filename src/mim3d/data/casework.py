"""One case of ``mim3d prepare``: read, check, resample, and write its folder atomically.

A case folder is written under a hidden temporary name in ``cases/`` and renamed into place
only when every file in it is complete and on disk; the manifest line that makes the case part
of the store is appended after that (:mod:`mim3d.data.prepare`). A process killed at any point
therefore leaves either the old state or a complete new folder, never a half-written case.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mim3d.config import DataConfig
from mim3d.data.body import body_cells, body_mask
from mim3d.data.crops import read_interpolated
from mim3d.data.datalists import CaseSpec
from mim3d.data.formats import ArrayFormat, array_format
from mim3d.data.manifest import HU_EDGES, CaseRecord
from mim3d.data.preprocess import resample_to_spacing, spacing_grid, stored_spacing
from mim3d.data.readers import read_volume, validate_volume
from mim3d.data.volume import ImageReadError
from mim3d.fileio import fsync_path, replace_folder

__all__ = ["CaseJob", "prepare_case", "stale_temporaries", "write_case_dir"]

logger = logging.getLogger(__name__)

_GRID_ATOL_MM = 1e-3
CASES_DIR = "cases"
RECORD_JSON = "record.json"


class _CaseError(Exception):
    """A case is unusable; the message is the quarantine reason."""


@dataclass(frozen=True)
class CaseJob:
    """What a worker needs to prepare cases into one store (pickled once per case).

    Attributes:
        root: the store folder.
        data: preprocessing (spacing and body threshold are baked in).
        format_name, format_params: array format of the store and its settings.
        min_size: quarantine volumes smaller than this (x, y, z) after resampling, or None.
        crop_size: the level-1 crop; smaller volumes are flagged (their crops get padded).
        keep_coarse: keep axes much coarser than ``data.spacing`` at their source spacing
            (:func:`mim3d.data.preprocess.stored_spacing`); crops interpolate them on read.
    """

    root: str
    data: DataConfig
    format_name: str
    format_params: dict[str, Any]
    min_size: tuple[int, int, int] | None = None
    crop_size: tuple[int, int, int] | None = None
    keep_coarse: bool = False


def prepare_case(spec: CaseSpec, job: CaseJob) -> dict[str, Any]:
    """Worker entry: prepare one case; returns ``{"record": ...}`` or ``{"reason": ...}``.

    Never raises for a bad case, so one broken file cannot stop the run.
    """
    try:
        return {"record": _write_case(spec, job)}
    except (ImageReadError, _CaseError) as err:
        return {"reason": str(err)}
    except MemoryError:
        return {"reason": "MemoryError: not enough memory to prepare this case"}
    except Exception as err:  # noqa: BLE001 - any other failure is this case's, not the run's
        return {"reason": f"{type(err).__name__}: {err}"}


def _write_case(spec: CaseSpec, job: CaseJob) -> dict[str, Any]:
    """Read, check, resample and write one case; returns its manifest record."""
    vol = read_volume(spec.image)
    reason = validate_volume(vol)
    if reason:
        raise _CaseError(reason)
    _check_intensities(vol.array)
    label = _read_label(spec.label, vol.array.shape, vol.affine) if spec.label else None
    stored, hu, affine, step = _resample(vol.array, vol.affine, job)
    if label is not None and job.data.spacing is not None:
        label = resample_to_spacing(label, vol.affine, job.data.spacing, order=0)[0]
    meta = vol.meta
    del vol
    small = _check_size(spec, hu.shape, job)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    mask = body_mask(hu, job.data.body_hu, spacing)
    kept = any(s != 1.0 for s in step)
    record = CaseRecord(
        name=spec.name, source=spec.image, label_source=spec.label, shape=tuple(hu.shape),
        spacing=spacing, affine=np.asarray(affine, float).tolist(), hu_min=int(hu.min()),
        hu_max=int(hu.max()), hu_mean=float(hu.mean(dtype=np.float64)),
        hu_std=float(hu.std(dtype=np.float64)), sha256=hashlib.sha256(stored.data).hexdigest(),
        has_label=label is not None, body_fraction=float(mask.mean()), prepared=now(),
        series_uid=meta.get("series_uid"), series_note=meta.get("series_note"),
        hu_hist=hu_histogram(hu), smaller_than_crop=small,
        stored_shape=tuple(stored.shape) if kept else None, stored_step=step if kept else None,
    ).to_json()
    arrays = {"image": stored, "body": body_cells(mask, hu.shape)}
    if label is not None:
        arrays["label"] = label
    fmt = array_format(job.format_name, job.format_params)
    return write_case_dir(Path(job.root), spec.name, arrays, record, fmt)


def _resample(array: np.ndarray, affine: np.ndarray, job: CaseJob) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """The image as stored, the image on the case's grid, the grid's affine, the stored step.

    Without ``keep_coarse`` (or without coarse axes) both images are the same int16 array.
    Otherwise the coarse axes stay at their source spacing in the stored array, and the grid
    image is interpolated from it exactly as crops will be (:func:`read_interpolated`), so the
    statistics and the body grid describe what training reads.
    """
    target = job.data.spacing
    if target is None:
        hu = _to_int16(array)
        return hu, hu, np.asarray(affine, float), (1.0, 1.0, 1.0)
    source = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    keep = stored_spacing(source, target) if job.keep_coarse else tuple(target)
    step = tuple(t / float(s) if k != t else 1.0
                 for k, t, s in zip(keep, map(float, target), source, strict=True))
    stored = _to_int16(resample_to_spacing(array, affine, keep, order=1)[0])
    shape, grid_affine = spacing_grid(array.shape, affine, target)
    if all(s == 1.0 for s in step):
        return stored, stored, grid_affine, step

    def box(first: list[int], count: list[int]) -> np.ndarray:
        return stored[tuple(slice(a, a + n) for a, n in zip(first, count))]

    grid = read_interpolated(box, stored.shape, step, shape, (0, 0, 0), shape, 0)
    return stored, _to_int16(grid), grid_affine, step


def _check_size(spec: CaseSpec, shape: tuple[int, ...], job: CaseJob) -> bool:
    """Quarantine below ``min_size``; returns whether the volume is smaller than the crop."""
    if job.min_size is not None and any(n < m for n, m in zip(shape, job.min_size)):
        raise _CaseError(f"volume {tuple(shape)} is smaller than --min-size "
                         f"{tuple(job.min_size)} (after resampling)")
    small = job.crop_size is not None and any(n < c for n, c in zip(shape, job.crop_size))
    if small:
        logger.warning("%s: volume %s is smaller than the level-1 crop %s; its crops will be "
                       "padded with air (prepare with --min-size to quarantine such cases)",
                       spec.name, tuple(shape), tuple(job.crop_size))
    return small


def hu_histogram(hu: np.ndarray) -> list[int]:
    """Voxel counts per :data:`HU_EDGES` bin, the outer bins taking everything beyond."""
    inner = np.asarray(HU_EDGES[1:-1])
    counts = np.bincount(np.searchsorted(inner, hu.ravel(), side="right"),
                         minlength=len(HU_EDGES) - 1)
    return [int(c) for c in counts]


def write_case_dir(root: Path, name: str, arrays: dict[str, np.ndarray], record: dict[str, Any],
                   fmt: ArrayFormat) -> dict[str, Any]:
    """Write a case folder atomically: temporary folder, every file flushed, then a rename.

    Args:
        root: the store folder.
        name: case name (the folder under ``cases/``).
        arrays: ``image`` and ``body``, optionally ``label`` (3D arrays).
        record: the manifest record; ``stored_bytes`` is filled in here.
        fmt: array format for image and label (the body grid is always ``.npy``).

    Returns:
        The record, as also saved in the folder's ``record.json`` with the chunk digests.
    """
    cases = root / CASES_DIR
    tmp = cases / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _fill_folder(tmp, arrays, record, fmt)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed case leaves nothing behind
        raise
    # an update (e.g. a new label) moves the old folder aside first
    replace_folder(tmp, cases / name, cases / f".{name}.old{os.getpid()}")
    fsync_path(cases)
    return record


def _fill_folder(tmp: Path, arrays: dict[str, np.ndarray], record: dict[str, Any],
                 fmt: ArrayFormat) -> None:
    """Write the arrays and record.json of one case into its temporary folder."""
    npy = array_format("npy")
    digests, size = {}, 0
    for kind, arr in arrays.items():
        kind_fmt = npy if kind == "body" else fmt
        path = tmp / f"{kind}{kind_fmt.suffix}"
        kind_fmt.write(path, arr)
        if kind != "body":
            digests[kind] = kind_fmt.chunk_digests(kind_fmt.open(path))
        size += path.stat().st_size
    record["stored_bytes"] = size
    (tmp / RECORD_JSON).write_text(json.dumps({"record": record, "format": fmt.name,
                                               "chunks": digests}) + "\n", encoding="utf-8")
    for path in tmp.iterdir():  # on disk before the rename makes the folder the case's
        fsync_path(path)
    fsync_path(tmp)


def stale_temporaries(root: Path, name: str | None = None) -> list[Path]:
    """Temporary case folders left by killed writers (of one case, or of all with None)."""
    cases = root / CASES_DIR
    if not cases.is_dir():
        return []
    who = ".+" if name is None else re.escape(name)
    pattern = re.compile(rf"^\.{who}\.(tmp|old)\d+$")
    return [p for p in cases.iterdir() if pattern.match(p.name)]


def _to_int16(array: np.ndarray) -> np.ndarray:
    """Round to the nearest integer HU and clip to the int16 range (C order)."""
    if array.dtype.kind == "f":
        array = np.rint(array)
    return np.clip(array, -32768, 32767).astype(np.int16, order="C")


def _check_intensities(array: np.ndarray) -> None:
    """Refuse float images whose values would be destroyed by rounding to int16 HU."""
    if array.dtype.kind != "f":
        return
    lo, hi = float(array.min()), float(array.max())
    if hi - lo < 100 and not np.array_equal(array, np.rint(array)):
        raise _CaseError(f"float intensities in [{lo:.4g}, {hi:.4g}] look normalised, not HU; "
                         "the store keeps int16 HU, so pass the original CT")


def _read_label(path: str, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Read a label map that must lie on the image's grid; returns uint8 or int16."""
    lab = read_volume(path)
    if lab.array.ndim != 3:
        raise _CaseError(f"label {path} is {lab.array.ndim}D; a 3D label map is needed")
    if tuple(lab.array.shape) != tuple(shape):
        raise _CaseError(f"label grid does not match its image: label shape "
                         f"{tuple(lab.array.shape)} vs image {tuple(shape)} ({path})")
    diff = float(np.abs(np.asarray(lab.affine) - np.asarray(affine)).max())
    if diff > _GRID_ATOL_MM:
        raise _CaseError(f"label grid does not match its image: affines differ by up to "
                         f"{diff:.4g} mm ({path})")
    arr = lab.array
    if arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.array_equal(arr, np.rint(arr))):
        raise _CaseError(f"label {path} has non-integer or NaN values; a label map is needed")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 32767:
        raise _CaseError(f"label {path} values [{lo}, {hi}] are outside [0, 32767]")
    return np.ascontiguousarray(arr.astype(np.uint8 if hi <= 255 else np.int16))


def now() -> str:
    """UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
