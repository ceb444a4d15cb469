"""MiM ablations (the paper's Tables VIII, IX, X, XII and the number of levels) at study scale.

Every variant pre-trains the ``study`` preset (MiM, L = 3) with the same budget as
``label_efficiency.py`` (same steps, batch and seed) with one group of ``--set`` overrides, then
MiM-UNETR is fine-tuned on one label fraction with several seeds (the ``study-phantom`` recipe)
and scored on the held-out phantoms. Per variant: downstream Dice / NSD mean ± std over seeds
and the final pre-training loss (mean of the last 10% of steps; its terms differ by variant, so
compare it within a table only). The baseline and the scratch row are the label-efficiency
study's MiM and scratch MiM-UNETR cells when the settings match (shared cache under ``--work``).

    PYTHONPATH=src .venv/bin/python benchmarks/ablations.py           # full, ~30 min
    PYTHONPATH=src .venv/bin/python benchmarks/ablations.py --quick   # smoke, ~1 min

Prints ``RESULT <name> <value>`` lines and writes benchmarks/results/ablations.json
(``--quick`` writes only when ``--out`` is given).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _study as S  # the shared machinery sits beside this script
from label_efficiency import FULL as LE_FULL  # the same budget as label efficiency
from label_efficiency import PRETRAIN_SEED
from label_efficiency import QUICK as LE_QUICK

_OFF2 = "loss.align_pairs=[false,false]"


@dataclass(frozen=True)
class Variant:
    """One pre-training variant: the table it belongs to, its label and its overrides."""

    name: str
    table: str
    label: str
    overrides: tuple[str, ...] | None  # None: no pre-training (scratch)


VARIANTS: tuple[Variant, ...] = (
    Variant("baseline", "all", "MiM (R1+R2+R3, C12+C23, masked, InfoNCE, concurrent, L=3)", ()),
    Variant("recon_l1", "VIII", "R1 only", ("loss.recon_levels=[true,false,false]", _OFF2)),
    Variant("recon_l12", "VIII", "R1+R2", ("loss.recon_levels=[true,true,false]", _OFF2)),
    Variant("recon_l123", "VIII", "R1+R2+R3, no alignment", (_OFF2,)),
    Variant("recon_l12_align12", "VIII", "R1+R2 + C12",
            ("loss.recon_levels=[true,true,false]", "loss.align_pairs=[true,false]")),
    Variant("children_unmasked", "IX", "children from unmasked units", ("geometry.source=unmasked",)),
    Variant("byol", "X", "BYOL alignment", ("loss.alignment=byol",)),
    Variant("coarse_to_fine", "XII", "coarse-to-fine weights", ("loss.schedule=coarse_to_fine",)),
    Variant("fine_to_coarse", "XII", "fine-to-coarse weights", ("loss.schedule=fine_to_coarse",)),
    Variant("level1_only", "XII", "level 1 weight only", ("loss.schedule=level1_only",)),
    Variant("levels_1", "L", "L = 1 (64^3 crop, no children)",
            ("geometry.crop_sizes=[[64,64,64]]", "geometry.mask_ratios=[0.6]",
             "geometry.gammas=[]", "loss.alignment=none")),
    Variant("levels_2", "L", "L = 2 (64^3 -> 2 x 32^3)",
            ("geometry.crop_sizes=[[64,64,64],[32,32,32]]", "geometry.mask_ratios=[0.6,0.6]",
             "geometry.gammas=[2]")),
    Variant("scratch", "all", "MiM-UNETR from scratch", None),
)


@dataclass(frozen=True)
class Mode:
    """Budget of one mode: pre-training and fine-tuning steps as in label efficiency."""

    cohort: S.CohortSpec
    pretrain_steps: int
    finetune_steps: int
    fraction: float
    seeds: tuple[int, ...]


FULL = Mode(LE_FULL.cohort, LE_FULL.pretrain_steps, LE_FULL.finetune_steps, fraction=0.5,
            seeds=(0, 1))
# label efficiency's quick budget at 100 % labels: on one --work both share their common runs
QUICK = Mode(LE_QUICK.cohort, LE_QUICK.pretrain_steps, LE_QUICK.finetune_steps, fraction=1.0,
             seeds=LE_QUICK.seeds)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    ap.add_argument("--work", type=Path, default=S.REPO / "runs" / "studies",
                    help="cohorts and cached runs (default runs/studies, shared with "
                         "label_efficiency.py)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON path")
    return ap.parse_args(argv)


def run_variant(v: Variant, mode: Mode, cohorts: S.Cohorts, work: Path) -> dict[str, Any]:
    """Pre-train (cached) and fine-tune one variant on every seed."""
    method = S.METHODS["mim"]
    pre = None
    if v.overrides is not None:
        pre = S.pretrain_arm(method.preset, list(v.overrides), mode.pretrain_steps,
                             PRETRAIN_SEED, cohorts=cohorts, work=work)
        print(f"{v.name}: pre-trained in {pre['wall_s']:.1f} s, final loss "
              f"{pre['final_loss']:.4f}{' (cached)' if pre['cached'] else ''}", flush=True)
    runs = []
    for seed in mode.seeds:
        r = S.finetune_arm(method.network, method.size, pre, mode.fraction, seed,
                           mode.finetune_steps, cohorts=cohorts, work=work)
        print(f"{v.name:18s} seed={seed}: dice {r['dice']:.3f} nsd {r['nsd']:.3f} "
              f"({r['finetune_s'] + r['eval_s']:.0f} s{', cached' if r['cached'] else ''})",
              flush=True)
        runs.append(r)
    return {"table": v.table, "label": v.label,
            "overrides": list(v.overrides) if v.overrides is not None else None,
            "pretraining": pre, **S.summarize_runs(runs)}


def report(results: dict[str, dict[str, Any]], mode: Mode) -> list[str]:
    """RESULT lines and the printed table (differences to the baseline in Dice points)."""
    base = results["baseline"]["dice"]["mean"]
    rows = []
    for name, r in results.items():
        pre = r["pretraining"]
        loss = pre["final_loss"] if pre else None
        S.result_line(f"ablation_dice_{name}", r["dice"]["mean"])
        S.result_line(f"ablation_nsd_{name}", r["nsd"]["mean"])
        if loss is not None:
            S.result_line(f"ablation_pretrain_loss_{name}", loss)
        rows.append([r["table"], name, S.pm(r["dice"]), S.pm(r["nsd"]),
                     f"{100 * (r['dice']['mean'] - base):+5.1f}",
                     "-" if loss is None else f"{loss:.4f}",
                     "-" if pre is None else f"{pre['wall_s']:.0f}"])
    text = S.table(["table", "variant", "Dice %", "NSD %", "dDice", "pre-train loss",
                    "pre-train s"], rows)
    print(f"\nAblations: MiM-UNETR, {round(100 * mode.fraction)}% labels, mean ± std over "
          f"seeds {list(mode.seeds)}:")
    print(text)
    return text.split("\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    mode = QUICK if args.quick else FULL
    watch, t0 = S.CpuWatch(), time.perf_counter()
    cohorts = S.build_cohorts(mode.cohort, args.work)
    results, notes = {}, list(cohorts.notes)
    for v in VARIANTS:
        try:
            results[v.name] = run_variant(v, mode, cohorts, args.work)
        except Exception as exc:  # noqa: BLE001 - report a broken variant, keep the others
            msg = f"{v.name}: failed, left out: {type(exc).__name__}: {exc}"
            print(msg)
            notes.append(msg[:500])
    if "baseline" not in results:
        raise SystemExit("the baseline variant failed; see the messages above")
    lines = report(results, mode)
    wall, target = S.finish_line("ablations", args.quick, args.out, t0)
    if target is None:
        return 0
    payload = {
        "benchmark": "ablations", "mode": "quick" if args.quick else "full",
        "settings": {"pretrain_preset": S.METHODS["mim"].preset,
                     "pretrain_steps": mode.pretrain_steps, "pretrain_seed": PRETRAIN_SEED,
                     "finetune_steps": mode.finetune_steps, "fraction": mode.fraction,
                     "seeds": list(mode.seeds), "network": S.METHODS["mim"].network,
                     "downstream_preset": S.DOWNSTREAM,
                     "std": "sample std over seeds (ddof 1); 0 for one seed"},
        "cohorts": {"spec": S.asdict(mode.cohort), "key": cohorts.key,
                    "test_cases": cohorts.test_cases, "real_ct_in_pretraining": cohorts.real_ct},
        "variants": results, "table": lines, "notes": notes}
    S.write_result(target, payload, watch, wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
