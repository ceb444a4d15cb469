"""nnU-Net v2 from scratch vs. nnU-Net v2 with a MiM encoder: same dataset, same folds, scored by
nnU-Net itself. CPU scale by default (phantoms, 1 epoch); the commands are what scales.

Per fold F the two arms are nnU-Net's own commands (see README "nnU-Net v2"):

    scratch: nnUNetv2_train D 3d_fullres F -tr TRAINER -device DEV            (nnUNetPlans)
    mim3d:   mim3d nnunet ENCODER --dataset D
             nnUNetv2_preprocess -d D -plans_name nnUNetPlans_mim3d -c 3d_fullres
             nnUNetv2_train D 3d_fullres F -p nnUNetPlans_mim3d -tr TRAINER -device DEV \\
                 -pretrained_weights $nnUNet_preprocessed/Dataset<D>_*/mim3d_pretrained.pth

Both read nnU-Net's ``splits_final.json`` (one split file for the dataset, so the folds are the
same cases), and nnU-Net's end-of-training validation scores the held-out cases
(``fold_F/validation/summary.json``, what ``nnUNetv2_evaluate_folder`` computes). Without
``--encoder`` a tiny MiM encoder is pre-trained on separate phantoms for ``--pretrain-steps``.

Prints ``RESULT <name> <value>`` lines and writes benchmarks/results/nnunet_compare.json with
the machine. Numbers at CPU scale (tiny network, one epoch) mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _study as S  # the shared machinery sits beside this script

from mim3d.config import load_config
from mim3d.data.phantom import write_cohort
from mim3d.engine.pretrain import pretrain
from mim3d.integrations.nnunet import write_handoff
from mim3d.integrations.nnunet_data import PHANTOM_CLASSES, run_nnunet, write_phantom_dataset
from mim3d.transfer import export_encoder

#: the tiny preset shrunk to CPU scale (as the tests' SHRINK)
_SMALL = ["model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]", "model.num_heads=2",
          "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
          "model.proj_dim=32", "train.workers=0"]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _encoder(work: Path, steps: int, seed: int) -> Path:
    """A tiny MiM encoder pre-trained on phantoms that are not in the nnU-Net dataset."""
    cohort = write_cohort(work / "pretrain_data", 4, seed=seed + 1000, shape=(64, 64, 64),
                          spacing=(3.0, 3.0, 3.0)).parent
    cfg = load_config("pretrain", "tiny", overrides=[*_SMALL, f"train.seed={seed}"])
    pretrain(cfg, data=cohort, out=work / "pretrain", max_steps=steps, progress=False)
    return export_encoder(work / "pretrain", work / "encoder.safetensors")[0]


def _dice(model: Path, fold: int) -> float:
    summary = json.loads((model / f"fold_{fold}" / "validation" / "summary.json").read_text())
    return float(summary["foreground_mean"]["Dice"])


def _arm(args: argparse.Namespace, env: dict[str, str], fold: int, plans: str,
         weights: Path | None, log: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    cmd = [_bin("nnUNetv2_train"), str(args.dataset), "3d_fullres", str(fold), "-p", plans,
           "-tr", args.trainer, "-device", args.device]
    run_nnunet(cmd + (["-pretrained_weights", str(weights)] if weights else []),
               env={**env, "nnUNet_n_proc_DA": str(args.da_workers)}, timeout=args.timeout,
               log=log)
    results = Path(env["nnUNet_results"])
    model = next(results.glob(f"Dataset{args.dataset:03d}_*")) / \
        f"{args.trainer}__{plans}__3d_fullres"
    return {"dice": _dice(model, fold), "train_s": time.perf_counter() - t0}


def _prepare(args: argparse.Namespace, work: Path) -> tuple[dict[str, str], Path, Path]:
    raw = work / "nnUNet_raw"
    write_phantom_dataset(raw, args.dataset, args.cases, shape=tuple(args.shape),
                          spacing=(4.0, 4.0, 4.0), seed=args.seed)
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(work / "pre"),
           "nnUNet_results": str(work / "results"), "nnUNet_compile": "false",
           "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"}
    log = work / "nnunet.log"
    run_nnunet([_bin("nnUNetv2_plan_and_preprocess"), "-d", str(args.dataset), "-c",
                "3d_fullres", "-np", "1", "-npfp", "1"], env=env, timeout=args.timeout, log=log)
    encoder = Path(args.encoder) if args.encoder else _encoder(work, args.pretrain_steps,
                                                               args.seed)
    handoff = write_handoff(encoder, args.dataset, patch_size=args.patch_size, environ=env)
    print(handoff.summary())
    run_nnunet([_bin("nnUNetv2_preprocess"), "-d", str(args.dataset), "-plans_name",
                "nnUNetPlans_mim3d", "-c", "3d_fullres", "-np", "1"], env=env,
               timeout=args.timeout, log=log)
    return env, handoff.weights, log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/nnunet_compare", help="working folder (nnU-Net's)")
    p.add_argument("--encoder", default=None, help="MiM encoder (default: pre-train a tiny one)")
    p.add_argument("--pretrain-steps", type=int, default=20, help="steps of that pre-training")
    p.add_argument("--dataset", type=int, default=502, help="nnU-Net dataset id to create")
    p.add_argument("--cases", type=int, default=5, help="phantom cases (5 -> 5 folds of 1)")
    p.add_argument("--shape", type=int, nargs=3, default=(32, 32, 32), help="voxels per case")
    p.add_argument("--folds", type=int, nargs="+", default=[0], help="nnU-Net folds to train")
    p.add_argument("--patch-size", type=int, nargs=3, default=(16, 16, 16),
                   help="mim3d plans patch size (default 16^3 for the CPU; omit for nnU-Net's)")
    p.add_argument("--trainer", default="nnUNetTrainer_1epoch", help="nnU-Net trainer (-tr)")
    p.add_argument("--device", default="cpu", help="nnU-Net -device (cpu, cuda)")
    p.add_argument("--da-workers", type=int, default=0, help="nnUNet_n_proc_DA for training")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per nnU-Net command")
    p.add_argument("--seed", type=int, default=0, help="seeds the phantoms and the encoder")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args()
    watch, t0 = S.CpuWatch(), time.perf_counter()
    work = Path(args.work)
    env, weights, log = _prepare(args, work)
    folds = {}
    for fold in args.folds:
        folds[fold] = {"scratch": _arm(args, env, fold, "nnUNetPlans", None, log),
                       "mim3d": _arm(args, env, fold, "nnUNetPlans_mim3d", weights, log)}
        for arm, res in folds[fold].items():
            S.result_line(f"nnunet_{arm}_dice_fold{fold}", res["dice"])
    for arm in ("scratch", "mim3d"):
        S.result_line(f"nnunet_{arm}_dice_mean", sum(f[arm]["dice"] for f in folds.values())
                      / len(folds))
    wall, _ = S.finish_line("nnunet_compare", False, None, t0)
    payload = {"folds": folds, "classes": list(PHANTOM_CLASSES), "settings": vars(args),
               "notes": ["CPU scale: tiny encoder, one epoch; the commands are what scales.",
                         (f"mim3d arm patch {args.patch_size} (None: nnU-Net's, rounded to "
                         "tokens); the scratch arm trains nnU-Net's planned patch")]}
    S.write_result(Path(args.out) if args.out else S.RESULTS / "nnunet_compare.json", payload,
                   watch, wall)


if __name__ == "__main__":
    main()
