"""Sliding-window inference, segmentation / classification metrics and metric reports.

Segmentation metrics score one class of integer label maps ``pred`` and ``gt`` (X, Y, Z) with
voxel ``spacing`` in mm, and agree with MONAI 1.6 (tests/test_evaluation.py):

* **Dice** ``2|P & G| / (|P| + |G|)``.
* **NSD** (normalised surface Dice, Nikolov et al. 2021). A mask's surface is the voxels that
  one binary erosion with the 6-connected element removes (the image border counts as
  background), as in ``monai.metrics.compute_surface_dice`` with its default
  ``use_subvoxels=False``. NSD = (pred-surface voxels within ``tolerance_mm`` of the gt surface
  + gt-surface voxels within it of the pred surface) / (all pred + gt surface voxels), with
  Euclidean voxel-centre distances in mm and ``d <= tolerance`` counted (in float32, as MONAI).
  The tolerance is the task preset's ``TaskConfig.nsd_tolerance_mm`` (1.0 mm unless the preset
  sets it) and every report records it.
* **HD95** ``max(q95(pred -> gt), q95(gt -> pred))`` of the same distances, ``q95`` the linearly
  interpolated 95th percentile of one direction: ``compute_hausdorff_distance(percentile=95)``,
  not the percentile of the pooled distances that some other tools report.

Absent-class rule (``ABSENT_CLASS_RULE``; MONAI 1.6 in brackets):

* in neither gt nor pred: Dice, NSD, HD95 NaN; the case is left out of the class's means
  [DiceMetric NaN with ``ignore_empty=True`` (default), 1.0 with ``ignore_empty=False``; NSD NaN;
  HD95 NaN].
* predicted but not in gt (false positive): Dice 0, NSD 0, HD95 NaN [Dice NaN with
  ``ignore_empty=True``, 0 with ``ignore_empty=False``; NSD 0; HD95 NaN, from ``torch.quantile``
  of infinite distances; plain Hausdorff (no percentile) inf].
* in gt but not predicted (missed): Dice 0, NSD 0, HD95 NaN [Dice 0; NSD 0; HD95 NaN; plain
  Hausdorff inf].

A one-sided HD95 is undefined, so it is left out of the HD95 mean and ``summarize`` counts such
cases (``n_hd95_undefined``) to keep that optimism visible; Dice and NSD of 0 enter their means.
Means and standard deviations (ddof=0) are over finite values. NaN is ``null`` in the JSON report
and ``nan`` in the CSV.

Classification: accuracy of the arg-max and the rank-based (Mann-Whitney) AUC: of class 1 for
K == 2, the macro mean of the one-vs-rest AUCs for K > 2.
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
from scipy import ndimage
from scipy.stats import rankdata
from torch import Tensor, nn

METRICS = ("dice", "nsd", "hd95")

ABSENT_CLASS_RULE = (
    "Class absent from both gt and prediction: dice, nsd and hd95 are NaN and the case is "
    "excluded from that class's means. Class predicted but absent from gt (false positive), or "
    "present in gt but not predicted (missed): dice 0 and nsd 0 (both enter the means), hd95 NaN "
    "(undefined; excluded from the hd95 mean and counted in n_hd95_undefined)."
)
STATISTICS_RULE = (
    "mean and std (ddof=0) over finite values; n counts them. Overall: each case's values are "
    "averaged over its classes with finite values, then mean/std are taken over cases; "
    "mean_of_class_means averages the per-class means. NaN is written as null."
)
HD95_RULE = "hd95 = max(q95(pred->gt), q95(gt->pred)) of surface distances in mm (as MONAI)."

Spacing = Sequence[float]
CaseMetrics = dict[str, dict[str, float]]


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


# ---------------------------------------------------------------- segmentation metrics


def _masks(pred: np.ndarray, gt: np.ndarray, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary (pred == class_id, gt == class_id) after checking that the maps match."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must have the same shape")
    return pred == class_id, gt == class_id


def dice(pred: np.ndarray, gt: np.ndarray, class_id: int) -> float:
    """Dice of one class; NaN when the class is in neither map (see ``ABSENT_CLASS_RULE``).

    Args:
        pred: (X, Y, Z) integer predicted labels.
        gt: (X, Y, Z) integer reference labels.
        class_id: the label scored.
    """
    return _dice_of(*_masks(pred, gt, class_id))


def _dice_of(p: np.ndarray, g: np.ndarray) -> float:
    """Dice of two bool masks; NaN when both are empty."""
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` that one 6-connected erosion removes (MONAI's ``get_mask_edges``)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _union_box(p: np.ndarray, g: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``p | g`` grown by one voxel (clipped to the image)."""
    nonzero = np.nonzero(p | g)
    return tuple(slice(max(int(ix.min()) - 1, 0), int(ix.max()) + 2) for ix in nonzero)


def _distances_to(src: np.ndarray, dst: np.ndarray, spacing: Spacing) -> np.ndarray:
    """Distance in mm from every ``src`` surface voxel to the nearest ``dst`` surface voxel."""
    if not dst.any():
        return np.full(int(src.sum()), np.inf, dtype=np.float32)
    edt = ndimage.distance_transform_edt(~dst, sampling=spacing)
    # float32 like MONAI, so that ties with the tolerance resolve the same way.
    return edt[src].astype(np.float32)


def _surface_distances(p: np.ndarray, g: np.ndarray,
                       spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred -> gt, gt -> pred) in mm of two binary masks.

    Args:
        p: (X, Y, Z) bool prediction mask.
        g: (X, Y, Z) bool reference mask.
        spacing: voxel size in mm per axis.

    Returns:
        Two float32 vectors, one entry per surface voxel of ``p`` and of ``g``; ``inf`` where the
        other mask is empty, both empty when both masks are.
    """
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != p.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing} must hold {p.ndim} positive values")
    if not (p.any() or g.any()):
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    # Cropping to the union (+1 voxel) keeps every surface voxel and both erosions unchanged,
    # and makes the distance transforms of small organs in a large CT cheap.
    box = _union_box(p, g)
    sp, sg = _surface(p[box]), _surface(g[box])
    return _distances_to(sp, sg, spacing), _distances_to(sg, sp, spacing)


def _check_tolerance(tolerance_mm: float) -> None:
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"the NSD tolerance_mm must be finite and >= 0, got {tolerance_mm}")


def _nsd_of(d_pg: np.ndarray, d_gp: np.ndarray, tolerance_mm: float) -> float:
    """NSD from directed distances; NaN when both surfaces are empty."""
    total = d_pg.size + d_gp.size
    if total == 0:
        return math.nan
    tol = np.float32(tolerance_mm)  # MONAI compares float32 distances in float32
    return float((d_pg <= tol).sum() + (d_gp <= tol).sum()) / total


def _hd95_of(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    """HD95 from directed distances; NaN when either surface is empty."""
    if d_pg.size == 0 or d_gp.size == 0 or np.isinf(d_pg).any() or np.isinf(d_gp).any():
        return math.nan
    return float(max(np.percentile(d_pg, 95.0), np.percentile(d_gp, 95.0)))


def surface_dice(pred: np.ndarray, gt: np.ndarray, class_id: int, spacing: Spacing,
                 tolerance_mm: float) -> float:
    """Normalised surface Dice of one class (module docstring; MONAI ``use_subvoxels=False``).

    Args:
        pred: (X, Y, Z) integer predicted labels.
        gt: (X, Y, Z) integer reference labels.
        class_id: the label scored.
        spacing: voxel size in mm per axis.
        tolerance_mm: largest surface deviation still counted as correct (>= 0).

    Returns:
        NSD in [0, 1]; 0 when only one map holds the class, NaN when neither does.
    """
    _check_tolerance(tolerance_mm)
    return _nsd_of(*_surface_distances(*_masks(pred, gt, class_id), spacing), tolerance_mm)


def hd95(pred: np.ndarray, gt: np.ndarray, class_id: int, spacing: Spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm of one class (as MONAI).

    Args:
        pred: (X, Y, Z) integer predicted labels.
        gt: (X, Y, Z) integer reference labels.
        class_id: the label scored.
        spacing: voxel size in mm per axis.

    Returns:
        HD95 in mm; NaN when either map lacks the class (see ``ABSENT_CLASS_RULE``).
    """
    return _hd95_of(*_surface_distances(*_masks(pred, gt, class_id), spacing))


def evaluate_case(pred: np.ndarray, gt: np.ndarray, *, spacing: Spacing,
                  class_ids: Sequence[int], class_names: Sequence[str],
                  nsd_tolerance_mm: float) -> CaseMetrics:
    """Dice, NSD and HD95 of every class of one case (surface distances computed once a class).

    Args:
        pred: (X, Y, Z) integer predicted labels.
        gt: (X, Y, Z) integer reference labels.
        spacing: voxel size in mm per axis.
        class_ids: labels scored (background normally left out).
        class_names: one name per id, the keys of the result.
        nsd_tolerance_mm: NSD tolerance, normally ``TaskConfig.nsd_tolerance_mm``.

    Returns:
        ``{name: {"dice": float, "nsd": float, "hd95": float}}`` in ``class_ids`` order.
    """
    if len(class_ids) != len(class_names) or len(set(class_names)) != len(class_names):
        raise ValueError("class_names must name each class id once, with distinct names")
    _check_tolerance(nsd_tolerance_mm)
    result: CaseMetrics = {}
    for cid, name in zip(class_ids, class_names):
        p, g = _masks(pred, gt, int(cid))
        d_pg, d_gp = _surface_distances(p, g, spacing)
        result[str(name)] = {"dice": _dice_of(p, g), "nsd": _nsd_of(d_pg, d_gp, nsd_tolerance_mm),
                             "hd95": _hd95_of(d_pg, d_gp)}
    return result


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


# ---------------------------------------------------------------- classification


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC: P(score_pos > score_neg) + 0.5 P(tie); NaN without both groups."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores, method="average")  # tied scores share their mean rank
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy and AUC of class scores.

    Args:
        probs: (N, K) class probabilities or scores, K >= 2.
        labels: (N,) integer true classes in [0, K).

    Returns:
        ``{"accuracy", "auc", "auc_per_class"}`` and, when AUC is undefined, ``"note"``.
        ``auc`` is the AUC of class 1 for K == 2 and the macro mean of the one-vs-rest AUCs for
        K > 2; it is NaN when a class it needs has no positive (or no negative) sample.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or probs.shape[1] < 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"need probs (N, K>=2) and labels (N,), got {probs.shape}, {labels.shape}")
    if probs.shape[0] == 0 or labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError("labels must be non-empty class ids in [0, K)")
    k = probs.shape[1]
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    per_class = [_auc(probs[:, c], labels == c) for c in range(k)]
    used = [1] if k == 2 else list(range(k))
    auc = math.nan if any(math.isnan(per_class[c]) for c in used) else float(
        np.mean([per_class[c] for c in used]))
    result: dict[str, Any] = {"accuracy": accuracy, "auc": auc, "auc_per_class": per_class}
    if math.isnan(auc):
        missing = [c for c in used if math.isnan(per_class[c])]
        result["note"] = (f"AUC undefined: class(es) {missing} have no positive or no negative "
                          "sample in these labels")
    return result
