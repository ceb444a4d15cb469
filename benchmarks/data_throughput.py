"""Store formats side by side: bytes on disk, random crop speed (cold and warm), MONAI, data wait.

One run measures every candidate on the same cases and the same crops, interleaved crop by crop
so that other load on the machine hits all of them alike:

* **bytes**: the four real CTs of ``../shared/data/ct`` (the DICOM series written once as
  .nii.gz for the reference) prepared at native spacing and at 1.5 mm into ``npy`` and
  ``blosc2`` stores, plus a Zarr v3 copy of the npy store (blosc with the blosc2 store's codec,
  64^3 chunks; the ecosystem's chunked format); ratio = store case files / .nii.gz sources.
  At 1.5 mm the stores keep coarse axes at source spacing (the default); ``*_resampled``
  stores do not.
* **crop speed**: a phantom cohort (``mim3d.data.phantom``) at native 0.8 mm, random 192^3
  crops through ``PretrainCropDataset`` (windowed float32) for npy and blosc2, and the same
  crops read from the Zarr copy and windowed alike; *warm* = the case's files read whole (into
  the page cache) before every crop, *cold* = them evicted (``posix_fadvise(DONTNEED)``).
* **long volumes**: the same crops (warm) from a cohort twice as long along z (448 slices, a
  chest-abdomen length instead of an abdomen's), since an npy crop reads whole z rows and so
  costs more the longer the volume, while a blosc2 crop decodes only the blocks it touches.
* **thick slices at 1.5 mm**: a phantom cohort with 3 mm slices prepared at 1.5 mm, random
  192^3 crops (warm) from stores that keep z at 3 mm and interpolate on read, and from stores
  resampled at prepare, npy and blosc2, interleaved alike (crops agree to 1 HU).
* **MONAI**: the on-the-fly pipeline of the authors' protocol (LoadImaged + Orientationd +
  ScaleIntensityRanged + SpatialPadd + RandSpatialCropd) on the cohort's .nii.gz files.
* **data wait**: ``benchmarks/pretrain_throughput.py``'s engine run (tiny preset, 2 loader
  workers) on a store of each format; share of step time blocked on data.

    PYTHONPATH=src .venv/bin/python benchmarks/data_throughput.py          # ~5-10 min
    PYTHONPATH=src .venv/bin/python benchmarks/data_throughput.py --quick  # CI smoke, ~1 min

Prints ``RESULT name value`` lines and writes benchmarks/results/data_throughput.json (a
``--quick`` run writes a JSON only when ``--out`` is given, so it never replaces the full result).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mim3d.config import DataConfig
from mim3d.data.crops import crop_box, place
from mim3d.data.formats import BLOSC2_DEFAULTS
from mim3d.data.intensity import window_hu
from mim3d.data.phantom import write_cohort
from mim3d.data.prepare import prepare
from mim3d.data.sampler import PretrainCropDataset
from mim3d.data.store import DEFAULT_FORMAT, PreparedStore
from mim3d.data.storetools import store_info

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REAL = HERE.parent.parent / "shared" / "data" / "ct"
FULL = {"cases": 6, "shape": (256, 256, 224), "spacing": (0.8, 0.8, 1.0), "crop": 192,
        "crops": 40, "monai_crops": 8, "pretrain": (4, 2),
        "thick": {"cases": 4, "shape": (384, 384, 100), "spacing": (0.8, 0.8, 3.0), "seed": 1},
        "long": {"cases": 4, "shape": (256, 256, 448), "spacing": (0.8, 0.8, 1.0), "seed": 2}}
QUICK = {"cases": 2, "shape": (96, 96, 80), "spacing": (1.5, 1.5, 2.0), "crop": 64, "crops": 4,
         "monai_crops": 2, "pretrain": None,
         "thick": {"cases": 2, "shape": (64, 64, 34), "spacing": (1.5, 1.5, 3.0), "seed": 1},
         "long": {"cases": 1, "shape": (96, 96, 160), "spacing": (1.5, 1.5, 2.0), "seed": 2}}
MM15 = (1.5, 1.5, 1.5)
FORMATS = ("npy", "blosc2")
TARGETS = {"bytes_vs_nii_gz": 1.0, "crop_speed_vs_npy": 0.8, "speedup_vs_monai": 20.0,
           "data_wait_share": 0.05}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small volumes and few crops (CI)")
    ap.add_argument("--crops", type=int, default=None, help="crops per format and cache state")
    ap.add_argument("--workdir", type=Path, default=None, help="keep cohorts and stores here")
    ap.add_argument("--out", type=Path, default=None, help="result JSON path")
    return ap.parse_args(argv)


def _evict(paths: list[Path]) -> None:
    """Drop files from the OS page cache (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_whole(paths: list[Path]) -> None:
    """Read files whole so they are in the page cache: this machine's DAMON reclaim pages out
    file pages left idle for about a minute, which would make some "warm" reads cold."""
    buf = bytearray(1 << 23)
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def steady_malloc() -> bool:
    """Serve crop-sized buffers from glibc's heap, as in a long-running loader worker.

    glibc maps allocations above a threshold freshly (every page faults on first touch) and
    raises that threshold after the first such free, so whether a 14-30 MB crop buffer faults
    depends on the process's history; on this machine that moved one read's time by up to 2x.
    A fixed 64 MiB threshold makes every candidate's buffers reused heap memory. Returns False
    where this is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 << 20) and libc.mallopt(-1, 256 << 20))  # MMAP, TRIM
    except (OSError, AttributeError):
        return False


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _zarr_copy(npy_store: Path, out: Path) -> Path:
    """The npy store's images as Zarr v3 arrays (blosc with the blosc2 store's codec, level and
    shuffle, 64^3 chunks: a Zarr chunk is its decode unit, so whole-z ones would be slower)."""
    import zarr
    from zarr.codecs import BloscCodec

    store = PreparedStore.open(npy_store)
    for i in range(len(store)):
        image = np.asarray(store.image(i))
        chunks = tuple(min(c, n) for c, n in zip(BLOSC2_DEFAULTS["chunks"], image.shape))
        z = zarr.create_array(out / store.index.name(i), shape=image.shape, dtype="int16",
                              chunks=chunks, compressors=[BloscCodec(
                                  cname=BLOSC2_DEFAULTS["codec"].lower(),
                                  clevel=BLOSC2_DEFAULTS["clevel"], shuffle="shuffle")])
        z[...] = image
    return out


def real_sources(work: Path) -> list[Path]:
    """The four real CTs as .nii.gz (the DICOM series converted once with nibabel)."""
    import nibabel as nib

    from mim3d.data.readers import read_volume

    files = [*sorted(REAL.glob("totalseg_*ct.nii.gz")), REAL / "totalseg_example_ct_sm.nii.gz"]
    dicom = REAL / "totalseg_example_ct_dicom"
    vol = read_volume(dicom)
    converted = work / "real" / "totalseg_example_ct_dicom.nii.gz"
    converted.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol.array.astype(np.int16), vol.affine), str(converted))
    return [*files, converted]


def _bytes(sources: list[Path], work: Path) -> dict[str, Any]:
    """Store bytes / .nii.gz bytes per format, at native spacing and at 1.5 mm."""
    nii = sum(p.stat().st_size for p in sources)
    out: dict[str, Any] = {"sources": [p.name for p in sources], "nii_gz_bytes": nii}
    for label, spacing in (("native", None), ("1.5mm", MM15)):
        row = {}
        layouts = [("", "kept")] + ([("_resampled", "resampled")] if spacing else [])
        for fmt in FORMATS:
            for tag, coarse in layouts:
                store = work / f"real_{fmt}{tag}_{label}"
                prepare(sources, store, data=DataConfig(spacing=spacing), workers=2,
                        progress=False, fmt=fmt, coarse_axes=coarse)
                row[fmt + tag] = store_info(store)["bytes_on_disk"]
        zarr_dir = _zarr_copy(work / f"real_npy_{label}", work / f"real_zarr_{label}")
        body = sum(p.stat().st_size for p in (work / f"real_npy_{label}").rglob("body.npy"))
        row["zarr"] = sum(p.stat().st_size for p in _files(zarr_dir)) + body
        out[label] = {f: {"bytes": b, "ratio_vs_nii_gz": b / nii, "ratio_vs_npy": b / row[
            "npy_resampled" if f.endswith("_resampled") else "npy"]} for f, b in row.items()}
    return out


def _crop_readers(stores: dict[str, Path], crop: int, data: DataConfig,
                  zarr_of: Path | None = None) -> tuple[dict[str, Callable[[int], Any]],
                                                        dict[str, Callable[[int], list[Path]]]]:
    """Per candidate: index -> windowed crop, and index -> the files to evict for it.

    Every candidate draws the crops of the first store's dataset (same seed, same cases);
    ``zarr_of`` adds a Zarr copy of that npy store as the candidate ``zarr``.
    """
    ds = {k: PretrainCropDataset(p, crop_size=(crop,) * 3, data=data, seed=0)
          for k, p in stores.items()}
    first = next(iter(ds.values()))
    readers: dict[str, Callable[[int], Any]] = {k: d.__getitem__ for k, d in ds.items()}

    def case_files(key: str) -> Callable[[int], list[Path]]:
        def files(i: int) -> list[Path]:
            case = first.crop_spec(i)[0]
            if key == "zarr":
                return _files(zdir / first.store.index.name(case))
            return [ds[key].store.array_path(case, "image"), ds[key].store.array_path(case, "body")]
        return files

    if zarr_of is not None:
        import zarr

        zdir = _zarr_copy(zarr_of, zarr_of.parent / "store_zarr")
        zarrs: dict[int, Any] = {}

        def zarr_crop(i: int) -> torch.Tensor:
            case, start, _ = first.crop_spec(i)
            z = zarrs.setdefault(case, zarr.open_array(zdir / first.store.index.name(case)))
            box = crop_box(start, (crop,) * 3, z.shape)
            inside = place(z[box[0]], (crop,) * 3, box[1], -1000)
            return torch.from_numpy(window_hu(inside, data.hu_window))[None]

        readers["zarr"] = zarr_crop
    return readers, {k: case_files(k) for k in readers}


def _warm_cohort(work: Path, cfg: dict[str, Any], name: str, data: DataConfig,
                 variants: dict[str, tuple[str, str]], atol: float = 0.0) -> dict[str, float]:
    """Warm crops/s of one extra phantom cohort (``cfg[name]``) per store variant.

    Args:
        variants: candidate name -> (array format, coarse_axes) of its store.
        atol: how far the candidates' crops may differ (0: identical).
    """
    cohort = cfg[name]
    datalist = write_cohort(work / name, cohort["cases"], seed=cohort["seed"],
                            shape=cohort["shape"], spacing=cohort["spacing"])
    stores = {key: work / f"{name}_{key}" for key in variants}
    for key, (fmt, coarse) in variants.items():
        prepare([datalist], stores[key], data=data, workers=2, progress=False, fmt=fmt,
                coarse_axes=coarse)
    readers, files = _crop_readers(stores, cfg["crop"], data)
    return _crop_speed(readers, files, cfg["crops"], modes=("warm",), atol=atol)["warm"]


def _long_volumes(work: Path, cfg: dict[str, Any]) -> dict[str, float]:
    """Warm native crops per format from a cohort of long volumes (module docstring)."""
    return _warm_cohort(work, cfg, "long", DataConfig(), {f: (f, "kept") for f in FORMATS})


def _thick_slices(work: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Warm 1.5 mm crops of 3 mm-slice phantoms: z kept and interpolated vs resampled."""
    data = DataConfig(spacing=MM15)
    variants = {f"{f}_{c}": (f, c) for c in ("kept", "resampled") for f in FORMATS}
    lo, hi = data.hu_window
    speed = _warm_cohort(work, cfg, "thick", data, variants, atol=1.0 / (hi - lo) + 1e-6)
    kept = PreparedStore.open(work / "thick_npy_kept")
    grid = kept.cases[0]
    return {"crops_per_s": speed, "case_grid": list(grid.shape),
            "stored_shape": list(grid.stored_shape or grid.shape),
            "bytes": {k: store_info(work / f"thick_{k}")["bytes_on_disk"] for k in variants}}


def machine(load_start: list[float]) -> dict[str, Any]:
    """The machine a result was measured on, with the load averages at start and end."""
    return {"os_cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())}


def _crop_speed(readers: dict[str, Callable[[int], Any]],
                files: dict[str, Callable[[int], list[Path]]], n: int,
                modes: tuple[str, ...] = ("warm", "cold"), atol: float = 0.0) -> dict[str, Any]:
    """Crops/s per candidate and cache state, the candidates interleaved crop by crop; every
    candidate's crop must equal the first's (to ``atol``)."""
    out: dict[str, Any] = {}
    for mode in modes:
        seconds = dict.fromkeys(readers, 0.0)
        for fn in readers.values():
            fn(10**6)  # warm-up: open files, first allocations
        for i in range(n):
            ref = None
            for name, fn in readers.items():
                (_evict if mode == "cold" else read_whole)(files[name](i))
                t0 = time.perf_counter()
                x = fn(i)
                seconds[name] += time.perf_counter() - t0
                ref = x if ref is None else ref
                same = torch.equal(x, ref) if atol == 0 else torch.allclose(x, ref, 0, atol)
                assert same, f"{name} gave another crop {i}"
        out[mode] = {name: n / s for name, s in seconds.items()}
    return out


def _monai_crops_per_s(files: list[str], crop: int, n: int) -> float:
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
        EnsureChannelFirstd(keys="image"), Orientationd(keys="image", axcodes="RAS"),
        ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0,
                             clip=True),
        SpatialPadd(keys="image", spatial_size=(crop,) * 3, value=0.0),
        RandSpatialCropd(keys="image", roi_size=(crop,) * 3, random_size=False),
    ])
    pipeline.set_random_state(seed=0)
    pipeline({"image": files[0]})  # warm-up
    t0 = time.perf_counter()
    for i in range(n):
        out = pipeline({"image": files[i % len(files)]})["image"]
    assert tuple(out.shape) == (1, crop, crop, crop)
    return n / (time.perf_counter() - t0)


def _data_wait(work: Path, datalist: Path, steps: int, warmup: int) -> dict[str, float]:
    """Data-wait share of the real engine (tiny preset, 2 workers) per store format."""
    from mim3d.config import load_config

    tiny = load_config("pretrain", "tiny").data
    out = {}
    for fmt in FORMATS:
        store = work / f"tiny_{fmt}"
        prepare([datalist], store, data=tiny, workers=2, progress=False, fmt=fmt)
        cmd = [sys.executable, str(HERE / "pretrain_throughput.py"), "--child", "tiny",
               "--store", str(store), "--run", str(work / f"run_{fmt}"), "--steps", str(steps),
               "--warmup", str(warmup), "--workers", "2"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("CHILD ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"pre-training on the {fmt} store failed:\n{done.stderr[-3000:]}")
        out[fmt] = json.loads(lines[-1][len("CHILD "):])["data_wait_share"]
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every measurement of the module docstring, in one process; returns the result record."""
    cfg = dict(QUICK if args.quick else FULL)
    cfg["crops"] = args.crops or cfg["crops"]
    cfg["steady_malloc"] = steady_malloc()
    load_start = list(os.getloadavg())
    datalist = write_cohort(work / "cohort", cfg["cases"], seed=0, shape=cfg["shape"],
                            spacing=cfg["spacing"])
    prep_s = {}
    for fmt in FORMATS:
        t0 = time.perf_counter()
        prepare([datalist], work / f"store_{fmt}", data=DataConfig(), workers=2, progress=False,
                fmt=fmt)
        prep_s[fmt] = time.perf_counter() - t0
    readers, files = _crop_readers({f: work / f"store_{f}" for f in FORMATS}, cfg["crop"],
                                   DataConfig(), zarr_of=work / "store_npy")
    speed = _crop_speed(readers, files, cfg["crops"])
    thick = _thick_slices(work, cfg)
    long = _long_volumes(work, cfg)
    sources = [c.source for c in PreparedStore.open(work / "store_npy").cases]
    monai = _monai_crops_per_s(sources, cfg["crop"], cfg["monai_crops"])
    real = None
    if REAL.is_dir():  # quick mode: the smallest real CT only
        sources = real_sources(work)
        real = _bytes(sources[-2:-1] if args.quick else sources, work)
    wait = _data_wait(work, datalist, *cfg["pretrain"]) if cfg["pretrain"] else None
    return _summary(cfg, speed, monai, real, wait, prep_s, load_start, thick, long)


def _summary(cfg: dict[str, Any], speed: dict[str, Any], monai: float, real: Any, wait: Any,
             prep_s: dict[str, float], load_start: list[float],
             thick: dict[str, Any], long: dict[str, float]) -> dict[str, Any]:
    """Headline figures, target checks and the format decision, plus everything measured."""
    new = "blosc2"
    ratio = {m: speed[m][new] / speed[m]["npy"] for m in ("warm", "cold")}
    head: dict[str, Any] = {
        "crop_speed_ratio_vs_npy_store_warm": ratio["warm"],
        "crop_speed_ratio_vs_npy_store_cold": ratio["cold"],
        "crop_speed_ratio_vs_npy_store_warm_long_volumes": long[new] / long["npy"],
        "zarr_crop_speed_ratio_vs_npy_store_warm": speed["warm"]["zarr"] / speed["warm"]["npy"],
        "zarr_crop_speed_ratio_vs_npy_store_cold": speed["cold"]["zarr"] / speed["cold"]["npy"],
        "crop_speedup_vs_monai": speed["warm"][DEFAULT_FORMAT] / monai,
        "npy_crop_speedup_vs_monai": speed["warm"]["npy"] / monai,
        **{f"thick_1p5mm_kept_vs_resampled_crop_speed_{f}":
           thick["crops_per_s"][f"{f}_kept"] / thick["crops_per_s"][f"{f}_resampled"]
           for f in FORMATS},
        "thick_1p5mm_crop_speed_ratio_vs_npy_store":
            thick["crops_per_s"][f"{new}_kept"] / thick["crops_per_s"]["npy_kept"],
    }
    if real:
        for label in ("native", "1.5mm"):
            tag = "" if label == "native" else "_1p5mm"
            head[f"store_bytes_ratio_vs_nii_gz{tag}"] = real[label][new]["ratio_vs_nii_gz"]
            head[f"store_bytes_ratio_vs_npy{tag}"] = real[label][new]["ratio_vs_npy"]
            head[f"zarr_bytes_ratio_vs_nii_gz{tag}"] = real[label]["zarr"]["ratio_vs_nii_gz"]
        head["store_bytes_ratio_vs_nii_gz_1p5mm_resampled"] = \
            real["1.5mm"][f"{new}_resampled"]["ratio_vs_nii_gz"]
    if wait:
        head.update({f"data_wait_share_{f}": w for f, w in wait.items()})
    met = {"bytes": bool(real) and all(real[lb][new]["ratio_vs_nii_gz"]
                                       <= TARGETS["bytes_vs_nii_gz"] for lb in ("native", "1.5mm")),
           "crop_speed_warm": ratio["warm"] >= TARGETS["crop_speed_vs_npy"],
           "crop_speed_cold": ratio["cold"] >= TARGETS["crop_speed_vs_npy"],
           "speedup_vs_monai": speed["warm"][new] / monai >= TARGETS["speedup_vs_monai"],
           "data_wait": bool(wait) and wait[new] < TARGETS["data_wait_share"]}
    return {**head, "targets": TARGETS, f"{new}_meets": met,
            "default_format_now": DEFAULT_FORMAT,
            "default_format_by_targets": new if all(met.values()) else "npy",
            "crops_per_s": speed, "monai_crops_per_s": monai, "bytes_real_ct": real,
            "thick_slices_1p5mm": thick, "long_volumes_warm_crops_per_s": long,
            "settings": {"mode": "full" if cfg["pretrain"] else "quick", **{
                k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                "blosc2": BLOSC2_DEFAULTS, "prepare_s": prep_s, "monai_reader": "NibabelReader",
                "timing": "one process, candidates interleaved crop by crop, 1 warm-up each; "
                          "steady_malloc: glibc mmap threshold fixed at 64 MiB"},
            "machine": {**machine(load_start),
                        "note": "ratios were measured side by side; absolute figures depend on "
                                "the load averages above"}}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    out = args.out or (None if args.quick else RESULTS / "data_throughput.json")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="mim3d_bench_") as tmp:
            result = run(args, Path(tmp))
    rows = {f"{name}_crops_per_s_{mode}": value
            for mode, row in result["crops_per_s"].items() for name, value in row.items()}
    emit(result, {**rows, "default_format_by_targets": result["default_format_by_targets"]}, out)
    return 0


def emit(result: dict[str, Any], extra: dict[str, Any], out: Path | None) -> None:
    """Print a ``RESULT`` line per top-level float and per ``extra`` item; write the JSON."""
    for key, value in [*((k, v) for k, v in result.items() if isinstance(v, float)),
                       *extra.items()]:
        print(f"RESULT {key} {value:.4g}" if isinstance(value, float) else f"RESULT {key} {value}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
