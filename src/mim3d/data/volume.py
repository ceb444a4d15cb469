"""The in-memory image every reader returns and every writer takes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class ImageReadError(ValueError):
    """A case cannot be used: the message names the file, what is wrong and what to do."""


@dataclass
class Volume:
    """A 3D scalar image in RAS orientation.

    Attributes:
        array: voxel values, shape ``(X, Y, Z)``. After :func:`mim3d.data.readers.to_ras`
            the three array axes point along +R, +A and +S world directions, as nibabel's
            ``as_closest_canonical`` orders them.
        affine: 4x4 voxel-to-world (RAS+, mm) matrix, as in NIfTI.
        source: where it was read from (file or folder).
        meta: free-form facts kept for reports (e.g. the DICOM SeriesInstanceUID chosen).
    """

    array: np.ndarray
    affine: np.ndarray
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)
