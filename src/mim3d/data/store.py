"""The prepared store: CT volumes read once, kept as raw int16 HU, cropped by partial reads.

Layout of a store folder (written by :func:`mim3d.data.prepare.prepare`)::

    STORE/store.json          format version + the DataConfig used to prepare it
    STORE/manifest.jsonl      one JSON object (a :class:`CaseRecord`) per prepared case
    STORE/quarantine.jsonl    one JSON object per unusable source: name, source, reason
    STORE/cases/<name>/image.npy   int16 HU, (X, Y, Z) in RAS order, C-contiguous
    STORE/cases/<name>/label.npy   optional label map on the same grid (uint8 or int16)
    STORE/cases/<name>/body.npy    float32 body fraction per BODY_CELL^3-voxel cell

Plain ``.npy`` files need no extra dependency and give partial reads: a crop reads only the
(y, z) blocks of the x-planes it touches (:func:`read_npy_crop`), and the OS page cache is shared
by every DataLoader worker and every rank on a node. ``image(i)`` is a read-only memmap for any
other access. Intensities are windowed on the fly (:func:`normalize`), so one store serves any
HU window.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mim3d.config import DataConfig, to_dict

__all__ = [
    "AIR_HU", "BODY_CELL", "FORMAT_VERSION", "PREPARE_KEYS", "CaseRecord", "PreparedStore",
    "body_cells", "body_mask", "config_mismatch", "crop_array", "minmax", "normalize",
    "read_manifest", "read_npy_crop", "read_quarantine", "window_hu", "zscore",
]

FORMAT_VERSION = 1
FORMAT_NAME = "mim3d-prepared-store"
BODY_CELL = 8  # voxels per side of one body.npy cell
AIR_HU = -1000
MANIFEST = "manifest.jsonl"
QUARANTINE = "quarantine.jsonl"
STORE_JSON = "store.json"
CASES_DIR = "cases"
# DataConfig fields that are baked into the stored arrays. The others (window, normalisation,
# body-aware crop thresholds) are applied when crops are read, so they may differ between runs.
PREPARE_KEYS = ("spacing", "body_hu")
_MAX_OPEN_MAPS = 128  # bounded: 10k+ cases would otherwise exhaust vm.max_map_count


@dataclass
class CaseRecord:
    """One manifest line: what was prepared from which source.

    Attributes:
        name: unique case name (the folder under ``cases/``).
        source: image path (file or DICOM folder) it was read from.
        label_source: label path, or None.
        shape: (X, Y, Z) of the stored arrays.
        spacing: voxel size in mm along the array axes.
        affine: 4x4 voxel-to-world RAS+ mm matrix of the stored grid (nested lists).
        hu_min, hu_max: value range of the stored int16 image.
        hu_mean, hu_std: mean and standard deviation of the stored image (for z-score).
        sha256: hex digest of the C-order int16 image bytes.
        has_label: whether ``label.npy`` exists.
        body_fraction: share of voxels in the body mask (table removed).
        prepared: UTC time the case was written (ISO 8601).
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

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (tuples become lists)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["spacing"] = list(self.spacing)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CaseRecord:
        """Build from a manifest object; unknown keys (newer writers) are ignored."""
        kwargs = {f.name: obj[f.name] for f in fields(cls)}
        kwargs["shape"] = tuple(int(v) for v in kwargs["shape"])
        kwargs["spacing"] = tuple(float(v) for v in kwargs["spacing"])
        return cls(**kwargs)

    @property
    def source_key(self) -> tuple[str, str | None]:
        """What "the same source" means for resuming: image and label paths."""
        return (self.source, self.label_source)


def read_manifest(path: str | Path) -> list[CaseRecord]:
    """Read ``manifest.jsonl``; a later line for the same name replaces an earlier one.

    A line that is not a complete record (a crash while appending) is ignored: its case is not
    prepared and the next ``prepare`` redoes it.
    """
    records: dict[str, CaseRecord] = {}
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = CaseRecord.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue
            records.pop(rec.name, None)  # re-insert so order follows the latest write
            records[rec.name] = rec
    return list(records.values())


def read_quarantine(path: str | Path) -> list[dict[str, Any]]:
    """Entries of ``quarantine.jsonl`` (name, source, label, reason, time), one per source."""
    out: dict[str, dict[str, Any]] = {}
    p = Path(path)
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                out[entry["source"]] = entry
            except (ValueError, KeyError, TypeError):
                continue
    return list(out.values())


def config_mismatch(stored: dict[str, Any], data: DataConfig) -> str | None:
    """Describe how ``data`` differs from a store's DataConfig in the baked-in fields, or None."""
    wanted = to_dict(data)
    diffs = []
    for key in PREPARE_KEYS:
        have, want = stored.get(key), wanted.get(key)
        same = (have is None and want is None) or (
            have is not None and want is not None
            and np.allclose(np.asarray(have, float), np.asarray(want, float), rtol=0, atol=1e-6))
        if not same:
            diffs.append(f"{key}={have!r} in the store but {want!r} requested")
    return "; ".join(diffs) if diffs else None


class PreparedStore:
    """Read access to a prepared store folder (see the module docstring for the layout).

    ``cases`` are sorted by name. Arrays are opened lazily as read-only memory maps and a bounded
    number stay open. The object pickles without its maps, so it can go to spawned DataLoader
    workers.
    """

    def __init__(self, root: Path, info: dict[str, Any], cases: list[CaseRecord]) -> None:
        self.root = root
        self.info = info
        self.cases = cases
        self._maps: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path) -> PreparedStore:
        """Open a store folder.

        Raises:
            ValueError: (one line) the folder is not a store, has an unknown format version,
                or holds no prepared case.
        """
        root = Path(path)
        meta = root / STORE_JSON
        if not meta.is_file():
            raise ValueError(f"{root}: not a prepared store (no {STORE_JSON}); "
                             "create one with `mim3d prepare INPUT... --out STORE`")
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{meta}: not valid JSON ({err}); prepare the store again") from None
        if info.get("format") != FORMAT_NAME or info.get("version") != FORMAT_VERSION:
            raise ValueError(f"{root}: store format {info.get('format')!r} version "
                             f"{info.get('version')!r} is not {FORMAT_NAME!r} v{FORMAT_VERSION}")
        # Sorted by name, not by the order workers finished: case i is then the same case for
        # any store prepared from the same inputs, and so is the crop of a (seed, index).
        cases = sorted(read_manifest(root / MANIFEST), key=lambda rec: rec.name)
        if not cases:
            raise ValueError(f"{root}: the store holds no prepared case (see "
                             f"{QUARANTINE} for the reasons); prepare usable images into it")
        return cls(root, info, cases)

    @property
    def data_config(self) -> dict[str, Any]:
        """The DataConfig (as a dict) the store was prepared with."""
        return dict(self.info.get("data", {}))

    def __len__(self) -> int:
        return len(self.cases)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()  # a pickled memmap would copy the whole array
        return state

    def case_dir(self, i: int) -> Path:
        """Folder of case ``i``."""
        return self.root / CASES_DIR / self.cases[i].name

    def _map(self, i: int, kind: str) -> np.ndarray:
        key = (i, kind)
        arr = self._maps.get(key)
        if arr is None:
            arr = np.load(self.case_dir(i) / f"{kind}.npy", mmap_mode="r")
            self._maps[key] = arr
            if len(self._maps) > _MAX_OPEN_MAPS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(key)
        return arr

    def image(self, i: int) -> np.memmap:
        """Read-only memory map of case ``i``'s int16 HU image, shape (X, Y, Z)."""
        return self._map(i, "image")

    def label(self, i: int) -> np.memmap | None:
        """Read-only memory map of case ``i``'s label map (X, Y, Z), or None without a label."""
        return self._map(i, "label") if self.cases[i].has_label else None

    def body(self, i: int) -> np.ndarray:
        """Body fraction per cell, float32 of shape ceil((X, Y, Z) / BODY_CELL)."""
        return self._map(i, "body")

    def read_crop(self, i: int, start: Sequence[int], size: Sequence[int],
                  pad_value: int = AIR_HU) -> np.ndarray:
        """Copy the box ``[start, start + size)`` of case ``i``'s image, padding outside with air.

        Args:
            i: case index.
            start: first voxel (x, y, z); may be negative.
            size: box size (sx, sy, sz); the box may extend past the volume.
            pad_value: HU written where the box lies outside the volume.

        Returns:
            int16 array of shape ``size``.
        """
        return read_npy_crop(self.case_dir(i) / "image.npy", start, size, pad_value,
                             header=self.image(i))

    def crop_body_fraction(self, i: int, start: Sequence[int], size: Sequence[int]) -> float:
        """Share of body voxels in a box, judged from body.npy only (outside counts as air).

        Each cell contributes its body fraction times the number of its voxels inside the box,
        which is exact when body voxels are spread evenly within a cell.
        """
        shape = self.cases[i].shape
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
        return list(range(rank, len(self.cases), world_size))


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
    box = _box(start, size, arr.shape)
    if box is None:
        return np.full(size, pad_value, dtype=arr.dtype)
    return _place(arr[box[0]], size, box[1], pad_value)


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
    box = _box(start, size, mm.shape)
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
    return _place(block[:, :, sz], size, box[1], pad_value)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset`` (preadv may return fewer bytes than asked)."""
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at byte {offset + done}: the .npy file is truncated")
        done += n


def _box(start: Sequence[int], size: tuple[int, ...],
         shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
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


def _place(inside: np.ndarray, size: tuple[int, ...], dst: tuple[slice, ...],
           pad_value: float) -> np.ndarray:
    if inside.shape == size:  # the usual case: no padding, a single copy
        return np.array(inside, copy=True)
    out = np.full(size, pad_value, dtype=inside.dtype)
    out[dst] = inside
    return out


def body_mask(hu: np.ndarray, body_hu: float,
              spacing: Sequence[float] | None = None) -> np.ndarray:
    """Patient body at half resolution, table removed, enclosed air (lungs, gas) included.

    HU > body_hu, opened to cut thin bridges (table pads, cables), largest 3D component kept (drops
    the table and outside objects), then holes filled slice by slice so lungs and bowel gas count
    as body. Half resolution is plenty for an 8-voxel cell grid and 8x cheaper.

    Args:
        hu: (X, Y, Z) image in HU.
        body_hu: body threshold.
        spacing: voxel size in mm; sets the opening radius to about 4 mm (2 half-res voxels
            when None).

    Returns:
        bool array of shape ceil((X, Y, Z) / 2), sampling voxels (2i, 2j, 2k).
    """
    from scipy import ndimage  # only prepare needs it; keeps reading the store light

    radius = 2 if spacing is None else int(np.clip(round(4.0 / (2 * min(spacing))), 1, 3))
    sub = np.asarray(hu[::2, ::2, ::2]) > body_hu
    # Edge padding: the body goes on past the field of view, the scan border is not air.
    opened = ndimage.binary_opening(np.pad(sub, radius, mode="edge"), iterations=radius,
                                    structure=ndimage.generate_binary_structure(3, 1))
    opened = opened[radius:-radius, radius:-radius, radius:-radius]
    labels, n = ndimage.label(opened)
    if n == 0:
        return opened
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    body = labels == int(np.argmax(counts))
    # In-plane connectivity only, and one empty slice above and below, so each axial slice is
    # filled on its own (the trachea would connect the lungs to the border in 3D).
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    filled = ndimage.binary_fill_holes(np.pad(body, ((0, 0), (0, 0), (1, 1))), in_plane)
    return filled[:, :, 1:-1]


def body_cells(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Body fraction per BODY_CELL^3 cell of the full grid from a half-resolution mask.

    Args:
        mask: output of :func:`body_mask`.
        shape: full-resolution (X, Y, Z).

    Returns:
        float32 of shape ceil(shape / BODY_CELL); edge cells count only their real voxels.
    """
    half = BODY_CELL // 2
    cells = [-(-int(n) // BODY_CELL) for n in shape]
    padded = np.zeros([c * half for c in cells], dtype=np.float32)
    count = np.zeros_like(padded)
    region = tuple(slice(0, n) for n in mask.shape)
    padded[region] = mask
    count[region] = 1.0
    blocks = (cells[0], half, cells[1], half, cells[2], half)
    body = padded.reshape(blocks).sum(axis=(1, 3, 5))
    total = count.reshape(blocks).sum(axis=(1, 3, 5))
    return (body / np.maximum(total, 1.0)).astype(np.float32)


def window_hu(arr: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """Map HU linearly so ``hu_window`` becomes [0, 1], clipping outside. Returns float32."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    out = np.array(arr, dtype=np.float32, copy=True)  # one allocation, then in place
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


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


def normalize(arr: np.ndarray, data: DataConfig, *, record: CaseRecord | None = None) -> np.ndarray:
    """Intensity normalisation of ``data.normalization`` (float32, same shape as ``arr``).

    ``window`` clips ``data.hu_window`` to [0, 1]. ``zscore`` and ``minmax`` use the whole
    volume's statistics from ``record`` when given (so every crop of a case is scaled alike),
    otherwise those of ``arr`` itself.
    """
    if data.normalization == "window":
        return window_hu(arr, data.hu_window)
    if data.normalization == "zscore":
        if record is None:
            return zscore(arr)
        return zscore(arr, record.hu_mean, record.hu_std)
    if record is None:
        return minmax(arr)
    return minmax(arr, record.hu_min, record.hu_max)
