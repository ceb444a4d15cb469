"""Losses of pre-training: MiM's masked reconstruction, cross-level alignment and level
weights, and the Swin-UNETR SSL baseline's rotation + contrastive + inpainting loss.

Everything here is a pure function of tensors (no state, no ``nn.Module``), so the functions can
be tested against hand-written loops and reused by baselines (MAE3D uses
:func:`reconstruction_loss` alone).

The models return objects with ``.levels`` (see :class:`MiMOutputLike`) or the three SSL heads
(:class:`SwinSSLOutputLike`); this module only relies on those shapes and never imports the
model code.

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
from mim3d.config import SCHEDULES as LEVEL_SCHEDULES

__all__ = ["ALIGNMENTS", "LEVEL_SCHEDULES", "LevelOutputLike", "MiMOutputLike",
           "SwinSSLOutputLike", "byol_alignment", "infonce_alignment", "level_weights",
           "mim_loss", "nt_xent", "reconstruction_loss", "swin_ssl_loss"]

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


class SwinSSLOutputLike(Protocol):
    """What :func:`swin_ssl_loss` reads from one view's Swin-UNETR SSL output."""

    rotation: Tensor  # (B, R) rotation logits
    contrastive: Tensor  # (B, P) un-normalised embedding
    reconstruction: Tensor  # (B, C, D, H, W) inpainted volume


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


def _start_weight(schedule: str, level: int, levels: int) -> float:
    """Weight of ``level`` (1-based) at progress 0 for the level-dependent schedules."""
    if level == 1:
        return 1.0
    if levels == 2:  # level 2 is the last level: the last-level rule applies
        frac = 1.0
    else:  # 0 at level 2, 1 at level L, linear in between
        frac = (level - 2) / (levels - 2)
    if schedule == "coarse_to_fine":
        return 2.0 - 2.0 * frac
    return 2.0 * frac  # fine_to_coarse


def level_weights(schedule: str, *, levels: int, progress: float) -> list[float]:
    """Per-level reconstruction weights ``w_l`` at a point of training (Table XII).

    All schedules are linear in ``progress`` from a start weight to an end weight:

    * ``"concurrent"`` (the paper's "Simultaneously", its best and mim3d's default): all 1.
    * ``"coarse_to_fine"``: level 1 stays 1; level 2 goes 2 -> 1; the last level 0 -> 1.
      For ``L > 3`` the start weights of levels 2..L are interpolated linearly between 2 and 0.
    * ``"fine_to_coarse"``: level 1 stays 1; level 2 goes 0 -> 1; the last level 2 -> 1
      (interpolated likewise for ``L > 3``).
    * ``"level1_only"`` (Table XII's "w/o Coarse & Fine" row): level 1 is 1, the others 0.
      The paper's text says "all weights set to 0", but its table merges the level-1 cell as
      1 -> 1 for every row; a run with no loss at all would not be pre-training.

    With ``L = 2`` the second level is the last one, and the last-level rule wins (start 0 for
    coarse-to-fine, 2 for fine-to-coarse).

    Args:
        schedule: one of :data:`LEVEL_SCHEDULES`.
        levels: number of levels ``L >= 1``.
        progress: fraction of training done, in [0, 1].

    Returns:
        ``L`` weights, level 1 first.

    Raises:
        ValueError: on an unknown schedule, ``levels < 1`` or ``progress`` outside [0, 1].
    """
    if schedule not in LEVEL_SCHEDULES:
        raise ValueError(f"unknown level-weight schedule {schedule!r}; valid: "
                         f"{', '.join(LEVEL_SCHEDULES)}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1; got {levels}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1]; got {progress}")
    if schedule == "concurrent":
        return [1.0] * levels
    if schedule == "level1_only":
        return [1.0] + [0.0] * (levels - 1)
    weights = []
    for level in range(1, levels + 1):
        start = _start_weight(schedule, level, levels)
        weights.append(start + (1.0 - start) * progress)
    return weights


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
        weights: ``L`` level weights ``w_l`` (e.g. from :func:`level_weights`); default all 1.

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


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR) loss between two views of the same B samples.

    Each of the 2B embeddings has its other view as the positive and the remaining 2B - 2 as
    negatives; the loss is the mean over all 2B anchors of
    ``-log(exp(s_pos / t) / sum_{k != anchor} exp(s_k / t))`` with cosine similarities ``s``.
    With B = 1 there are no negatives and the loss is exactly 0.

    Args:
        z1: (B, P) embeddings of view 1.
        z2: (B, P) embeddings of view 2.
        temperature: t > 0.

    Returns:
        Scalar float32 tensor.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1, z2 must both be (B, P), got {tuple(z1.shape)}, {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # an anchor is not its own negative
    target = (torch.arange(2 * b, device=z.device) + b) % (2 * b)
    return F.cross_entropy(logits, target)


def swin_ssl_loss(out1: SwinSSLOutputLike, out2: SwinSSLOutputLike, rot_targets1: Tensor,
                  rot_targets2: Tensor, x1: Tensor, x2: Tensor, *, temperature: float = 0.5,
                  weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, Tensor]:
    """Total Swin-UNETR SSL loss (Tang et al., CVPR 2022): rotation CE + NT-Xent + L1 inpainting.

    Args:
        out1, out2: model outputs of the two augmented views.
        rot_targets1, rot_targets2: (B,) Long rotation labels of the views.
        x1, x2: (B, C, D, H, W) inpainting targets (the rotated views *before* cutout).
        temperature: NT-Xent temperature (0.5 in the paper).
        weights: (rotation, contrastive, reconstruction) weights (all 1 in the paper).

    Returns:
        ``{"loss", "rotation", "contrastive", "reconstruction"}`` scalar float32 tensors. The
        rotation CE and the L1 are means over both views (all samples, all voxels).
    """
    rot = F.cross_entropy(torch.cat([out1.rotation, out2.rotation]).float(),
                          torch.cat([rot_targets1, rot_targets2]))
    con = nt_xent(out1.contrastive, out2.contrastive, temperature)
    rec = F.l1_loss(torch.cat([out1.reconstruction, out2.reconstruction]).float(),
                    torch.cat([x1, x2]).float())
    total = weights[0] * rot + weights[1] * con + weights[2] * rec
    return {"loss": total, "rotation": rot, "contrastive": con, "reconstruction": rec}
