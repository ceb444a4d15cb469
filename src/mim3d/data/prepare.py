"""``mim3d prepare``: read every case once into a :mod:`mim3d.data.store` folder.

Each case is read (RAS), checked, optionally resampled to ``DataConfig.spacing`` (trilinear
image, nearest label), rounded to int16 HU, and written with a coarse body-fraction grid. Bad
cases go to ``quarantine.jsonl`` with one reason and never stop the run. The run resumes: a case
is done once its manifest line exists, and that line is appended only after its arrays are in
place, so an interrupted case is simply redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from mim3d.config import DataConfig, to_dict
from mim3d.data.datalists import CaseSpec, resolve_inputs
from mim3d.data.readers import read_volume, validate_volume
from mim3d.data.store import (
    BODY_CELL,
    CASES_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    QUARANTINE,
    STORE_JSON,
    CaseRecord,
    body_cells,
    body_mask,
    config_mismatch,
    read_manifest,
    read_quarantine,
)
from mim3d.data.volume import ImageReadError

__all__ = ["PrepareReport", "prepare", "resample"]

_GRID_ATOL_MM = 1e-3
_CRASH_REASON = ("worker process died while preparing this case (out of memory, or a crash "
                 "inside an image reader)")


@dataclass
class PrepareReport:
    """Outcome of :func:`prepare`.

    Attributes:
        prepared: cases written by this run.
        skipped: cases already in the store with the same image and label source.
        quarantined: cases found unusable by this run (reasons in ``quarantine.jsonl``).
        store: the store folder.
        messages: one line per quarantined case, then a summary line.
        in_store: prepared cases the store holds after the run.
    """

    prepared: int
    skipped: int
    quarantined: int
    store: Path
    messages: list[str] = field(default_factory=list)
    in_store: int = 0


class _CaseError(Exception):
    """A case is unusable; the message is the quarantine reason."""


def prepare(inputs: Sequence[str | Path], out: str | Path, *, data: DataConfig,
            workers: int = 2, progress: bool = True) -> PrepareReport:
    """Prepare images into a store folder, resuming whatever an earlier run left.

    Args:
        inputs: files, DICOM folders, datalists, nnU-Net folders, folders or .txt lists
            (see :func:`mim3d.data.datalists.resolve_inputs`).
        out: store folder (created when missing).
        data: preprocessing; ``spacing`` and ``body_hu`` are baked into the arrays and must match
            an existing store's.
        workers: worker processes; 0 or 1 prepares in this process.
        progress: show a tqdm bar.

    Returns:
        The counts; the store is usable when ``in_store > 0``.

    Raises:
        ValueError: (one line) inputs cannot be resolved, ``out`` is a store prepared with other
            baked-in settings, or another prepare is writing to it.
    """
    specs = resolve_inputs(inputs)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    with _store_lock(root):
        _init_store(root, data)
        _repair_manifest(root / MANIFEST)
        done = read_manifest(root / MANIFEST)
        todo, skipped = _plan(specs, done)
        report = PrepareReport(prepared=0, skipped=skipped, quarantined=0, store=root)
        quarantine = {e["source"]: e for e in read_quarantine(root / QUARANTINE)}
        known = {rec.name for rec in done}
        bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=not progress)

        def finish(spec: CaseSpec, result: dict[str, Any]) -> None:
            _record_result(root, spec, result, report, quarantine, known)
            bar.update(1)
            bar.set_postfix(quarantined=report.quarantined, refresh=False)

        try:
            _run_cases(todo, root, data, workers, finish)
        finally:
            bar.close()
        report.in_store = len(read_manifest(root / MANIFEST))
    report.messages.append(
        f"prepared {report.prepared}, skipped {report.skipped} (already in the store), "
        f"quarantined {report.quarantined}; {report.in_store} cases in {root}")
    return report


@contextlib.contextmanager
def _store_lock(root: Path) -> Iterator[None]:
    """Refuse a second concurrent prepare into the same folder (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the user is trusted
        yield
        return
    with open(root / ".prepare.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"{root}: another `mim3d prepare` is writing to this store; "
                             "wait for it or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _init_store(root: Path, data: DataConfig) -> None:
    """Write store.json for a new store, or check an existing one was made the same way."""
    meta = root / STORE_JSON
    if meta.is_file():
        info = json.loads(meta.read_text(encoding="utf-8"))
        if info.get("format") != FORMAT_NAME or info.get("version") != FORMAT_VERSION:
            raise ValueError(f"{root}: holds a store of another format/version; use a new --out")
        why = config_mismatch(info.get("data", {}), data)
        if why:
            raise ValueError(f"{root}: store was prepared with other settings ({why}); prepare "
                             "into a new --out folder or use the store's preset")
        return
    if any(p.name not in (".prepare.lock",) for p in root.iterdir()):
        raise ValueError(f"{root}: folder is not empty and not a store; choose a new --out")
    info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "data": to_dict(data),
            "body_cell": BODY_CELL, "created": _now()}
    _write_atomic(meta, json.dumps(info, indent=2) + "\n")
    (root / CASES_DIR).mkdir(exist_ok=True)


def _repair_manifest(path: Path) -> None:
    """Drop a half-written last line (crash mid-append) so new lines start on their own line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    raw = path.read_bytes()
    if raw.endswith(b"\n"):
        return
    _write_atomic(path, raw[: raw.rfind(b"\n") + 1].decode("utf-8"))


def _plan(specs: list[CaseSpec], done: list[CaseRecord]) -> tuple[list[CaseSpec], int]:
    """Cases still to prepare, with names that never overwrite another image's arrays."""
    done_keys = {rec.source_key for rec in done}
    name_of_image = {rec.source: rec.name for rec in done}
    taken = {rec.name.lower(): rec.source for rec in done}
    todo, skipped = [], 0
    for spec in specs:
        if (spec.image, spec.label) in done_keys:
            skipped += 1
            continue
        # Same image with another label: update its case. A new image: a name nobody holds.
        name = name_of_image.get(spec.image)
        if name is None:
            name, n = spec.name, 1
            while taken.get(name.lower(), spec.image) != spec.image:
                n += 1
                name = f"{spec.name}_{n}"
        taken[name.lower()] = spec.image
        todo.append(CaseSpec(name, spec.image, spec.label))
    return todo, skipped


def _run_cases(todo: list[CaseSpec], root: Path, data: DataConfig, workers: int,
               finish: Callable[[CaseSpec, dict[str, Any]], None]) -> None:
    """Prepare ``todo`` in this process or in pools; a dead worker quarantines only its case.

    A crash (segfault, OOM kill) breaks the whole pool. Only the cases in flight at that moment
    are suspects: they are redone one per fresh single-worker pool, the rest go on in a new pool.
    """
    if workers <= 1:
        for spec in todo:
            finish(spec, _prepare_case(spec, str(root / CASES_DIR / spec.name), data))
        return
    pending, suspects, ok = deque(todo), [], [0]

    def finish_ok(spec: CaseSpec, result: dict[str, Any]) -> None:
        ok[0] += 1
        finish(spec, result)

    while pending:
        suspects += _pool_round(pending, root, data, workers, finish_ok)
    results = [(spec, _run_alone(spec, root, data)) for spec in suspects]
    if ok[0] == 0 and len(todo) > 1 and all(r.get("reason") == _CRASH_REASON for _, r in results):
        # Every case died: the workers cannot run here at all; quarantining would hide that.
        raise RuntimeError("every prepare worker process died; run with workers=0 to see why")
    for spec, result in results:
        finish(spec, result)


def _pool_round(pending: deque[CaseSpec], root: Path, data: DataConfig, workers: int,
                finish: Callable[[CaseSpec, dict[str, Any]], None]) -> list[CaseSpec]:
    """Feed ``pending`` to one pool, a few cases in flight; returns the in-flight cases of a crash."""
    in_flight: dict[Future, CaseSpec] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as pool:
        try:
            while pending or in_flight:
                while pending and len(in_flight) < 2 * workers:
                    case_dir = str(root / CASES_DIR / pending[0].name)
                    try:
                        fut = pool.submit(_prepare_case, pending[0], case_dir, data)
                    except BrokenProcessPool:  # broke before we saw why; this case is innocent
                        return list(in_flight.values()) or [pending.popleft()]
                    in_flight[fut] = pending.popleft()
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        return list(in_flight.values())
                    finish(in_flight.pop(fut), result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return []


def _run_alone(spec: CaseSpec, root: Path, data: DataConfig) -> dict[str, Any]:
    """Prepare one suspect case in its own worker process, so a crash names this case."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_mp_context()) as pool:
        try:
            return pool.submit(_prepare_case, spec, str(root / CASES_DIR / spec.name),
                               data).result()
        except BrokenProcessPool:
            return {"reason": _CRASH_REASON}


def _mp_context() -> multiprocessing.context.BaseContext:
    """fork on Linux (no re-import of the caller's script, instant start), spawn elsewhere."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method)


def _record_result(root: Path, spec: CaseSpec, result: dict[str, Any], report: PrepareReport,
                   quarantine: dict[str, dict[str, Any]], known: set[str]) -> None:
    """Append a manifest line, or a quarantine entry (one per source), for a finished case."""
    if "record" in result:
        _append_line(root / MANIFEST, result["record"])
        known.add(spec.name)
        report.prepared += 1
        if quarantine.pop(spec.image, None) is not None:  # fixed since an earlier run
            _write_quarantine(root / QUARANTINE, quarantine)
        return
    reason = " ".join(str(result["reason"]).split())
    quarantine[spec.image] = {"name": spec.name, "source": spec.image, "label": spec.label,
                              "reason": reason, "time": _now()}
    _write_quarantine(root / QUARANTINE, quarantine)
    report.quarantined += 1
    report.messages.append(f"quarantined {spec.name} ({spec.image}): {reason}")
    if spec.name not in known:  # leftovers of a failed new case are garbage
        shutil.rmtree(root / CASES_DIR / spec.name, ignore_errors=True)


def _prepare_case(spec: CaseSpec, case_dir: str, data: DataConfig) -> dict[str, Any]:
    """Worker entry: prepare one case; returns ``{"record": ...}`` or ``{"reason": ...}``.

    Never raises for a bad case, so one broken file cannot stop the run.
    """
    try:
        return {"record": _write_case(spec, Path(case_dir), data)}
    except (ImageReadError, _CaseError) as err:
        return {"reason": str(err)}
    except MemoryError:
        return {"reason": "MemoryError: not enough memory to prepare this case"}
    except Exception as err:  # noqa: BLE001 - any other failure is this case's, not the run's
        return {"reason": f"{type(err).__name__}: {err}"}


def _write_case(spec: CaseSpec, case_dir: Path, data: DataConfig) -> dict[str, Any]:
    """Read, check, resample and write one case; returns its manifest record."""
    vol = read_volume(spec.image)
    reason = validate_volume(vol)
    if reason:
        raise _CaseError(reason)
    _check_intensities(vol.array)
    label = _read_label(spec.label, vol.array.shape, vol.affine) if spec.label else None
    array, affine = vol.array, vol.affine
    if data.spacing is not None:
        array, affine = resample(vol.array, vol.affine, data.spacing, order=1)
        if label is not None:
            label = resample(label, vol.affine, data.spacing, order=0)[0]
    hu = _to_int16(array)
    del array, vol
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    mask = body_mask(hu, data.body_hu, spacing)
    case_dir.mkdir(parents=True, exist_ok=True)
    _save_atomic(case_dir / "body.npy", body_cells(mask, hu.shape))
    if label is not None:
        _save_atomic(case_dir / "label.npy", label)
    else:
        (case_dir / "label.npy").unlink(missing_ok=True)  # stale from an earlier label
    _save_atomic(case_dir / "image.npy", hu)
    return CaseRecord(
        name=spec.name, source=spec.image, label_source=spec.label, shape=tuple(hu.shape),
        spacing=spacing, affine=np.asarray(affine, float).tolist(), hu_min=int(hu.min()),
        hu_max=int(hu.max()), hu_mean=float(hu.mean(dtype=np.float64)),
        hu_std=float(hu.std(dtype=np.float64)), sha256=hashlib.sha256(hu.data).hexdigest(),
        has_label=label is not None, body_fraction=float(mask.mean()), prepared=_now(),
    ).to_json()


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


def resample(array: np.ndarray, affine: np.ndarray, spacing: Sequence[float], *,
             order: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample a volume to ``spacing`` keeping the first voxel's centre and the axis directions.

    Args:
        array: (X, Y, Z) volume.
        affine: its 4x4 voxel-to-world matrix.
        spacing: target voxel size in mm along the array axes.
        order: 1 = trilinear (images, float32 output), 0 = nearest (labels, dtype kept).

    Returns:
        ``(array, affine)`` on the new grid; shape = round(old extent / new spacing).
    """
    old = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    new = np.asarray(spacing, dtype=float)
    if np.allclose(old, new, rtol=1e-4, atol=0):
        return array, np.asarray(affine, float)
    step = new / old  # new voxel step in old voxels
    shape = tuple(max(1, round(n / s)) for n, s in zip(array.shape, step, strict=True))
    src = array.astype(np.float32) if order == 1 else array
    out = ndimage.affine_transform(src, step, offset=0.0, output_shape=shape, order=order,
                                   mode="nearest", prefilter=False)
    new_affine = np.asarray(affine, float).copy()
    new_affine[:3, :3] = new_affine[:3, :3] * step[None, :]
    return out, new_affine


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write an .npy through a temporary name, so a crash never leaves a half file in place."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _append_line(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON line with a single write, flushed to disk before returning."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_quarantine(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    _write_atomic(path, "".join(json.dumps(e) + "\n" for e in entries.values()))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
