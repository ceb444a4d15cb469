"""Model output pictures: input | masked input | reconstruction of one volume per level."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mim3d.fileio import write_atomically
from mim3d.masking import unpatchify
from mim3d.viz.levels import mask_layer
from mim3d.viz.planes import (
    VIEWS,
    display_plane,
    draw_plane,
    figure_rgb,
    window_caption,
)

__all__ = ["MASK_FILL", "reconstruction_picture", "reconstruction_volumes",
           "save_inpainting_png", "save_reconstruction_png"]

#: Value under masked tokens of the masked input. Intensities live in [0, 1] with air at 0
#: (DESIGN §4); the pictures tint these tokens (:data:`mim3d.viz.levels.MASK_RGBA`) so a hidden
#: token never reads as air.
MASK_FILL = 0.0
_COLUMNS = ("input", "masked input", "reconstruction")
Volumes = tuple[np.ndarray, np.ndarray, np.ndarray]


def _lineage(levels: Sequence[Any], sample: int, volume: Sequence[int] = ()) -> list[int]:
    """Index, per level, of the volume drawn: ``sample``, then each time a child of it.

    ``volume[l]`` is the position of the child followed below level ``l + 1`` among the
    children of the volume drawn there (0 = first; missing entries are 0), the numbering of the
    ids ``L2.j``, ``L3.j.m`` of ``levels.json``. Children are looked up through ``parent`` rather
    than assuming the parent-major layout, so the choice stays right whatever order a model
    keeps a level's volumes in.
    """
    n1 = int(levels[0].mask.shape[0])
    if not 0 <= sample < n1:
        raise ValueError(f"sample={sample} is out of range: level 1 has {n1} volumes")
    if len(volume) > len(levels) - 1:
        raise ValueError(f"volume path {list(volume)} has {len(volume)} steps but the output "
                         f"has {len(levels)} levels (at most {len(levels) - 1} steps)")
    chain = [sample]
    for depth, lv in enumerate(levels[1:]):
        children = (lv.parent.detach().cpu() == chain[-1]).nonzero().flatten()
        if children.numel() == 0:
            raise ValueError(f"volume {chain[-1]} of level {len(chain)} has no child at level "
                             f"{len(chain) + 1}; check the output's parent indices")
        pos = int(volume[depth]) if depth < len(volume) else 0
        if not 0 <= pos < children.numel():
            raise ValueError(f"volume path {list(volume)}: level {depth + 2} has children "
                             f"0..{children.numel() - 1} of the volume above, not {pos}")
        chain.append(int(children[pos]))
    return chain


def parse_volume_id(text: str) -> tuple[int, ...]:
    """``"L3.2.1"``, ``"2.1"`` or ``""`` -> child positions ``(2, 1)`` (``levels.json`` ids)."""
    body, head = text.strip(), None
    if body[:1] in ("L", "l"):
        head, _, body = body[1:].partition(".")
    parts = [p for p in body.split(".") if p != ""]
    if not all(p.isdigit() for p in parts) or (
            head is not None and (not head.isdigit() or int(head) != len(parts) + 1)):
        raise ValueError(f"volume id {text!r}: write it as in levels.json, e.g. L1, L2.3 or "
                         "L3.2.1 (level, then the child position at each level below 1)")
    return tuple(int(p) for p in parts)


def _level_volumes(lv: Any, idx: int, patch_size: int, norm_pix: bool, eps: float,
                   fill: float) -> Volumes:
    """``(input, masked input, reconstruction)`` of volume ``idx`` of one level, channel 0.

    Args:
        lv: a level output with ``inputs (B_l, C, *R)``, ``pred``/``target (B_l, N, p^3*C)``
            and ``mask (B_l, N)``.
        idx: volume index within the level.

    Returns:
        Three float32 ``R`` arrays.
    """
    inputs = lv.inputs[idx].detach().float().cpu()  # (C, *R)
    channels, size = int(inputs.shape[0]), tuple(int(r) for r in inputs.shape[1:])
    grid = tuple(r // patch_size for r in size)
    target = lv.target[idx : idx + 1].detach().float().cpu()  # (1, N, P)
    pred = lv.pred[idx : idx + 1].detach().float().cpu()  # (1, N, P)
    hidden = lv.mask[idx].detach().cpu().bool()[None, :, None]  # (1, N, 1)
    if norm_pix:
        # The decoder predicts per-token normalised voxels (mim3d.losses.reconstruction_loss):
        # map them back with the true token's own statistics, as MAE's visualisation does. This
        # borrows the hidden token's mean and contrast; the picture shows structure, not level.
        mean = target.mean(dim=-1, keepdim=True)
        std = torch.sqrt(target.var(dim=-1, unbiased=False, keepdim=True) + eps)
        pred = pred * std + mean
    masked = target.masked_fill(hidden, fill)
    recon = torch.where(hidden, pred, target)
    vols = [unpatchify(t, patch_size, grid, channels)[0, 0] for t in (masked, recon)]
    return (inputs[0].numpy().astype(np.float32, copy=False),
            *(v.numpy().astype(np.float32, copy=False) for v in vols))


def _hidden_voxels(lv: Any, idx: int, patch_size: int) -> np.ndarray:
    """``R`` bool map of the masked tokens of volume ``idx`` (True = hidden from the encoder)."""
    size = tuple(int(r) for r in lv.inputs.shape[2:])
    grid = tuple(r // patch_size for r in size)
    tokens = lv.mask[idx].detach().cpu().float()[None, :, None].expand(1, -1, patch_size**3)
    return unpatchify(tokens, patch_size, grid, 1)[0, 0].numpy() > 0.5


def reconstruction_volumes(output: Any, *, patch_size: int, norm_pix: bool, sample: int = 0,
                           volume: Sequence[int] = (), eps: float = 1e-6,
                           fill: float = MASK_FILL) -> list[Volumes]:
    """Input, masked input and reconstruction of one volume per level, for one batch sample.

    Level 1 shows volume ``sample``; each next level shows a child (through ``parent``) of the
    volume shown above: the ``volume[l]``-th child, the first by default, so the rows zoom into
    one lineage. The reconstruction keeps the input on visible tokens and the prediction on
    masked ones.

    Args:
        output: a :class:`mim3d.models.mim.MiMOutput` or any object whose ``levels`` have
            ``inputs (B_l, C, *R)``, ``pred (B_l, N, p^3*C)``, ``target (B_l, N, p^3*C)``
            (``patchify(inputs)``), ``mask (B_l, N)`` bool (True = masked), ``parent (B_l,)``.
        patch_size: token edge ``p`` in input voxels.
        norm_pix: whether ``pred`` is in per-token normalised units (the loss's ``norm_pix``).
        sample: level-1 batch sample to follow.
        volume: child positions to follow below level 1 (see :func:`parse_volume_id`).
        eps: variance epsilon of the normalisation (the loss's default is 1e-6).
        fill: value under masked tokens of the masked input.

    Returns:
        One ``(input, masked_input, reconstruction)`` per level, each a float32 ``R`` array
        ``(X, Y, Z)`` (RAS) of channel 0.

    Raises:
        ValueError: no levels, ``sample`` or ``volume`` out of range, or a volume without child.
    """
    levels = list(output.levels)
    if not levels:
        raise ValueError("the model output has no levels")
    chain = _lineage(levels, sample, volume)
    return [_level_volumes(lv, idx, patch_size, norm_pix, eps, fill)
            for lv, idx in zip(levels, chain)]


def _reconstruction_figure(volumes: list[Volumes], hidden: Sequence[np.ndarray | None],
                           row_labels: list[str], title: str, markers: bool = True) -> Any:
    """Grid figure: one row per volume, column groups input | masked input | reconstruction.

    ``hidden[row]`` (``R`` bool) tints the masked tokens of the masked input of that row;
    ``markers`` draws the anatomical markers (only for volumes in RAS order).
    """
    from matplotlib.figure import Figure

    n = len(volumes)
    fig = Figure(figsize=(14.0, 1.55 * n + 1.0), dpi=100)
    # Narrow empty columns between the three groups keep them apart.
    gs = fig.add_gridspec(n, 11, width_ratios=[1, 1, 1, 0.15] * 2 + [1, 1, 1], wspace=0.04,
                          hspace=0.06, left=0.05, right=0.995, bottom=0.01,
                          top=1.0 - 0.9 / fig.get_figheight())
    grey = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    for row, (vols, mask, label) in enumerate(zip(volumes, hidden, row_labels)):
        for g, vol in enumerate(vols):
            for v, view in enumerate(VIEWS):
                ax = fig.add_subplot(gs[row, 4 * g + v])
                index = vol.shape[view.slice_axis] // 2
                layers = [(display_plane(vol, view, index), grey)]
                if g == 1 and mask is not None:
                    layers.append(mask_layer(display_plane(mask, view, index)))
                draw_plane(ax, layers, view, title=view.name if row == 0 else None,
                           marker_size=6, markers=markers)
                if row == 0 and v == 1:
                    ax.annotate(_COLUMNS[g], (0.5, 1.0), xytext=(0, 16),
                                xycoords="axes fraction", textcoords="offset points",
                                ha="center", va="bottom", fontsize=12, weight="bold")
                if g == 0 and v == 0:
                    ax.set_ylabel(label, fontsize=10)
    fig.suptitle(title, fontsize=10, x=0.01, y=0.995, ha="left", va="top")
    return fig


def reconstruction_picture(output: Any, *, patch_size: int, norm_pix: bool, sample: int = 0,
                           volume: Sequence[int] = (),
                           hu_window: Sequence[float] | None = None) -> np.ndarray:
    """Tri-planar picture of :func:`reconstruction_volumes` (grey, clipped to [0, 1]).

    Central slices in radiological convention with R/L, A/P, S/I markers; masked tokens of the
    masked input are tinted red (they are not air); rows are labelled with the ``levels.json``
    ids of the volumes drawn; the HU window is written in the title.

    Args:
        output: model output, see :func:`reconstruction_volumes`.
        patch_size: token edge ``p``.
        norm_pix: whether ``pred`` is per-token normalised.
        sample: level-1 batch sample to follow.
        volume: child positions to follow below level 1 (see :func:`parse_volume_id`).
        hu_window: HU range that [0, 1] stands for (``None``: not an HU window).

    Returns:
        ``(H, W, 3)`` uint8 RGB, ready for ``SummaryWriter.add_image(..., dataformats="HWC")``.
    """
    levels = list(output.levels)
    volumes = reconstruction_volumes(output, patch_size=patch_size, norm_pix=norm_pix,
                                     sample=sample, volume=volume)
    chain = _lineage(levels, sample, volume)
    hidden = [_hidden_voxels(lv, idx, patch_size) for lv, idx in zip(levels, chain)]
    path = [0] * (len(levels) - 1)
    path[: len(volume)] = list(volume)
    labels = [f"level {row + 1}\n" + "L" + ".".join(map(str, [row + 1, *path[:row]]))
              + f" (#{idx})" for row, idx in enumerate(chain)]
    pix = "de-normalised per token" if norm_pix else "raw voxels"
    return figure_rgb(_reconstruction_figure(
        volumes, hidden, labels,
        f"MiM reconstruction, sample {sample} ({pix}; central slices; masked tokens tinted "
        f"red); {window_caption(hu_window)}; radiological convention"))


def save_reconstruction_png(output: Any, path: str | PathLike, *, patch_size: int,
                            norm_pix: bool, sample: int = 0, volume: Sequence[int] = (),
                            hu_window: Sequence[float] | None = None) -> np.ndarray:
    """Write :func:`reconstruction_picture` to ``path`` as PNG (atomically) and return it.

    Returns:
        The ``(H, W, 3)`` uint8 picture that was written.
    """
    from matplotlib.image import imsave

    picture = reconstruction_picture(output, patch_size=patch_size, norm_pix=norm_pix,
                                     sample=sample, volume=volume, hu_window=hu_window)
    write_atomically(path, lambda tmp: imsave(tmp, picture, format="png"))
    return picture


def save_inpainting_png(targets: Sequence[Tensor], inputs: Sequence[Tensor],
                        reconstructions: Sequence[Tensor], path: str | PathLike, *,
                        sample: int = 0, hu_window: Sequence[float] | None = None) -> np.ndarray:
    """Swin-UNETR SSL picture: per view, the rotated view | its cut-out input | the inpainting.

    Args:
        targets, inputs, reconstructions: one ``(B, C, X, Y, Z)`` tensor per view.
        path: PNG to write.
        sample: batch sample drawn.
        hu_window: HU range that [0, 1] stands for (``None``: not an HU window).

    Returns:
        The ``(H, W, 3)`` uint8 picture that was written.
    """
    from matplotlib.image import imsave

    def vol(t: Tensor) -> np.ndarray:
        return t[sample, 0].detach().float().clamp(0, 1).cpu().numpy()

    volumes = [(vol(t), vol(i), vol(r)) for t, i, r in zip(targets, inputs, reconstructions)]
    labels = [f"view {v + 1}" for v in range(len(volumes))]
    picture = figure_rgb(_reconstruction_figure(
        volumes, [None] * len(volumes), labels,
        f"Swin-UNETR SSL inpainting, sample {sample} (central slices of rotated views, so no "
        f"anatomical markers); {window_caption(hu_window)}", markers=False))
    write_atomically(path, lambda tmp: imsave(tmp, picture, format="png"))
    return picture
