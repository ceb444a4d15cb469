"""MiM's pre-training loss: masked reconstruction plus cross-level InfoNCE / BYOL alignment.

Pure functions of tensors (no state, no ``nn.Module``), testable against hand-written loops and
reusable by baselines (MAE3D uses :func:`reconstruction_loss` alone). The model returns an object
with ``.levels`` (see :class:`MiMOutputLike`); this module only relies on those shapes and never
imports the model code.

Conventions (see DESIGN.md §1):

* the **total** loss is a *sum* over levels, ``sum_l w_l * L_R^l + alpha * sum_l L_C^{l,l+1}``
  with ``w_l = 1`` (the paper's eq. 8-10), not the mean over levels of its eq. 3 / eq. 7 (that
  would only rescale the loss by ``1/L`` and ``1/(L-1)``);
* stop-gradient on the parent side of the alignment is done inside the model (it detaches the
  decoder features before the parent projection head); the losses never detach anything;
* every output tensor of the model enters the graph of the total loss, even when a term is
  switched off (it is then added times zero), so that every parameter receives a gradient and
  DDP can run without ``find_unused_parameters``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

# one definition of the choices: the config validates them, the losses dispatch on them
from mim3d.config import ALIGNMENTS

__all__ = ["ALIGNMENTS", "LevelOutputLike", "MiMOutputLike", "byol_alignment",
           "infonce_alignment", "mim_loss", "reconstruction_loss"]


class LevelOutputLike(Protocol):
    """What the losses read from one level of a MiM forward pass.

    Shapes: ``B_l`` volumes at this level, ``N`` tokens per volume, ``P`` voxels per token,
    ``U`` units per volume, ``D`` projection width.
    """

    pred: Tensor  # (B_l, N, P) predicted voxels per token
    target: Tensor  # (B_l, N, P) raw patchified input voxels
    mask: Tensor  # (B_l, N) bool, True = masked
    context: Tensor | None  # (B_l, D) projected context vectors; None at level 1
    unit_features: Tensor | None  # (B_l, U, D) projected unit features; None at the last level
    parent: Tensor  # (B_l,) long, parent volume index in the previous level (-1 at level 1)
    parent_unit: Tensor  # (B_l,) long, flat unit index in the parent volume


class MiMOutputLike(Protocol):
    """Any object with a ``levels`` sequence, coarsest level first."""

    levels: Sequence[LevelOutputLike]


def reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor, *, norm_pix: bool = True,
                        eps: float = 1e-6) -> Tensor:
    """Mean squared error on masked tokens (paper eq. 1-2, MAE convention).

    The per-token error is the mean over the ``P`` voxels of the squared difference; the loss is
    the average of that error over all masked tokens of all volumes (tokens, not volumes, are
    weighted equally).

    With ``norm_pix`` each target token is normalised on its own: subtract its mean and divide by
    ``sqrt(var + eps)``, where ``var`` is the *population* variance (``unbiased=False``), as
    written in DESIGN.md §1. MAE's reference code uses the unbiased variance; with ``P = 4096``
    voxels the two differ by a factor ``P / (P - 1)``, i.e. by 0.02 %. The computation is done in
    float32 so that bf16/fp16 predictions do not lose the normalisation's precision.

    Args:
        pred: ``(B, N, P)`` predicted voxels per token.
        target: ``(B, N, P)`` raw (un-normalised) voxels per token.
        mask: ``(B, N)`` bool, True where the token was masked (hidden from the encoder).
        norm_pix: normalise each target token (default on, as in the paper).
        eps: added to the variance before the square root.

    Returns:
        Scalar float32 tensor. It is 0 (still attached to ``pred``) when nothing is masked.

    Raises:
        ValueError: on mismatching shapes or a non-bool mask.
    """
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (B, N, P); got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if mask.dtype != torch.bool or mask.shape != pred.shape[:2]:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(pred.shape[:2])}; got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    pred = pred.float()
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, unbiased=False, keepdim=True)
        target = (target - mean) / torch.sqrt(var + eps)
    per_token = (pred - target).pow(2).mean(dim=-1)  # (B, N)
    weights = mask.to(per_token.dtype)
    # clamp: an all-visible batch gives 0 instead of 0/0, and keeps pred in the graph.
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def _check_alignment_inputs(context: Tensor, unit_features: Tensor, parent: Tensor,
                            parent_unit: Tensor) -> None:
    """Validate shapes and index ranges shared by the two alignment losses."""
    if context.ndim != 2 or unit_features.ndim != 3:
        raise ValueError(f"context must be (M, D) and unit_features (Bp, U, D); got "
                         f"{tuple(context.shape)} and {tuple(unit_features.shape)}")
    if context.shape[1] != unit_features.shape[2]:
        raise ValueError(f"context width {context.shape[1]} != unit feature width "
                         f"{unit_features.shape[2]}")
    m = context.shape[0]
    for name, idx in (("parent", parent), ("parent_unit", parent_unit)):
        if idx.shape != (m,) or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an integer tensor of shape ({m},); got "
                             f"{idx.dtype} {tuple(idx.shape)}")
    if m == 0 or parent.is_cuda:  # range checks read the device: keep the GPU step sync-free
        return
    bp, u = unit_features.shape[:2]
    if int(parent.min()) < 0 or int(parent.max()) >= bp:
        raise ValueError(f"parent indices must lie in [0, {bp}); got "
                         f"[{int(parent.min())}, {int(parent.max())}]")
    if int(parent_unit.min()) < 0 or int(parent_unit.max()) >= u:
        raise ValueError(f"parent_unit indices must lie in [0, {u}); got "
                         f"[{int(parent_unit.min())}, {int(parent_unit.max())}]")


def _empty_alignment(context: Tensor, unit_features: Tensor) -> Tensor:
    """Zero loss for a level without children, still attached to both inputs."""
    return context.float().sum() * 0.0 + unit_features.float().sum() * 0.0


def infonce_alignment(context: Tensor, unit_features: Tensor, parent: Tensor,
                      parent_unit: Tensor, *, temperature: float) -> Tensor:
    """Cross-level InfoNCE (paper eq. 4-6): find your source unit among your parent's units.

    For child ``i`` the logits are ``cos(c_i, p_{parent(i), u}) / tau`` over the ``U`` units of
    its own parent volume; the loss is the softmax cross-entropy with target ``parent_unit(i)``,
    averaged over children. The negatives are therefore the other units of the same parent
    (8 octants for level 1 -> 2, 216 tokens for level 2 -> 3), as described in Section III-C.

    This is the standard InfoNCE (denominator with the positive): the paper's eq. 5-6, read
    literally (a sum over ``k != i`` mixing children and units), is not a contrastive loss.

    Args:
        context: ``(M, D)`` projected context vectors of the ``M`` children.
        unit_features: ``(Bp, U, D)`` projected unit features of the ``Bp`` parent volumes.
        parent: ``(M,)`` long, index into ``Bp`` of each child's parent volume.
        parent_unit: ``(M,)`` long, index into ``U`` of the unit each child was cut from.
        temperature: softmax temperature ``tau > 0``.

    Returns:
        Scalar float32 tensor.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    _check_alignment_inputs(context, unit_features, parent, parent_unit)
    if context.shape[0] == 0:
        return _empty_alignment(context, unit_features)
    c = F.normalize(context.float(), dim=-1)  # (M, D)
    p = F.normalize(unit_features.float(), dim=-1)[parent]  # (M, U, D)
    # elementwise product + sum rather than einsum/bmm: autocast would run those in bf16/fp16,
    # and logits scaled by 1/tau need float32 precision
    logits = (c[:, None, :] * p).sum(dim=-1) / temperature  # (M, U)
    return F.cross_entropy(logits, parent_unit.long())


def byol_alignment(context: Tensor, unit_features: Tensor, parent: Tensor,
                   parent_unit: Tensor) -> Tensor:
    """BYOL-style cosine alignment (Table X's alternative; no negatives).

    Mean over children of ``2 - 2 * cos(c_i, p_{parent(i), parent_unit(i)})``, i.e. the squared
    distance between the L2-normalised vectors. Range [0, 4].

    Args:
        context: ``(M, D)`` projected context vectors of the children.
        unit_features: ``(Bp, U, D)`` projected unit features of the parent volumes.
        parent: ``(M,)`` long, index of each child's parent volume.
        parent_unit: ``(M,)`` long, index of the unit each child was cut from.

    Returns:
        Scalar float32 tensor.
    """
    _check_alignment_inputs(context, unit_features, parent, parent_unit)
    if context.shape[0] == 0:
        return _empty_alignment(context, unit_features)
    c = F.normalize(context.float(), dim=-1)  # (M, D)
    p = F.normalize(unit_features.float()[parent, parent_unit], dim=-1)  # (M, D)
    return (2.0 - 2.0 * (c * p).sum(dim=-1)).mean()


def _flags(values: Sequence[bool] | None, n: int, name: str) -> list[bool]:
    """Default a per-level/per-pair switch list to all True and check its length."""
    if values is None:
        return [True] * n
    if len(values) != n:
        raise ValueError(f"{name} needs {n} entries; got {len(values)}")
    return [bool(v) for v in values]


def _touch(*tensors: Tensor | None) -> Tensor:
    """Sum of ``0 * t`` over the tensors: keeps switched-off outputs in the graph for DDP.

    ``nan_to_num`` first, so a non-finite value in a switched-off output cannot turn the total
    into NaN (0 * inf = NaN); the gradient it sends is zero either way.
    """
    zero = torch.zeros(())
    for t in tensors:
        if t is not None:
            zero = zero.to(t.device) + t.float().sum().nan_to_num() * 0.0
    return zero


def _alignment_term(parent_level: LevelOutputLike, child_level: LevelOutputLike, pair: str,
                    alignment: str, temperature: float) -> Tensor:
    """Alignment loss between a parent level and its child level."""
    context, units = child_level.context, parent_level.unit_features
    if context is None or units is None:
        raise ValueError(f"alignment {pair} needs the child's context and the parent's "
                         "unit_features, but the model returned None")
    if alignment == "infonce":
        return infonce_alignment(context, units, child_level.parent, child_level.parent_unit,
                                 temperature=temperature)
    return byol_alignment(context, units, child_level.parent, child_level.parent_unit)


def mim_loss(out: MiMOutputLike, *, norm_pix: bool = True, alpha: float = 0.1,
             alignment: str = "infonce", temperature: float = 0.1,
             recon_levels: Sequence[bool] | None = None,
             align_pairs: Sequence[bool] | None = None,
             weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Total MiM loss ``sum_l w_l L_R^l + alpha * sum_l L_C^{l,l+1}`` (DESIGN §1, eq. 8-10).

    This is a *sum* over levels and pairs (eq. 8-9), not the means of eq. 3 and 7.

    Args:
        out: model output with ``levels`` (coarsest first), see :class:`LevelOutputLike`.
        norm_pix: per-token target normalisation in the reconstruction terms.
        alpha: weight of the alignment terms; 0 skips them (no term is computed, so a model
            built without projection heads is fine).
        alignment: ``"infonce"`` (paper default), ``"byol"`` (Table X) or ``"none"``.
        temperature: InfoNCE temperature.
        recon_levels: ``L`` switches for the reconstruction terms (Table VIII); default all on.
        align_pairs: ``L - 1`` switches for the alignment terms; default all on.
        weights: ``L`` level weights ``w_l`` (e.g. from
            :func:`~mim3d.losses.schedules.level_weights`); default all 1.

    Returns:
        ``{"loss": total, "recon_<l>": ..., "align_<l>_<l+1>": ...}`` with one entry per
        *enabled* term (levels 1-based); all scalar float32 tensors attached to the graph.
        Disabled terms enter ``loss`` times zero so every parameter still gets a gradient.
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {alignment!r}; valid: {', '.join(ALIGNMENTS)}")
    levels = list(out.levels)
    n = len(levels)
    if n == 0:
        raise ValueError("the model output has no levels")
    recon_on = _flags(recon_levels, n, "recon_levels")
    align_on = _flags(align_pairs, n - 1, "align_pairs")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights needs {n} entries; got {len(w)}")

    terms: dict[str, Tensor] = {}
    # zero, attached to every model output, so that switched-off terms still give gradients
    total = _touch(*(t for lv in levels for t in (lv.pred, lv.context, lv.unit_features)))
    for i, lv in enumerate(levels):
        if recon_on[i]:
            term = reconstruction_loss(lv.pred, lv.target, lv.mask, norm_pix=norm_pix)
            terms[f"recon_{i + 1}"] = term
            total = total + w[i] * term
    for i in range(n - 1):
        parent, child = levels[i], levels[i + 1]
        if alignment != "none" and align_on[i] and alpha != 0:
            pair = f"{i + 1}_{i + 2}"
            term = _alignment_term(parent, child, pair, alignment, temperature)
            terms[f"align_{pair}"] = term
            total = total + alpha * term
    return {"loss": total, **terms}
