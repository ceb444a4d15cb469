"""Random MiM mask sampling (DESIGN §2): unit masks, MAE index tensors, nested children.

:func:`sample_levels` draws, for a batch of level-1 crops, every level's unit mask, the token
mask and MAE indices derived from it, and the boxes of the child volumes cut from chosen units;
:func:`levels_to_json` describes one sample's tree of volumes. The index conventions are those of
:mod:`mim3d.masking`. Every random draw takes an explicit ``torch.Generator``; tensors are
created on its device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mim3d.masking.geometry import SOURCES, GeometryError, LevelGeometry

__all__ = ["LevelMasks", "child_boxes", "expand_units", "levels_to_json", "mask_indices",
           "sample_children", "sample_levels", "unit_mask"]


@dataclass
class LevelMasks:
    """Masks and boxes of all ``B_l`` volumes of one level (``B_l = B * prod(gamma_<l)``).

    Attributes:
        level: 1-based level.
        mask: ``(B_l, N)`` bool, True = masked token.
        ids_keep: ``(B_l, N_vis)`` long, visible token indices, ascending.
        ids_mask: ``(B_l, N_mask)`` long, masked token indices, ascending.
        ids_restore: ``(B_l, N)`` long; ``cat([kept, masked], 1).gather(1, ids_restore)``
            puts tokens back in raster order (MAE convention).
        unit_mask: ``(B_l, n_units)`` bool, True = masked unit.
        boxes: ``(B_l, 3, 2)`` long, ``[start, stop)`` voxels in the level-1 crop.
        parent: ``(B_l,)`` long, parent volume index in the previous level (-1 at level 1).
        parent_unit: ``(B_l,)`` long, flat unit index in the parent (-1 at level 1).
    """

    level: int
    mask: Tensor
    ids_keep: Tensor
    ids_mask: Tensor
    ids_restore: Tensor
    unit_mask: Tensor
    boxes: Tensor
    parent: Tensor
    parent_unit: Tensor


def unit_mask(batch: int, n_units: int, n_masked: int, generator: torch.Generator) -> Tensor:
    """Mask exactly ``n_masked`` of ``n_units`` units per row, uniformly at random.

    Returns:
        ``(batch, n_units)`` bool, True = masked.
    """
    if not 0 <= n_masked <= n_units:
        raise GeometryError(f"n_masked={n_masked} must lie in [0, n_units={n_units}]")
    noise = torch.rand(batch, n_units, generator=generator, device=generator.device)
    ids = noise.argsort(dim=1)
    out = torch.zeros(batch, n_units, dtype=torch.bool, device=noise.device)
    return out.scatter_(1, ids[:, :n_masked], True)


def expand_units(unit_mask: Tensor, unit_grid: Sequence[int], unit_tokens: Sequence[int]) -> Tensor:
    """Expand a unit mask to the token grid: every token of a masked unit is masked.

    Args:
        unit_mask: ``(B, n_units)`` bool in unit raster order.
        unit_grid: ``(u0, u1, u2)``.
        unit_tokens: ``(k0, k1, k2)`` tokens per unit per axis.

    Returns:
        ``(B, N)`` bool with ``N = prod(unit_grid * unit_tokens)`` in token raster order.
    """
    b = unit_mask.shape[0]
    m = unit_mask.reshape(b, *[int(u) for u in unit_grid])
    for ax, k in enumerate(unit_tokens):
        m = m.repeat_interleave(int(k), dim=ax + 1)
    return m.reshape(b, -1)


def mask_indices(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Turn a token mask into MAE index tensors.

    Args:
        mask: ``(B, N)`` bool, True = masked; every row must mask the same number of tokens.

    Returns:
        ``ids_keep (B, N_vis)``, ``ids_mask (B, N_mask)`` (each ascending) and
        ``ids_restore (B, N)`` such that gathering ``cat([kept, masked], 1)`` with it restores
        raster order.
    """
    counts = mask.sum(dim=1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError(f"every row must mask the same number of tokens, got {counts.tolist()}")
    n_vis = mask.shape[1] - (int(counts[0]) if counts.numel() else 0)
    # A stable sort on the 0/1 mask lists visible tokens then masked ones, each ascending.
    ids_shuffle = mask.to(torch.uint8).argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1)
    return ids_shuffle[:, :n_vis], ids_shuffle[:, n_vis:], ids_restore


def sample_children(unit_mask: Tensor, gamma: int, generator: torch.Generator,
                    source: str = "masked") -> Tensor:
    """Draw ``gamma`` distinct units per row, without replacement, from the chosen source.

    Args:
        unit_mask: ``(B, n_units)`` bool, True = masked.
        gamma: children per row.
        generator: random source.
        source: ``"masked"`` or ``"unmasked"`` units are eligible.

    Returns:
        ``(B, gamma)`` long unit indices, ascending within each row.
    """
    if source not in SOURCES:
        raise GeometryError(f"source={source!r} must be one of {SOURCES}")
    eligible = unit_mask if source == "masked" else ~unit_mask
    fewest = int(eligible.sum(dim=1).min()) if eligible.shape[0] else gamma
    if gamma < 0 or fewest < gamma:
        raise GeometryError(f"gamma={gamma} but a row has only {fewest} {source} units; lower "
                            "gamma or change the mask ratio")
    noise = torch.rand(unit_mask.shape, generator=generator, device=generator.device)
    noise = noise.to(unit_mask.device).masked_fill(~eligible, 2.0)  # ineligible sort last
    return noise.argsort(dim=1)[:, :gamma].sort(dim=1).values


def child_boxes(parent_boxes: Tensor, child_units: Tensor, unit_grid: Sequence[int],
                child_size: Sequence[int]) -> Tensor:
    """Voxel boxes of child volumes cut from units of their parents.

    Args:
        parent_boxes: ``(B, 3, 2)`` long ``[start, stop)`` per axis.
        child_units: ``(B, gamma)`` flat unit indices.
        unit_grid: ``(u0, u1, u2)`` of the parent; parent size == unit_grid * child_size.
        child_size: ``S_{l+1}`` per axis.

    Returns:
        ``(B * gamma, 3, 2)`` long, parent-major.
    """
    _, u1, u2 = (int(v) for v in unit_grid)
    u = child_units.long()
    coords = torch.stack([u // (u1 * u2), (u // u2) % u1, u % u2], dim=-1)  # (B, gamma, 3)
    size = torch.as_tensor([int(s) for s in child_size], dtype=torch.long, device=u.device)
    start = parent_boxes[:, None, :, 0].to(u.device) + coords * size
    return torch.stack([start, start + size], dim=-1).reshape(-1, 3, 2)


def _level_masks(level: int, geo: LevelGeometry, boxes: Tensor, parent: Tensor,
                 parent_unit: Tensor, generator: torch.Generator) -> LevelMasks:
    units = unit_mask(boxes.shape[0], geo.n_units, geo.n_masked, generator)
    mask = expand_units(units, geo.unit_grid, geo.unit_tokens)
    keep, masked, restore = mask_indices(mask)
    return LevelMasks(level, mask, keep, masked, restore, units, boxes, parent, parent_unit)


def sample_levels(batch: int, geometry: Sequence[LevelGeometry], generator: torch.Generator, *,
                  source: str = "masked") -> list[LevelMasks]:
    """Sample the nested masks and boxes of every level for a batch of level-1 crops.

    Args:
        batch: number of level-1 crops ``B``.
        geometry: output of :func:`build_geometry`.
        generator: the only random source (tensors are created on its device).
        source: ``"masked"`` (paper) or ``"unmasked"`` units feed the next level.

    Returns:
        One :class:`LevelMasks` per level; level ``l`` holds ``B * prod(gamma_<l)`` volumes.
    """
    dev = generator.device
    s1 = torch.as_tensor(geometry[0].crop_size, dtype=torch.long, device=dev)
    boxes = torch.stack([torch.zeros_like(s1), s1], dim=-1).expand(batch, 3, 2).clone()
    parent = torch.full((batch,), -1, dtype=torch.long, device=dev)
    parent_unit = parent.clone()
    levels = []
    for i, geo in enumerate(geometry):
        lm = _level_masks(geo.level, geo, boxes, parent, parent_unit, generator)
        levels.append(lm)
        if i + 1 < len(geometry):
            children = sample_children(lm.unit_mask, geo.gamma, generator, source)
            boxes = child_boxes(boxes, children, geo.unit_grid, geometry[i + 1].crop_size)
            parent = torch.arange(boxes.shape[0] // geo.gamma, device=dev)
            parent = parent.repeat_interleave(geo.gamma)
            parent_unit = children.reshape(-1)
    return levels


def levels_to_json(levels: list[LevelMasks], geometry: Sequence[LevelGeometry],
                   sample: int = 0) -> dict:
    """Describe the volumes descending from one batch sample as a JSON-ready dict.

    Ids are paths of child positions: ``"L1"``, ``"L2.j"``, ``"L3.j.m"``. Boxes are
    ``[start, stop)`` voxels of the level-1 crop; ``masked_tokens`` are flat raster indices
    ``(i * g1 + j) * g2 + k`` on the level's token grid.

    ``mask_ratio`` is the ratio asked for; masks are drawn in whole units, so
    ``effective_mask_ratio = n_masked / n_units`` is what the level really hides.

    Returns:
        ``{"levels": [{"level", "crop_size", "token_grid", "unit_tokens", "mask_ratio",
        "n_units", "n_masked", "effective_mask_ratio",
        "volumes": [{"id", "parent", "box", "masked_tokens"}]}]}``.
    """
    out = []
    current: list[tuple[int, str]] = [(sample, "")]  # (volume index, child-position path)
    for i, (lm, geo) in enumerate(zip(levels, geometry)):
        vols = []
        for idx, path in current:
            vid = f"L{geo.level}{path}"
            par = None if i == 0 else f"L{geo.level - 1}{path.rsplit('.', 1)[0]}"
            vols.append({
                "id": vid, "parent": par, "box": lm.boxes[idx].tolist(),
                "masked_tokens": lm.mask[idx].nonzero().flatten().tolist(),
            })
        out.append({"level": geo.level, "crop_size": list(geo.crop_size),
                    "token_grid": list(geo.token_grid), "unit_tokens": list(geo.unit_tokens),
                    "mask_ratio": geo.mask_ratio, "n_units": geo.n_units,
                    "n_masked": geo.n_masked, "effective_mask_ratio": geo.n_masked / geo.n_units,
                    "volumes": vols})
        if geo.gamma:
            current = [(idx * geo.gamma + j, f"{path}.{j}")
                       for idx, path in current for j in range(geo.gamma)]
    return {"levels": out}
