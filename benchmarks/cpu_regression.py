"""The CPU step, this tree against an earlier commit, in turns in one run (issue 12, item 7).

A shared VM's pace moves from day to day: the same code's MiM base step took 1.61 s on this
project's 2-core VM one day and about 2.5 s on another. So "no CPU regression" is a ratio
measured side by side: ``efficiency.py``'s worker for one case (default MiM base, batch 1,
fp32) runs from a git worktree of ``--against`` and from this tree, in turns (the order
alternates from round to round), each in a fresh process after waiting for idle CPUs.

``head_vs_ref`` is the median over rounds of this tree's step time over the reference's (below
1: this tree is faster). ``step_share_*`` is each side's forward + backward FLOPs per second
over the fp32 GEMM rate its own worker measured (``efficiency.py``'s ``step_share_of_gemm_peak``).

    PYTHONPATH=src .venv/bin/python benchmarks/cpu_regression.py --against 7be2dbc --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _efficiency_cases import FULL, QUICK
from efficiency import RESULTS, ROOT, _machine, _run_worker


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached git worktree of ``rev``, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="mim3d-ref-") as tmp:
        path = Path(tmp) / "tree"
        made = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                               str(path), rev], check=False, capture_output=True, text=True)
        if made.returncode != 0:
            why = (made.stderr.strip().splitlines() or ["git failed"])[-1]
            raise SystemExit(f"cpu_regression.py: cannot check out --against {rev!r} ({why}); "
                             "give a commit of this repository, e.g. --against HEAD~1")
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                           check=False, capture_output=True)


def run_case(tree: Path, spec: dict[str, Any], timeout: float, wait: float) -> dict[str, Any]:
    """``tree``'s ``efficiency.py`` worker for ``spec``: its step time and share of the GEMM."""
    r = _run_worker(spec, timeout, wait, tree)
    if "error" in r:
        raise RuntimeError(f"worker in {tree} failed: {r['error']}")
    step = statistics.median(r["wall_s"])
    idle = {k: r[k] for k in ("waited_s", "foreign_cpu_share_before") if k in r}
    return {"step_s": step, "wall_s": r["wall_s"], **idle,
            "step_share": (r["flops_fwd"] + r["flops_bwd"]) / step / r["gemm_fp32_flops_per_s"],
            "gemm_fp32_flops_per_s": r["gemm_fp32_flops_per_s"],
            "foreign_cpu_share": r["foreign_cpu_share"]}


def compare(ref: Path, rounds: int, spec: dict[str, Any], timeout: float,
            wait: float) -> dict[str, Any]:
    """``rounds`` rounds of (ref, head), the order alternating; medians and per-round ratios."""
    sides: dict[str, list[dict[str, Any]]] = {"ref": [], "head": []}
    trees = {"ref": ref, "head": ROOT}
    for i in range(rounds):
        for side in (("ref", "head") if i % 2 == 0 else ("head", "ref")):
            sides[side].append(run_case(trees[side], spec, timeout, wait))
            print(f"# round {i} {side}: step {sides[side][-1]['step_s']:.3f} s, share "
                  f"{sides[side][-1]['step_share']:.3f}", file=sys.stderr, flush=True)
    ratios = [h["step_s"] / r["step_s"] for h, r in zip(sides["head"], sides["ref"], strict=True)]
    res = {"head_vs_ref": statistics.median(ratios)}
    for side, runs in sides.items():
        res[f"step_s_{side}"] = statistics.median(r["step_s"] for r in runs)
        res[f"step_share_{side}"] = statistics.median(r["step_share"] for r in runs)
    return {"results": res, "ratios": ratios, "runs": sides}


def main(argv: list[str] | None = None) -> int:
    """Compare, print RESULT lines, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="the reference commit (any git revision)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--case", default="mim_base", help="an efficiency.py case (default mim_base)")
    ap.add_argument("--quick", action="store_true", help="tiny models (CI smoke, seconds)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--wait-idle", type=float, default=60.0, metavar="S",
                    help="before each worker wait up to S s for other jobs to leave the CPUs")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    ap.add_argument("--out", type=Path, default=None,
                    help="result JSON (default results/cpu_regression.json; --quick: none)")
    args = ap.parse_args(argv)
    mode = QUICK if args.quick else FULL
    spec = {"device": "cpu", "threads": args.threads, "quick": args.quick, "batch": 1,
            "precision": "fp32", "compile": False, "malloc": "tuned", "case": args.case,
            "iters": mode["iters"][args.case], "sample_flops": False}
    t0 = time.perf_counter()
    with worktree(args.against) as ref:
        data = compare(ref, args.rounds, spec, args.timeout, args.wait_idle)
    for key, value in data["results"].items():
        print(f"RESULT {key} {value:.4g}")
    out = args.out or (None if args.quick else RESULTS / "cpu_regression.json")
    if out is not None:
        machine = _machine(argparse.Namespace(threads=args.threads, device="cpu"))
        doc = {"command": "PYTHONPATH=src " + " ".join([Path(sys.executable).name, *sys.argv]),
               "against": args.against, "head": _head(), "spec": spec, "machine": machine,
               "wall_s": time.perf_counter() - t0, **data}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def _head() -> str:
    """This tree's commit, with ``+changes`` when it has uncommitted ones."""
    git = ["git", "-C", str(ROOT)]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return rev + ("+changes" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
