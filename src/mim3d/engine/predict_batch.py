"""``mim3d predict -i FOLDER_OR_LIST``: many cases with one loaded network.

Cases come from a folder (scanned recursively for image files and DICOM series folders), a
datalist JSON (its ``test`` list when it has one, else its ``training`` list), an nnU-Net
dataset or a ``.txt`` list of paths (:func:`mim3d.data.datalists.resolve_inputs`). Case
``NAME`` is written to ``OUT/NAME.nii.gz`` (``OUT/NAME.dcm`` for DICOM SEG) with its side-car
``OUT/NAME.json``. A case whose label map and side-car both exist is skipped (a rerun continues
where the last one stopped) unless ``overwrite``; a case that fails (unreadable, non-finite,
wrong geometry, ...) is reported with its one-line reason and skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mim3d.data.datalists import CaseSpec, load_datalist, resolve_inputs
from mim3d.data.dicom import is_dicom_folder
from mim3d.engine.predict import (
    PredictOptions,
    load_run_for_prediction,
    predict_case,
    sidecar_path,
)

__all__ = ["BatchResult", "is_batch_input", "predict_batch"]

_LOG = logging.getLogger(__name__)
BATCH_FORMAT = "mim3d-predict-batch"


@dataclass
class BatchResult:
    """Case names by outcome, and where each prediction went."""

    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    report: Path | None = None


def is_batch_input(path: str | Path) -> bool:
    """A folder that is not itself a DICOM series, a ``.json`` datalist or a ``.txt`` list."""
    p = Path(path)
    if p.is_dir():
        return not is_dicom_folder(p)
    return p.suffix.lower() in (".json", ".txt")


def _cases(path: Path) -> list[CaseSpec]:
    if path.suffix.lower() == ".json" and path.is_file():
        raw = json.loads(path.read_text())
        if isinstance(raw, dict) and raw.get("test"):
            return load_datalist(path, "test")[0]
    return resolve_inputs([path])


def predict_batch(model: str | Path, inputs: str | Path, out_dir: str | Path, *,
                  checkpoint: str | Path = "best", device: str | None = None,
                  options: PredictOptions | None = None) -> BatchResult:
    """Predict every case of ``inputs`` into ``out_dir`` (module docstring).

    Args:
        model: a segmentation run folder or its ONNX export.
        inputs: a folder, datalist JSON, nnU-Net dataset or ``.txt`` list.
        out_dir: the output folder (created).
        checkpoint: ``best``, ``last`` or a checkpoint folder.
        device: ``auto`` (default), ``cpu`` or ``cuda``.
        options: as for one case; ``options.report`` names the batch report (one entry per
            case: its report, ``skipped`` or its ``error``), ``options.preview`` a folder of
            ``NAME.png`` overlays.

    Raises:
        ValueError: no cases, or a bad model; a bad *case* is recorded, not raised.
    """
    options = options or PredictOptions()
    cases = _cases(Path(inputs))
    loaded = load_run_for_prediction(model, checkpoint=checkpoint, device=device)
    out = Path(out_dir)
    ext = ".dcm" if options.output_type == "dicom-seg" else ".nii.gz"
    result, entries = BatchResult(), {}
    for case in tqdm(cases, desc="predict", unit="case", disable=not options.progress):
        target = out / f"{case.name}{ext}"
        result.outputs[case.name] = str(target)
        if target.exists() and sidecar_path(target).exists() and not options.overwrite:
            result.skipped.append(case.name)
            entries[case.name] = {"status": "skipped", "output": str(target)}
            continue
        entries[case.name] = _one(loaded, case, target, options, result)
    if options.report is not None:
        doc = {"format": BATCH_FORMAT, "model": loaded.describe(), "cases": entries}
        options.report.parent.mkdir(parents=True, exist_ok=True)
        options.report.write_text(json.dumps(doc, indent=2) + "\n")
        result.report = options.report
    return result


def _one(loaded: Any, case: CaseSpec, target: Path, options: PredictOptions,
         result: BatchResult) -> dict[str, Any]:
    """Predict one case; a failure becomes the case's entry instead of an exception."""
    preview = options.preview / f"{case.name}.png" if options.preview else None
    mine = replace(options, report=None, preview=preview, overwrite=True, progress=False)
    try:
        done = predict_case(loaded, str(Path(case.image)), target, mine)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _LOG.warning("case %s skipped: %s", case.name, message)
        result.failed[case.name] = message
        return {"status": "failed", "error": message}
    result.predicted.append(case.name)
    return {"status": "predicted", "output": str(done.labels), "report": done.report_doc}
