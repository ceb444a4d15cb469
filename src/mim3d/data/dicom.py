"""DICOM series folders: recognising DICOM files and folders, choosing and reading one series.

A folder is read as a DICOM series through SimpleITK's GDCM series reader; pydicom only looks at
header tags such as Modality. Without a requested SeriesInstanceUID the CT series with the most
slices is read, and the choice is recorded in the volume's meta. Errors are the one-line
:class:`~mim3d.data.volume.ImageReadError` of :func:`mim3d.data.sitk_io.read_error`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mim3d.data.sitk_io import itk_error_line, read_error, sitk_to_array_affine

__all__ = ["is_dicom_file", "is_dicom_folder", "read_dicom_folder"]


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


def read_dicom_folder(folder: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read one DICOM series of ``folder`` (chosen by :func:`_choose_series`).

    Args:
        folder: a folder directly holding the slice files.
        series_uid: the SeriesInstanceUID to read (any modality); None picks the largest CT.

    Returns:
        ``(array, affine, meta)``: the ``(x, y, z)`` array before RAS reordering, its RAS+ affine,
        and meta with the series UID, the note on the choice, modality and slice files.

    Raises:
        ImageReadError: no series, no CT series, an unknown ``series_uid`` or unreadable slices.
    """
    # GDCM prints a warning to stderr for a folder without DICOM; we raise a clearer error.
    warnings_on = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except Exception as err:
        raise read_error(folder, f"cannot scan for DICOM ({err})", "check folder permissions") from err
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_on)
    if not uids:
        raise read_error(
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
        raise read_error(
            folder,
            f"cannot read DICOM series {uid!r} ({itk_error_line(err)})",
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
            raise read_error(
                folder,
                f"no DICOM series with SeriesInstanceUID {series_uid!r}",
                f"choose one of: {listing}",
            )
        n = len(series[series_uid]["files"])
        return series_uid, f"read requested series {series_uid!r} ({n} slices) in {folder}"
    ct = [uid for uid, info in series.items() if info["modality"] == "CT"]
    if not ct:
        raise read_error(
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
