"""Array file formats of the prepared store: raw ``.npy`` and compressed, chunked blosc2.

Both keep int16 HU losslessly and read a crop without the whole volume:

* ``npy``: C-order raw arrays; a crop reads the (y, all z) rows of the x-planes it touches
  (:func:`mim3d.data.crops.read_npy_crop`). No dependency, biggest on disk.
* ``blosc2``: a ``.b2nd`` frame of chunks sized for the level-1 crop (64^3), each split into
  32^3 blocks that are compressed on their own (:data:`BLOSC2_DEFAULTS`; volumes at most 256
  voxels long along z get whole-z chunks of 4 x 16 x Z blocks), so a crop decompresses only
  the blocks it touches; files are memory-mapped. Chosen over Zarr v3 by
  measurement (``benchmarks/data_throughput.py``: same bytes, about 4x Zarr's crop speed).

Each format also lists a digest per chunk, so ``mim3d store verify`` can name the damaged chunk
(a ``.npy`` "chunk" is a slab of :data:`NPY_SLAB` x-planes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mim3d.data.crops import crop_array, crop_box, place, read_npy_crop

__all__ = ["BLOSC2_DEFAULTS", "FORMATS", "NPY_SLAB", "ArrayFormat", "Blosc2Format",
           "DamagedArrayError", "NpyFormat", "array_format", "digest"]

NPY_SLAB = 64  # x-planes per verification chunk of a .npy file
#: Compression of new blosc2 stores (recorded in store.json, so old stores keep theirs).
#: Chosen by measurement (benchmarks/data_throughput.py and its README): LZ4HC level 9 writes
#: the LZ4 format, so it decodes as fast as LZ4 but is 6 % smaller (prepare pays, once); 32^3
#: blocks decode faster than 16^3 (fewer per-block calls per 192^3 crop) at the same bytes.
#: ``short_z``: an array at most ``upto`` voxels long along z gets whole-z chunks and blocks
#: instead, so a crop copies rows as long as the crop out of each block, not 32-voxel pieces
#: (data_throughput: warm 192^3 crops of 224-slice volumes went from 0.76-0.80 to 0.90-0.95x
#: npy for +0.3 % bytes; decoding all of z costs little while z is that short).
BLOSC2_DEFAULTS: dict[str, Any] = {"codec": "LZ4HC", "clevel": 9, "filter": "SHUFFLE",
                                   "chunks": [64, 64, 64], "blocks": [32, 32, 32],
                                   "short_z": {"upto": 256, "chunks": [16, 256],
                                               "blocks": [4, 16]}}
#: Settings added after blosc2 stores existed (a store.json without one predates it).
_NEWER_KEYS = ("short_z",)
Region = tuple[tuple[int, int], ...]
# blosc2's thread pool does not survive fork(): a forked DataLoader or prepare worker would hang
# on its first (de)compression once the parent had used threads. One thread per process is also
# what loader workers want (their parallelism is the worker count).
_ONE_THREAD = {"nthreads": 1}


class DamagedArrayError(ValueError):
    """An array file of the store cannot be read back (damaged on disk or truncated)."""


def digest(data: bytes | memoryview) -> str:
    """Short content digest of one chunk (BLAKE2b, 64 bits: damage detection, not security)."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class ArrayFormat:
    """One array file format; subclasses implement the file I/O."""

    name = ""
    suffix = ""

    def params(self) -> dict[str, Any]:
        """Settings recorded in ``store.json`` (empty for formats without any)."""
        return {}

    def check_available(self) -> None:
        """Raise a one-line ValueError when a package the format needs is missing."""

    def write(self, path: Path, array: np.ndarray) -> None:
        """Write a 3D array to ``path`` (a new file; durability is the caller's business)."""
        raise NotImplementedError

    def open(self, path: Path) -> Any:
        """A read handle (memory map or blosc2 array); it holds at most one file descriptor."""
        raise NotImplementedError

    def read_crop(self, handle: Any, path: Path, start: Sequence[int], size: Sequence[int],
                  pad_value: float) -> np.ndarray:
        """The box ``[start, start + size)``, padded with ``pad_value`` outside the array."""
        raise NotImplementedError

    def read_all(self, handle: Any) -> np.ndarray:
        """The whole array in memory."""
        raise NotImplementedError

    def chunk_digests(self, handle: Any) -> list[str]:
        """Digest of every chunk in storage order."""
        raise NotImplementedError

    def chunk_region(self, shape: Sequence[int], i: int) -> Region:
        """Voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` of chunk ``i`` of an array."""
        raise NotImplementedError


class NpyFormat(ArrayFormat):
    """Raw C-order ``.npy`` files, read by ``pread`` of the rows a crop touches."""

    name = "npy"
    suffix = ".npy"

    def write(self, path: Path, array: np.ndarray) -> None:
        with open(path, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))

    def open(self, path: Path) -> np.memmap:
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise DamagedArrayError(f"{path}: cannot open ({err})") from None

    def read_crop(self, handle: np.memmap, path: Path, start: Sequence[int],
                  size: Sequence[int], pad_value: float) -> np.ndarray:
        if handle.ndim != 3:
            return crop_array(handle, start, size, pad_value)
        return read_npy_crop(path, start, size, pad_value, header=handle)

    def read_all(self, handle: np.memmap) -> np.ndarray:
        return np.array(handle)

    def chunk_digests(self, handle: np.memmap) -> list[str]:
        return [digest(np.ascontiguousarray(handle[x:x + NPY_SLAB]).data)
                for x in range(0, max(handle.shape[0], 1), NPY_SLAB)]

    def chunk_region(self, shape: Sequence[int], i: int) -> Region:
        x0 = i * NPY_SLAB
        return ((x0, min(x0 + NPY_SLAB, int(shape[0]))),
                *((0, int(n)) for n in shape[1:]))


class Blosc2Format(ArrayFormat):
    """Compressed, chunked blosc2 ``.b2nd`` frames (one file per array)."""

    name = "blosc2"
    suffix = ".b2nd"

    def __init__(self, **params: Any) -> None:
        # Settings given are a store's recorded ones: a store without a newer key predates it
        # (64^3 chunks everywhere before short_z), so only new stores get every default.
        base = {k: v for k, v in BLOSC2_DEFAULTS.items() if not params or k not in _NEWER_KEYS}
        self._params = {**base, **params}

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    @staticmethod
    def _blosc2() -> Any:
        try:
            import blosc2
        except ImportError:
            raise ValueError("the blosc2 store format needs the blosc2 package (a mim3d "
                             "dependency): pip install blosc2, or prepare with --format npy"
                             ) from None
        return blosc2

    def check_available(self) -> None:
        self._blosc2()

    def write(self, path: Path, array: np.ndarray) -> None:
        blosc2 = self._blosc2()
        p = self._params
        chunks, blocks = self.layout(array.shape)
        cparams = {"codec": blosc2.Codec[p["codec"]], "clevel": int(p["clevel"]),
                   "filters": [blosc2.Filter[p["filter"]]], "nthreads": 1}
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(path), mode="w", chunks=chunks,
                       blocks=blocks, cparams=cparams, dparams=_ONE_THREAD)

    def open(self, path: Path) -> Any:
        blosc2 = self._blosc2()
        try:
            # Memory-mapped, so a crop's chunks are not fetched by one read() and copy each:
            # a 192^3 crop's read went from about 8 to 6 ms, data_throughput's warm ratio from
            # 0.75 to 0.79 (README, "Prepared stores").
            return blosc2.open(str(path), mmap_mode="r", dparams=_ONE_THREAD)
        except (RuntimeError, ValueError, OSError) as err:
            raise DamagedArrayError(f"{path}: cannot open as blosc2 ({err})") from None

    def read_crop(self, handle: Any, path: Path, start: Sequence[int], size: Sequence[int],
                  pad_value: float) -> np.ndarray:
        size = tuple(int(s) for s in size)
        box = crop_box(start, size, handle.shape)
        if box is None:
            return np.full(size, pad_value, dtype=handle.dtype)
        try:
            inside = handle[box[0]]
        except (RuntimeError, ValueError) as err:
            raise DamagedArrayError(f"{path}: a chunk cannot be decompressed ({err}); run "
                                    "`mim3d store verify` on the store") from None
        if inside.shape == size:
            return inside  # already a fresh array: no second copy
        return place(inside, size, box[1], pad_value)

    def read_all(self, handle: Any) -> np.ndarray:
        return handle[...]

    def chunk_digests(self, handle: Any) -> list[str]:
        schunk = handle.schunk
        return [digest(schunk.get_chunk(i)) for i in range(schunk.nchunks)]

    def layout(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(chunks, blocks)`` of an array of ``shape``: the store's, clipped to the array, or
        whole-z ones for an array no longer along z than ``short_z["upto"]``."""
        p, short = self._params, self._params.get("short_z")
        if short and len(shape) == 3 and int(shape[2]) <= int(short["upto"]):
            want_c, want_b = [*short["chunks"], shape[2]], [*short["blocks"], shape[2]]
        else:
            want_c, want_b = p["chunks"], p["blocks"]
        chunks = tuple(min(int(c), max(int(n), 1)) for c, n in zip(want_c, shape))
        return chunks, tuple(min(int(b), c) for b, c in zip(want_b, chunks))

    def chunk_region(self, shape: Sequence[int], i: int) -> Region:
        chunks = self.layout(shape)[0]
        grid = [-(-int(n) // c) for n, c in zip(shape, chunks)]
        idx = np.unravel_index(i, grid)
        return tuple((int(k) * c, min((int(k) + 1) * c, int(n)))
                     for k, c, n in zip(idx, chunks, shape))


FORMATS: dict[str, type[ArrayFormat]] = {"npy": NpyFormat, "blosc2": Blosc2Format}


def array_format(name: str, params: dict[str, Any] | None = None) -> ArrayFormat:
    """The format called ``name`` with its store.json settings.

    Raises:
        ValueError: an unknown name (a store written by a newer mim3d).
    """
    cls = FORMATS.get(name)
    if cls is None:
        raise ValueError(f"unknown array format {name!r} (this mim3d knows "
                         f"{', '.join(FORMATS)}); upgrade mim3d to read this store")
    return cls(**(params or {})) if cls is Blosc2Format else cls()
