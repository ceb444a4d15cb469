"""Token layout and static multi-level geometry of MiM (DESIGN §2), as pure functions.

:func:`patchify` / :func:`unpatchify` cut a volume into raster-ordered tokens and back;
:func:`build_geometry` validates a multi-level configuration and derives each level's
:class:`LevelGeometry` (token grid, mask units, masked-unit count, children, resize kind). The
index conventions are those of :mod:`mim3d.masking`. Nothing here draws a random number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["RESIZE_MODES", "SOURCES", "GeometryError", "LevelGeometry", "build_geometry",
           "patchify", "resize_kind", "unpatchify"]

#: Which units of a volume feed its children: the paper's masked ones, or the Table IX ablation.
SOURCES = ("masked", "unmasked")
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
    if source not in SOURCES:
        raise GeometryError(f"source={source!r} must be one of {SOURCES}")
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
