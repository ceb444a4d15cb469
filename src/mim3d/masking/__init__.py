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

Two concerns, one module each: :mod:`~mim3d.masking.geometry` (token layout, the static geometry
of every level) and :mod:`~mim3d.masking.sampling` (the random nested masks and boxes). This
package only re-exports their public names.

Every random draw takes an explicit ``torch.Generator``; tensors are created on its device.
"""

from mim3d.masking.geometry import (
    RESIZE_MODES,
    GeometryError,
    LevelGeometry,
    build_geometry,
    patchify,
    resize_kind,
    unpatchify,
)
from mim3d.masking.sampling import (
    LevelMasks,
    child_boxes,
    expand_units,
    levels_to_json,
    mask_indices,
    sample_children,
    sample_levels,
    unit_mask,
)

__all__ = [  # noqa: RUF022 - grouped: types, then functions in pipeline order
    "RESIZE_MODES", "GeometryError", "LevelGeometry", "LevelMasks", "patchify", "unpatchify",
    "resize_kind", "build_geometry",
    "unit_mask", "expand_units", "mask_indices", "sample_children", "child_boxes",
    "sample_levels", "levels_to_json",
]
