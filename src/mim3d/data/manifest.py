"""The store's manifest and quarantine files: records, safe concurrent appends, a compact index.

``manifest.jsonl`` holds one :class:`CaseRecord` per line. Writers append under an advisory
lock (``.manifest.lock``), so any number of ``prepare --shard`` processes can share one store;
a later line for the same name replaces an earlier one. Readers that only sample crops use a
:class:`CaseIndex` (a few numbers per case in numpy arrays) instead of the records, so 10k+
cases cost a few MB per DataLoader worker.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["HU_EDGES", "MANIFEST", "QUARANTINE", "CaseIndex", "CaseRecord", "CaseStats",
           "ManifestWriter", "locked", "read_manifest", "read_quarantine"]

MANIFEST = "manifest.jsonl"
QUARANTINE = "quarantine.jsonl"
MANIFEST_LOCK = ".manifest.lock"
#: Bin edges (HU) of the per-case histogram kept in the manifest (outer bins open-ended).
HU_EDGES = tuple(range(-1024, 3073, 256))


@dataclass
class CaseRecord:
    """One manifest line: what was prepared from which source.

    Attributes:
        name: unique case name (the folder under ``cases/``).
        source: image path (file or DICOM folder) it was read from.
        label_source: label path, or None.
        shape: (X, Y, Z) of the case's grid: the one crops are taken on, and the label's.
        spacing: voxel size in mm along the grid axes.
        affine: 4x4 voxel-to-world RAS+ mm matrix of the grid (nested lists).
        hu_min, hu_max: value range of the int16 image on the grid.
        hu_mean, hu_std: mean and standard deviation of the image on the grid (for z-score).
        sha256: hex digest of the C-order int16 image bytes as stored.
        has_label: whether the case has a label array.
        body_fraction: share of voxels in the body mask (table removed).
        prepared: UTC time the case was written (ISO 8601).
        series_uid: DICOM SeriesInstanceUID that was read (None for single-file images).
        series_note: why that series was chosen when the folder held several.
        hu_hist: voxel counts per :data:`HU_EDGES` bin (first/last bins open-ended).
        stored_bytes: bytes of the case's files on disk.
        smaller_than_crop: the volume is smaller than the level-1 crop on some axis (its crops
            are padded with air).
        stored_shape: shape of the image file when it keeps coarse axes at their source
            spacing (format version 3), else None (stored on the grid, ``shape``).
        stored_step: stored voxels per grid voxel on each axis (1.0 on the grid, below 1 on an
            axis kept coarser), or None for all 1.0.
    """

    name: str
    source: str
    label_source: str | None
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: list[list[float]]
    hu_min: int
    hu_max: int
    hu_mean: float
    hu_std: float
    sha256: str
    has_label: bool
    body_fraction: float
    prepared: str
    series_uid: str | None = None
    series_note: str | None = None
    hu_hist: list[int] = field(default_factory=list)
    stored_bytes: int = 0
    smaller_than_crop: bool = False
    stored_shape: tuple[int, int, int] | None = None
    stored_step: tuple[float, float, float] | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of the image array as stored."""
        return tuple(self.stored_shape) if self.stored_shape else tuple(self.shape)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (tuples become lists)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["spacing"] = list(self.spacing)
        for key in ("stored_shape", "stored_step"):
            out[key] = None if out[key] is None else list(out[key])
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CaseRecord:
        """Build from a manifest object; unknown keys (newer writers) are ignored, fields that
        older writers did not know take their defaults."""
        kwargs = {}
        for f in fields(cls):
            if f.name in obj:
                kwargs[f.name] = obj[f.name]
            elif f.default is MISSING and f.default_factory is MISSING:
                raise KeyError(f.name)
        kwargs["shape"] = tuple(int(v) for v in kwargs["shape"])
        kwargs["spacing"] = tuple(float(v) for v in kwargs["spacing"])
        if kwargs.get("stored_shape") is not None:
            kwargs["stored_shape"] = tuple(int(v) for v in kwargs["stored_shape"])
        if kwargs.get("stored_step") is not None:
            kwargs["stored_step"] = tuple(float(v) for v in kwargs["stored_step"])
        return cls(**kwargs)

    @property
    def source_key(self) -> tuple[str, str | None]:
        """What "the same source" means for resuming: image and label paths."""
        return (self.source, self.label_source)


def _records(lines: Iterator[str]) -> dict[str, CaseRecord]:
    """Complete records by name, the latest line winning; broken lines are skipped."""
    records: dict[str, CaseRecord] = {}
    for line in lines:
        try:
            rec = CaseRecord.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash: its case is not prepared, the next run redoes it
        records.pop(rec.name, None)  # re-insert so order follows the latest write
        records[rec.name] = rec
    return records


def read_manifest(path: str | Path) -> list[CaseRecord]:
    """Read ``manifest.jsonl``; a later line for the same name replaces an earlier one."""
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, encoding="utf-8") as fh:
        return list(_records(fh).values())


def read_quarantine(path: str | Path) -> list[dict[str, Any]]:
    """Entries of ``quarantine.jsonl`` (name, source, label, reason, time), one per source.

    The latest line per source wins; a line with ``"resolved": true`` (the source was prepared
    later) removes it.
    """
    out: dict[str, dict[str, Any]] = {}
    p = Path(path)
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                out.pop(entry["source"], None)
                if not entry.get("resolved"):
                    out[entry["source"]] = entry
            except (ValueError, KeyError, TypeError):
                continue
    return list(out.values())


@contextlib.contextmanager
def locked(path: Path, *, exclusive: bool = True, blocking: bool = True) -> Iterator[bool]:
    """Hold a POSIX advisory lock on ``path`` (created); yields False when non-blocking and busy.

    Locks die with their process, so a SIGKILLed writer never leaves a stale lock. Windows has
    no ``fcntl``: there the lock is a no-op and the user is trusted.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    with open(path, "a") as fh:
        flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fh, flags | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ManifestWriter:
    """Appends records and quarantine entries; safe with other writers on the same store.

    Every operation takes the manifest lock, first reads the lines other writers appended since
    the last look (an offset into the file, so the cost is the new lines only), and appends with
    one ``write`` flushed to disk. A case already recorded from the same source is never
    appended twice.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / MANIFEST
        self.quarantine_path = root / QUARANTINE
        self._lock = root / MANIFEST_LOCK
        self._offset = 0
        self._keys: dict[str, tuple[str, str | None]] = {}

    def _catch_up(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            new = fh.read()
        end = new.rfind(b"\n") + 1
        for rec in _records(iter(new[:end].decode("utf-8").splitlines())).values():
            self._keys[rec.name] = rec.source_key
        self._offset += end

    def repair(self) -> None:
        """Cut a half-written last line (a writer killed mid-append), so appends start clean."""
        with locked(self._lock):
            if not self.path.is_file():
                return
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                os.truncate(self.path, raw.rfind(b"\n") + 1)

    def recorded(self, name: str, key: tuple[str, str | None]) -> bool:
        """Whether ``name`` is in the manifest from source ``key`` (by any writer)."""
        with locked(self._lock):
            self._catch_up()
            return self._keys.get(name) == key

    def commit(self, record: dict[str, Any]) -> bool:
        """Append ``record`` unless its case is already there from the same source."""
        key = (record["source"], record["label_source"])
        with locked(self._lock):
            self._catch_up()
            if self._keys.get(record["name"]) == key:
                return False
            self._offset += _append(self.path, record)
            self._keys[record["name"]] = key
        return True

    def quarantine(self, entry: dict[str, Any]) -> None:
        """Append a quarantine entry (or a ``resolved`` marker) under the manifest lock."""
        with locked(self._lock):
            _append(self.quarantine_path, entry)


def _append(path: Path, obj: dict[str, Any]) -> int:
    """Append one JSON line with a single write, flushed to disk; returns its byte length."""
    data = (json.dumps(obj) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


class CaseStats(NamedTuple):
    """Whole-volume statistics of one case (what normalisation needs)."""

    hu_min: int
    hu_max: int
    hu_mean: float
    hu_std: float


@dataclass
class CaseIndex:
    """What crop sampling needs of every case, as compact arrays (sorted by name).

    Attributes:
        names: case names, UTF-8 encoded, shape (N,) numpy bytes array (4x smaller than str).
        shapes: (N, 3) int32 array shapes.
        stats: (N, 4) float64 hu_min, hu_max, hu_mean, hu_std.
        has_label: (N,) bool.
        tags: (N,) uint64: the first 16 hex digits of each image hash (they key cached copies
            of remote files).
        kept: (K,) int64 sorted indices of the cases that keep coarse axes at source spacing.
        kept_steps: (K, 3) float64 their :attr:`CaseRecord.stored_step` (the other cases are
            stored on their grid: all 1.0).
        offsets: (N,) int64 byte offset of each case's line in the manifest (full records are
            read from there only when asked for).
    """

    names: np.ndarray
    shapes: np.ndarray
    stats: np.ndarray
    has_label: np.ndarray
    tags: np.ndarray
    offsets: np.ndarray
    kept: np.ndarray
    kept_steps: np.ndarray

    @classmethod
    def from_manifest(cls, path: Path) -> CaseIndex:
        """Parse the manifest once, keeping the latest complete line per name."""
        latest: dict[str, tuple[int, dict[str, Any]]] = {}
        offset = 0
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    obj = json.loads(raw)
                    row = {k: obj[k] for k in ("shape", "hu_min", "hu_max", "hu_mean", "hu_std",
                                               "has_label", "sha256")}
                    row["step"] = obj.get("stored_step")
                    latest.pop(obj["name"], None)
                    latest[str(obj["name"])] = (offset, row)
                except (ValueError, KeyError, TypeError):
                    pass
                offset += len(raw)
        names = sorted(latest)
        rows = [latest[n][1] for n in names]
        return cls(
            names=np.array([n.encode("utf-8") for n in names], dtype=bytes),
            shapes=np.array([r["shape"] for r in rows], dtype=np.int32).reshape(-1, 3),
            stats=np.array([[r["hu_min"], r["hu_max"], r["hu_mean"], r["hu_std"]] for r in rows],
                           dtype=np.float64).reshape(-1, 4),
            has_label=np.array([bool(r["has_label"]) for r in rows], dtype=bool),
            tags=np.array([int(str(r["sha256"])[:16], 16) for r in rows], dtype=np.uint64),
            offsets=np.array([latest[n][0] for n in names], dtype=np.int64),
            kept=np.array([i for i, r in enumerate(rows) if r["step"]], dtype=np.int64),
            kept_steps=np.array([r["step"] for r in rows if r["step"]],
                                dtype=np.float64).reshape(-1, 3))

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return self.names[i].decode("utf-8")

    def tag(self, i: int) -> str:
        return f"{int(self.tags[i]):016x}"

    def step(self, i: int) -> tuple[float, ...] | None:
        """Stored voxels per grid voxel of case ``i``, or None when it is stored on its grid."""
        k = int(np.searchsorted(self.kept, i))
        if k < len(self.kept) and self.kept[k] == i:
            return tuple(float(v) for v in self.kept_steps[k])
        return None

    def case_stats(self, i: int) -> CaseStats:
        lo, hi, mean, std = self.stats[i]
        return CaseStats(int(lo), int(hi), float(mean), float(std))

    def record(self, manifest: Path, i: int) -> CaseRecord:
        """The full record of case ``i``, read from its manifest line."""
        with open(manifest, "rb") as fh:
            fh.seek(int(self.offsets[i]))
            return CaseRecord.from_json(json.loads(fh.readline()))
