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


def _run_quick(script: str, work: Path) -> tuple[dict, str]:
    """Run a study's ``--quick`` mode as a user would (its own process); (JSON, stdout)."""
    out = work.parent / f"{script}.json"
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src")}
    # the timeout only guards against a hang: a quick study is about a minute on 2 idle cores,
    # but many times that on a machine shared with other jobs
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--work",
                           str(work), "--out", str(out)], check=False, capture_output=True,
                          text=True, env=env, timeout=1500, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "RESULT wall_s" in proc.stdout
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both quick studies on ONE work folder, as a user runs them: ablations reuses the cohorts,
    the baseline pre-training and the two shared fine-tunings that label efficiency cached."""
    work = tmp_path_factory.mktemp("studies") / "work"
    le, le_out = _run_quick("label_efficiency", work)
    ab, ab_out = _run_quick("ablations", work)
    return {"work": work, "le": le, "le_out": le_out, "ab": ab, "ab_out": ab_out}


def _results(stdout: str) -> dict[str, float]:
    """The ``RESULT name value`` lines of a study's output."""
    return {p[1]: float(p[2]) for p in (line.split() for line in stdout.splitlines())
            if len(p) == 3 and p[0] == "RESULT"}


def _finetunes(work: Path) -> list[dict]:
    """Every cached fine-tuning result, checked against its own evaluation report."""
    found = []
    for path in sorted((work / "finetune").glob("*/result.json")):
        result = json.loads(path.read_text())
        overall = json.loads((path.parent / "eval.json").read_text())["summary"]
        for metric in ("dice", "nsd"):  # the study copies the evaluation's numbers unchanged
            assert result[metric] == pytest.approx(overall["overall"][metric]["mean"])
            for organ, cell in result["per_class"].items():
                want = overall["classes"][organ][metric]["mean"]
                assert cell[metric] == pytest.approx(math.nan if want is None else want,
                                                     nan_ok=True)
        found.append(result)
    return found


def _check_cell(cell: dict, runs: list[dict]) -> None:
    """A quick cell is one seed: its statistics are that run's evaluated numbers."""
    assert len(runs) == 1, runs
    for metric in ("dice", "nsd"):
        stat = cell[metric]
        assert 0.0 <= stat["mean"] <= 1.0 and math.isfinite(stat["mean"])
        assert stat["n"] == 1 and stat["std"] == 0.0 and stat["values"] == [stat["mean"]]
        assert stat["mean"] == pytest.approx(runs[0][metric])
        for organ, per_class in cell["per_class"].items():
            assert per_class[metric]["mean"] == pytest.approx(
                runs[0]["per_class"][organ][metric], nan_ok=True)


def _final_loss(work: Path, pre: dict) -> float:
    """The pre-training's final loss recomputed from its run's metrics.jsonl (last 10%)."""
    rows = [json.loads(line) for line in
            (work / "pretrain" / f"{pre['preset']}-{pre['key']}" / "run" / "metrics.jsonl")
            .read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return float(np.mean(losses[-max(1, len(losses) // 10):]))


@pytest.mark.slow
def test_label_efficiency_quick(studies: dict) -> None:
    result, work, printed = studies["le"], studies["work"], _results(studies["le_out"])
    expected = {a["arm"] for a in label_efficiency.arms(list(S.METHODS))}
    assert set(result["summary"]) == expected
    fractions = {str(round(100 * f)) for f in label_efficiency.QUICK.fractions}
    finetunes = _finetunes(work)
    for arm in result["arms"]:
        pre = result["pretraining"].get(arm["method"]) if arm["method"] else None
        cells = result["summary"][arm["arm"]]
        assert set(cells) == fractions, arm
        for p, cell in cells.items():
            runs = [r for r in finetunes if r["network"] == arm["network"]
                    and r["encoder"] == (pre["key"] if pre else None)
                    and str(round(100 * r["fraction"])) == p]
            _check_cell(cell, runs)
            assert set(cell["per_class"]) == {"spleen", "right_kidney", "left_kidney", "liver"}
            arm_id = arm["arm"].replace("-", "_")
            assert printed[f"dice_{arm_id}_{p}"] == pytest.approx(cell["dice"]["mean"], abs=1e-4)
    for method, pre in result["pretraining"].items():
        assert pre["final_loss"] == pytest.approx(_final_loss(work, pre)), method
    assert set(result["gains_vs_scratch"]) == set(S.METHODS)
    for arm, gains in result["gains_vs_scratch"].items():  # gain = arm mean - scratch mean
        base = result["summary"][f"scratch-{S.METHODS[arm].network}"]
        for p, gain in gains.items():
            for m in ("dice", "nsd"):
                want = result["summary"][arm][p][m]["mean"] - base[p][m]["mean"]
                assert gain[m] == pytest.approx(want)
    for p in fractions:  # every arm trained on the same cases for a given fraction and seed
        assert len({json.dumps(c[p]["train_cases"]) for c in result["summary"].values()}) == 1
    assert result["machine"]["cpu_count"] >= 1 and result["command"]


@pytest.mark.slow
def test_ablations_quick(studies: dict) -> None:
    result, work, printed = studies["ab"], studies["work"], _results(studies["ab_out"])
    assert set(result["variants"]) == {v.name for v in ablations.VARIANTS}
    finetunes = _finetunes(work)
    for name, cell in result["variants"].items():
        pre = cell["pretraining"]
        assert (pre is None) == (name == "scratch")
        runs = [r for r in finetunes if r["network"] == "mim-unetr" and r["fraction"] == 1.0
                and r["encoder"] == (pre["key"] if pre else None)]
        _check_cell(cell, runs)
        assert printed[f"ablation_dice_{name}"] == pytest.approx(cell["dice"]["mean"], abs=1e-4)
        if pre is not None:
            assert pre["final_loss"] == pytest.approx(_final_loss(work, pre)) and pre["wall_s"] > 0
    # one work folder: the runs both studies share are the same cached runs, same numbers
    le = studies["le"]
    assert result["variants"]["baseline"]["pretraining"]["key"] == le["pretraining"]["mim"]["key"]
    for variant, arm in (("baseline", "mim"), ("scratch", "scratch-mim-unetr")):
        assert result["variants"][variant]["dice"] == le["summary"][arm]["100"]["dice"]
