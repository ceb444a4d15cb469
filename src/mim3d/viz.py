"""Pictures. matplotlib is imported lazily and only through its object API (no pyplot), so
importing mim3d never touches the user's plotting backend and figures render headless (Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mim3d.masking import LevelGeometry, LevelMasks, unpatchify

__all__ = ["reconstruction_picture", "reconstruction_volumes", "save_levels_png",
           "save_reconstruction_png"]

_LEVEL_COLOURS = ("#ffd700", "#00e5ff", "#ff4fd8", "#7CFC00", "#ff8c00")
_MASK_RGBA = (1.0, 0.15, 0.1, 0.32)
# (title, slice axis, horizontal axis, vertical axis) in the crop's array axes (D, H, W).
_VIEWS = (("axial", 2, 0, 1), ("coronal", 1, 0, 2), ("sagittal", 0, 1, 2))


# ------------------------------------------------------------ level picture (masks and boxes) ----


def _descendants(levels: Sequence[LevelMasks], geometry: Sequence[LevelGeometry],
                 sample: int) -> list[list[int]]:
    """Indices, per level, of the volumes descending from batch ``sample`` (parent-major)."""
    current, out = [sample], []
    for geo in geometry[: len(levels)]:
        out.append(current)
        if geo.gamma:
            current = [i * geo.gamma + j for i in current for j in range(geo.gamma)]
    return out


def _level1_voxel_mask(mask: np.ndarray, geo: LevelGeometry) -> np.ndarray:
    """Nearest-neighbour map of a level-1 token mask ``(N,)`` onto the crop's voxels."""
    grid = mask.reshape(geo.token_grid)
    # Voxel v of an axis of size S lies in token floor(v * g / S) (S need not divide by g).
    idx = [np.arange(s) * g // s for s, g in zip(geo.crop_size, geo.token_grid)]
    return grid[np.ix_(*idx)]


def _colour(level_index: int) -> str:
    """Outline colour of level ``level_index + 1`` (``level_index`` >= 1, 0-based)."""
    return _LEVEL_COLOURS[(level_index - 1) % len(_LEVEL_COLOURS)]


def _draw_view(ax, view: tuple[str, int, int, int], crop: np.ndarray, shade: np.ndarray,
               boxes: list[np.ndarray], centre: np.ndarray) -> None:
    """Draw one slice with the level-1 mask overlay and the boxes of levels >= 2 it cuts.

    Args:
        ax: matplotlib Axes.
        view: ``(title, slice axis, horizontal axis, vertical axis)``.
        crop: ``S1`` volume in [0, 1]; shade: ``S1`` bool level-1 voxel mask.
        boxes: per level >= 2 (list index 1, 2, ...; index 0 unused), ``(n, 3, 2)`` voxel boxes.
        centre: ``(3,)`` voxel the three slices pass through.
    """
    from matplotlib.patches import Rectangle

    title, s_ax, h_ax, v_ax = view
    cut = [slice(None)] * 3
    cut[s_ax] = int(centre[s_ax])
    # Transposed so the horizontal image axis is h_ax and the vertical one v_ax.
    img, msk = crop[tuple(cut)].T, shade[tuple(cut)].T
    ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
    overlay = np.zeros(msk.shape + (4,), dtype=np.float32)
    overlay[msk] = _MASK_RGBA
    ax.imshow(overlay, origin="lower", interpolation="nearest")
    for lvl in range(1, len(boxes)):
        for b in boxes[lvl]:
            if not b[s_ax, 0] <= centre[s_ax] < b[s_ax, 1]:
                continue
            # Inset a little so boxes sharing an edge stay distinguishable.
            pad = min(max(crop.shape) / 100, (b[:, 1] - b[:, 0]).min() / 8)
            ax.add_patch(Rectangle(
                (b[h_ax, 0] - 0.5 + pad, b[v_ax, 0] - 0.5 + pad),
                b[h_ax, 1] - b[h_ax, 0] - 2 * pad, b[v_ax, 1] - b[v_ax, 0] - 2 * pad,
                fill=False, edgecolor=_colour(lvl), linewidth=2.0 if lvl == 1 else 1.4))
    ax.set_title(f"{title} (array axis {s_ax} = {int(centre[s_ax])})", fontsize=10)
    ax.set_xlabel(f"array axis {h_ax}")
    ax.set_ylabel(f"array axis {v_ax}")


def save_levels_png(crop: np.ndarray, levels: list[LevelMasks],
                    geometry: Sequence[LevelGeometry], path: str | PathLike,
                    sample: int = 0) -> None:
    """Draw the nested MiM levels of one sample on three orthogonal slices (paper Fig. 3/9).

    The level-1 crop is shown in grey with its masked units shaded red; boxes of level 2, 3, ...
    are outlined in one colour per level. Slices pass through the centre of the first level-2
    box (the crop centre when L = 1); only boxes cut by a slice are drawn on it.

    Args:
        crop: level-1 crop, shape ``geometry[0].crop_size``, values in [0, 1].
        levels: output of :func:`mim3d.masking.sample_levels`.
        geometry: output of :func:`mim3d.masking.build_geometry`.
        path: PNG file to write.
        sample: batch sample to draw.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    crop = np.asarray(crop, dtype=np.float32)
    if crop.shape != tuple(geometry[0].crop_size):
        raise ValueError(f"crop has shape {crop.shape}; expected the level-1 crop size "
                         f"{tuple(geometry[0].crop_size)}")
    owned = _descendants(levels, geometry, sample)
    shade = _level1_voxel_mask(levels[0].mask[sample].cpu().numpy(), geometry[0])
    boxes = [lm.boxes[idx].cpu().numpy() for lm, idx in zip(levels, owned)]
    if len(levels) > 1:
        centre = (boxes[1][0, :, 0] + boxes[1][0, :, 1]) // 2
    else:
        centre = np.asarray(crop.shape) // 2

    fig = Figure(figsize=(12, 4.9), dpi=100)
    for ax, view in zip(fig.subplots(1, 3), _VIEWS):
        _draw_view(ax, view, crop, shade, boxes, centre)
    handles = [Patch(facecolor=_MASK_RGBA, label="level-1 masked units")]
    handles += [Patch(facecolor="none", edgecolor=_colour(i), label=f"level-{i + 1} boxes")
                for i in range(1, len(levels))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"MiM levels, sample {sample}: level-1 crop {tuple(geometry[0].crop_size)}")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path)


# ---------------------------------------------- reconstruction picture (model output, per level) ----

#: Value shown on masked tokens of the masked input. Intensities live in [0, 1] with air at 0
#: (DESIGN §4), so hidden tokens read as black holes inside the body.
MASK_FILL = 0.0
_COLUMNS = ("input", "masked input", "reconstruction")


def _lineage(levels: Sequence[Any], sample: int) -> list[int]:
    """Index, per level, of the volume drawn: ``sample``, then each time its first child.

    Children are looked up through ``parent`` rather than assuming the parent-major layout, so
    the choice stays right whatever order a model keeps a level's volumes in.
    """
    n1 = int(levels[0].mask.shape[0])
    if not 0 <= sample < n1:
        raise ValueError(f"sample={sample} is out of range: level 1 has {n1} volumes")
    chain = [sample]
    for lv in levels[1:]:
        children = (lv.parent.detach().cpu() == chain[-1]).nonzero().flatten()
        if children.numel() == 0:
            raise ValueError(f"volume {chain[-1]} of level {len(chain)} has no child at level "
                             f"{len(chain) + 1}; check the output's parent indices")
        chain.append(int(children[0]))
    return chain


def _level_volumes(lv: Any, idx: int, patch_size: int, norm_pix: bool, eps: float,
                   fill: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def reconstruction_volumes(output: Any, *, patch_size: int, norm_pix: bool, sample: int = 0,
                           eps: float = 1e-6, fill: float = MASK_FILL,
                           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Input, masked input and reconstruction of one volume per level, for one batch sample.

    Level 1 shows volume ``sample``; each next level shows the first child (lowest index whose
    ``parent`` points at it) of the volume shown above, so the rows zoom into one lineage.
    The reconstruction keeps the input on visible tokens and the prediction on masked ones.

    Args:
        output: a :class:`mim3d.models.mim.MiMOutput` or any object whose ``levels`` have
            ``inputs (B_l, C, *R)``, ``pred (B_l, N, p^3*C)``, ``target (B_l, N, p^3*C)``
            (``patchify(inputs)``), ``mask (B_l, N)`` bool (True = masked), ``parent (B_l,)``.
        patch_size: token edge ``p`` in input voxels.
        norm_pix: whether ``pred`` is in per-token normalised units (the loss's ``norm_pix``).
        sample: level-1 batch sample to follow.
        eps: variance epsilon of the normalisation (the loss's default is 1e-6).
        fill: value shown on masked tokens of the masked input.

    Returns:
        One ``(input, masked_input, reconstruction)`` per level, each a float32 ``R`` array
        ``(D, H, W)`` of channel 0.

    Raises:
        ValueError: no levels, ``sample`` out of range or a volume without a child.
    """
    levels = list(output.levels)
    if not levels:
        raise ValueError("the model output has no levels")
    chain = _lineage(levels, sample)
    return [_level_volumes(lv, idx, patch_size, norm_pix, eps, fill)
            for lv, idx in zip(levels, chain)]


def _central_slice(vol: np.ndarray, view: tuple[str, int, int, int]) -> np.ndarray:
    """Central slice of ``vol (D, H, W)`` for ``view``, oriented as in :func:`_draw_view`."""
    _, s_ax, _, _ = view
    cut: list[slice | int] = [slice(None)] * 3
    cut[s_ax] = vol.shape[s_ax] // 2
    # Transposed so the horizontal image axis is the view's h_ax and the vertical one v_ax.
    return vol[tuple(cut)].T


def _reconstruction_figure(volumes: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                           row_labels: list[str], title: str) -> Any:
    """Grid figure: one row per volume, column groups input | masked input | reconstruction."""
    from matplotlib.figure import Figure

    n = len(volumes)
    fig = Figure(figsize=(14.0, 1.55 * n + 0.85), dpi=100)
    # Narrow empty columns between the three groups keep them apart.
    gs = fig.add_gridspec(n, 11, width_ratios=[1, 1, 1, 0.15] * 2 + [1, 1, 1], wspace=0.04,
                          hspace=0.06, left=0.05, right=0.995, bottom=0.01,
                          top=1.0 - 0.75 / fig.get_figheight())
    for row, (vols, label) in enumerate(zip(volumes, row_labels)):
        for g, vol in enumerate(vols):
            for v, view in enumerate(_VIEWS):
                ax = fig.add_subplot(gs[row, 4 * g + v])
                ax.imshow(_central_slice(vol, view), cmap="gray", vmin=0.0, vmax=1.0,
                          origin="lower", interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(view[0], fontsize=9)
                    if v == 1:
                        ax.annotate(_COLUMNS[g], (0.5, 1.0), xytext=(0, 16),
                                    xycoords="axes fraction", textcoords="offset points",
                                    ha="center", va="bottom", fontsize=12, weight="bold")
                if g == 0 and v == 0:
                    ax.set_ylabel(label, fontsize=10)
    fig.suptitle(title, fontsize=10, x=0.01, y=0.995, ha="left", va="top")
    return fig


def _rgb(fig: Any) -> np.ndarray:
    """``(H, W, 3)`` uint8 pixels of a matplotlib figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def reconstruction_picture(output: Any, *, patch_size: int, norm_pix: bool,
                           sample: int = 0) -> np.ndarray:
    """Tri-planar picture of :func:`reconstruction_volumes` (grey, clipped to [0, 1]).

    Args:
        output: model output, see :func:`reconstruction_volumes`.
        patch_size: token edge ``p``.
        norm_pix: whether ``pred`` is per-token normalised.
        sample: level-1 batch sample to follow.

    Returns:
        ``(H, W, 3)`` uint8 RGB, ready for ``SummaryWriter.add_image(..., dataformats="HWC")``.
    """
    volumes = reconstruction_volumes(output, patch_size=patch_size, norm_pix=norm_pix,
                                     sample=sample)
    labels = [f"level {row + 1}\nvolume {idx}"
              for row, idx in enumerate(_lineage(list(output.levels), sample))]
    pix = "de-normalised per token" if norm_pix else "raw voxels"
    return _rgb(_reconstruction_figure(
        volumes, labels, f"MiM reconstruction, sample {sample} ({pix}; central slices)"))


def save_reconstruction_png(output: Any, path: str | PathLike, *, patch_size: int,
                            norm_pix: bool, sample: int = 0) -> np.ndarray:
    """Write :func:`reconstruction_picture` to ``path`` as PNG and return it.

    Returns:
        The ``(H, W, 3)`` uint8 picture that was written.
    """
    from matplotlib.image import imsave

    picture = reconstruction_picture(output, patch_size=patch_size, norm_pix=norm_pix,
                                     sample=sample)
    imsave(path, picture, format="png")
    return picture


def save_inpainting_png(targets: Sequence[Tensor], inputs: Sequence[Tensor],
                        reconstructions: Sequence[Tensor], path: str | PathLike, *,
                        sample: int = 0) -> np.ndarray:
    """Swin-UNETR SSL picture: per view, the rotated view | its cut-out input | the inpainting.

    Args:
        targets, inputs, reconstructions: one ``(B, C, D, H, W)`` tensor per view.
        path: PNG to write.
        sample: batch sample drawn.

    Returns:
        The ``(H, W, 3)`` uint8 picture that was written.
    """
    from matplotlib.image import imsave

    def vol(t: Tensor) -> np.ndarray:
        return t[sample, 0].detach().float().clamp(0, 1).cpu().numpy()

    volumes = [(vol(t), vol(i), vol(r)) for t, i, r in zip(targets, inputs, reconstructions)]
    labels = [f"view {v + 1}" for v in range(len(volumes))]
    picture = _rgb(_reconstruction_figure(
        volumes, labels, f"Swin-UNETR SSL inpainting, sample {sample} (central slices)"))
    imsave(path, picture, format="png")
    return picture
