"""Token layout, multi-level geometry and MiM mask sampling as pure tensor functions.

Conventions used everywhere in mim3d:

* A volume ``(B, C, D, H, W)`` is cut into ``p^3`` patches on a token grid ``(g0, g1, g2)``.
  Token ``(i, j, k)`` has flat index ``(i * g1 + j) * g2 + k`` (raster order, last axis fastest).
* Level ``l`` is masked in *units*: spatial blocks of ``k_l^3`` tokens (per axis ``k_l``). Unit
  ``(a, b, c)`` on the unit grid ``(u0, u1, u2)`` has flat index ``(a * u1 + b) * u2 + c`` and
  covers tokens ``[a*k0, (a+1)*k0) x [b*k1, (b+1)*k1) x [c*k2, (c+1)*k2)``. A unit is exactly the
  region of one child volume, so a child drawn from a masked unit is entirely hidden from its
  parent (the authors' release masked runs of consecutive raster tokens instead; DESIGN §8).
* Boxes are half-open voxel ranges ``[start, stop)`` in the level-1 crop's array axes.
* Volumes of level ``l+1`` are ordered parent-major: ``index = parent_index * gamma_l + j``.

Every random draw takes an explicit ``torch.Generator``; tensors are created on its device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [  # noqa: RUF022 - grouped: types, then functions in pipeline order
    "RESIZE_MODES", "GeometryError", "LevelGeometry", "LevelMasks", "patchify", "unpatchify",
    "resize_kind", "build_geometry",
    "unit_mask", "expand_units", "mask_indices", "sample_children", "child_boxes",
    "sample_levels", "levels_to_json",
]

_SOURCES = ("masked", "unmasked")
Int3 = tuple[int, int, int]


class GeometryError(ValueError):
    """An impossible multi-level geometry or mask request; the message says what to change."""


def _grid_of(x: Tensor, patch: int) -> Int3:
    if x.dim() != 5:
        raise GeometryError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    if patch < 1 or any(s % patch for s in spatial):
        raise GeometryError(f"spatial size {spatial} is not divisible by patch={patch}; "
                            "resize or pad the volume to a multiple of the patch size")
    return spatial[0] // patch, spatial[1] // patch, spatial[2] // patch


def patchify(x: Tensor, patch: int) -> Tensor:
    """Cut a volume into non-overlapping cubic tokens in raster order.

    Args:
        x: ``(B, C, D, H, W)`` with each spatial size a multiple of ``patch``.
        patch: token edge length ``p`` in voxels.

    Returns:
        ``(B, N, p^3 * C)`` with ``N = g0 * g1 * g2``. Within a token the values are ordered
        ``(pd, ph, pw, C)``: channel fastest, then the width offset, height offset, depth offset.
    """
    g0, g1, g2 = _grid_of(x, patch)
    b, c = x.shape[:2]
    x = x.reshape(b, c, g0, patch, g1, patch, g2, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, g0, g1, g2, pd, ph, pw, C)
    return x.reshape(b, g0 * g1 * g2, patch**3 * c)


def unpatchify(tokens: Tensor, patch: int, grid: Sequence[int], channels: int = 1) -> Tensor:
    """Exact inverse of :func:`patchify`.

    Args:
        tokens: ``(B, N, p^3 * C)`` with ``N = prod(grid)``.
        patch: token edge length ``p``.
        grid: token grid ``(g0, g1, g2)``.
        channels: ``C``.

    Returns:
        ``(B, C, g0 * p, g1 * p, g2 * p)``.
    """
    g0, g1, g2 = (int(v) for v in grid)
    b = tokens.shape[0]
    if tuple(tokens.shape[1:]) != (g0 * g1 * g2, patch**3 * channels):
        raise GeometryError(f"tokens of shape {tuple(tokens.shape)} do not match grid "
                            f"{(g0, g1, g2)}, patch={patch}, channels={channels}")
    x = tokens.reshape(b, g0, g1, g2, patch, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, g0, pd, g1, ph, g2, pw)
    return x.reshape(b, channels, g0 * patch, g1 * patch, g2 * patch)


@dataclass(frozen=True)
class LevelGeometry:
    """Static geometry of one level (see DESIGN §2).

    Attributes:
        level: 1-based level number.
        crop_size: ``S_l`` per axis, in voxels of the level-1 preprocessed volume.
        token_grid: ``g = R / p`` per axis (every level is resized to the encoder input ``R``).
        unit_tokens: ``k_l = g * S_{l+1} / S_l`` per axis; ``(1, 1, 1)`` at the last level.
        unit_grid: ``token_grid // unit_tokens``; also ``S_l / S_{l+1}`` for levels < L.
        n_units: number of mask units, ``prod(unit_grid)``.
        n_masked: masked units per volume, ``round(mask_ratio * n_units)`` (half rounds up),
            clamped to ``[1, n_units - 1]`` so a volume always has something to encode and
            something to reconstruct.
        mask_ratio: requested fraction of units to mask, in (0, 1).
        gamma: children per volume drawn into the next level; 0 at the last level.
        resize: how the level's crops become encoder inputs (see :func:`resize_kind`):
            ``none`` (S_l == R), ``area`` (block averaging: downsampling, and every resize of
            the ``nearest`` mode that downsamples), ``trilinear`` (the paper's upsampling) or
            ``nearest`` (voxel replication: leak-free upsampling).
    """

    level: int
    crop_size: Int3
    token_grid: Int3
    unit_tokens: Int3
    unit_grid: Int3
    n_units: int
    n_masked: int
    mask_ratio: float
    gamma: int
    resize: str = "none"


RESIZE_MODES = ("trilinear", "nearest")


def resize_kind(level: int, crop: Int3, input_size: Int3, patch: int, mode: str) -> str:
    """How a level's crops of size ``crop`` are resized to the encoder input ``input_size``.

    ``trilinear`` mode (the paper): area averaging when every axis shrinks (antialiased for any
    factor), else trilinear. Upsampled tokens then straddle native voxels: the *input* of a
    visible token shares native voxels with its masked neighbours (DESIGN §9).
    ``nearest`` mode (leak-free): every factor must be a whole number and an upsampling factor
    must divide the patch size, so each token covers whole native voxels; resizing is block
    averaging / voxel replication (``area``, or ``nearest`` when nothing shrinks).

    Raises:
        GeometryError: ``nearest`` requested where the geometry does not allow it.
    """
    if mode not in RESIZE_MODES:
        raise GeometryError(f"resize_mode={mode!r} must be one of {RESIZE_MODES}")
    if crop == input_size:
        return "none"
    if mode == "trilinear":
        return "area" if all(c >= r for c, r in zip(crop, input_size)) else "trilinear"
    for c, r in zip(crop, input_size):
        if (c >= r and c % r) or (c < r and (r % c or patch % (r // c))):
            ok = [r // f for f in range(1, patch + 1) if patch % f == 0 and r % f == 0]
            raise GeometryError(
                f"resize_mode=nearest: level {level} resizes {crop} to {input_size}; a shrink "
                f"factor must be a whole number and an enlarging factor a whole number dividing "
                f"patch_size={patch}, so that tokens cover whole native voxels (axis size "
                f"{c} -> {r}; choose a crop side from {ok} or a multiple of {r}), or use "
                "resize_mode=trilinear")
    return "area" if any(c > r for c, r in zip(crop, input_size)) else "nearest"


def _three_ints(name: str, value: Sequence[int]) -> Int3:
    vals = tuple(value) if not isinstance(value, int) else (value,) * 3
    if len(vals) != 3 or any(int(v) != v or v < 1 for v in vals):
        raise GeometryError(f"{name}={value!r} must be 3 positive integers (D, H, W)")
    return int(vals[0]), int(vals[1]), int(vals[2])


def _unit_tokens(l: int, grid: Int3, parent: Int3, child: Int3) -> Int3:
    """Return ``k_l`` per axis or raise a GeometryError proposing valid child sizes."""
    ks = []
    for ax in range(3):
        g, s, c = grid[ax], parent[ax], child[ax]
        if c > s:
            raise GeometryError(f"crop_sizes[{l}]={child} is larger than crop_sizes[{l - 1}]="
                                f"{parent} on axis {ax}; each level must fit inside its parent")
        if (g * c) % s or g % (g * c // s):
            ok = [s * k // g for k in range(1, g + 1) if g % k == 0 and (s * k) % g == 0]
            raise GeometryError(
                f"crop_sizes[{l}]={child}: unit size k = g*S{l + 1}/S{l} = {g}*{c}/{s} = "
                f"{g * c / s:g} tokens on axis {ax} must be a whole number dividing g={g}; "
                f"choose S{l + 1}[{ax}] from {ok} (or change crop_sizes[{l - 1}] / input_size)")
        ks.append(g * c // s)
    return ks[0], ks[1], ks[2]


def _n_masked(l: int, n_units: int, ratio: float) -> int:
    if not 0.0 < ratio < 1.0:
        raise GeometryError(f"mask_ratios[{l}]={ratio} must lie strictly between 0 and 1")
    if n_units < 2:
        raise GeometryError(f"level {l + 1} has {n_units} mask unit; it needs at least 2 so that "
                            "part can be masked and part seen (make the next crop smaller)")
    return min(max(math.floor(ratio * n_units + 0.5), 1), n_units - 1)


def build_geometry(*, crop_sizes: Sequence[Sequence[int]], input_size: Sequence[int],
                   patch_size: int, mask_ratios: Sequence[float], gammas: Sequence[int],
                   source: str = "masked",
                   resize_mode: str = "trilinear") -> tuple[LevelGeometry, ...]:
    """Validate a multi-level configuration (DESIGN §2) and derive every level's geometry.

    Args:
        crop_sizes: ``L`` crop sizes ``S_l`` (3 ints each), in level-1 preprocessed voxels.
        input_size: encoder input ``R`` (3 ints), divisible by ``patch_size``.
        patch_size: token edge ``p`` in input voxels.
        mask_ratios: ``L`` mask ratios in (0, 1).
        gammas: ``L - 1`` children per volume.
        source: ``"masked"`` (paper) or ``"unmasked"`` (Table IX ablation) units feed children.
        resize_mode: ``"trilinear"`` (paper) or ``"nearest"`` (leak-free where the geometry
            allows it), see :func:`resize_kind`.

    Returns:
        One :class:`LevelGeometry` per level.

    Raises:
        GeometryError: naming the offending value and what to do about it.
    """
    if source not in _SOURCES:
        raise GeometryError(f"source={source!r} must be one of {_SOURCES}")
    sizes = [_three_ints(f"crop_sizes[{i}]", s) for i, s in enumerate(crop_sizes)]
    n_lev = len(sizes)
    if n_lev < 1:
        raise GeometryError("crop_sizes is empty; give at least the level-1 crop size")
    if len(mask_ratios) != n_lev:
        raise GeometryError(f"mask_ratios={list(mask_ratios)} has {len(mask_ratios)} values; "
                            f"give one per level ({n_lev})")
    if len(gammas) != n_lev - 1:
        raise GeometryError(f"gammas={list(gammas)} has {len(gammas)} values; give one per "
                            f"level transition ({n_lev - 1})")
    r = _three_ints("input_size", input_size)
    if int(patch_size) != patch_size or patch_size < 1 or any(v % patch_size for v in r):
        raise GeometryError(f"input_size={r} is not divisible by patch_size={patch_size}; "
                            "choose an input size that is a multiple of the patch size")
    grid = (r[0] // patch_size, r[1] // patch_size, r[2] // patch_size)
    out = []
    for l in range(n_lev):
        last = l == n_lev - 1
        k = (1, 1, 1) if last else _unit_tokens(l + 1, grid, sizes[l], sizes[l + 1])
        ugrid = (grid[0] // k[0], grid[1] // k[1], grid[2] // k[2])
        n_units = ugrid[0] * ugrid[1] * ugrid[2]
        n_masked = _n_masked(l, n_units, float(mask_ratios[l]))
        gamma = 0 if last else int(gammas[l])
        if not last:
            avail = n_masked if source == "masked" else n_units - n_masked
            if gamma < 1 or gamma > avail:
                raise GeometryError(
                    f"gammas[{l}]={gammas[l]} but a level-{l + 1} volume has {avail} {source} "
                    f"units ({n_masked} of {n_units} masked); use 1 <= gamma <= {avail} or "
                    "change mask_ratios")
        out.append(LevelGeometry(l + 1, sizes[l], grid, k, ugrid, n_units, n_masked,
                                 float(mask_ratios[l]), gamma,
                                 resize_kind(l + 1, sizes[l], r, patch_size, resize_mode)))
    return tuple(out)


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
    if source not in _SOURCES:
        raise GeometryError(f"source={source!r} must be one of {_SOURCES}")
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
