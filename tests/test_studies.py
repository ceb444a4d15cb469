"""The label-efficiency and ablation studies (benchmarks/): statistics, cache keys, quick runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _study as S  # benchmarks/ is not a package
import ablations
import label_efficiency


def test_aggregate_matches_numpy() -> None:
    values = [0.61, 0.55, 0.72]
    got = S.aggregate(values)
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # sample std, by hand
    assert got["mean"] == pytest.approx(mean)
    assert got["std"] == pytest.approx(std)
    assert got["std"] == pytest.approx(float(np.std(values, ddof=1)))
    assert got["n"] == 3 and got["values"] == values


def test_aggregate_single_seed_has_zero_std() -> None:
    assert S.aggregate([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1, "values": [0.4]}


def test_summarize_runs_per_class() -> None:
    runs = [{"dice": d, "nsd": d / 2, "per_class": {"liver": {"dice": d, "nsd": d}},
             "finetune_s": 1.0, "eval_s": 0.5, "seed": i, "train_cases": ["a"]}
            for i, d in enumerate([0.2, 0.4])]
    out = S.summarize_runs(runs)
    assert out["dice"]["mean"] == pytest.approx(0.3)
    assert out["nsd"]["std"] == pytest.approx(float(np.std([0.1, 0.2], ddof=1)))
    assert out["per_class"]["liver"]["dice"]["mean"] == pytest.approx(0.3)
    assert out["finetune_s"] == pytest.approx(3.0)


def test_cache_key_follows_config_steps_and_data() -> None:
    _, base = S.pretrain_key("study", [], 20, 0, "data-a")
    assert S.pretrain_key("study", [], 20, 0, "data-a")[1] == base  # stable
    assert S.pretrain_key("study", ["loss.alignment=byol"], 20, 0, "data-a")[1] != base
    assert S.pretrain_key("study", ["geometry.source=unmasked"], 20, 0, "data-a")[1] != base
    assert S.pretrain_key("study", [], 21, 0, "data-a")[1] != base
    assert S.pretrain_key("study", [], 20, 1, "data-a")[1] != base
    assert S.pretrain_key("study", [], 20, 0, "data-b")[1] != base
    assert S.pretrain_key("study-hybrid-mae", [], 20, 0, "data-a")[1] != base


def test_digest_ignores_key_order() -> None:
    assert S.digest({"a": 1, "b": [1, 2]}) == S.digest({"b": [1, 2], "a": 1})
    assert S.digest({"a": 1}) != S.digest({"a": 2})


def test_ablation_variants_resolve() -> None:
    """Every variant's overrides give a valid config (bad keys fail here, not mid-study)."""
    names = [v.name for v in ablations.VARIANTS]
    assert len(set(names)) == len(names) and {"baseline", "scratch"} <= set(names)
    for v in ablations.VARIANTS:
        if v.overrides is not None:
            S.pretrain_key("study", list(v.overrides), 20, 0, "data")


def _run_quick(script: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src")}
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--work",
                           str(tmp_path / "work"), "--out", str(out)],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "RESULT wall_s" in proc.stdout
    return json.loads(out.read_text())


def _check_cell(cell: dict) -> None:
    for metric in ("dice", "nsd"):
        stat = cell[metric]
        assert 0.0 <= stat["mean"] <= 1.0 and math.isfinite(stat["mean"])
        assert stat["n"] == 1 and stat["std"] == 0.0  # one seed in quick mode
        for per_class in cell["per_class"].values():
            assert 0.0 <= per_class[metric]["mean"] <= 1.0


@pytest.mark.slow
def test_label_efficiency_quick(tmp_path: Path) -> None:
    result = _run_quick("label_efficiency", tmp_path)
    expected = {a["arm"] for a in label_efficiency.arms(list(S.METHODS))}
    assert set(result["summary"]) == expected
    fractions = {str(round(100 * f)) for f in label_efficiency.QUICK.fractions}
    for arm, cells in result["summary"].items():
        assert set(cells) == fractions, arm
        for cell in cells.values():
            _check_cell(cell)
            assert set(cell["per_class"]) == {"spleen", "right_kidney", "left_kidney", "liver"}
    assert set(result["gains_vs_scratch"]) == set(S.METHODS)
    for p in fractions:  # every arm trained on the same cases for a given fraction and seed
        assert len({json.dumps(c[p]["train_cases"]) for c in result["summary"].values()}) == 1
    assert result["machine"]["cpu_count"] >= 1 and result["command"]


@pytest.mark.slow
def test_ablations_quick(tmp_path: Path) -> None:
    result = _run_quick("ablations", tmp_path)
    assert set(result["variants"]) == {v.name for v in ablations.VARIANTS}
    for name, cell in result["variants"].items():
        _check_cell(cell)
        pre = cell["pretraining"]
        assert (pre is None) == (name == "scratch")
        if pre is not None:
            assert math.isfinite(pre["final_loss"]) and pre["wall_s"] > 0
