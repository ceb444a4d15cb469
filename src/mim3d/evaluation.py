"""Sliding-window inference, per-class summaries and the JSON / CSV metric reports.

The metrics themselves (Dice, NSD, HD95, accuracy, AUC) and their absent-class rule are in
:mod:`mim3d.metrics`; the reports quote that rule. Means and standard deviations (ddof=0) are
over finite values. NaN is ``null`` in the JSON report and ``nan`` in the CSV.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from mim3d.metrics import ABSENT_CLASS_RULE, HD95_RULE, METRICS

STATISTICS_RULE = (
    "mean and std (ddof=0) over finite values; n counts them. Overall: each case's values are "
    "averaged over its classes with finite values, then mean/std are taken over cases; "
    "mean_of_class_means averages the per-class means. NaN is written as null."
)


# ---------------------------------------------------------------- inference


def _logits_of(out: Any) -> Tensor:
    """Logits tensor of a model output: a tensor, or an output object with ``.logits``."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if not isinstance(logits, Tensor):
        raise TypeError(f"model output {type(out).__name__} is neither a tensor nor has .logits")
    return logits


def sliding_window_predict(model: nn.Module, image: Tensor, *, roi: Sequence[int],
                           overlap: float = 0.5, sw_batch_size: int = 2,
                           mode: str = "gaussian",
                           device: torch.device | str | None = None,
                           progress: bool = False) -> Tensor:
    """Predict a whole volume by sliding ``roi`` windows over it and blending the overlaps.

    Volumes smaller than ``roi`` are zero-padded and the output is cropped back. The model runs
    in eval mode under ``torch.no_grad`` and gets its former mode back afterwards.

    Args:
        model: maps (b, C, *roi) to logits (b, K, *roi), or to an object with ``.logits``.
        image: (B, C, X, Y, Z) volume(s); B is usually 1.
        roi: window size (3 ints), normally ``TaskConfig.roi``.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        sw_batch_size: windows per model call.
        mode: ``"gaussian"`` (windows weighted towards their centre) or ``"constant"``.
        device: where the windows run; defaults to the model's parameters' device. The blended
            result stays on ``image``'s device so a whole CT need not fit on the accelerator.
        progress: a progress bar (tqdm, with ETA) over the window batches.

    Returns:
        (B, K, X, Y, Z) float logits on ``image.device``.
    """
    if image.ndim != 5:
        raise ValueError(f"image must be (B, C, X, Y, Z), got shape {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else image.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = sliding_window_inference(
                image, roi_size=tuple(int(r) for r in roi), sw_batch_size=sw_batch_size,
                predictor=lambda x: _logits_of(model(x)), overlap=overlap, mode=mode,
                sw_device=torch.device(device), device=image.device, progress=progress)
    finally:
        model.train(was_training)
    return _logits_of(out)



# ---------------------------------------------------------------- summaries and reports


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    """NaN-aware ``{"mean", "std", "n"}`` (ddof=0); mean and std NaN when nothing is finite."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def summarize(per_case: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """Per-class and overall mean ± std of every metric (``STATISTICS_RULE``).

    Args:
        per_case: ``{case: {class: {metric: value}}}`` as built from ``evaluate_case``.

    Returns:
        ``{"n_cases", "classes": {class: {metric: {"mean","std","n"}, "n_absent",
        "n_hd95_undefined"}}, "overall": {metric: {"mean","std","n","mean_of_class_means"}}}``.
        ``n_absent`` counts cases without the class in gt or pred (Dice NaN);
        ``n_hd95_undefined`` counts cases where exactly one of them holds it.
    """
    names: list[str] = []
    for classes in per_case.values():
        names += [c for c in classes if c not in names]
    summary: dict[str, Any] = {"n_cases": len(per_case), "classes": {}, "overall": {}}
    for name in names:
        rows = [classes[name] for classes in per_case.values() if name in classes]
        entry: dict[str, Any] = {m: _stats([r.get(m, math.nan) for r in rows]) for m in METRICS}
        dices = np.array([r.get("dice", math.nan) for r in rows], dtype=np.float64)
        hds = np.array([r.get("hd95", math.nan) for r in rows], dtype=np.float64)
        entry["n_absent"] = int(np.isnan(dices).sum())
        entry["n_hd95_undefined"] = int((~np.isnan(dices) & np.isnan(hds)).sum())
        summary["classes"][name] = entry
    for metric in METRICS:
        case_means = []
        for classes in per_case.values():
            vals = np.array([v.get(metric, math.nan) for v in classes.values()], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            case_means.append(float(vals.mean()) if vals.size else math.nan)
        overall = _stats(case_means)
        overall["mean_of_class_means"] = _stats(
            [summary["classes"][n][metric]["mean"] for n in names])["mean"]
        summary["overall"][metric] = overall
    return summary


def _json_safe(obj: Any) -> Any:
    """Copy of ``obj`` with non-finite floats as ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return int(obj) if isinstance(obj, np.integer) else obj


def write_reports(per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
                  summary: Mapping[str, Any], out_json: str | Path, *,
                  extra: Mapping[str, Any] | None = None,
                  nsd_tolerance_mm: float | None = None) -> tuple[Path, Path]:
    """Write the JSON report and, beside it, a CSV with one row per case x class.

    Args:
        per_case: ``{case: {class: {metric: value}}}``.
        summary: the result of :func:`summarize`.
        out_json: JSON path; the CSV gets the same stem with ``.csv``.
        extra: further top-level JSON entries (run, data, preset, ...).
        nsd_tolerance_mm: the NSD tolerance used, recorded under ``rules``.

    Returns:
        (json_path, csv_path).
    """
    out_json = Path(out_json)
    extra = dict(extra or {})
    clash = {"summary", "per_case", "rules"} & set(extra)
    if clash:
        raise ValueError(f"extra must not redefine {sorted(clash)}")
    rules = {"absent_class": ABSENT_CLASS_RULE, "statistics": STATISTICS_RULE,
             "hd95": HD95_RULE, "nsd_tolerance_mm": nsd_tolerance_mm}
    report = {"summary": summary, "per_case": per_case, "rules": rules, **extra}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    out_csv = out_json.with_suffix(".csv")
    with out_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", "class", *METRICS])
        for case, classes in per_case.items():
            for name, values in classes.items():
                writer.writerow([case, name, *(repr(float(values.get(m, math.nan)))
                                               for m in METRICS)])
    return out_json, out_csv
