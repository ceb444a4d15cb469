"""The prepared store: CT volumes read once, kept as int16 HU, cropped by partial reads.

Layout of a store folder (written by :func:`mim3d.data.prepare.prepare`)::

    STORE/store.json          format version, array format + its settings, the DataConfig used
    STORE/manifest.jsonl      one JSON object (a :class:`CaseRecord`) per prepared case
    STORE/quarantine.jsonl    one JSON object per unusable source: name, source, reason
    STORE/cases/<name>/image.b2nd|.npy   int16 HU, (X, Y, Z) in RAS order (see "coarse axes")
    STORE/cases/<name>/label.b2nd|.npy   optional label map on the case's grid (uint8 or int16)
    STORE/cases/<name>/body.npy          float32 body fraction per BODY_CELL^3-voxel cell
    STORE/cases/<name>/record.json       the case's manifest record + its chunk digests

**Coarse axes** (format version 3, ``"coarse_axes": "kept"`` in store.json, the default): a
case's grid is the one of ``DataConfig.spacing``, but an axis whose source spacing is much
coarser (thick slices, :func:`mim3d.data.preprocess.stored_spacing`) is stored at its source
spacing, and crops interpolate it on read (:func:`mim3d.data.crops.read_interpolated`): a 3 mm
scan at 1.5 mm takes half the bytes, and the crop equals the one of a fully resampled store up
to 1 HU of rounding. ``"resampled"`` stores (and every version 1-2 store) hold the grid itself.

Format version 1-2 stores (version 1: ``.npy`` only, no record.json) stay readable. The array
format (:mod:`mim3d.data.formats`) is ``npy`` or the compressed, chunked ``blosc2``; both give
partial reads, so a crop reads only what it touches. Intensities are windowed on the fly
(:func:`normalize`), so one store serves any HU window. A store may live behind an fsspec URL
(:mod:`mim3d.data.remote`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mim3d.config import DataConfig, to_dict
from mim3d.data.body import BODY_CELL, body_cells, body_mask
from mim3d.data.crops import AIR_HU, crop_array, read_interpolated, read_npy_crop
from mim3d.data.formats import ArrayFormat, DamagedArrayError, array_format
from mim3d.data.intensity import minmax, normalize, window_hu, zscore
from mim3d.data.manifest import (
    MANIFEST,
    QUARANTINE,
    CaseIndex,
    CaseRecord,
    CaseStats,
    read_manifest,
    read_quarantine,
)
from mim3d.data.remote import StoreFiles, is_remote

__all__ = [
    "AIR_HU", "BODY_CELL", "COARSE_AXES", "DEFAULT_COARSE_AXES", "DEFAULT_FORMAT",
    "FORMAT_VERSION", "PREPARE_KEYS", "CaseRecord", "DamagedArrayError", "PreparedStore",
    "body_cells", "body_mask", "config_mismatch", "crop_array", "is_remote", "minmax",
    "normalize", "read_manifest", "read_npy_crop", "read_quarantine", "read_store_info",
    "window_hu", "zscore",
]

FORMAT_VERSION = 3
FORMAT_NAME = "mim3d-prepared-store"
#: Array format of new stores, set by the measurement in benchmarks/data_throughput.py.
DEFAULT_FORMAT = "blosc2"
STORE_JSON = "store.json"
CASES_DIR = "cases"
RECORD_JSON = "record.json"
#: ``coarse_axes`` of new stores: "kept" (at source spacing, interpolated on read) or
#: "resampled" (the grid itself, as format versions 1-2 stored every case).
COARSE_AXES = ("kept", "resampled")
DEFAULT_COARSE_AXES = "kept"
# DataConfig fields that are baked into the stored arrays. The others (window, normalisation,
# body-aware crop thresholds) are applied when crops are read, so they may differ between runs.
PREPARE_KEYS = ("spacing", "body_hu")
_MAX_OPEN = 64  # open maps / blosc2 files: bounded, 10k+ cases would exhaust fds and map count


def config_mismatch(stored: dict[str, Any], data: DataConfig, *,
                    reading: bool = False) -> str | None:
    """Describe how ``data`` differs from a store's DataConfig in the baked-in fields, or None.

    Args:
        stored: the store's DataConfig as a dict.
        data: the requested preprocessing.
        reading: judge a store to train on rather than one to prepare into: a request for no
            resampling (``spacing=None``) then accepts a store at any spacing.
    """
    wanted = to_dict(data)
    diffs = []
    for key in PREPARE_KEYS:
        have, want = stored.get(key), wanted.get(key)
        if reading and key == "spacing" and want is None:
            continue
        same = (have is None and want is None) or (
            have is not None and want is not None
            and np.allclose(np.asarray(have, float), np.asarray(want, float), rtol=0, atol=1e-6))
        if not same:
            diffs.append(f"{key}={have!r} in the store but {want!r} requested")
    return "; ".join(diffs) if diffs else None


def read_store_info(files: StoreFiles) -> dict[str, Any]:
    """``store.json`` of a store, checked to be one this mim3d can read.

    Raises:
        ValueError: (one line) not a store, not valid JSON, or written by a newer mim3d.
    """
    where = files.location
    try:
        meta = files.path(STORE_JSON, refresh=True)
    except FileNotFoundError:
        meta = Path(where) / STORE_JSON
    if not meta.is_file():
        raise ValueError(f"{where}: not a prepared store (no {STORE_JSON}); "
                         "create one with `mim3d prepare INPUT... --out STORE`")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{meta}: not valid JSON ({err}); prepare the store again") from None
    version = info.get("version")
    if info.get("format") != FORMAT_NAME or not isinstance(version, int):
        raise ValueError(f"{where}: {STORE_JSON} is not a {FORMAT_NAME!r} description")
    if version > FORMAT_VERSION:
        raise ValueError(f"{where}: store format version {version} was written by a newer mim3d "
                         f"(this one reads versions 1-{FORMAT_VERSION}); upgrade mim3d")
    info.setdefault("array_format", "npy")  # version 1 knew only .npy
    info.setdefault("coarse_axes", "resampled")  # versions 1-2 stored every case on its grid
    if info["coarse_axes"] not in COARSE_AXES:
        raise ValueError(f"{where}: coarse_axes {info['coarse_axes']!r} in {STORE_JSON} is not "
                         f"one of {', '.join(COARSE_AXES)}; upgrade mim3d to read this store")
    array_format(info["array_format"], info.get("format_params"))  # unknown -> clear error
    return info


class PreparedStore:
    """Read access to a prepared store (see the module docstring for the layout).

    Cases are sorted by name and described by a compact :class:`CaseIndex`; full records are
    read from the manifest on demand (``cases[i]``). Array files are opened lazily and a bounded
    number stay open. The object pickles without its open files, so it can go to DataLoader
    workers, and what it carries per case is a few numbers, not the manifest.
    """

    def __init__(self, files: StoreFiles, info: dict[str, Any], index: CaseIndex,
                 manifest: Path) -> None:
        self.files = files
        self.info = info
        self.index = index
        self.manifest = manifest
        self.format: ArrayFormat = array_format(info["array_format"], info.get("format_params"))
        self._open: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self._records: OrderedDict[int, CaseRecord] = OrderedDict()

    @classmethod
    def open(cls, location: str | Path,
             storage_options: dict[str, Any] | None = None) -> PreparedStore:
        """Open a store folder or fsspec URL.

        Raises:
            ValueError: (one line) not a store, a newer format, an unreachable remote store, or
                no prepared case.
        """
        files = StoreFiles(location, storage_options)
        info = read_store_info(files)
        try:
            manifest = files.path(MANIFEST, refresh=True)
        except FileNotFoundError:
            manifest = Path(files.location) / MANIFEST
        index = CaseIndex.from_manifest(manifest) if manifest.is_file() else None
        if index is None or len(index) == 0:
            raise ValueError(f"{files.location}: the store holds no prepared case (see "
                             f"{QUARANTINE} for the reasons); prepare usable images into it")
        return cls(files, info, index, manifest)

    @property
    def root(self) -> Path | str:
        """The store folder (a ``Path``) or its URL (a ``str``) for a remote store."""
        return self.files.location if self.files.remote else Path(self.files.location)

    @property
    def data_config(self) -> dict[str, Any]:
        """The DataConfig (as a dict) the store was prepared with."""
        return dict(self.info.get("data", {}))

    @property
    def cases(self) -> _Cases:
        """The full records, sorted by name (``len``, indexing, iteration)."""
        return _Cases(self)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # a pickled memmap would copy the whole array
        state["_records"] = OrderedDict()
        return state

    def record(self, i: int) -> CaseRecord:
        """The manifest record of case ``i`` (a few recent ones are kept)."""
        rec = self._records.get(i)
        if rec is None:
            rec = self.index.record(self.manifest, i)
            self._records[i] = rec
            if len(self._records) > _MAX_OPEN:
                self._records.popitem(last=False)
        return rec

    def shape(self, i: int) -> tuple[int, int, int]:
        """(X, Y, Z) of case ``i``'s grid (crops and labels are on it)."""
        return tuple(int(n) for n in self.index.shapes[i])

    def stats(self, i: int) -> CaseStats:
        """hu_min, hu_max, hu_mean, hu_std of case ``i``."""
        return self.index.case_stats(i)

    def case_dir(self, i: int) -> Path:
        """Local folder of case ``i`` (the cache folder for a remote store)."""
        return self.files.cache / CASES_DIR / self.index.name(i)

    def array_path(self, i: int, kind: str) -> Path:
        """Local path of case ``i``'s ``image``, ``label`` or ``body`` file (fetched if remote)."""
        suffix = ".npy" if kind == "body" else self.format.suffix
        rel = f"{CASES_DIR}/{self.index.name(i)}/{kind}{suffix}"
        return self.files.path(rel, version=self.index.tag(i))

    def _handle(self, i: int, kind: str) -> Any:
        key = (i, kind)
        handle = self._open.get(key)
        if handle is None:
            fmt = array_format("npy") if kind == "body" else self.format
            handle = fmt.open(self.array_path(i, kind))
            self._open[key] = handle
            if len(self._open) > _MAX_OPEN:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(key)
        return handle

    def image(self, i: int) -> Any:
        """Read handle of case ``i``'s int16 HU image as stored (X, Y, Z): a read-only memmap
        for ``npy`` stores, a blosc2 array for ``blosc2`` stores; both slice like numpy. Its
        shape is the grid's unless coarse axes are kept (use :meth:`volume` for the grid)."""
        return self._handle(i, "image")

    def label(self, i: int) -> Any | None:
        """Read handle of case ``i``'s label map (X, Y, Z), or None without a label."""
        return self._handle(i, "label") if self.index.has_label[i] else None

    def body(self, i: int) -> np.ndarray:
        """Body fraction per cell, float32 of shape ceil((X, Y, Z) / BODY_CELL)."""
        return self._handle(i, "body")

    def read_crop(self, i: int, start: Sequence[int], size: Sequence[int],
                  pad_value: int = AIR_HU) -> np.ndarray:
        """Copy the box ``[start, start + size)`` of case ``i``'s image, padding outside with air.

        Args:
            i: case index.
            start: first voxel (x, y, z); may be negative.
            size: box size (sx, sy, sz); the box may extend past the volume.
            pad_value: HU written where the box lies outside the volume.

        Returns:
            Array of shape ``size``: int16 for a case stored on its grid, float32 where coarse
            axes are interpolated on read.

        Raises:
            DamagedArrayError: (one line, naming the file) the image cannot be read back.
        """
        handle, path = self.image(i), self.array_path(i, "image")
        step = self.index.step(i)
        if step is None:
            return self.format.read_crop(handle, path, start, size, pad_value)

        def read(first: list[int], count: list[int]) -> np.ndarray:
            return self.format.read_crop(handle, path, first, count, pad_value)

        return read_interpolated(read, handle.shape, step, self.shape(i), start, size, pad_value)

    def volume(self, i: int) -> np.ndarray:
        """Case ``i``'s whole image on its grid (int16, or float32 with kept coarse axes)."""
        return self.read_crop(i, (0, 0, 0), self.shape(i))

    def crop_body_fraction(self, i: int, start: Sequence[int], size: Sequence[int]) -> float:
        """Share of body voxels in a box, judged from body.npy only (outside counts as air).

        Each cell contributes its body fraction times the number of its voxels inside the box,
        which is exact when body voxels are spread evenly within a cell.
        """
        shape = self.shape(i)
        body = self.body(i)
        sel, weights = [], []
        for ax in range(3):
            lo, hi = max(int(start[ax]), 0), min(int(start[ax]) + int(size[ax]), shape[ax])
            if hi <= lo:
                return 0.0
            c0, c1 = lo // BODY_CELL, (hi - 1) // BODY_CELL + 1
            edges = np.minimum(np.arange(c0, c1 + 1) * BODY_CELL, shape[ax])
            w = np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo)
            sel.append(slice(c0, c1))
            weights.append(w.astype(np.float64))
        cells = np.asarray(body[tuple(sel)], dtype=np.float64)
        inside = np.einsum("ijk,i,j,k->", cells, *weights)
        return float(inside / np.prod([int(s) for s in size]))

    def shard(self, rank: int, world_size: int) -> list[int]:
        """Case indices of one rank: every ``world_size``-th case starting at ``rank``."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard: need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        return list(range(rank, len(self), world_size))


class _Cases(Sequence[CaseRecord]):
    """``store.cases``: records read from the manifest only when indexed."""

    def __init__(self, store: PreparedStore) -> None:
        self._store = store

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, i: int) -> CaseRecord:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"case index {i} out of range for {len(self)} cases")
        return self._store.record(i % len(self))

    def __iter__(self) -> Iterator[CaseRecord]:
        return (self[i] for i in range(len(self)))
