"""``mim3d export``, ``mim3d evaluate`` and ``mim3d predict``: a trained model leaves the run.

``export`` writes a pre-trained encoder (safetensors + card, or a Hugging Face folder) or a
fine-tuned network (ONNX, TorchScript, MONAI bundle); ``evaluate`` scores a fine-tuned run on
labelled cases; ``predict`` writes label maps (NIfTI or DICOM SEG) of new scans. Thin handlers
over :mod:`mim3d.engine.export`, :mod:`mim3d.engine.evaluate` and :mod:`mim3d.engine.predict`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    if (args.run is None) == (args.from_official is None):
        raise ValueError("give either RUN_OR_CKPT or --from-official FILE (one of them)")
    if args.format is not None and args.hf is not None:
        raise ValueError("--hf writes an encoder folder; it does not combine with --format")
    if args.out is None and args.hf is None:
        raise ValueError("give --out ENCODER.safetensors and/or --hf DIR")
    if args.format is not None:
        return _export_network(args)
    return _export_encoder(args)


def _export_encoder(args: argparse.Namespace) -> int:
    import tempfile

    from mim3d.hub import write_hf_folder
    from mim3d.transfer import export_encoder, import_official

    with tempfile.TemporaryDirectory() as tmp:  # holds the encoder file when only --hf is given
        out = args.out or Path(tmp) / "encoder.safetensors"
        if args.from_official is not None:
            weights, card, report = import_official(args.from_official, out)
            print(report.summary())
        else:
            weights, card = export_encoder(args.run, out)
        if args.out is not None:
            print(f"wrote {weights} and its card {card}")
        if args.hf is not None:
            folder = write_hf_folder(weights, args.hf, license_id=args.license)
            print(f"wrote the Hugging Face folder {folder} (config.json, model.safetensors, "
                  "README.md)")
    return 0


def _export_network(args: argparse.Namespace) -> int:
    from mim3d.engine.export import export_run

    if args.from_official is not None:
        raise ValueError("--format exports a fine-tuning run; it does not take --from-official")
    path, meta = export_run(args.run, args.out, fmt=args.format, checkpoint=args.checkpoint)
    check = meta["check"]
    print(f"wrote {path} ({args.format}); its logits match PyTorch's on a batch of "
          f"{check['batch']} within rtol {check['rtol']} / atol {check['atol']} (max |diff| "
          f"{check['max_abs_diff']:.2e})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from mim3d.engine.evaluate import evaluate_run, summary_lines

    json_path, csv_path = evaluate_run(args.run, data=args.data, out_json=args.out,
                                       checkpoint=args.checkpoint, device=args.device)
    print("\n".join(summary_lines(json.loads(Path(json_path).read_text()))))
    print(f"wrote {json_path} and {csv_path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mim3d.engine.predict import PredictOptions, predict_case, prepare_prediction
    from mim3d.engine.predict_batch import is_batch_input, predict_batch

    options = PredictOptions(
        output_type=args.output_type, series_uid=args.series, overwrite=args.overwrite,
        report=Path(args.report) if args.report else None, progress=True,
        preview=Path(args.preview) if args.preview else None)
    if is_batch_input(args.input):
        done = predict_batch(args.model, args.input, args.output, checkpoint=args.checkpoint,
                             device=args.device, options=options)
        for name, why in done.failed.items():
            print(f"mim3d predict: case {name} skipped: {why}", file=sys.stderr)
        print(f"predicted {len(done.predicted)}, already done (skipped) {len(done.skipped)}, "
              f"failed {len(done.failed)} -> {args.output}")
        return 0 if done.predicted or done.skipped or not done.failed else 1
    result = predict_case(*prepare_prediction(args.model, args.input, args.output,
                                              checkpoint=args.checkpoint, device=args.device,
                                              options=options))
    if result.series_note:
        print(result.series_note)
    extra = f", report {result.report}" if result.report else ""
    extra += f", preview {result.preview}" if result.preview else ""
    print(f"wrote {result.labels} and its class names {result.sidecar}{extra}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``mim3d export``, ``mim3d evaluate`` and ``mim3d predict`` to the command line."""
    p = sub.add_parser("export", help="write a pre-trained encoder as safetensors + JSON card")
    p.add_argument("run", nargs="?", default=None, metavar="RUN_OR_CKPT",
                   help="run folder, ckpt_* folder or model.safetensors of a mim3d run")
    p.add_argument("--from-official", default=None, metavar="FILE",
                   help="import the MiM authors' released checkpoint instead")
    p.add_argument("--out", default=None, help="ENCODER.safetensors to write (card beside "
                   "it); with --format: model.onnx, model.ts or the bundle folder")
    p.add_argument("--hf", default=None, metavar="DIR", help="also (or only) write the encoder "
                   "as a Hugging Face folder: config.json, model.safetensors, README.md")
    p.add_argument("--license", default="other",
                   help="licence id for the --hf model card (default other), e.g. apache-2.0")
    p.add_argument("--format", default=None, choices=("onnx", "torchscript", "bundle"),
                   help="export a fine-tuning RUN's whole network instead of an encoder: ONNX "
                   "(onnxruntime), TorchScript, or a MONAI bundle folder")
    p.add_argument("--checkpoint", default="best",
                   help="with --format: best, last or a ckpt_* folder of the run")
    p.set_defaults(func=cmd_export)


    p = sub.add_parser("evaluate", help="Dice / NSD / HD95 (or ACC / AUC) of a fine-tuned run")
    p.add_argument("run", metavar="RUN", help="fine-tuning run folder")
    p.add_argument("--data", required=True, help="datalist (validation/test) or folder")
    p.add_argument("--out", required=True, help="METRICS.json (a per-case CSV goes beside it)")
    p.add_argument("--checkpoint", default="best", help="best, last or a ckpt_* folder")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the network runs (auto: CUDA when available)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="label map of a new scan, on the scan's own grid")
    p.add_argument("-i", "--input", required=True, help="CT file or DICOM series folder; or, "
                   "for many cases, a folder of them, a datalist JSON or a .txt list")
    p.add_argument("-o", "--output", required=True, help="LABELS.nii.gz (or .dcm) to write; "
                   "an output folder for many cases")
    p.add_argument("--model", required=True,
                   help="fine-tuning run folder, or a model.onnx of `mim3d export --format onnx`")
    p.add_argument("--checkpoint", default="best", help="best, last or a ckpt_* folder")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the network runs (auto: CUDA when available)")
    p.add_argument("--output-type", default="nifti", choices=("nifti", "dicom-seg"),
                   help="label map file (default), or a DICOM SEG for a DICOM series input")
    p.add_argument("--series", default=None, metavar="UID",
                   help="SeriesInstanceUID to read from a DICOM folder with several series "
                   "(default: the CT series with the most slices)")
    p.add_argument("--report", default=None, metavar="FILE.json",
                   help="write a report: input, model, preprocessing, device, timings, and "
                   "the volume (mL) and voxel count of every label")
    p.add_argument("--preview", default=None, metavar="PNG",
                   help="draw the labels over the CT (a folder of NAME.png for many cases)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (many cases: redo cases already predicted)")
    p.set_defaults(func=cmd_predict)
