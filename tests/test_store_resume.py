"""Prepare survives SIGKILL, shards into one store or into merged parts, and never duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_nifti

from mim3d.cli import main
from mim3d.config import DataConfig
from mim3d.data.manifest import locked, read_manifest
from mim3d.data.prepare import parse_shard, prepare
from mim3d.data.storetools import merge_stores

pytest.importorskip("blosc2", reason="the blosc2 store format needs blosc2 (mim3d[store])")

N = 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N small CTs (a body-like block of noisy soft tissue in air)."""
    src = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(1)
    for i in range(N):
        arr = np.full((40, 36, 32), -1000, np.int16)
        arr[6:34, 6:30, 4:28] = rng.integers(-100, 300, size=(28, 24, 24))
        write_nifti(src / f"ct{i:02d}.nii.gz", arr)
    return src


@pytest.fixture(scope="module")
def reference(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Case -> image hash of one uninterrupted, unsharded prepare."""
    out = tmp_path_factory.mktemp("ref") / "store"
    report = _prepare(cohort, out)
    assert report.prepared == N
    return _hashes(out)


def _prepare(src: Path, out: Path, **kw: object):
    return prepare([src], out, data=DataConfig(), workers=0, progress=False, fmt="blosc2", **kw)


def _hashes(store: Path) -> dict[str, str]:
    lines = (store / "manifest.jsonl").read_text().splitlines()
    names = [json.loads(line)["name"] for line in lines]
    assert len(names) == len(set(names)), "a case was recorded twice"
    return {r.name: r.sha256 for r in read_manifest(store / "manifest.jsonl")}


def _cli(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mim3d.cli", "prepare", str(src), "--out", str(out),
           "--preset", "tiny", "--workers", "0", "--format", "blosc2", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _lines(store: Path) -> int:
    path = store / "manifest.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_sigkill_mid_prepare_then_rerun_equals_uninterrupted(
        cohort: Path, reference: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "store"
    for at_least in (1, 3):  # killed twice, at different points of the run
        proc = _cli(cohort, out)
        try:
            deadline = time.monotonic() + 120
            while _lines(out) < at_least and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, "prepare finished before it could be killed"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert 0 < _lines(out) < N
    proc = _cli(cohort, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert _hashes(out) == reference
    leftovers = [p.name for p in (out / "cases").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not (out / ".claims").exists()


def test_concurrent_shards_into_one_store_equal_single_prepare(
        cohort: Path, reference: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "store"
    procs = [_cli(cohort, out, "--shard", f"{i}/2") for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert _hashes(out) == reference
    again = _prepare(cohort, out)  # a plain rerun finds everything done
    assert (again.prepared, again.skipped) == (0, N)


def test_shard_parts_merged_equal_single_prepare(cohort: Path, reference: dict[str, str],
                                                  tmp_path: Path) -> None:
    parts = [tmp_path / f"part{i}" for i in range(3)]
    counts = [_prepare(cohort, part, shard=(i, 3)).prepared for i, part in enumerate(parts)]
    assert sum(counts) == N and all(c > 0 for c in counts)  # disjoint, and all non-empty
    assert main(["store", "merge", *map(str, parts), "--out", str(tmp_path / "all")]) == 0
    assert _hashes(tmp_path / "all") == reference
    again = merge_stores(parts, tmp_path / "all")  # merging twice adds nothing
    assert (again.merged, again.skipped, again.in_store) == (0, N, N)
    other = tmp_path / "npy"
    prepare([cohort], other, data=DataConfig(), workers=0, progress=False, fmt="npy",
            shard=(0, 3))
    with pytest.raises(ValueError, match="array_format differs"):
        merge_stores([parts[0], other], tmp_path / "mixed")
    assert not (tmp_path / "mixed" / "manifest.jsonl").exists()


def test_two_processes_on_one_case_or_shard(cohort: Path, reference: dict[str, str],
                                            tmp_path: Path) -> None:
    out = tmp_path / "store"
    _prepare(cohort, out, shard=(1, 2))
    name = min(set(reference) - set(_hashes(out)))  # a case of the other shard
    (out / ".claims").mkdir(exist_ok=True)
    with locked(out / ".claims" / name):  # another process is preparing it right now
        report = _prepare(cohort, out, shard=(0, 1))
    assert report.busy == 1 and any(name in m and "another process" in m
                                    for m in report.messages)
    assert name not in _hashes(out) and len(_hashes(out)) == N - 1
    with locked(out / ".shard-0-of-2.lock"), pytest.raises(ValueError, match="already being"):
        _prepare(cohort, out, shard=(0, 2))
    with locked(out / ".prepare.lock", exclusive=False), \
            pytest.raises(ValueError, match="another `mim3d prepare`"):
        _prepare(cohort, out)  # a plain prepare needs the store to itself
    overlap = _prepare(cohort, out, shard=(0, 3))  # another N: only `name` can be missing
    assert overlap.prepared <= 1
    final = _prepare(cohort, out)
    assert _hashes(out) == reference and final.in_store == N
    with pytest.raises(ValueError, match="I/N"):
        parse_shard("2")
    with pytest.raises(ValueError, match="0 <= I < N"):
        parse_shard("3/3")
