"""Read and write 3D medical images as RAS-oriented :class:`~mim3d.data.volume.Volume` objects.

Formats: NIfTI (``.nii``, ``.nii.gz``) through nibabel; NRRD (``.nrrd``, ``.nhdr``) and
MetaImage (``.mha``, ``.mhd``) through SimpleITK; a folder is read as a DICOM series by
:mod:`mim3d.data.dicom` (which series, when a folder holds several, is chosen there).

Conventions every reader follows:

* the returned array is indexed ``(x, y, z)`` and, for 3D and 4D images, re-ordered/flipped to
  the closest RAS orientation (:func:`to_ras`); the affine maps voxel indices to RAS+ mm;
* the native dtype is kept (CT stays int16/int32); the only value change is DICOM's rescale
  slope/intercept (applied by SimpleITK) and NIfTI's ``scl_slope``/``scl_inter`` when set;
* 2D and 4D images are returned as read (a trailing 4th axis of size 1 is dropped) so that
  :func:`validate_volume` can give the reason they are unusable;
* every failure raises :class:`~mim3d.data.volume.ImageReadError` with one line that names
  the file, what is wrong and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel import orientations as ornt_mod

from mim3d.data.dicom import is_dicom_file, read_dicom_folder
from mim3d.data.sitk_io import LPS_TO_RAS, itk_error_line, read_error, sitk_to_array_affine
from mim3d.data.volume import Volume

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "image_extension",
    "read_volume",
    "to_ras",
    "validate_volume",
    "write_volume",
]

#: File endings read by :func:`read_volume` (lower case; matched case-insensitively).
#: ``.nii.gz`` comes first so that it wins over ``.nii``-less matching of ``.gz``.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

_FORMATS = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
}


def image_extension(path: str | Path) -> str | None:
    """Return the supported extension of ``path`` (lower case), or None if it has none."""
    name = Path(path).name.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return None


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-order and flip the first three array axes to the closest RAS orientation.

    Args:
        array: image of 3 or more dimensions; axes beyond the third are carried along.
        affine: 4x4 voxel-to-world (RAS+ mm) matrix of ``array``.

    Returns:
        ``(array, affine)`` where array axes 0, 1, 2 point (closest) to +R, +A, +S and the affine
        maps the new indices to the same world points. The array is C-contiguous (no copy when
        it already is) so it can go straight into ``torch.from_numpy``. Arrays with fewer than
        3 dims are not reoriented.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim < 3:
        return np.ascontiguousarray(array), affine
    current = ornt_mod.io_orientation(affine)
    transform = ornt_mod.ornt_transform(current, ornt_mod.axcodes2ornt("RAS"))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        # SimpleITK arrays arrive transposed (Fortran order): copy once to C order here.
        return np.ascontiguousarray(array), affine
    new_array = ornt_mod.apply_orientation(array, transform)
    new_affine = affine @ ornt_mod.inv_ornt_aff(transform, array.shape[:3])
    return np.ascontiguousarray(new_array), new_affine


def read_volume(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read an image file or a DICOM series folder as a RAS-oriented :class:`Volume`.

    Args:
        path: a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file, or a folder
            directly holding DICOM files.
        series_uid: for a DICOM folder, the SeriesInstanceUID to read (any modality). When None,
            the CT series with the most slices is chosen and the choice recorded in
            ``meta["series_uid"]`` and ``meta["series_note"]``.

    Returns:
        The volume; ``meta["format"]`` is one of ``nifti``, ``nrrd``, ``metaimage``, ``dicom``
        and ``meta["orig_axcodes"]`` the orientation found in the file.

    Raises:
        ImageReadError: missing path, unknown extension, unreadable or truncated file, a DICOM
            folder without a CT series, or an unknown ``series_uid``.
    """
    p = Path(path)
    if not p.exists():
        raise read_error(p, "file or folder not found", "check the path and that the disk is mounted")
    if p.is_dir():
        array, affine, meta = read_dicom_folder(p, series_uid)
    else:
        ext = image_extension(p)
        if ext is None:
            if is_dicom_file(p):
                raise read_error(p, "is a single DICOM file", "pass the folder holding its series")
            raise read_error(
                p,
                "unknown image file extension",
                f"use one of {', '.join(SUPPORTED_EXTENSIONS)} or a DICOM series folder",
            )
        reader = _read_nifti if _FORMATS[ext] == "nifti" else _read_sitk_file
        array, affine, meta = reader(p)
        meta["format"] = _FORMATS[ext]
    # A NIfTI 3D volume is often stored as (X, Y, Z, 1): drop trailing singleton axes only.
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim >= 3:
        meta["orig_axcodes"] = "".join(str(c) for c in nib.aff2axcodes(affine))
    array, affine = to_ras(array, affine)
    return Volume(array=array, affine=affine, source=str(p), meta=meta)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a NIfTI file with nibabel (sform preferred, as nibabel does)."""
    try:
        # mmap=False: read everything now so a truncated file fails here, not in a later crop.
        img = nib.load(str(path), mmap=False)
        array = _scaled_nifti_data(img)
        affine = np.asarray(img.affine, dtype=np.float64)
    except MemoryError:
        raise
    except Exception as err:  # nibabel/gzip/zlib raise many unrelated types
        raise read_error(
            path,
            f"cannot read as NIfTI ({type(err).__name__}: {err})",
            "the file is truncated, corrupt or not a NIfTI image; re-export or re-download it",
        ) from err
    if not np.all(np.isfinite(affine)):
        raise read_error(path, "header affine has non-finite values", "fix the qform/sform of the file")
    return array, affine, {}


def _scaled_nifti_data(img: nib.Nifti1Image) -> np.ndarray:
    """Voxel values with ``scl_slope``/``scl_inter`` applied, keeping integers when possible.

    nibabel would turn any scaled integer image into float64; CT stored as uint16 with
    ``scl_inter = -1024`` should stay an integer HU image, so integral scaling of integer data
    gives the smallest signed integer type holding the result. Other scaling gives float32.
    """
    proxy = img.dataobj
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    if slope == 1.0 and inter == 0.0:
        return np.asarray(proxy)
    raw = np.asarray(proxy.get_unscaled())
    if raw.dtype.kind in "iu" and slope.is_integer() and inter.is_integer():
        values = raw.astype(np.int64) * int(slope) + int(inter)
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        for dtype in (np.int16, np.int32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return values.astype(dtype)
        return values
    return (raw.astype(np.float32) * np.float32(slope) + np.float32(inter)).astype(np.float32)


def _read_sitk_file(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read an NRRD or MetaImage file with SimpleITK."""
    try:
        image = sitk.ReadImage(str(path))
    except MemoryError:
        raise
    except Exception as err:  # SimpleITK raises RuntimeError with multi-line ITK text
        raise read_error(
            path,
            f"SimpleITK cannot read it ({itk_error_line(err)})",
            "the file (or its detached data file) is missing, truncated or corrupt",
        ) from err
    array, affine = sitk_to_array_affine(image)
    return array, affine, {}



def validate_volume(vol: Volume) -> str | None:
    """Return why ``vol`` cannot be used as a 3D training image, or None if it can.

    Checks, in order: 3 dimensions, every axis at least 2 voxels, a finite invertible affine,
    no NaN/inf voxels, not all voxels equal.
    """
    arr = vol.array
    if arr.ndim != 3:
        hint = {2: "a single slice", 4: "e.g. several time points or channels"}.get(arr.ndim, "")
        return (
            f"{arr.ndim}D image (shape {tuple(arr.shape)}{', ' + hint if hint else ''}); "
            "a 3D volume is needed"
        )
    small = [ax for ax, n in enumerate(arr.shape) if n < 2]
    if small:
        return (
            f"axis {small[0]} has {arr.shape[small[0]]} voxel (shape {tuple(arr.shape)}); "
            "at least 2 voxels per axis are needed"
        )
    aff = np.asarray(vol.affine, dtype=np.float64)
    ok = aff.shape == (4, 4) and np.all(np.isfinite(aff))
    if not ok or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        return "invalid affine (non-finite or singular voxel-to-world matrix)"
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
        return f"{int(np.isnan(arr).sum())} NaN and {int(np.isinf(arr).sum())} inf voxels"
    if arr.size and arr.min() == arr.max():
        return f"all voxels equal {arr.flat[0].item()!r} (constant image)"
    return None


def write_volume(vol: Volume, path: str | Path) -> None:
    """Write ``vol`` to ``path`` keeping its affine (NIfTI, NRRD or MetaImage by extension).

    NIfTI is written with nibabel, qform and sform both set (code 1, scanner). NRRD/MetaImage go
    through SimpleITK (RAS affine converted to LPS origin/direction/spacing) and need a 3D array
    with an orthogonal affine. Parent folders are created.

    Raises:
        ValueError: unsupported extension, or a non-3D array for an ITK format.
    """
    p = Path(path)
    ext = image_extension(p)
    if ext is None:
        raise ValueError(f"{p}: unknown extension; use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    p.parent.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(vol.affine, dtype=np.float64)
    array = np.asarray(vol.array)
    if _FORMATS[ext] == "nifti":
        _write_nifti(array, affine, p)
        return
    if array.ndim != 3:
        raise ValueError(f"{p}: {array.ndim}D array; NRRD/MetaImage writing supports 3D only")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    lps = LPS_TO_RAS @ affine  # the flip is its own inverse
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    sitk.WriteImage(image, os.fspath(p), True)


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI-1 file; dtypes NIfTI lacks are mapped to the nearest it has."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)  # explicit, so int64 is kept rather than refused
    img = nib.Nifti1Image(array, affine, header=header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    nib.save(img, os.fspath(path))
