"""Where a blosc2 crop's time and a 1.5 mm store's bytes go (issue 14's targets, in parts).

``data_throughput.py`` measures the targets. This script splits them into their parts, in one
run, side by side:

* **warm crops**: random 192^3 crops of ``data_throughput``'s phantom cohort (native 0.8 mm).
  Before each read, the case's file is read whole into the page cache, and glibc's heap serves
  the crop buffers (``data_throughput.steady_malloc``). Each crop is timed three ways on the same
  crop: the npy read, the blosc2 read (``Blosc2Format.read_crop``) and the HU window
  (``normalize``, paid by both formats). A fourth figure is computed, the *decode bound*: the
  bytes of the blocks that the crop touches, decoded at the codec's own full-chunk speed
  (``SChunk.decompress_chunk`` over the case).
  ``ratio_now`` = (npy + window) / (blosc2 + window), the target's ratio.
  ``ratio_decode_bound`` = (npy + window) / (bound + window): what a compiled kernel could reach
  if it decoded the touched blocks straight into the windowed crop, with no other copy.
* **1.5 mm bytes**: per real CT, the image bytes at 1.5 mm in a store that resamples every
  axis at prepare (``--coarse-axes resampled``) and in one that keeps axes much coarser than
  1.5 mm at their source spacing (``kept``, the default), each with the default codec and with
  the smallest lossless setting measured (ZSTD-9 + shuffle + byte-delta; its compressed size in
  memory, without the frame's few hundred bytes of header).

    PYTHONPATH=src .venv/bin/python benchmarks/store_limits.py           # ~1 min, idle machine
    PYTHONPATH=src .venv/bin/python benchmarks/store_limits.py --quick   # smoke run, seconds

Prints ``RESULT name value`` lines and writes benchmarks/results/store_limits.json (``--quick``
writes only to ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from data_throughput import (
    FULL,
    QUICK,
    REAL,
    emit,
    machine,
    read_whole,
    real_sources,
    steady_malloc,
)

from mim3d.config import DataConfig
from mim3d.data.formats import BLOSC2_DEFAULTS, Blosc2Format
from mim3d.data.intensity import normalize
from mim3d.data.phantom import write_cohort
from mim3d.data.prepare import prepare
from mim3d.data.readers import read_volume
from mim3d.data.sampler import PretrainCropDataset
from mim3d.data.store import PreparedStore

HERE = Path(__file__).resolve().parent
SMALLEST = {"codec": "ZSTD", "clevel": 9, "filters": ["SHUFFLE", "BYTEDELTA"]}
TARGET_SPACING = (1.5, 1.5, 1.5)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small volumes and few crops (CI)")
    ap.add_argument("--crops", type=int, default=None, help="crops (each timed four ways)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON path")
    return ap.parse_args(argv)


def _decode_speed(handle: Any) -> float:
    """Bytes per second at which the codec decodes this array's whole chunks (best of 3)."""
    schunk = handle.schunk
    buf = np.empty(schunk.chunksize // schunk.typesize, dtype=handle.dtype)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(schunk.nchunks):
            schunk.decompress_chunk(i, buf)
        best = min(best, time.perf_counter() - t0)
    return schunk.nchunks * schunk.chunksize / best


def _touched_bytes(handle: Any, start: tuple[int, ...], size: int) -> int:
    """Bytes of the blosc2 blocks that the box ``[start, start + size)`` touches (a block at the
    array's edge is decoded whole)."""
    n = 1
    for s, dim, block in zip(start, handle.shape, handle.blocks):
        lo, hi = max(s, 0), min(s + size, dim)
        n *= (-(-hi // block) - lo // block) * block
    return n * handle.dtype.itemsize


def _warm(work: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Per-part milliseconds per crop, medians over the crops (module docstring)."""
    datalist = write_cohort(work / "cohort", cfg["cases"], seed=0, shape=cfg["shape"],
                            spacing=cfg["spacing"])
    data = DataConfig()
    ds = {}
    for fmt in ("npy", "blosc2"):
        prepare([datalist], work / f"store_{fmt}", data=data, workers=2, progress=False, fmt=fmt)
        ds[fmt] = PretrainCropDataset(work / f"store_{fmt}", crop_size=(cfg["crop"],) * 3,
                                      data=data, seed=0)
    b2 = ds["blosc2"].store
    speed = [_decode_speed(b2.image(i)) for i in range(len(b2))]
    size = (cfg["crop"],) * 3
    ms: dict[str, list[float]] = {"npy": [], "blosc2": [], "window": [], "decode_bound": []}
    for i in [10**6, *range(cfg["crops"])]:  # the first: warm-up (handles, first allocations)
        case, start, _ = ds["npy"].crop_spec(i)
        t, crops = [], []
        for store in (ds["npy"].store, b2):
            read_whole([store.array_path(case, "image")])
            t0 = time.perf_counter()
            crops.append(store.read_crop(case, start, size, pad_value=-1000))
            t.append(time.perf_counter() - t0)
        assert np.array_equal(*crops), f"blosc2 gave another crop {i}"
        t0 = time.perf_counter()
        normalize(crops[0], data)
        t.append(time.perf_counter() - t0)
        t.append(_touched_bytes(b2.image(case), start, cfg["crop"]) / speed[case])
        if i < 10**6:
            for key, sec in zip(ms, t):
                ms[key].append(1e3 * sec)
    med = {k: float(np.median(v)) for k, v in ms.items()}
    npy = med["npy"] + med["window"]
    return {"ms_per_crop": med, "ratio_now": npy / (med["blosc2"] + med["window"]),
            "ratio_decode_bound": npy / (med["decode_bound"] + med["window"]),
            "decode_gb_per_s": [s / 1e9 for s in speed], "crops": cfg["crops"]}


def _image_bytes(store: Path, params: dict[str, Any] | None) -> list[int]:
    """Per case: bytes of its image array in ``store``, or its compressed size with blosc2
    ``params`` (codec, clevel, filters) and the default chunks and blocks."""
    import blosc2

    st = PreparedStore.open(store)
    if params is None:
        return [st.array_path(i, "image").stat().st_size for i in range(len(st))]
    cparams = {"codec": blosc2.Codec[params["codec"]], "clevel": params["clevel"],
               "filters": [blosc2.Filter[f] for f in params["filters"]], "nthreads": 2}
    out = []
    for i in range(len(st)):
        image = np.asarray(st.image(i))
        chunks, blocks = Blosc2Format().layout(image.shape)
        arr = blosc2.asarray(image, chunks=chunks, blocks=blocks, cparams=cparams)
        out.append(int(arr.schunk.cbytes))
    return out


def _source_spacing(path: Path) -> tuple[float, ...]:
    vol = read_volume(path)
    return tuple(float(s) for s in np.linalg.norm(np.asarray(vol.affine)[:3, :3], axis=0))


def _bytes(work: Path, quick: bool) -> dict[str, Any]:
    """1.5 mm image bytes per real CT and setting, against each .nii.gz (module docstring)."""
    sources = real_sources(work)
    sources = sources[-2:-1] if quick else sources
    by_name = {p.name.removesuffix(".nii.gz"): p for p in sources}
    rows = {n: {"nii_gz": p.stat().st_size, "source_spacing_mm": _source_spacing(p)}
            for n, p in by_name.items()}
    settings = {}
    for coarse in ("resampled", "kept"):
        store = work / f"real_1p5mm_{coarse}"
        prepare(sources, store, data=DataConfig(spacing=TARGET_SPACING), workers=2,
                progress=False, fmt="blosc2", coarse_axes=coarse)
        names = [PreparedStore.open(store).index.name(i) for i in range(len(sources))]
        for key, params in ((coarse, None), (f"{coarse}_zstd9_bytedelta", SMALLEST)):
            settings[key] = _image_bytes(store, params)
            for n, b in zip(names, settings[key]):
                rows[n][key] = b
    nii = sum(r["nii_gz"] for r in rows.values())
    return {"cases": rows, "ratio_vs_nii_gz": {k: sum(v) / nii for k, v in settings.items()}}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Both measurements; returns the result record."""
    cfg = dict(QUICK if args.quick else FULL)
    cfg["crops"] = args.crops or (cfg["crops"] if args.quick else 30)
    cfg["steady_malloc"] = steady_malloc()
    load_start = list(os.getloadavg())
    warm = _warm(work, cfg)
    real = _bytes(work, args.quick) if REAL.is_dir() else None
    return {
        "warm_crop_ratio_now": warm["ratio_now"],
        "warm_crop_ratio_decode_bound": warm["ratio_decode_bound"],
        **({f"bytes_ratio_1p5mm_{k}": v for k, v in real["ratio_vs_nii_gz"].items()}
           if real else {}),
        "warm": warm, "bytes_1p5mm": real,
        "settings": {"mode": "quick" if args.quick else "full", "crop": cfg["crop"],
                     "cohort": {"cases": cfg["cases"], "shape": list(cfg["shape"]),
                                "spacing": list(cfg["spacing"])},
                     "blosc2_default": BLOSC2_DEFAULTS, "blosc2_smallest": SMALLEST,
                     "steady_malloc": cfg["steady_malloc"],
                     "timing": "one process, the four parts timed on the same crop in turn"},
        "machine": machine(load_start),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    out = args.out or (None if args.quick else HERE / "results" / "store_limits.json")
    with tempfile.TemporaryDirectory(prefix="mim3d_limits_") as tmp:
        result = run(args, Path(tmp))
    emit(result, {f"ms_per_crop_{k}": v for k, v in result["warm"]["ms_per_crop"].items()}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
