"""``benchmarks/cpu_regression.py``: this tree's CPU step against a commit's, side by side."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cpu_regression  # benchmarks/ is not a package


def _git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    probe = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                           check=False)
    return probe.returncode == 0


needs_git = pytest.mark.skipif(not _git_checkout(), reason="needs git and a git checkout of mim3d "
                               "(the reference side is a worktree of a commit)")


def _worktrees() -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "worktree", "list", "--porcelain"],
                         capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines() if ln.startswith("worktree ")]


@needs_git
@pytest.mark.slow
def test_quick_comparison_against_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One round, tiny preset: both sides ran the worker, the ratio is their step times' ratio,
    the shares are each side's FLOP rate over its own GEMM rate, and the worktree is gone."""
    before = _worktrees()
    out = tmp_path / "cpu_regression.json"
    assert cpu_regression.main(["--quick", "--against", "HEAD", "--rounds", "1",
                                "--wait-idle", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    res, (ref,), (head,) = doc["results"], doc["runs"]["ref"], doc["runs"]["head"]
    assert res["head_vs_ref"] == pytest.approx(head["step_s"] / ref["step_s"])
    assert res["step_s_ref"] == pytest.approx(ref["step_s"])
    for side in (ref, head):
        assert side["step_s"] == pytest.approx(sorted(side["wall_s"])[len(side["wall_s"]) // 2])
        assert 0 < side["step_share"] < 1
    assert doc["spec"]["case"] == "mim_base" and doc["spec"]["quick"]
    assert f"RESULT head_vs_ref {res['head_vs_ref']:.4g}" in capsys.readouterr().out
    assert _worktrees() == before


@needs_git
def test_unknown_revision_is_one_clear_line() -> None:
    with pytest.raises(SystemExit, match="cannot check out --against 'no-such-rev'"):
        cpu_regression.main(["--quick", "--against", "no-such-rev", "--rounds", "1"])
