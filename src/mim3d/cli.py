"""Command line: thin entry points over library functions (``mim3d <command> --help``).

Every command exits non-zero with one clear line on bad input. Library errors are
``ValueError`` subclasses (config, image, geometry, checkpoint errors) or ``FileNotFoundError``;
:func:`main` turns them into ``mim3d <command>: error: <message>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mim3d import __version__

Handler = Callable[[argparse.Namespace], int]

#: Command groups living in :mod:`mim3d.commands` (each module has ``register(sub)``).
_COMMAND_MODULES: tuple[str, ...] = ("deploy", "presets", "store", "nnunet")


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
    from mim3d.data.prepare import parse_shard, prepare

    cfg = load_config(_preset_kind(args.preset), args.preset, config_file=args.config,
                      overrides=args.overrides)
    geometry = getattr(cfg, "geometry", None)  # pretrain presets: padded crops get counted
    min_size = None if args.min_size is None else (
        args.min_size * 3 if len(args.min_size) == 1 else args.min_size)
    if min_size is not None and len(min_size) != 3:
        raise ValueError(f"--min-size takes 1 or 3 sizes, got {len(args.min_size)}")
    report = prepare(args.inputs, args.out, data=cfg.data, workers=args.workers,
                     fmt=args.format, shard=parse_shard(args.shard) if args.shard else None,
                     min_size=min_size, coarse_axes=args.coarse_axes,
                     crop_size=geometry.crop_sizes[0] if geometry is not None else None)
    print(f"prepared {report.prepared}, skipped (already in store) {report.skipped}, "
          f"quarantined {report.quarantined} -> {report.store}")
    for line in report.messages[:-1]:
        if not line.startswith("quarantined "):  # busy cases and padding notes
            print(line)
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
    from mim3d.engine.loop import stop_exit_code
    from mim3d.engine.pretrain import pretrain

    cfg = load_config("pretrain", args.preset, config_file=args.config, overrides=args.overrides)
    result = pretrain(cfg, data=args.data, out=args.out, max_steps=args.max_steps,
                      resume=args.resume)
    if result.checkpoint is not None:
        print(f"step {result.step}: checkpoint {result.checkpoint}; metrics {result.metrics}")
    return stop_exit_code(result.stop_signal)  # 143 / 130 when SIGTERM / SIGINT stopped it


def cmd_demo(args: argparse.Namespace) -> int:
    from mim3d.engine.demo import run_demo
    from mim3d.engine.loop import stop_exit_code

    record = run_demo(Path(args.out), steps=args.steps, cases=args.cases, seed=args.seed,
                      echo=print)
    return stop_exit_code(record.stop_signal)


def cmd_masks(args: argparse.Namespace) -> int:
    from mim3d.config import load_config
    from mim3d.engine.inspect import mask_preview

    cfg = load_config("pretrain", args.preset, config_file=args.config, overrides=args.overrides)
    json_path, png_path = mask_preview(args.input, args.out, cfg, seed=args.seed)
    print(f"wrote {json_path} and {png_path}")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from mim3d.engine.inspect import visualize_checkpoint

    folder = visualize_checkpoint(args.run, args.input, args.out, seed=args.seed,
                                  sample=args.sample, volume=args.volume)
    print(f"wrote {args.out} (checkpoint {folder})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from mim3d.config import load_config
    from mim3d.engine.finetune import finetune
    from mim3d.engine.loop import stop_exit_code
    from mim3d.hub import resolve_encoder

    overrides = [*args.overrides, f"task.task={args.task}"]
    cfg = load_config("downstream", args.preset, config_file=args.config, overrides=overrides)
    pretrained = resolve_encoder(args.pretrained) if args.pretrained else None
    result = finetune(cfg, data=args.data, out=args.out, pretrained=pretrained,
                      network=args.network, size=args.size, label_fraction=args.label_fraction,
                      lora_rank=args.lora_rank, max_steps=args.max_steps, resume=args.resume,
                      fold=args.fold, folds=args.folds)
    print(f"step {result.step}: last {result.last_checkpoint}; best {result.best_checkpoint} "
          f"(score {result.best_score}); metrics {result.metrics}")
    return stop_exit_code(result.stop_signal)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mim3d", description="MiM (Mask in Mask) pre-training for 3D CT, and its downstream use.")
    parser.add_argument("--version", action="version", version=f"mim3d {__version__}")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true",
                       help="log warnings and errors only (results are still printed)")
    level.add_argument("-v", "--verbose", action="store_true",
                       help="log debug messages too, each with the module that wrote it")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_data_commands(sub)
    _add_pretrain_commands(sub)
    _add_finetune_command(sub)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"mim3d.commands.{name}").register(sub)
    return parser


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """``prepare`` and ``phantoms``."""
    p = sub.add_parser("prepare", help="read CT volumes once into a prepared, crop-friendly store")
    p.add_argument("inputs", nargs="+", help="files, DICOM folders, folders, datalist JSON, "
                   "nnU-Net dataset folders or .txt lists of paths")
    p.add_argument("--out", required=True, help="store folder (created; re-running resumes)")
    p.add_argument("--workers", type=int, default=2, help="parallel reader processes")
    p.add_argument("--format", choices=("blosc2", "npy"), default=None,
                   help="array format of a new store: blosc2 (compressed, chunked, the "
                   "default) or npy (raw, no compression); an existing store keeps its own")
    p.add_argument("--coarse-axes", choices=("kept", "resampled"), default=None,
                   help="a new store keeps axes at least 1.2x coarser than the preset's spacing "
                   "(thick slices) at their source spacing and interpolates them when a crop is "
                   "read (kept, the default: fewer bytes), or stores every case resampled "
                   "(resampled: faster crops); an existing store keeps its own")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="prepare only part I of N of the inputs (0 <= I < N); run N processes "
                   "or nodes into one --out, or into parts joined by `mim3d store merge`")
    p.add_argument("--min-size", type=int, nargs="+", default=None, metavar="N",
                   help="quarantine volumes smaller than N (or X Y Z) voxels after resampling, "
                   "instead of padding their crops with air")
    _add_config_args(p, "base")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("phantoms", help="write synthetic CT phantoms with BTCV-style labels")
    p.add_argument("--out", required=True, help="output folder (imagesTr/, labelsTr/, dataset.json)")
    p.add_argument("--n", type=int, default=8, help="number of cases")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the cohort: the same seed writes the same phantoms (default 0)")
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96), metavar=("X", "Y", "Z"),
                   help="voxels per axis, RAS order (default 128 128 96)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.0),
                   metavar=("SX", "SY", "SZ"), help="voxel size in mm (default 1.5 1.5 2.0)")
    p.set_defaults(func=cmd_phantoms)


def _add_pretrain_commands(sub: argparse._SubParsersAction) -> None:
    """``pretrain``, ``demo``, ``masks`` and ``visualize``."""
    p = sub.add_parser("pretrain", help="MiM (or baseline) pre-training, single process or under torchrun")
    p.add_argument("--data", required=True, help="a prepared store, or raw inputs as for prepare")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (the LR schedule is unchanged)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    _add_config_args(p, "base")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="phantoms + tiny MiM pre-training on the CPU "
                       "(about 4 min on 2 idle cores)")
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps of a new demo run (default 80; a rerun keeps its own)")
    p.add_argument("--cases", type=int, default=8, help="phantom cases to generate")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the phantoms, the masks and the run (default 0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("masks", help="the nested level boxes and masks of one CT (JSON + PNG)")
    p.add_argument("--input", required=True, help="CT file or DICOM series folder")
    p.add_argument("--out", required=True, help="output folder (levels.json, levels.png)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the masks: the same seed draws the same levels (default 0)")
    _add_config_args(p, "base")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("visualize",
                       help="reconstructions of a checkpoint on any CT (tri-planar, radiological)")
    p.add_argument("run", metavar="RUN_OR_CKPT", help="run folder or ckpt_* folder")
    p.add_argument("--input", required=True, nargs="+", metavar="CT",
                   help="CT file(s) or DICOM series folder(s); several form one batch")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--seed", type=int, default=0, help="seeds the masks")
    p.add_argument("--sample", type=int, default=0, metavar="I",
                   help="which --input CT (batch sample) to draw (default 0)")
    p.add_argument("--volume", default="", metavar="ID",
                   help="volume to follow below level 1, as the ids of levels.json: L2.3 or "
                   "L3.2.1 (default: the first child at each level)")
    p.set_defaults(func=cmd_visualize)


def _add_finetune_command(sub: argparse._SubParsersAction) -> None:
    """``finetune``."""
    p = sub.add_parser("finetune", help="fine-tune a segmentation or classification network")
    p.add_argument("--task", choices=("seg", "cls"), default="seg",
                   help="seg (voxel labels) or cls (one class per volume); default seg")
    p.add_argument("--data", required=True, help="datalist JSON, nnU-Net dataset or folder")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--pretrained", default=None, help="encoder: ENCODER.safetensors from mim3d "
                   "export, a Hugging Face folder, or hf://OWNER/NAME[@REV]")
    p.add_argument("--network", default=None,
                   choices=("mim-unetr", "unetr", "swinunetr", "classifier"),
                   help="default: mim-unetr (seg) or classifier (cls)")
    p.add_argument("--size", default="base", help="encoder size: tiny, small or base")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="share of the training split used (nested subsets)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (4, 8, 16)")
    p.add_argument("--fold", type=int, default=0,
                   help="held-out validation fold, 0..FOLDS-1, when the datalist has no "
                   "validation list (default 0)")
    p.add_argument("--folds", type=int, default=5,
                   help="number of folds the training cases are cut into when the datalist "
                   "has no validation list (default 5)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (the LR schedule is unchanged)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out")
    _add_config_args(p, "btcv")
    p.set_defaults(func=cmd_finetune)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not when it was built), so
    a redirected or captured stderr (tests, notebooks) never receives a stale stream."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging(quiet: bool, verbose: bool) -> None:
    """Library messages (``logging.getLogger(__name__)`` under ``mim3d``) go to stderr: INFO by
    default, WARNING with ``--quiet``, DEBUG with ``-v``. Results stay on stdout (``print``)."""
    logger = logging.getLogger("mim3d")
    for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(old)  # main() may run several times in one process (tests)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(
        "%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet, args.verbose)
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
