"""SimpleITK image conversion and the one-line read error shared by the image readers.

:mod:`mim3d.data.readers` (files) and :mod:`mim3d.data.dicom` (DICOM series folders) both
convert ITK images (LPS) to RAS arrays and raise the same one-line
:class:`~mim3d.data.volume.ImageReadError`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mim3d.data.volume import ImageReadError

__all__ = ["LPS_TO_RAS", "itk_error_line", "read_error", "sitk_to_array_affine"]

# ITK works in LPS; NIfTI/RAS flips the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_error(path: str | Path, what: str, todo: str) -> ImageReadError:
    """Build the one-line error every reader raises."""
    what = " ".join(str(what).split())  # library messages may span lines
    if len(what) > 300:
        what = what[:297] + "..."
    return ImageReadError(f"{path}: {what}; {todo}")


def itk_error_line(err: Exception) -> str:
    """Condense an ITK exception: its ERROR line (minus the object prefix) and its last line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    head = next((ln for ln in lines if "ERROR" in ln), lines[0])
    head = re.sub(r"^.*?ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", head)
    return head if lines[-1] in head else f"{head} {lines[-1]}"


def sitk_to_array_affine(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Convert a SimpleITK image to an ``(x, y, z, ...)`` array and a RAS+ 4x4 affine.

    ITK stores origin and direction in LPS; they are converted with diag(-1, -1, 1).
    """
    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) for ITK's (x, y, z)
    order = list(range(dim))[::-1] + list(range(dim, array.ndim))
    array = np.transpose(array, order)
    n = min(dim, 3)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:n, :n]
    lps = np.eye(4)
    lps[:n, :n] = direction * np.asarray(image.GetSpacing()[:n], dtype=np.float64)
    lps[:n, 3] = np.asarray(image.GetOrigin()[:n], dtype=np.float64)
    return array, LPS_TO_RAS @ lps
