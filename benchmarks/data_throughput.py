"""Random level-1 crops per second: prepared store vs MONAI's on-the-fly pipeline.

One run writes a synthetic phantom cohort (``mim3d.data.phantom``) as .nii.gz, prepares it into a
store, then draws the same number of random crops (a) from the store through
``PretrainCropDataset`` (windowed float32) and (b) with MONAI dict transforms from the .nii.gz
files: LoadImaged(nibabel) + EnsureChannelFirstd + Orientationd(RAS) + ScaleIntensityRanged
(-1000, 1000 -> 0, 1, clip) + SpatialPadd + RandSpatialCropd. Both run in this one process with
the same torch thread setting, after one warm-up crop each (files and store in the page cache).

    PYTHONPATH=src .venv/bin/python benchmarks/data_throughput.py          # ~1-3 min
    PYTHONPATH=src .venv/bin/python benchmarks/data_throughput.py --quick  # CI smoke, seconds

Prints ``RESULT name value`` lines and writes benchmarks/results/data_throughput.json (a
``--quick`` run writes a JSON only when ``--out`` is given, so it never replaces the full result).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mim3d.config import DataConfig
from mim3d.data.phantom import write_cohort
from mim3d.data.prepare import prepare
from mim3d.data.sampler import PretrainCropDataset
from mim3d.data.store import PreparedStore, crop_array, read_npy_crop

RESULTS = Path(__file__).resolve().parent / "results"
FULL = {"cases": 6, "shape": (256, 256, 224), "spacing": (0.8, 0.8, 1.0), "crop": 192,
        "crops": 64, "large": (512, 512, 320)}
QUICK = {"cases": 2, "shape": (96, 96, 80), "spacing": (1.5, 1.5, 2.0), "crop": 64, "crops": 4,
         "large": (192, 192, 128)}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small volumes and few crops (CI)")
    ap.add_argument("--crops", type=int, default=None, help="crops per pipeline")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both pipelines (default: torch's own default)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep cohort and store here")
    ap.add_argument("--out", type=Path, default=None, help="result JSON path")
    return ap.parse_args(argv)


def _timed(fn: Callable[[int], torch.Tensor], n: int) -> tuple[float, tuple[int, ...]]:
    """Seconds for ``fn(0..n-1)`` after one untimed warm-up call; and the output shape."""
    shape = tuple(fn(n).shape)  # warm-up on an index outside the timed ones
    start = time.perf_counter()
    for i in range(n):
        out = fn(i)
    elapsed = time.perf_counter() - start
    assert tuple(out.shape) == shape
    return elapsed, shape


def _monai_pipeline(crop: int, seed: int) -> Callable[[dict[str, str]], dict[str, Any]]:
    """The on-the-fly pipeline of the authors' protocol, built from MONAI dict transforms."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandSpatialCropd,
        ScaleIntensityRanged,
        SpatialPadd,
    )

    pipeline = Compose([
        LoadImaged(keys="image", reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0,
                             clip=True),
        SpatialPadd(keys="image", spatial_size=(crop,) * 3, value=0.0),
        RandSpatialCropd(keys="image", roi_size=(crop,) * 3, random_size=False),
    ])
    pipeline.set_random_state(seed=seed)
    return pipeline


def _evict(path: Path) -> bool:
    """Drop a file's pages from the OS page cache (no root needed); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _partial_read(work: Path, shape: tuple[int, int, int], crop: int,
                  repeats: int = 3) -> dict[str, Any]:
    """Milliseconds for one int16 crop (store's pread, and plain memmap slicing) vs np.load.

    Measured on one large array (a typical 512^2 CT, bigger than the cohort's cases), with the
    file in the page cache (warm) and evicted before every read (cold, i.e. from disk).
    """
    path = work / "large_image.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(-1000, 1000, size=shape, dtype=np.int16))
    starts = [[int(rng.integers(0, n - crop + 1)) for n in shape] for _ in range(repeats)]
    out: dict[str, Any] = {"large_array_shape": list(shape)}
    for mode in ("warm", "cold"):
        if mode == "cold" and not _evict(path):
            break
        np.load(path)  # warms the cache for the warm pass
        times: dict[str, list[float]] = {"crop_read": [], "crop_memmap": [], "full_load": []}
        for start in starts:
            for kind, fn in (
                ("crop_read", lambda s: read_npy_crop(path, s, (crop,) * 3)),
                ("crop_memmap", lambda s: crop_array(np.load(path, mmap_mode="r"), s,
                                                     (crop,) * 3, -1000)),
                ("full_load", lambda s: np.load(path)),
            ):
                if mode == "cold":
                    _evict(path)
                t0 = time.perf_counter()
                fn(start)
                times[kind].append(time.perf_counter() - t0)
        for kind, values in times.items():
            out[f"{kind}_ms_{mode}"] = 1e3 * float(np.median(values))
    path.unlink()
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write the cohort, prepare it, time both pipelines; return the result record."""
    cfg = dict(QUICK if args.quick else FULL)
    if args.crops:
        cfg["crops"] = args.crops
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    datalist = write_cohort(work / "cohort", cfg["cases"], seed=0, shape=cfg["shape"],
                            spacing=cfg["spacing"])
    t1 = time.perf_counter()
    report = prepare([datalist], work / "store", data=DataConfig(), workers=2, progress=False)
    t2 = time.perf_counter()
    assert report.prepared == cfg["cases"], report.messages
    crop, n = cfg["crop"], cfg["crops"]
    store = PreparedStore.open(work / "store")
    ds = PretrainCropDataset(store, crop_size=(crop,) * 3, data=DataConfig(), seed=0)
    store_s, store_shape = _timed(ds.__getitem__, n)
    aware = PretrainCropDataset(store, crop_size=(crop,) * 3, data=DataConfig(body_aware=True),
                                seed=0)
    aware_s, _ = _timed(aware.__getitem__, n)
    files = [c.source for c in store.cases]
    pipeline = _monai_pipeline(crop, seed=0)
    monai_s, monai_shape = _timed(lambda i: pipeline({"image": files[i % len(files)]})["image"], n)
    assert store_shape == monai_shape == (1, crop, crop, crop), (store_shape, monai_shape)
    return {
        "crop_speedup_vs_monai": (n / store_s) / (n / monai_s),
        "store_crops_per_s": n / store_s,
        "monai_crops_per_s": n / monai_s,
        "store_body_aware_crops_per_s": n / aware_s,
        "partial_read": _partial_read(work, cfg["large"], crop),
        "settings": {
            "mode": "quick" if args.quick else "full", "n_cases": cfg["cases"],
            "case_shape": list(cfg["shape"]), "case_spacing_mm": list(cfg["spacing"]),
            "crop_size": [crop] * 3, "n_crops": n, "cohort_write_s": t1 - t0,
            "prepare_s": t2 - t1, "prepare_workers": 2, "store_format": "npy memmap, int16 HU",
            "monai_reader": "NibabelReader", "timing": "single process, 1 warm-up crop each, "
            "files and store in the page cache",
        },
        "machine": {
            "os_cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "monai": _monai_version(), "platform": platform.platform(),
        },
    }


def _monai_version() -> str:
    import monai

    return monai.__version__


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    out = args.out or (None if args.quick else RESULTS / "data_throughput.json")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="mim3d_bench_") as tmp:
            result = run(args, Path(tmp))
    for key in ("crop_speedup_vs_monai", "store_crops_per_s", "monai_crops_per_s",
                "store_body_aware_crops_per_s"):
        print(f"RESULT {key} {result[key]:.4g}")
    for key, value in result["partial_read"].items():
        if key.endswith(("_ms_warm", "_ms_cold")):
            print(f"RESULT {key} {value:.4g}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
