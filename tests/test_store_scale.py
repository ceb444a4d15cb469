"""10,000-case store: open time, resident memory, bounded files and maps, per-worker footprint."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mim3d.config import DataConfig
from mim3d.data.formats import BLOSC2_DEFAULTS, array_format
from mim3d.data.sampler import PretrainCropDataset
from mim3d.data.store import PreparedStore

N_CASES = 10_000
SHAPE = (20, 18, 16)

# Runs in a fresh interpreter: opens the store, samples crops from thousands of cases, and
# reports what the sampler and index cost on top of the imports.
_PROBE = r"""
import json, os, resource, sys, time
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
from mim3d.config import DataConfig
from mim3d.data.sampler import PretrainCropDataset
from mim3d.data.store import PreparedStore
base, fds0 = rss_mb(), len(os.listdir("/proc/self/fd"))
t0 = time.perf_counter()
store = PreparedStore.open(sys.argv[1])
open_s = time.perf_counter() - t0
ds = PretrainCropDataset(store, crop_size=(16, 16, 16), data=DataConfig(body_aware=True), seed=0)
cases, peak_fds = set(), 0
for i in range(1500):
    x = ds[i]
    cases.add(ds.crop_spec(i)[0])
    peak_fds = max(peak_fds, len(os.listdir("/proc/self/fd")))
maps = sum(1 for line in open("/proc/self/maps") if sys.argv[1] in line)
print(json.dumps({"open_s": open_s, "rss_delta_mb": rss_mb() - base, "rss_mb": rss_mb(),
                  "extra_fds": peak_fds - fds0, "store_maps": maps, "cases_touched": len(cases),
                  "n": len(store)}))
"""


def _build(root: Path) -> None:
    """A store of N_CASES tiny blosc2 cases, fast: one image and body file hard-linked."""
    fmt = array_format("blosc2")
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1000, size=SHAPE, dtype=np.int16)
    (root / "cases").mkdir(parents=True)
    proto = root / "proto"
    proto.mkdir()
    fmt.write(proto / "image.b2nd", image)
    np.save(proto / "body.npy", np.ones([-(-n // 8) for n in SHAPE], np.float32))
    info = {"format": "mim3d-prepared-store", "version": 2, "array_format": "blosc2",
            "format_params": BLOSC2_DEFAULTS, "data": {"spacing": None, "body_hu": -500.0}}
    (root / "store.json").write_text(json.dumps(info))
    stats = {"hu_min": int(image.min()), "hu_max": int(image.max()),
             "hu_mean": float(image.mean()), "hu_std": float(image.std())}
    lines = []
    for i in range(N_CASES):
        case = root / "cases" / f"case{i:05d}"
        case.mkdir()
        os.link(proto / "image.b2nd", case / "image.b2nd")
        os.link(proto / "body.npy", case / "body.npy")
        lines.append(json.dumps({
            "name": case.name, "source": f"/data/{case.name}.nii.gz", "label_source": None,
            "shape": list(SHAPE), "spacing": [1.0, 1.0, 1.0], "affine": np.eye(4).tolist(),
            "sha256": "0" * 64, "has_label": False, "body_fraction": 1.0, "prepared": "now",
            **stats}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("blosc2", reason="the blosc2 store format needs blosc2 (mim3d[store])")
    root = tmp_path_factory.mktemp("big") / "store"
    t0 = time.perf_counter()
    _build(root)
    assert time.perf_counter() - t0 < 60, "building the synthetic store took too long"
    return root


def test_ten_thousand_cases_open_fast_and_stay_bounded(big_store: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(big_store)], capture_output=True,
                         check=False, text=True, timeout=300, start_new_session=True)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["n"] == N_CASES
    assert probe["open_s"] < 5.0, probe
    assert probe["rss_delta_mb"] < 500, probe
    assert probe["cases_touched"] > 1000, probe  # crops really came from thousands of cases
    assert probe["extra_fds"] <= 64 + 8, probe  # open blosc2 files are bounded (LRU)
    assert probe["store_maps"] <= 2 * 64, probe  # and so are the body-grid memory maps


def test_workers_get_the_index_not_the_manifest(big_store: Path) -> None:
    store = PreparedStore.open(big_store)
    ds = PretrainCropDataset(store, crop_size=(16, 16, 16), data=DataConfig(), seed=0)
    for i in range(200):  # fill the handle caches: they must not travel to the workers
        ds[i]
    blob = pickle.dumps(ds)
    manifest_bytes = (big_store / "manifest.jsonl").stat().st_size
    assert len(blob) < manifest_bytes / 5, (len(blob), manifest_bytes)
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[123].numpy(), ds[123].numpy())
    # Full records are still there on demand, read from their manifest line.
    rec = store.cases[N_CASES - 1]
    assert rec.name == f"case{N_CASES - 1:05d}" and rec.shape == SHAPE
    assert store.shard(3, 4)[:2] == [3, 7] and len(store.shard(3, 4)) == N_CASES // 4
