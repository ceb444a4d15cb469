"""``mim3d predict``: the label map of a new scan, written on the scan's own grid.

The model is a fine-tuning run folder or an ONNX file of ``mim3d export --format onnx``
(:func:`mim3d.engine.inference.load_run`). The input is an image file or a DICOM series folder
(the series is chosen by ``series_uid``, else the CT series with the most slices, and the choice
is logged and recorded). The prediction is mapped back through the inverse preprocessing, so the
written label map has the input's size, spacing, origin and direction, in the input's own axis
order (:func:`_to_input_orientation` undoes the readers' RAS view, ``meta["orig_axcodes"]``).

Outputs: the label map (NIfTI by default, ``.nrrd``/``.mha`` too, or a DICOM SEG for a DICOM
input, :mod:`mim3d.deploy.dicomseg`), a side-car JSON with the class names, the model and the
input, and optionally a report (:mod:`mim3d.deploy.report`) and an overlay picture. A label map is
written to a temporary name and renamed, so an interrupted run leaves nothing half-written; an
existing output is refused unless ``overwrite``. Many cases: :mod:`mim3d.engine.predict_batch`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nibabel import orientations as ornt

from mim3d import __version__
from mim3d.data import readers
from mim3d.data.datalists import case_name
from mim3d.data.dicom import is_dicom_folder
from mim3d.data.readers import image_extension
from mim3d.data.transforms import make_dataset
from mim3d.data.volume import ImageReadError, Volume
from mim3d.deploy.report import REPORT_FORMAT, StageTimer, label_volumes, preprocessing_of
from mim3d.engine.evaluate import evaluate_run, evaluation_cases
from mim3d.engine.inference import LoadedRun, ReadCapture, load_run, segment_case

__all__ = ["OUTPUT_TYPES", "LoadedRun", "PredictOptions", "PredictResult", "evaluate_run",
           "evaluation_cases", "load_run", "load_run_for_prediction", "predict_case",
           "predict_volume", "prepare_prediction", "sidecar_path"]

_LOG = logging.getLogger(__name__)
OUTPUT_TYPES = ("nifti", "dicom-seg")
#: A CT in HU has air near -1000 HU somewhere in the field of view; an image whose lowest
#: value lies above this is unlikely to be a CT in HU (an MRI, or an already scaled image).
_CT_AIR_CEILING_HU = -500.0


@dataclass(frozen=True)
class PredictOptions:
    """How one prediction is run and written (see :func:`predict_volume`)."""

    output_type: str = "nifti"
    series_uid: str | None = None
    report: Path | None = None
    preview: Path | None = None
    overwrite: bool = False
    progress: bool = False


@dataclass
class PredictResult:
    """What one prediction wrote, and what it found."""

    labels: Path
    sidecar: Path
    report: Path | None = None
    preview: Path | None = None
    series_note: str | None = None
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    report_doc: dict[str, Any] = field(default_factory=dict)


def _to_input_orientation(array: np.ndarray, ras_affine: np.ndarray,
                          axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Undo the readers' RAS reordering: the array and affine in the file's own axis order."""
    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(axcodes)))
    out = ornt.apply_orientation(array, transform)
    affine = np.asarray(ras_affine, dtype=np.float64) @ ornt.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out), affine


def sidecar_path(out: Path) -> Path:
    """``labels.nii.gz`` -> ``labels.json`` (the class names, model and input)."""
    ext = image_extension(out) or out.suffix
    return out.with_name(out.name[: len(out.name) - len(ext)] + ".json")


def check_output(out: Path, options: PredictOptions) -> None:
    """Refuse a wrong extension for the output type, or an existing output without overwrite."""
    if options.output_type not in OUTPUT_TYPES:
        raise ValueError(f"--output-type {options.output_type}: choose one of "
                         f"{', '.join(OUTPUT_TYPES)}")
    if options.output_type == "dicom-seg" and out.suffix.lower() != ".dcm":
        raise ValueError(f"{out}: a DICOM SEG output needs the .dcm extension")
    if options.output_type == "nifti" and image_extension(out) is None:
        raise ValueError(f"{out}: unknown label-map extension; use .nii.gz, .nii, .nrrd or .mha")
    if out.exists() and not options.overwrite:
        raise ValueError(f"{out}: exists; pass --overwrite to replace it (or another -o)")


class _CheckedCapture(ReadCapture):
    """The reader of :func:`predict_case`: refuses unusable images, warns on odd intensities."""

    def __init__(self, loaded: LoadedRun, series_uid: str | None) -> None:
        super().__init__(series_uid)
        self.loaded, self.warnings = loaded, []

    def __call__(self, path: str) -> Volume:
        vol = super().__call__(path)
        arr = np.asarray(vol.array)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            raise ImageReadError(f"{path}: {int(np.isnan(arr).sum())} NaN and "
                                 f"{int(np.isinf(arr).sum())} inf voxels of {arr.size}; "
                                 "predict needs finite intensities (fix or re-export the image)")
        why = readers.validate_volume(vol) if self.loaded.cfg.task.in_channels == 1 else None
        if why is not None:
            raise ImageReadError(f"{path}: {why}; the model segments 3D volumes")
        data = self.loaded.cfg.data
        low, high = float(arr.min()), float(arr.max())
        if data.normalization == "window" and low > _CT_AIR_CEILING_HU:
            message = (f"{path}: intensities span [{low:g}, {high:g}], with no air near "
                       f"-1000 HU; the model expects CT in HU (window {list(data.hu_window)}). "
                       "Is this an MRI or a rescaled image? The prediction may be meaningless")
            _LOG.warning(message)
            self.warnings.append(message)
        return vol


def _input_info(vol: Volume, first: str, shape: tuple[int, ...]) -> dict[str, Any]:
    keep = ("format", "series_uid", "series_note", "modality", "other_series")
    return {"path": str(Path(first).resolve()), "shape": list(shape),
            "spacing": list(vol.spacing), "orientation": vol.meta["orig_axcodes"],
            **{k: v for k, v in vol.meta.items() if k in keep}}


def _write_labels(array: np.ndarray, affine: np.ndarray, vol: Volume, out: Path,
                  loaded: LoadedRun, options: PredictOptions) -> None:
    """The label map (file axis order) to a temporary name, then renamed onto ``out``."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}{image_extension(out) or '.dcm'}")
    try:
        if options.output_type == "dicom-seg":
            from mim3d.deploy.dicomseg import write_dicom_seg

            write_dicom_seg(array, vol.meta["files"], loaded.spec["classes"], tmp,
                            description=f"mim3d {loaded.spec['network']} ({loaded.cfg.name})")
        else:
            dtype = np.uint8 if array.max(initial=0) < 256 else np.uint16
            readers.write_volume(Volume(array.astype(dtype), affine, source=vol.source), tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _report(loaded: LoadedRun, info: dict[str, Any], timer: StageTimer, pred: np.ndarray,
            vol: Volume, out: Path, options: PredictOptions, warnings: list[str]) -> dict:
    return {"format": REPORT_FORMAT, "mim3d_version": __version__, "input": info["input"],
            "model": {**info["model"], "preset": loaded.cfg.name},
            "preprocessing": preprocessing_of(loaded.cfg), "device": str(loaded.device),
            "timings_s": dict(timer.seconds),
            "output": {"path": str(out.resolve()), "type": options.output_type},
            "labels": label_volumes(pred, vol.affine, loaded.spec["classes"]),
            "warnings": warnings}


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def predict_case(loaded: LoadedRun, image: str | list[str], out: Path,
                 options: PredictOptions) -> PredictResult:
    """Segment one case with an already loaded network (see :func:`predict_volume`)."""
    check_output(out, options)
    first = image if isinstance(image, str) else image[0]
    if options.output_type == "dicom-seg" and not is_dicom_folder(first):
        raise ValueError(f"{first}: --output-type dicom-seg needs a DICOM series folder as "
                         "input (a SEG references its source images)")
    timer, cfg = StageTimer(), loaded.cfg
    capture = _CheckedCapture(loaded, options.series_uid)
    ds = make_dataset([{"image": image, "name": case_name(first)}], cfg.data, cfg.task,
                      train=False, cache=False, reader=capture)
    pred, vol = segment_case(loaded, ds, 0, capture, progress=options.progress, timer=timer)
    if vol.meta.get("series_note"):
        _LOG.info(vol.meta["series_note"])
    array, affine = _to_input_orientation(pred, vol.affine, vol.meta["orig_axcodes"])
    info = {"labels": {"0": "background", **loaded.spec["classes"]}, "model": loaded.describe(),
            "input": _input_info(vol, first, array.shape)}
    result = PredictResult(out, sidecar_path(out), series_note=vol.meta.get("series_note"),
                           warnings=capture.warnings, info=info)
    with timer.stage("write"):
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_labels(array, affine, vol, out, loaded, options)
        _write_json(result.sidecar, info)
        if options.preview is not None:
            from mim3d import viz

            names = {int(k): v for k, v in loaded.spec["classes"].items()}
            image_hu = vol.array if vol.array.ndim == 3 else vol.array[..., 0]
            result.preview = viz.save_label_overlay(
                image_hu, pred, vol.affine, options.preview,
                hu_window=tuple(cfg.data.hu_window), class_names=names)
    result.report_doc = _report(loaded, info, timer, pred, vol, out, options, capture.warnings)
    if options.report is not None:
        _write_json(options.report, result.report_doc)
        result.report = options.report
    return result


def predict_volume(model: str | Path, input_path: str | Path | list[str | Path],
                   out_path: str | Path, *, checkpoint: str | Path = "best",
                   device: str | None = None, options: PredictOptions | None = None
                   ) -> tuple[Path, Path]:
    """Segment one CT (file or DICOM series folder) and write the label map on its own grid.

    Args:
        model: the run folder of ``mim3d finetune`` (a segmentation run), or its ONNX export.
        input_path: an image file or DICOM folder (a list of co-registered files for a
            multi-channel task).
        out_path: the label map (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``; ``.dcm`` for a
            DICOM SEG); a JSON with the class names, the model and the input goes beside it
            (same name, ``.json``).
        checkpoint: ``best``, ``last`` or a checkpoint folder.
        device: ``auto`` (default), ``cpu`` or ``cuda``.
        options: output type, series, report, preview, overwrite (:class:`PredictOptions`).

    Returns:
        ``(label_path, json_path)``. A NIfTI/NRRD/MHA label map has the input's size, spacing,
        origin and direction, and uint8 ids (uint16 when an id exceeds 255).

    Raises:
        ValueError (incl. ImageReadError): unreadable or non-finite input, a DICOM folder
            without a CT series or with an unknown ``series_uid``, an unknown output extension,
            an existing output, or a classification run. Nothing is written then.
    """
    result = predict_case(*prepare_prediction(model, input_path, out_path, checkpoint=checkpoint,
                                              device=device, options=options))
    return result.labels, result.sidecar


def prepare_prediction(model: str | Path, input_path: str | Path | list[str | Path],
                       out_path: str | Path, *, checkpoint: str | Path = "best",
                       device: str | None = None, options: PredictOptions | None = None
                       ) -> tuple[LoadedRun, str | list[str], Path, PredictOptions]:
    """The arguments of :func:`predict_case`: output checked first, then the model loaded, and
    the input path(s) normalised once (``dicom_dir/`` and ``dicom_dir`` are the same case)."""
    options = options or PredictOptions()
    out = Path(out_path)
    check_output(out, options)  # before the (slow) model load
    loaded = load_run_for_prediction(model, checkpoint=checkpoint, device=device)
    single = isinstance(input_path, (str, Path))
    image = str(Path(input_path)) if single else [str(Path(p)) for p in input_path]
    return loaded, image, out, options


def load_run_for_prediction(model: str | Path, *, checkpoint: str | Path = "best",
                            device: str | None = None) -> LoadedRun:
    """:func:`load_run`, refusing a classification run (predict writes label maps)."""
    loaded = load_run(model, checkpoint=checkpoint, device=device)
    if loaded.spec["task"] != "seg":
        raise ValueError(f"{model} is a classification run; predict writes label maps "
                         "(use evaluate for classification scores)")
    return loaded
