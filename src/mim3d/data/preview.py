"""One level-1 crop of one CT, preprocessed exactly as for pre-training (for pictures)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mim3d.config import DataConfig
from mim3d.data.preprocess import resample_to_spacing
from mim3d.data.readers import read_volume, validate_volume
from mim3d.data.store import AIR_HU, crop_array, normalize
from mim3d.data.volume import ImageReadError


def load_level1_crop(path: str | Path, data: DataConfig,
                     crop_size: Sequence[int]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a CT, orient and resample it, and cut the crop centred on the body.

    Args:
        path: an image file or a DICOM series folder.
        data: the run's preprocessing (spacing, HU window / normalisation, body threshold).
        crop_size: S_1, the level-1 crop size in voxels.

    Returns:
        ``(crop, spacing)``: the (X, Y, Z) RAS float32 crop of ``crop_size``, normalised as in
        training (air-padded), and its voxel size in mm per axis (for the pictures' aspect).

    Raises:
        ImageReadError: the file cannot be read or is not a usable 3D image.
    """
    vol = read_volume(path)
    reason = validate_volume(vol)
    if reason is not None:
        raise ImageReadError(f"{path}: {reason}; pass a 3D CT volume")
    array, affine = vol.array, vol.affine
    spacing = tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    if data.spacing is not None:
        array, _ = resample_to_spacing(array, affine, data.spacing, order=1)
        spacing = tuple(float(v) for v in data.spacing)
    hu = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
    body = np.argwhere(hu > data.body_hu)
    # centre on the body so the picture shows anatomy, not the air around it
    centre = body.mean(axis=0) if len(body) else np.asarray(hu.shape) / 2
    start = [round(c - s / 2) for c, s in zip(centre, crop_size)]
    crop = crop_array(hu, start, crop_size, pad_value=AIR_HU)
    return normalize(crop, data), (spacing[0], spacing[1], spacing[2])
