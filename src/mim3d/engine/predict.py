"""``mim3d evaluate`` and ``mim3d predict``: a fine-tuned run applied to images.

Both rebuild the run's network from ``RUN/finetune.json`` and ``RUN/config.yaml``, load its
``best`` (default) or ``last`` checkpoint, and preprocess every image exactly as validation did
in training (:func:`mim3d.data.transforms.build_transforms` with ``train=False``: RAS, the
preset's spacing, intensity, body crop, padding). Segmentation runs a sliding window with the
preset's overlap and Gaussian blending, takes the arg-max, and maps the label map back through
the inverse of that preprocessing (MONAI ``Invertd``, nearest neighbour) onto the image's
original grid. So metrics are computed at the original voxel spacing against the original label
file, and a written prediction has the input's own size, spacing, origin and direction (its axis
order is restored from the RAS view the readers give, ``meta["orig_axcodes"]``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.data import MetaTensor
from monai.transforms import Invertd
from nibabel import orientations as ornt
from torch import nn
from tqdm import tqdm

from mim3d.config import FinetuneConfig, config_from_dict
from mim3d.data import readers
from mim3d.data.datalists import case_name
from mim3d.data.readers import image_extension
from mim3d.data.transforms import make_dataset, remap_labels
from mim3d.data.volume import Volume
from mim3d.engine.checkpoint import CheckpointError, find_latest, load_checkpoint
from mim3d.engine.downstream_run import (
    Item,
    build_network,
    datalist_items,
    predict_logits,
    read_cases,
)
from mim3d.engine.finetune import BEST_DIR, CONFIG_FILE, SPEC_FILE, SPEC_FORMAT, SPLITS_FILE
from mim3d.engine.train import autocast_context
from mim3d.evaluation import classification_metrics, evaluate_case, summarize, write_reports

__all__ = ["LoadedRun", "evaluate_run", "evaluation_cases", "load_run", "predict_volume"]

GRID_NOTE = ("segmentation metrics are computed on each case's original image grid and spacing "
             "(the prediction is mapped back through the inverse of the preprocessing)")


@dataclass
class LoadedRun:
    """A fine-tuned network ready for inference, with what describes it."""

    run_dir: Path
    spec: dict[str, Any]
    cfg: FinetuneConfig
    model: nn.Module
    checkpoint: Path
    device: torch.device

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts about the model, for reports and side-car files."""
        return {"run": str(self.run_dir.resolve()), "checkpoint": str(self.checkpoint.resolve()),
                "network": self.spec["network"], "size": self.spec["size"],
                "preset": self.cfg.name, "pretrained": self.spec.get("pretrained"),
                "lora_rank": self.spec.get("lora_rank")}


def _checkpoint_folder(run: Path, which: str | Path) -> Path:
    if str(which) in ("best", "last"):
        where = run / BEST_DIR if str(which) == "best" else run
        found = find_latest(where) if where.is_dir() else None
        if found is None:
            raise CheckpointError(f"{run}: no {which} checkpoint; has the run trained a step? "
                                  "(checkpoint='last' takes the newest training checkpoint)")
        return found
    folder = find_latest(which)
    if folder is None:
        raise CheckpointError(f"{which}: not a checkpoint folder; pass best, last or a ckpt_*")
    return folder


def load_run(run: str | Path, *, checkpoint: str | Path = "best") -> LoadedRun:
    """Rebuild a fine-tuning run's network and load its weights.

    Args:
        run: the run folder of ``mim3d finetune``.
        checkpoint: ``best`` (highest validation score), ``last``, or a checkpoint folder.

    Raises:
        ValueError: not a fine-tuning run; CheckpointError: no such or a damaged checkpoint.
    """
    run = Path(run)
    spec_path = run / SPEC_FILE
    if not spec_path.is_file() or not (run / CONFIG_FILE).is_file():
        raise ValueError(f"{run}: not a fine-tuning run (no {SPEC_FILE} / {CONFIG_FILE}); pass "
                         "the --out folder of `mim3d finetune`")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{spec_path}: not a {SPEC_FORMAT} file")
    cfg = config_from_dict("downstream", yaml.safe_load((run / CONFIG_FILE).read_text()))
    folder = _checkpoint_folder(run, checkpoint)
    model = build_network(spec)
    load_checkpoint(folder, model=model, restore_rng=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return LoadedRun(run, spec, cfg, model.to(device).eval(), folder, device)


class _Capture:
    """A reader that remembers the volumes it read (original geometry, orientation, labels)."""

    def __init__(self) -> None:
        self.volumes: dict[str, Volume] = {}

    def __call__(self, path: str) -> Volume:
        vol = readers.read_volume(path)
        self.volumes[path] = vol
        return vol


def _segment(loaded: LoadedRun, ds: Any, index: int, capture: _Capture) -> np.ndarray:
    """Label map of case ``index`` on its image's original (RAS, as read) grid."""
    item = ds[index]
    image = item["image"]
    with autocast_context(loaded.device, loaded.cfg.optim.precision):
        logits = predict_logits(loaded.model, image.as_tensor()[None], loaded.cfg.task,
                                loaded.device)
    pred = MetaTensor(logits.argmax(1).float(), affine=image.affine)
    # Invertd replays the image's recorded operations backwards (unpad, uncrop, resample to the
    # original affine) with nearest-neighbour interpolation, so label ids stay intact.
    invert = Invertd(keys="pred", transform=ds.transform, orig_keys="image", nearest_interp=True)
    back = invert({"image": image, "pred": pred})["pred"]
    source = image.meta["filename_or_obj"]
    vol = capture.volumes[source if isinstance(source, str) else source[0]]
    if tuple(back.shape[1:]) != vol.shape[:3]:
        raise RuntimeError(f"inverse preprocessing gave {tuple(back.shape[1:])}, not the "
                           f"image grid {vol.shape[:3]}")
    return np.rint(back[0].numpy()).astype(np.int32)


# ------------------------------------------------------------------------------ evaluate


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
                 checkpoint: str | Path = "best", progress: bool = True) -> tuple[Path, Path]:
    """Score a fine-tuned run and write ``METRICS.json`` plus a per-case CSV beside it.

    Segmentation: Dice, NSD (the preset's tolerance) and HD95 per class and case on the
    original grid, with mean ± std (``mim3d.evaluation``: absent-class rule and statistics are
    written into the report). Classification: accuracy and AUC.

    Args:
        run: the run folder of ``mim3d finetune``.
        data: a datalist JSON (see :func:`evaluation_cases`), an nnU-Net folder or a folder.
        out_json: where the JSON report goes; the CSV gets the same name with ``.csv``.
        checkpoint: ``best``, ``last`` or a checkpoint folder.
        progress: show a progress bar over cases.

    Returns:
        ``(json_path, csv_path)``.
    """
    loaded = load_run(run, checkpoint=checkpoint)
    cases, source = evaluation_cases(loaded, data)
    cfg, capture = loaded.cfg, _Capture()
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
        pred = _segment(loaded, ds, i, capture)
        label = capture.volumes[cases[i]["label"]]
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


# ------------------------------------------------------------------------------ predict


def _to_input_orientation(array: np.ndarray, ras_affine: np.ndarray,
                          axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Undo the readers' RAS reordering: the array and affine in the file's own axis order."""
    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(axcodes)))
    out = ornt.apply_orientation(array, transform)
    affine = np.asarray(ras_affine, dtype=np.float64) @ ornt.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out), affine


def _sidecar(out: Path) -> Path:
    ext = image_extension(out) or out.suffix
    return out.with_name(out.name[: len(out.name) - len(ext)] + ".json")


def predict_volume(model_run: str | Path, input_path: str | Path | Sequence[str | Path],
                   out_path: str | Path, *, checkpoint: str | Path = "best") -> tuple[Path, Path]:
    """Segment one CT (file or DICOM series folder) and write the label map on its own grid.

    Args:
        model_run: the run folder of ``mim3d finetune`` (a segmentation run).
        input_path: an image file or DICOM folder (a list of co-registered files for a
            multi-channel task).
        out_path: the label map (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``); a JSON with the
            class names, the model and the input goes beside it (same name, ``.json``).
        checkpoint: ``best``, ``last`` or a checkpoint folder.

    Returns:
        ``(label_path, json_path)``. The label map has the input's size, spacing, origin and
        direction, and uint8 ids (uint16 when an id exceeds 255).

    Raises:
        ValueError (incl. ImageReadError): unreadable input, a DICOM folder without a CT
            series, an unknown output extension, or a classification run.
    """
    out = Path(out_path)
    if image_extension(out) is None:
        raise ValueError(f"{out}: unknown label-map extension; use .nii.gz, .nii, .nrrd or .mha")
    loaded = load_run(model_run, checkpoint=checkpoint)
    if loaded.spec["task"] != "seg":
        raise ValueError(f"{model_run} is a classification run; predict writes label maps "
                         "(use evaluate for classification scores)")
    single = isinstance(input_path, (str, Path))
    image = str(input_path) if single else [str(p) for p in input_path]
    first = image if single else image[0]
    capture, cfg = _Capture(), loaded.cfg
    ds = make_dataset([{"image": image, "name": case_name(first)}], cfg.data, cfg.task,
                      train=False, cache=False, reader=capture)
    pred = _segment(loaded, ds, 0, capture)
    vol = capture.volumes[first]
    array, affine = _to_input_orientation(pred, vol.affine, vol.meta["orig_axcodes"])
    dtype = np.uint8 if array.max(initial=0) < 256 else np.uint16
    readers.write_volume(Volume(array.astype(dtype), affine, source=first), out)
    info = {"labels": {"0": "background", **loaded.spec["classes"]}, "model": loaded.describe(),
            "input": {"path": str(Path(first).resolve()), "shape": list(array.shape),
                      "spacing": list(vol.spacing), "orientation": vol.meta["orig_axcodes"],
                      **{k: v for k, v in vol.meta.items()
                         if k in ("format", "series_uid", "series_note", "modality")}}}
    side = _sidecar(out)
    side.write_text(json.dumps(info, indent=2) + "\n")
    return out, side
