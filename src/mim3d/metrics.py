"""Segmentation and classification metrics (reports and summaries: :mod:`mim3d.evaluation`).

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

A one-sided HD95 is undefined, so it is left out of the HD95 mean and
:func:`mim3d.evaluation.summarize` counts such cases (``n_hd95_undefined``) to keep that optimism
visible; Dice and NSD of 0 enter their means.

Classification: accuracy of the arg-max and the rank-based (Mann-Whitney) AUC: of class 1 for
K == 2, the macro mean of the one-vs-rest AUCs for K > 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

METRICS = ("dice", "nsd", "hd95")

ABSENT_CLASS_RULE = (
    "Class absent from both gt and prediction: dice, nsd and hd95 are NaN and the case is "
    "excluded from that class's means. Class predicted but absent from gt (false positive), or "
    "present in gt but not predicted (missed): dice 0 and nsd 0 (both enter the means), hd95 NaN "
    "(undefined; excluded from the hd95 mean and counted in n_hd95_undefined)."
)
HD95_RULE = "hd95 = max(q95(pred->gt), q95(gt->pred)) of surface distances in mm (as MONAI)."

Spacing = Sequence[float]
CaseMetrics = dict[str, dict[str, float]]


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
    """Raise ``ValueError`` unless the NSD tolerance is a finite number of mm >= 0."""
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
