"""The store benchmarks (``benchmarks/data_throughput.py``, ``benchmarks/store_limits.py``):
their helpers, and their ``--quick`` runs end to end, so the scripts never rot."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
REAL = BENCH.parent.parent / "shared" / "data" / "ct"


def _load(name: str):
    """A benchmarks/ script as a module (benchmarks/ on sys.path, as when run as a script)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def test_touched_bytes_counts_whole_blocks(tmp_path: Path) -> None:
    """A box touches the blocks it overlaps, clipped to the array; edge blocks count whole."""
    blosc2 = pytest.importorskip("blosc2", reason="the blosc2 store format needs blosc2")
    arr = blosc2.asarray(np.zeros((100, 70, 50), np.int16), chunks=(64, 64, 64),
                         blocks=(32, 32, 32))
    touched = _load("store_limits")._touched_bytes
    # x [10, 50): blocks 0-1; y [0, 35) after clipping -5: blocks 0-1; z [40, 50): block 1
    assert touched(arr, (10, -5, 40), 40) == (2 * 32) * (2 * 32) * (1 * 32) * 2
    assert touched(arr, (0, 0, 0), 32) == 32 ** 3 * 2


def test_touch_reads_every_byte(tmp_path: Path) -> None:
    """The warm-up read covers files larger than its buffer (and empty ones)."""
    big, empty = tmp_path / "big.bin", tmp_path / "empty.bin"
    big.write_bytes(os.urandom((1 << 23) + 5))
    empty.write_bytes(b"")
    _load("data_throughput").read_whole([big, empty])  # raises on a short or failed read


def _run(script: str, out: Path) -> str:
    """``script --quick --out out`` in its own process group, killed with it on timeout."""
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src")}
    proc = subprocess.Popen([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return stdout


@pytest.mark.slow
def test_store_limits_quick(tmp_path: Path) -> None:
    """Every part is timed and the 1.5 mm bytes are split per setting."""
    out = tmp_path / "limits.json"
    stdout = _run("store_limits", out)
    doc = json.loads(out.read_text())
    ms = doc["warm"]["ms_per_crop"]
    assert set(ms) == {"npy", "blosc2", "window", "decode_bound"} and min(ms.values()) > 0
    assert doc["warm_crop_ratio_now"] > 0 and "RESULT warm_crop_ratio_decode_bound" in stdout
    if not REAL.is_dir():
        pytest.skip("../shared/data is absent: the 1.5 mm bytes part needs the real CTs")
    (case,) = doc["bytes_1p5mm"]["cases"].values()  # the smallest CT: a 3 mm scan
    assert case["source_spacing_mm"] == pytest.approx([3.0, 3.0, 3.0])
    # kept at 3 mm it holds 1/8 of the 1.5 mm voxels, so it must be several times smaller
    assert case["kept"] * 4 < case["resampled"]
    assert case["resampled_zstd9_bytedelta"] < case["resampled"]
    assert case["kept_zstd9_bytedelta"] < case["kept"]


@pytest.mark.slow
def test_data_throughput_quick(tmp_path: Path) -> None:
    """The targets' benchmark runs end to end and decides a default format."""
    out = tmp_path / "throughput.json"
    stdout = _run("data_throughput", out)
    doc = json.loads(out.read_text())
    assert doc["default_format_by_targets"] in ("npy", "blosc2")
    assert doc["settings"]["steady_malloc"] is True or sys.platform != "linux"
    for mode in ("warm", "cold"):
        assert min(doc["crops_per_s"][mode].values()) > 0
    assert "RESULT crop_speed_ratio_vs_npy_store_warm" in stdout
    assert min(doc["thick_slices_1p5mm"]["crops_per_s"].values()) > 0
    assert "RESULT thick_1p5mm_kept_vs_resampled_crop_speed_npy" in stdout
