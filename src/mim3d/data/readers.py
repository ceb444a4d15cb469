"""Read and write 3D medical images as RAS-oriented :class:`~mim3d.data.volume.Volume` objects.

Formats: NIfTI (``.nii``, ``.nii.gz``) through nibabel; NRRD (``.nrrd``, ``.nhdr``) and
MetaImage (``.mha``, ``.mhd``) through SimpleITK; a folder is read as a DICOM series through
SimpleITK's GDCM series reader (pydicom only looks at header tags such as Modality).

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
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel import orientations as ornt_mod

from mim3d.data.volume import ImageReadError, Volume

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "image_extension",
    "is_dicom_file",
    "is_dicom_folder",
    "read_volume",
    "sitk_to_array_affine",
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
# ITK works in LPS; NIfTI/RAS flips the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_extension(path: str | Path) -> str | None:
    """Return the supported extension of ``path`` (lower case), or None if it has none."""
    name = Path(path).name.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return None


def is_dicom_file(path: str | Path) -> bool:
    """Return True if ``path`` is a file with the DICOM ``DICM`` marker (or a ``.dcm`` name)."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_folder(path: str | Path) -> bool:
    """Return True if the folder directly holds at least one DICOM file (hidden files ignored)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return any(not f.name.startswith(".") and is_dicom_file(f) for f in sorted(p.iterdir()))


def _fail(path: str | Path, what: str, todo: str) -> ImageReadError:
    """Build the one-line error every reader raises."""
    what = " ".join(str(what).split())  # library messages may span lines
    if len(what) > 300:
        what = what[:297] + "..."
    return ImageReadError(f"{path}: {what}; {todo}")


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
        raise _fail(p, "file or folder not found", "check the path and that the disk is mounted")
    if p.is_dir():
        array, affine, meta = _read_dicom_folder(p, series_uid)
    else:
        ext = image_extension(p)
        if ext is None:
            if is_dicom_file(p):
                raise _fail(p, "is a single DICOM file", "pass the folder holding its series")
            raise _fail(
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
        raise _fail(
            path,
            f"cannot read as NIfTI ({type(err).__name__}: {err})",
            "the file is truncated, corrupt or not a NIfTI image; re-export or re-download it",
        ) from err
    if not np.all(np.isfinite(affine)):
        raise _fail(path, "header affine has non-finite values", "fix the qform/sform of the file")
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
        raise _fail(
            path,
            f"SimpleITK cannot read it ({_first_itk_line(err)})",
            "the file (or its detached data file) is missing, truncated or corrupt",
        ) from err
    array, affine = sitk_to_array_affine(image)
    return array, affine, {}


def _first_itk_line(err: Exception) -> str:
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
    return array, _LPS_TO_RAS @ lps


def _read_dicom_folder(folder: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read one DICOM series of ``folder`` (chosen by :func:`_choose_series`)."""
    # GDCM prints a warning to stderr for a folder without DICOM; we raise a clearer error.
    warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except Exception as err:
        raise _fail(folder, f"cannot scan for DICOM ({err})", "check folder permissions") from err
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)
    if not uids:
        raise _fail(
            folder,
            "folder holds no DICOM series",
            "pass an image file or a folder of DICOM slices (resolve_inputs scans other folders)",
        )
    series = {uid: _series_info(folder, uid) for uid in sorted(uids)}
    uid, note = _choose_series(folder, series, series_uid)
    files = series[uid]["files"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except Exception as err:
        raise _fail(
            folder,
            f"cannot read DICOM series {uid!r} ({_first_itk_line(err)})",
            "check that the slices are complete and not corrupt",
        ) from err
    array, affine = sitk_to_array_affine(image)
    info = series[uid]
    meta = {"format": "dicom", "series_uid": uid, "series_note": note, "n_slices": len(files)}
    meta.update(modality=info["modality"], series_description=info["description"])
    # The slice files in the order of the array's third axis (before RAS reordering), so a
    # DICOM SEG written later can reference each source instance.
    meta["files"] = [str(f) for f in files]
    meta["other_series"] = [u for u in series if u != uid]
    return array, affine, meta


def _series_info(folder: Path, uid: str) -> dict:
    """Collect the sorted files, Modality and description of one series."""
    import pydicom  # local: only DICOM folders need it

    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
    except (OSError, ValueError, pydicom.errors.InvalidDicomError):
        # GDCM parsed it, so this is rare; an unknown modality keeps it out of the CT choice.
        return {"files": files, "modality": "", "description": ""}
    return {
        "files": files,
        "modality": str(ds.get("Modality", "") or "").strip().upper(),
        "description": str(ds.get("SeriesDescription", "") or "").strip(),
    }


def _choose_series(
    folder: Path, series: dict[str, dict], series_uid: str | None
) -> tuple[str, str]:
    """Pick the requested series, else the CT series with the most slices; explain the pick."""
    def listed(skip: str | None = None) -> str:
        return ", ".join(
            f"{uid!r} ({info['modality'] or '?'}, {len(info['files'])} slices)"
            for uid, info in series.items() if uid != skip
        )

    listing = listed()
    if series_uid is not None:
        if series_uid not in series:
            raise _fail(
                folder,
                f"no DICOM series with SeriesInstanceUID {series_uid!r}",
                f"choose one of: {listing}",
            )
        n = len(series[series_uid]["files"])
        return series_uid, f"read requested series {series_uid!r} ({n} slices) in {folder}"
    ct = [uid for uid, info in series.items() if info["modality"] == "CT"]
    if not ct:
        raise _fail(
            folder,
            f"no CT series among {len(series)} DICOM series [{listing}]",
            "pass a CT series, or give series_uid to read another modality",
        )
    # Most slices wins; ties go to the smallest UID so the choice is deterministic.
    best = max(sorted(ct), key=lambda uid: len(series[uid]["files"]))
    n = len(series[best]["files"])
    shown = best if best else "(empty SeriesInstanceUID)"
    note = f"chose CT series {shown} ({n} slices) of {len(series)} series in {folder}"
    others = listed(skip=best)
    if others:
        # Several series and no choice: say which one was read and how to pick another.
        note += f"; others: {others} (choose one with --series UID)"
    return best, note


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
    lps = _LPS_TO_RAS @ affine  # the flip is its own inverse
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
