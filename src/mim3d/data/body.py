"""The patient's body in a CT, as a coarse grid of body fractions for body-aware crops."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["BODY_CELL", "body_cells", "body_mask"]

BODY_CELL = 8  # voxels per side of one body-grid cell


def body_mask(hu: np.ndarray, body_hu: float,
              spacing: Sequence[float] | None = None) -> np.ndarray:
    """Patient body at half resolution, table removed, enclosed air (lungs, gas) included.

    HU > body_hu, opened to cut thin bridges (table pads, cables), largest 3D component kept (drops
    the table and outside objects), then holes filled slice by slice so lungs and bowel gas count
    as body. Half resolution is plenty for an 8-voxel cell grid and 8x cheaper.

    Args:
        hu: (X, Y, Z) image in HU.
        body_hu: body threshold.
        spacing: voxel size in mm; sets the opening radius to about 4 mm (2 half-res voxels
            when None).

    Returns:
        bool array of shape ceil((X, Y, Z) / 2), sampling voxels (2i, 2j, 2k).
    """
    from scipy import ndimage  # only prepare needs it; keeps reading the store light

    radius = 2 if spacing is None else int(np.clip(round(4.0 / (2 * min(spacing))), 1, 3))
    sub = np.asarray(hu[::2, ::2, ::2]) > body_hu
    # Edge padding: the body goes on past the field of view, the scan border is not air.
    opened = ndimage.binary_opening(np.pad(sub, radius, mode="edge"), iterations=radius,
                                    structure=ndimage.generate_binary_structure(3, 1))
    opened = opened[radius:-radius, radius:-radius, radius:-radius]
    labels, n = ndimage.label(opened)
    if n == 0:
        return opened
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    body = labels == int(np.argmax(counts))
    # In-plane connectivity only, and one empty slice above and below, so each axial slice is
    # filled on its own (the trachea would connect the lungs to the border in 3D).
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    filled = ndimage.binary_fill_holes(np.pad(body, ((0, 0), (0, 0), (1, 1))), in_plane)
    return filled[:, :, 1:-1]


def body_cells(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Body fraction per BODY_CELL^3 cell of the full grid from a half-resolution mask.

    Args:
        mask: output of :func:`body_mask`.
        shape: full-resolution (X, Y, Z).

    Returns:
        float32 of shape ceil(shape / BODY_CELL); edge cells count only their real voxels.
    """
    half = BODY_CELL // 2
    cells = [-(-int(n) // BODY_CELL) for n in shape]
    padded = np.zeros([c * half for c in cells], dtype=np.float32)
    count = np.zeros_like(padded)
    region = tuple(slice(0, n) for n in mask.shape)
    padded[region] = mask
    count[region] = 1.0
    blocks = (cells[0], half, cells[1], half, cells[2], half)
    body = padded.reshape(blocks).sum(axis=(1, 3, 5))
    total = count.reshape(blocks).sum(axis=(1, 3, 5))
    return (body / np.maximum(total, 1.0)).astype(np.float32)
