"""``mim3d evaluate``: a fine-tuned run scored on labelled images.

The run is loaded and every image preprocessed as in :mod:`mim3d.engine.inference`; the
prediction is mapped back onto each case's original grid, so metrics are computed at the original
voxel spacing against the original label file.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mim3d.data.transforms import make_dataset, remap_labels
from mim3d.engine.downstream_run import Item, datalist_items, predict_logits, read_cases
from mim3d.engine.inference import LoadedRun, ReadCapture, load_run, segment_case
from mim3d.engine.train import autocast_context
from mim3d.evaluation import summarize, write_reports
from mim3d.metrics import classification_metrics, evaluate_case
from mim3d.runfolder import SPLITS_FILE

__all__ = ["evaluate_run", "evaluation_cases", "summary_lines"]

GRID_NOTE = ("segmentation metrics are computed on each case's original image grid and spacing "
             "(the prediction is mapped back through the inverse of the preprocessing)")


def _labelled(entries: list[Any], task: str) -> bool:
    def ok(e: Any) -> bool:
        label = e.get("label") if isinstance(e, dict) else None
        return isinstance(label, int) if task == "cls" else isinstance(label, (str, list))

    return bool(entries) and all(ok(e) for e in entries)


def evaluation_cases(loaded: LoadedRun, data: str | Path) -> tuple[list[Item], str]:
    """The cases to score and where they came from.

    A datalist gives its labelled ``validation`` list, else its labelled ``test`` list, else
    (when it is the run's own datalist) the run's validation split from ``splits.json``. A
    folder or nnU-Net dataset gives every case, each of which needs a label.

    Raises:
        ValueError: nothing labelled to evaluate.
    """
    path, task = Path(data), loaded.spec["task"]
    if path.suffix.lower() == ".json" and path.is_file():
        raw = json.loads(path.read_text())
        for key in ("validation", "test"):
            if isinstance(raw, dict) and _labelled(raw.get(key) or [], task):
                return datalist_items(path, key, task), f"datalist {key} list"
        splits_path = loaded.run_dir / SPLITS_FILE
        held = json.loads(splits_path.read_text())["validation"] if splits_path.is_file() else []
        if held and str(path.resolve()) == loaded.spec.get("data"):
            train = read_cases(path, task)[0]
            return [c for c in train if c["name"] in set(held)], "the run's validation split"
        raise ValueError(f"{path}: no labelled 'validation' or 'test' list, and the run holds "
                         "out no cases of it; add one or pass labelled cases")
    cases = read_cases(path, task)[0]
    unlabelled = [c["name"] for c in cases if c.get("label") is None]
    if unlabelled:
        raise ValueError(f"{path}: {len(unlabelled)} case(s) have no label (e.g. "
                         f"{unlabelled[0]}); evaluation needs reference labels")
    return cases, "every case of the input"


def evaluate_run(run: str | Path, *, data: str | Path, out_json: str | Path,
                 checkpoint: str | Path = "best", progress: bool = True,
                 device: str | None = None) -> tuple[Path, Path]:
    """Score a fine-tuned run and write ``METRICS.json`` plus a per-case CSV beside it.

    Segmentation: Dice, NSD (the preset's tolerance) and HD95 per class and case on the
    original grid, with mean ± std (``mim3d.metrics`` and ``mim3d.evaluation``: absent-class
    rule and statistics are written into the report). Classification: accuracy and AUC.

    Args:
        run: the run folder of ``mim3d finetune`` (or an exported ``.onnx``).
        data: a datalist JSON (see :func:`evaluation_cases`), an nnU-Net folder or a folder.
        out_json: where the JSON report goes; the CSV gets the same name with ``.csv``.
        checkpoint: ``best``, ``last`` or a checkpoint folder.
        progress: show a progress bar over cases.
        device: ``auto`` (default), ``cpu`` or ``cuda``.

    Returns:
        ``(json_path, csv_path)``.
    """
    loaded = load_run(run, checkpoint=checkpoint, device=device)
    cases, source = evaluation_cases(loaded, data)
    cfg, capture = loaded.cfg, ReadCapture()
    ds = make_dataset(cases, cfg.data, cfg.task, train=False, cache=False, reader=capture)
    extra = {**loaded.describe(), "data": str(Path(data).resolve()), "cases_from": source,
             "task": cfg.task.task, "classes": loaded.spec["classes"]}
    bar = tqdm(range(len(ds)), desc="evaluate", unit="case", disable=not progress)
    if cfg.task.task == "cls":
        return _evaluate_cls(loaded, ds, cases, bar, Path(out_json), extra)
    ids = [int(i) for i in loaded.spec["classes"]]
    names = [loaded.spec["classes"][str(i)] for i in ids]
    per_case = {}
    for i in bar:
        pred = segment_case(loaded, ds, i, capture)[0]
        label = capture.get(cases[i]["label"])
        gt = remap_labels(np.asarray(label.array), ids, aliases=cfg.task.label_aliases)
        per_case[cases[i]["name"]] = evaluate_case(
            pred, gt, spacing=label.spacing, class_ids=ids, class_names=names,
            nsd_tolerance_mm=cfg.task.nsd_tolerance_mm)
        capture.volumes.clear()  # one case in memory at a time
    extra["grid"] = GRID_NOTE
    return write_reports(per_case, summarize(per_case), out_json, extra=extra,
                         nsd_tolerance_mm=cfg.task.nsd_tolerance_mm)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _evaluate_cls(loaded: LoadedRun, ds: Any, cases: list[Item], bar: Any, out_json: Path,
                  extra: dict[str, Any]) -> tuple[Path, Path]:
    """Accuracy and AUC over the cases; one CSV row per case with its class probabilities."""
    probs, labels = [], []
    for i in bar:
        image = ds[i]["image"].as_tensor()[None]
        with autocast_context(loaded.device, loaded.cfg.optim.precision):
            logits = predict_logits(loaded.model, image, loaded.cfg.task, loaded.device)
        probs.append(torch.softmax(logits, dim=1)[0].numpy().astype(np.float64))
        labels.append(int(cases[i]["label"]))
    summary = classification_metrics(np.stack(probs), np.asarray(labels))
    names = [loaded.spec["classes"][str(k)] for k in range(len(probs[0]))]
    per_case = {c["name"]: {"label": y, "pred": int(p.argmax()), "probs": p.tolist()}
                for c, y, p in zip(cases, labels, probs)}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    report = {"summary": summary, "per_case": per_case, **extra}
    out_json.write_text(json.dumps(_nan_to_none(report), indent=2, allow_nan=False) + "\n")
    out_csv = out_json.with_suffix(".csv")
    with out_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", "label", "pred", *(f"p_{n}" for n in names)])
        for name, row in per_case.items():
            writer.writerow([name, row["label"], row["pred"], *map(repr, row["probs"])])
    return out_json, out_csv


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{float(value):.4f}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Console lines of a METRICS.json: mean Dice / NSD per class and overall (seg), or
    accuracy and AUC (cls)."""
    summary = report["summary"]
    if "classes" not in summary:
        return [f"accuracy {_fmt(summary.get('accuracy'))}  AUC {_fmt(summary.get('auc'))}"]
    width = max([len("overall"), *map(len, summary["classes"])])
    lines = [f"{'class':<{width}}  {'dice':>7}  {'nsd':>7}"]
    for name, entry in summary["classes"].items():
        lines.append(f"{name:<{width}}  {_fmt(entry['dice']['mean']):>7}  "
                     f"{_fmt(entry['nsd']['mean']):>7}")
    overall = summary["overall"]
    lines.append(f"{'overall':<{width}}  {_fmt(overall['dice']['mean']):>7}  "
                 f"{_fmt(overall['nsd']['mean']):>7}")
    return lines
