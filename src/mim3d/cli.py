"""Command line: thin entry points over library functions (``mim3d <command> --help``).

Every command exits non-zero with one clear line on bad input. Library errors are
``ValueError`` subclasses (config, image, geometry, checkpoint errors) or ``FileNotFoundError``;
:func:`main` turns them into ``mim3d <command>: error: <message>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mim3d import __version__

Handler = Callable[[argparse.Namespace], int]

#: Command groups living in :mod:`mim3d.commands` (each module has ``register(sub)``).
_COMMAND_MODULES: tuple[str, ...] = ()


def _add_config_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", default=default_preset, help=f"preset name (default {default_preset})")
    p.add_argument("--config", default=None, help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value, e.g. --set optim.lr=3e-4 (repeatable)")


def _preset_kind(name: str) -> str:
    from mim3d.config import ConfigError, preset_names

    for kind in ("pretrain", "downstream"):
        if name in preset_names(kind):
            return kind
    every = preset_names("pretrain") + preset_names("downstream")
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(every)}")


def cmd_prepare(args: argparse.Namespace) -> int:
    from mim3d.config import load_config
    from mim3d.data.prepare import prepare

    cfg = load_config(_preset_kind(args.preset), args.preset, config_file=args.config,
                      overrides=args.overrides)
    report = prepare(args.inputs, args.out, data=cfg.data, workers=args.workers)
    print(f"prepared {report.prepared}, skipped (already in store) {report.skipped}, "
          f"quarantined {report.quarantined} -> {report.store}")
    if report.quarantined:
        print(f"reasons: {Path(report.store) / 'quarantine.jsonl'}")
    if report.in_store == 0:
        print("mim3d prepare: error: no usable case remains; see the quarantine file",
              file=sys.stderr)
        return 1
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    from mim3d.data.phantom import write_cohort

    datalist = write_cohort(args.out, args.n, seed=args.seed, shape=tuple(args.shape),
                            spacing=tuple(args.spacing))
    print(f"wrote {args.n} phantom cases and the datalist {datalist}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mim3d.config import load_config
    from mim3d.engine.pretrain import pretrain

    cfg = load_config("pretrain", args.preset, config_file=args.config, overrides=args.overrides)
    result = pretrain(cfg, data=args.data, out=args.out, max_steps=args.max_steps,
                      resume=args.resume)
    if result.checkpoint is not None:
        print(f"step {result.step}: checkpoint {result.checkpoint}; metrics {result.metrics}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mim3d.engine.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, cases=args.cases, seed=args.seed)
    return 0


def cmd_masks(args: argparse.Namespace) -> int:
    from mim3d.config import load_config
    from mim3d.engine.inspect import mask_preview

    cfg = load_config("pretrain", args.preset, config_file=args.config, overrides=args.overrides)
    json_path, png_path = mask_preview(args.input, args.out, cfg, seed=args.seed)
    print(f"wrote {json_path} and {png_path}")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from mim3d.engine.inspect import visualize_checkpoint

    folder = visualize_checkpoint(args.run, args.input, args.out, seed=args.seed)
    print(f"wrote {args.out} (checkpoint {folder})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mim3d.transfer import export_encoder, import_official

    if (args.run is None) == (args.from_official is None):
        raise ValueError("give either RUN_OR_CKPT or --from-official FILE (one of them)")
    if args.from_official is not None:
        weights, card, report = import_official(args.from_official, args.out)
        print(report.summary())
    else:
        weights, card = export_encoder(args.run, args.out)
    print(f"wrote {weights} and its card {card}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from mim3d.config import load_config
    from mim3d.engine.finetune import finetune

    overrides = [*args.overrides, f"task.task={args.task}"]
    cfg = load_config("downstream", args.preset, config_file=args.config, overrides=overrides)
    result = finetune(cfg, data=args.data, out=args.out, pretrained=args.pretrained,
                      network=args.network, size=args.size, label_fraction=args.label_fraction,
                      lora_rank=args.lora_rank, max_steps=args.max_steps, resume=args.resume,
                      fold=args.fold, folds=args.folds)
    print(f"step {result.step}: last {result.last_checkpoint}; best {result.best_checkpoint} "
          f"(score {result.best_score}); metrics {result.metrics}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mim3d.engine.predict import evaluate_run

    json_path, csv_path = evaluate_run(args.run, data=args.data, out_json=args.out,
                                       checkpoint=args.checkpoint)
    print(f"wrote {json_path} and {csv_path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mim3d.engine.predict import predict_volume

    label_path, json_path = predict_volume(args.model, args.input, args.output,
                                           checkpoint=args.checkpoint)
    print(f"wrote {label_path} and its class names {json_path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mim3d", description="MiM (Mask in Mask) pre-training for 3D CT, and its downstream use.")
    parser.add_argument("--version", action="version", version=f"mim3d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="read CT volumes once into a prepared, crop-friendly store")
    p.add_argument("inputs", nargs="+", help="files, DICOM folders, folders, datalist JSON, "
                   "nnU-Net dataset folders or .txt lists of paths")
    p.add_argument("--out", required=True, help="store folder (created; re-running resumes)")
    p.add_argument("--workers", type=int, default=2, help="parallel reader processes")
    _add_config_args(p, "base")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("phantoms", help="write synthetic CT phantoms with BTCV-style labels")
    p.add_argument("--out", required=True, help="output folder (imagesTr/, labelsTr/, dataset.json)")
    p.add_argument("--n", type=int, default=8, help="number of cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.0),
                   metavar=("SX", "SY", "SZ"))
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("pretrain", help="MiM (or baseline) pre-training, single process or under torchrun")
    p.add_argument("--data", required=True, help="a prepared store, or raw inputs as for prepare")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (the LR schedule is unchanged)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    _add_config_args(p, "base")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="phantoms + tiny MiM pre-training on the CPU (a few minutes)")
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100)")
    p.add_argument("--cases", type=int, default=8, help="phantom cases to generate")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("masks", help="the nested level boxes and masks of one CT (JSON + PNG)")
    p.add_argument("--input", required=True, help="CT file or DICOM series folder")
    p.add_argument("--out", required=True, help="output folder (levels.json, levels.png)")
    p.add_argument("--seed", type=int, default=0)
    _add_config_args(p, "base")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("visualize", help="reconstructions of a checkpoint on any CT (tri-planar)")
    p.add_argument("run", metavar="RUN_OR_CKPT", help="run folder or ckpt_* folder")
    p.add_argument("--input", required=True, help="CT file or DICOM series folder")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--seed", type=int, default=0, help="seeds the masks")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("export", help="write a pre-trained encoder as safetensors + JSON card")
    p.add_argument("run", nargs="?", default=None, metavar="RUN_OR_CKPT",
                   help="run folder, ckpt_* folder or model.safetensors of a mim3d run")
    p.add_argument("--from-official", default=None, metavar="FILE",
                   help="import the MiM authors' released checkpoint instead")
    p.add_argument("--out", required=True, help="ENCODER.safetensors to write (card beside it)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("finetune", help="fine-tune a segmentation or classification network")
    p.add_argument("--task", choices=("seg", "cls"), default="seg")
    p.add_argument("--data", required=True, help="datalist JSON, nnU-Net dataset or folder")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--pretrained", default=None, help="ENCODER.safetensors from mim3d export")
    p.add_argument("--network", default=None,
                   choices=("mim-unetr", "unetr", "swinunetr", "classifier"),
                   help="default: mim-unetr (seg) or classifier (cls)")
    p.add_argument("--size", default="base", help="encoder size: tiny, small or base")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="share of the training split used (nested subsets)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (4, 8, 16)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    _add_config_args(p, "btcv")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="Dice / NSD / HD95 (or ACC / AUC) of a fine-tuned run")
    p.add_argument("run", metavar="RUN", help="fine-tuning run folder")
    p.add_argument("--data", required=True, help="datalist (validation/test) or folder")
    p.add_argument("--out", required=True, help="METRICS.json (a per-case CSV goes beside it)")
    p.add_argument("--checkpoint", default="best", help="best, last or a ckpt_* folder")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="label map of a new scan, on the scan's own grid")
    p.add_argument("-i", "--input", required=True, help="CT file or DICOM series folder")
    p.add_argument("-o", "--output", required=True, help="LABELS.nii.gz to write")
    p.add_argument("--model", required=True, help="fine-tuning run folder")
    p.add_argument("--checkpoint", default="best", help="best, last or a ckpt_* folder")
    p.set_defaults(func=cmd_predict)

    for name in _COMMAND_MODULES:
        importlib.import_module(f"mim3d.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    try:
        return int(handler(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"mim3d {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mim3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
