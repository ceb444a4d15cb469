"""The MiM module: every level of a batch of level-1 crops through one encoder and decoder.

No loss lives here (see :mod:`mim3d.losses`) and no random draw either: masks come in as
:class:`mim3d.masking.LevelMasks` from :func:`mim3d.masking.sample_levels`, so a run is
reproducible and tests can pass masks in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mim3d.masking import LevelGeometry, LevelMasks, patchify
from mim3d.models.decoder import MaskedDecoder
from mim3d.models.heads import ProjectionHead


@dataclass
class LevelOutput:
    """What one level produced, batched over its volumes (B_l of them).

    Attributes:
        level: 1-based level number.
        inputs: (B_l, C, *R) the level volumes as the encoder saw them (before masking).
        pred: (B_l, N, p^3 * C) predicted voxels of every token.
        target: (B_l, N, p^3 * C) the raw voxels of every token (``patchify(inputs)``).
        mask: (B_l, N) bool, True where the token was hidden from the encoder.
        context: (B_l, D) projected context vectors (None at level 1 or without alignment).
        unit_features: (B_l, U, D) projected per-unit features (None at the last level).
        parent: (B_l,) index of each volume's parent in the previous level (-1 at level 1).
        parent_unit: (B_l,) unit of the parent each volume was cut from (-1 at level 1).
        boxes: (B_l, 3, 2) half-open voxel ranges in the level-1 crop.
    """

    level: int
    inputs: Tensor
    pred: Tensor
    target: Tensor
    mask: Tensor
    context: Tensor | None
    unit_features: Tensor | None
    parent: Tensor
    parent_unit: Tensor
    boxes: Tensor


@dataclass
class MiMOutput:
    """Per-level outputs, coarse to fine."""

    levels: list[LevelOutput]


def _root_index(masks: Sequence[LevelMasks], level: int) -> Tensor:
    """Index of the level-1 sample every volume of ``level`` (0-based) descends from."""
    idx = torch.arange(masks[level].mask.shape[0], device=masks[level].parent.device)
    for lv in range(level, 0, -1):
        idx = masks[lv].parent[idx]
    return idx


def cut_level_volumes(x1: Tensor, boxes: Tensor, roots: Tensor, crop: Sequence[int],
                      size: Sequence[int], resize: str) -> Tensor:
    """Cut equally sized boxes out of the level-1 crops and resize them to the encoder input.

    One gather over all boxes (no host round trip for the box coordinates, which may live on
    the GPU), then one resize.

    Args:
        x1: (B, C, *S1) level-1 crops.
        boxes: (B_l, 3, 2) half-open voxel ranges in the level-1 crop, each of size ``crop``.
        roots: (B_l,) which crop each box lies in.
        crop: the box size S_l.
        size: R, the encoder input size.
        resize: ``LevelGeometry.resize``: ``none``, ``area``, ``trilinear`` or ``nearest``.

    Returns:
        (B_l, C, *R) volumes.
    """
    roots = roots.to(x1.device)
    if tuple(crop) == tuple(x1.shape[2:]):
        out = x1.index_select(0, roots)
    else:
        starts = boxes[:, :, 0].to(x1.device)
        ax = [starts[:, a, None] + torch.arange(crop[a], device=x1.device) for a in range(3)]
        out = x1.permute(0, 2, 3, 4, 1)[roots[:, None, None, None], ax[0][:, :, None, None],
                                         ax[1][:, None, :, None], ax[2][:, None, None, :]]
        out = out.permute(0, 4, 1, 2, 3).contiguous()  # (B_l, C, *S_l)
    if resize == "none":
        return out
    corners = {"align_corners": False} if resize == "trilinear" else {}
    return F.interpolate(out, size=tuple(size), mode=resize, **corners)


def unit_means(features: Tensor, grid: Sequence[int], unit: Sequence[int]) -> Tensor:
    """Mean token features per unit.

    Args:
        features: (B, N, E) tokens in raster order on ``grid``.
        grid: token grid (g0, g1, g2).
        unit: unit size in tokens (k0, k1, k2); units are numbered in raster order too.

    Returns:
        (B, U, E) with U = prod(g_i / k_i).
    """
    b, _, e = features.shape
    (g0, g1, g2), (k0, k1, k2) = grid, unit
    x = features.reshape(b, g0 // k0, k0, g1 // k1, k1, g2 // k2, k2, e)
    return x.mean(dim=(2, 4, 6)).reshape(b, -1, e)


class MiM(nn.Module):
    """Mask in Mask: multi-level masked reconstruction with cross-level alignment features.

    Args:
        encoder: a masked encoder with ``forward(x, ids_keep) -> (B, N_vis, E)`` and
            ``embed_dim`` (:class:`~mim3d.models.hybrid.HybridEncoder` or
            :class:`~mim3d.models.vit.ViTEncoder`).
        geometry: one :class:`~mim3d.masking.LevelGeometry` per level, coarse to fine.
        in_channels: image channels C.
        patch_size: token size p in encoder-input voxels.
        input_size: R, the encoder input size.
        decoder_dim, decoder_depth, decoder_heads, mlp_ratio: light transformer decoder.
        decoder_checkpointing: recompute the decoder's blocks in backward (saves memory).
        proj_dim: width D of the projection heads (hidden and output).
        align: build projection heads for cross-level alignment (needs >= 2 levels).
        stop_grad: detach parent unit features before the parent head (the head still learns).
        one_pass: run the encoder's conv stages and the decoder once over the stacked volumes
            of all levels (``encoder.forward_levels``); False runs level by level (the same
            function, in more and smaller passes); None: one pass when the input is on CUDA.
    """

    def __init__(self, *, encoder: nn.Module, geometry: Sequence[LevelGeometry],
                 in_channels: int = 1, patch_size: int = 16,
                 input_size: Sequence[int] = (96, 96, 96), decoder_dim: int = 576,
                 decoder_depth: int = 8, decoder_heads: int = 16, mlp_ratio: float = 4.0,
                 proj_dim: int = 2048, align: bool = True, stop_grad: bool = True,
                 one_pass: bool | None = None, decoder_checkpointing: bool = False) -> None:
        super().__init__()
        if len(geometry) < 1:
            raise ValueError(f"geometry={geometry!r}: need at least one level")
        grid = tuple(int(r) // patch_size for r in input_size)
        if any(g * patch_size != r for g, r in zip(grid, input_size)):
            raise ValueError(f"input_size={tuple(input_size)} is not divisible by "
                             f"patch_size={patch_size}")
        if align and len(geometry) < 2:
            raise ValueError("align=True needs at least 2 levels; pass align=False for L=1")
        self.encoder = encoder
        self.geometry = tuple(geometry)
        self.patch_size = patch_size
        self.input_size = tuple(int(r) for r in input_size)
        self.grid = grid
        self.stop_grad = stop_grad
        self.one_pass = one_pass
        self.decoder = MaskedDecoder(
            encoder_dim=encoder.embed_dim, dim=decoder_dim, depth=decoder_depth,
            num_heads=decoder_heads, grid=grid, out_dim=patch_size ** 3 * in_channels,
            mlp_ratio=mlp_ratio, grad_checkpointing=decoder_checkpointing)
        self.child_head = ProjectionHead(in_dim=decoder_dim, hidden_dim=proj_dim,
                                         out_dim=proj_dim) if align else None
        self.parent_head = ProjectionHead(in_dim=decoder_dim, hidden_dim=proj_dim,
                                          out_dim=proj_dim) if align else None

    def level_inputs(self, x1: Tensor, masks: Sequence[LevelMasks]) -> list[Tensor]:
        """Build every level's encoder inputs (B_l, C, *R) from the level-1 crops (B, C, *S1)."""
        return [cut_level_volumes(x1, m.boxes, _root_index(masks, lv), geo.crop_size,
                                  self.input_size, geo.resize)
                for lv, (geo, m) in enumerate(zip(self.geometry, masks))]

    def _decode_levels(self, vols: list[Tensor],
                       masks: Sequence[LevelMasks]) -> list[tuple[Tensor, Tensor]]:
        """(pred, decoder features) of every level, in one pass or level by level."""
        one = vols[0].is_cuda if self.one_pass is None else self.one_pass
        if not (one and hasattr(self.encoder, "forward_levels")):
            outs = [self.decoder(self.encoder(v, m.ids_keep), m.ids_restore)
                    for v, m in zip(vols, masks)]
            return [(d.pred, d.features) for d in outs]
        latents = self.encoder.forward_levels(torch.cat(vols), [m.ids_keep for m in masks])
        dec = self.decoder.forward_levels(latents, [m.ids_restore for m in masks])
        sizes = [v.shape[0] for v in vols]
        return list(zip(dec.pred.split(sizes), dec.features.split(sizes)))

    def forward(self, x1: Tensor, masks: Sequence[LevelMasks]) -> MiMOutput:
        """Run every level.

        Args:
            x1: (B, C, *S1) level-1 crops, intensities already normalised.
            masks: one :class:`~mim3d.masking.LevelMasks` per level, from ``sample_levels``.

        Returns:
            :class:`MiMOutput` with one :class:`LevelOutput` per level.
        """
        if len(masks) != len(self.geometry):
            raise ValueError(f"got masks for {len(masks)} levels, the model has "
                             f"{len(self.geometry)}")
        expected = tuple(self.geometry[0].crop_size)
        if tuple(x1.shape[2:]) != expected:
            raise ValueError(f"level-1 crop shape {tuple(x1.shape[2:])} != geometry {expected}")
        vols = self.level_inputs(x1, masks)
        levels = []
        for lv, (geo, m, vol, (pred, feats)) in enumerate(
                zip(self.geometry, masks, vols, self._decode_levels(vols, masks))):
            context = units = None
            if self.child_head is not None and lv > 0:
                context = self.child_head(feats.mean(dim=1))
            if self.parent_head is not None and lv < len(self.geometry) - 1:
                unit = unit_means(feats, self.grid, geo.unit_tokens)
                units = self.parent_head(unit.detach() if self.stop_grad else unit)
            levels.append(LevelOutput(
                level=lv + 1, inputs=vol, pred=pred, target=patchify(vol, self.patch_size),
                mask=m.mask, context=context, unit_features=units, parent=m.parent,
                parent_unit=m.parent_unit, boxes=m.boxes))
        return MiMOutput(levels=levels)
