"""Label efficiency (the paper's Table IV, at study scale on 2 CPU cores).

Each method pre-trains for the same budget (same optimizer steps and batch size, its ``study*``
preset) on one unlabelled store (phantoms + the real CT in ``../shared/data/ct``), then its
encoder is fine-tuned on 25 / 50 / 100 % of the labelled phantom training cases with several
seeds, next to every downstream architecture trained from scratch, all with the same recipe
(``study-phantom`` preset: steps, lr, batch, roi). Dice and NSD are scored on the held-out
phantoms' original grid and reported as mean ± std over seeds.

    PYTHONPATH=src .venv/bin/python benchmarks/label_efficiency.py           # full, ~35 min
    PYTHONPATH=src .venv/bin/python benchmarks/label_efficiency.py --quick   # smoke, ~1 min
    PYTHONPATH=src python benchmarks/label_efficiency.py --finetune-steps 300 --seeds 0 1 2 3 4

Pre-trainings and fine-tunings are cached under ``--work`` (default ``runs/studies``), so a re-run
and ``ablations.py`` reuse them. Prints ``RESULT <name> <value>`` lines and writes
benchmarks/results/label_efficiency.json (``--quick`` writes only when ``--out`` is given).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _study as S  # the shared machinery sits beside this script


@dataclass(frozen=True)
class Mode:
    """Budget of one mode (measured on 2 cores; see the module docstring for wall times)."""

    cohort: S.CohortSpec
    pretrain_steps: int
    finetune_steps: int
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]


FULL = Mode(S.CohortSpec(), pretrain_steps=200, finetune_steps=50, fractions=(0.25, 0.5, 1.0),
            seeds=(0, 1, 2))
#: Quick = ablations' quick budget (cohorts, 1 pre-training step, 1 fine-tuning step at 100 %),
#: so both studies on one ``--work`` share their cohorts and the runs they have in common.
QUICK = Mode(S.CohortSpec(unlabelled=2, unlabelled_shape=(64, 64, 64), train=2, test=1),
             pretrain_steps=1, finetune_steps=1, fractions=(0.5, 1.0), seeds=(0,))
PRETRAIN_SEED = 0  # one pre-training per method; the seeds vary the fine-tuning


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    ap.add_argument("--work", type=Path, default=S.REPO / "runs" / "studies",
                    help="cohorts and cached runs (default runs/studies)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON path")
    ap.add_argument("--methods", nargs="+", default=list(S.METHODS), choices=list(S.METHODS))
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="pre-training steps per method (default: the mode's)")
    ap.add_argument("--finetune-steps", type=int, default=None,
                    help="fine-tuning steps per arm (default: the mode's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="fine-tuning seeds (default: the mode's)")
    ap.add_argument("--fractions", type=float, nargs="+", default=None,
                    help="label fractions in (0, 1] (default: the mode's)")
    return ap.parse_args(argv)


def resolve_mode(args: argparse.Namespace) -> Mode:
    """The mode's budget with the command line's step and seed choices applied."""
    mode = QUICK if args.quick else FULL
    changes = {k: v for k, v in (("pretrain_steps", args.pretrain_steps),
                                 ("finetune_steps", args.finetune_steps),
                                 ("seeds", tuple(args.seeds) if args.seeds else None),
                                 ("fractions", tuple(args.fractions) if args.fractions else None))
               if v is not None}
    if any(isinstance(v, int) and v < 1 for v in changes.values()):
        raise SystemExit("--pretrain-steps and --finetune-steps must be >= 1")
    if any(not 0.0 < f <= 1.0 for f in changes.get("fractions", ())):
        raise SystemExit(f"--fractions must lie in (0, 1], got {args.fractions}")
    return replace(mode, **changes)


def arms(methods: list[str]) -> list[dict[str, Any]]:
    """Pre-trained arms, then one from-scratch arm per downstream architecture used."""
    out = [{"arm": m, "method": m, "network": S.METHODS[m].network, "size": S.METHODS[m].size}
           for m in methods]
    for network in dict.fromkeys(S.METHODS[m].network for m in methods):
        out.append({"arm": f"scratch-{network}", "method": None, "network": network,
                    "size": S.SCRATCH[network]})
    return out


def pretrain_all(methods: list[str], mode: Mode, cohorts: S.Cohorts, work: Path,
                 notes: list[str]) -> dict[str, dict[str, Any]]:
    """Pre-train every method (cached); a method that fails is reported and left out."""
    done = {}
    for m in methods:
        method = S.METHODS[m]
        try:
            done[m] = S.pretrain_arm(method.preset, [], mode.pretrain_steps, PRETRAIN_SEED,
                                     cohorts=cohorts, work=work)
        except Exception as exc:  # noqa: BLE001 - one broken method must not sink the study
            msg = f"{m}: pre-training failed, arm left out: {type(exc).__name__}: {exc}"
            print(msg)
            notes.append(msg[:500])
            continue
        arm = done[m]
        print(f"pretrained {m} ({method.preset}): {arm['wall_s']:.1f} s, final loss "
              f"{arm['final_loss']:.4f}{' (cached)' if arm['cached'] else ''}", flush=True)
    return done


def finetune_all(plan: list[dict[str, Any]], pretrained: dict[str, dict[str, Any]], mode: Mode,
                 cohorts: S.Cohorts, work: Path) -> dict[str, dict[float, list[dict]]]:
    """Fine-tune every arm on every (fraction, seed); arms alternate so partial runs balance."""
    runs: dict[str, dict[float, list[dict]]] = {a["arm"]: {} for a in plan}
    for fraction in mode.fractions:
        for seed in mode.seeds:
            for a in plan:
                enc = pretrained.get(a["method"]) if a["method"] else None
                r = S.finetune_arm(a["network"], a["size"], enc, fraction, seed,
                                   mode.finetune_steps, cohorts=cohorts, work=work)
                runs[a["arm"]].setdefault(fraction, []).append(r)
                print(f"{a['arm']:18s} f={fraction:.2f} seed={seed}: dice {r['dice']:.3f} "
                      f"nsd {r['nsd']:.3f} ({r['finetune_s'] + r['eval_s']:.0f} s"
                      f"{', cached' if r['cached'] else ''})", flush=True)
            _check_same_cases(runs, fraction, seed)
    return runs


def _check_same_cases(runs: dict[str, dict[float, list[dict]]], fraction: float,
                      seed: int) -> None:
    """Every arm must train on the same cases for a given (fraction, seed)."""
    seen = {tuple(cell[fraction][-1]["train_cases"]) for cell in runs.values()
            if fraction in cell}
    if len(seen) > 1:
        raise SystemExit(f"arms trained on different cases at fraction {fraction}, seed {seed}")


def report(plan: list[dict[str, Any]], runs: dict[str, dict[float, list[dict]]],
           mode: Mode) -> dict[str, Any]:
    """Summaries per arm and fraction, gains over each architecture's scratch arm, RESULT lines
    and the printed table."""
    summary = {a["arm"]: {_pct(f): S.summarize_runs(rs) for f, rs in runs[a["arm"]].items()}
               for a in plan}
    gains: dict[str, dict[str, dict[str, float]]] = {}
    for a in plan:
        base = f"scratch-{a['network']}"
        if a["method"] is None or base not in summary:
            continue
        gains[a["arm"]] = {
            p: {m: summary[a["arm"]][p][m]["mean"] - summary[base][p][m]["mean"]
                for m in ("dice", "nsd")} for p in summary[a["arm"]]}
    for arm, cells in summary.items():
        for p, cell in cells.items():
            for m in ("dice", "nsd"):
                S.result_line(f"{m}_{_id(arm)}_{p}", cell[m]["mean"])
    for arm, cells in gains.items():
        for p, g in cells.items():
            S.result_line(f"dice_gain_{_id(arm)}_vs_scratch_{p}", g["dice"])
    header = ["arm", "network"] + [f"{m} {_pct(f)}%" for m in ("Dice", "NSD")
                                   for f in mode.fractions]
    rows = [[a["arm"], a["network"]] + [S.pm(summary[a["arm"]][_pct(f)][m])
                                        for m in ("dice", "nsd") for f in mode.fractions]
            for a in plan]
    text = S.table(header, rows)
    print(f"\nLabel efficiency (Table IV shape), mean ± std over seeds {list(mode.seeds)}, %:")
    print(text)
    return {"summary": summary, "gains_vs_scratch": gains, "table": text.split("\n")}


def _pct(fraction: float) -> str:
    return str(round(100 * fraction))


def _id(arm: str) -> str:
    return arm.replace("-", "_")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    mode = resolve_mode(args)
    watch, t0, notes = S.CpuWatch(), time.perf_counter(), []
    cohorts = S.build_cohorts(mode.cohort, args.work)
    notes += cohorts.notes
    t_cohort = time.perf_counter() - t0
    pretrained = pretrain_all(args.methods, mode, cohorts, args.work, notes)
    t_pre = time.perf_counter() - t0 - t_cohort
    for m, arm in pretrained.items():
        S.result_line(f"pretrain_s_{_id(m)}", arm["wall_s"])
    plan = arms([m for m in args.methods if m in pretrained])
    runs = finetune_all(plan, pretrained, mode, cohorts, args.work)
    t_ft = time.perf_counter() - t0 - t_cohort - t_pre
    out = report(plan, runs, mode)
    wall, target = S.finish_line("label_efficiency", args.quick, args.out, t0)
    if target is None:
        return 0
    payload = {
        "benchmark": "label_efficiency", "mode": "quick" if args.quick else "full",
        "settings": {"pretrain_steps": mode.pretrain_steps, "pretrain_seed": PRETRAIN_SEED,
                     "finetune_steps": mode.finetune_steps, "fractions": list(mode.fractions),
                     "seeds": list(mode.seeds), "downstream_preset": S.DOWNSTREAM,
                     "std": "sample std over seeds (ddof 1); 0 for one seed",
                     "scored": "last weights, test = the datalist's validation cases"},
        "cohorts": {"spec": S.asdict(mode.cohort), "key": cohorts.key,
                    "train_cases": cohorts.train_cases, "test_cases": cohorts.test_cases,
                    "real_ct_in_pretraining": cohorts.real_ct},
        "arms": plan, "pretraining": pretrained, **out,
        "phase_wall_s": {"cohorts": t_cohort, "pretraining": t_pre, "finetuning": t_ft},
        "notes": notes}
    S.write_result(target, payload, watch, wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
