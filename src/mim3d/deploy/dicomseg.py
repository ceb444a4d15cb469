"""DICOM Segmentation objects (highdicom) for label maps predicted on a DICOM series.

:func:`write_dicom_seg` writes one SEG instance (BINARY, one segment per predicted label, empty
frames omitted) that references the source series' instances and shares its Frame of Reference
and Study. Segment labels are the run's class names; the coded property type comes from
:data:`SNOMED_TYPES` (SNOMED CT codes of pydicom's code dictionary, with a Right/Left modifier
for lateral organs) when the name is known, else the generic category/type "Tissue"
(SCT 85756007). :func:`read_dicom_seg` turns such an object back into a label map of class ids.

Array convention: ``labels`` is ``(X, Y, Z)`` in the source series' own index order (column,
row, slice in the order of ``files``), which is what :mod:`mim3d.engine.predict` writes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mim3d import __version__

__all__ = ["SNOMED_TYPES", "read_dicom_seg", "segment_codes", "write_dicom_seg"]

#: Class-name stem -> (pydicom ``codes.SCT`` attribute of the property type, of its category).
#: Names are matched after lower-casing and removing a ``right``/``left`` prefix or suffix.
SNOMED_TYPES: dict[str, tuple[str, str]] = {
    **{name: (attr, "AnatomicalStructure") for name, attr in {
        "spleen": "Spleen", "kidney": "Kidney", "gallbladder": "Gallbladder",
        "esophagus": "Esophagus", "liver": "Liver", "stomach": "Stomach", "aorta": "Aorta",
        "inferior_vena_cava": "InferiorVenaCava", "postcava": "InferiorVenaCava",
        "portal_and_splenic_veins": "Vein", "portal_vein": "PortalVein",
        "splenic_vein": "SplenicVein", "pancreas": "Pancreas", "adrenal_gland": "AdrenalGland",
        "duodenum": "Duodenum", "bladder": "Bladder", "urinary_bladder": "Bladder",
        "prostate": "Prostate", "uterus": "Uterus", "heart": "Heart", "lung": "Lung",
        "colon": "Colon", "trachea": "Trachea", "small_bowel": "SmallIntestine",
        "pulmonary_artery": "PulmonaryArtery", "vessel": "BloodVessel",
        "hepatic_vessel": "BloodVessel"}.items()},
    **{name: (attr, "MorphologicallyAbnormalStructure") for name, attr in {
        "tumour": "Neoplasm", "tumor": "Neoplasm", "colon_cancer": "Neoplasm",
        "lesion": "Lesion", "edema": "Edema", "necrotic_core": "Necrosis"}.items()},
}
_LOG = logging.getLogger(__name__)
_SIDE = re.compile(r"^(right|left)_(.+)$|^(.+)_(right|left)$")


def segment_codes(name: str) -> tuple[Any, Any, Any | None]:
    """``(category, type, laterality or None)`` pydicom codes of a class name (module docstring)."""
    from pydicom.sr.codedict import codes

    stem, side = name.lower().strip(), None
    match = _SIDE.match(stem)
    if match and (match.group(2) or match.group(3)) in SNOMED_TYPES:
        side = match.group(1) or match.group(4)
        stem = match.group(2) or match.group(3)
    if stem not in SNOMED_TYPES:
        return codes.SCT.Tissue, codes.SCT.Tissue, None
    type_attr, category_attr = SNOMED_TYPES[stem]
    modifier = getattr(codes.SCT, side.capitalize()) if side else None
    return getattr(codes.SCT, category_attr), getattr(codes.SCT, type_attr), modifier


def _description(number: int, name: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    category, kind, side = segment_codes(name)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="mim3d", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    desc = hd.seg.SegmentDescription(
        segment_number=number, segment_label=name, segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    if side is not None:
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(side)]
    return desc


def _source_datasets(files: Sequence[str | Path], *, pixels: bool = True) -> list[Any]:
    """The series' datasets, with identifying UIDs that anonymisation blanked filled in.

    An instance's SOP Class/Instance UIDs are also in its file meta (Media Storage ...), so they
    are taken from there; a blank Study Instance UID gets one new UID for the whole series (the
    SEG must name a study), with a warning.
    """
    import highdicom as hd
    import pydicom

    sources = [pydicom.dcmread(str(f), stop_before_pixels=not pixels) for f in files]
    study = None
    for ds in sources:
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and meta is not None:
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta is not None:
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if pixels and not ds.get("StudyInstanceUID"):
            if study is None:
                study = str(hd.UID())
                _LOG.warning("%s: the series has no StudyInstanceUID (anonymised?); the SEG "
                             "gets a new one, %s", Path(files[0]).parent, study)
            ds.StudyInstanceUID = study
    return sources


def write_dicom_seg(labels: np.ndarray, files: Sequence[str | Path],
                    classes: Mapping[str, str], out: str | Path, *,
                    description: str = "mim3d segmentation") -> list[str]:
    """Write ``labels`` as a DICOM SEG referencing the series of ``files``.

    Args:
        labels: ``(X, Y, Z)`` class ids in the series' index order (module docstring).
        files: the series' slice files, in the order of ``labels``' last axis.
        classes: ``{"id": name}`` of the foreground classes.
        out: the ``.dcm`` file to write.
        description: the SEG's SeriesDescription.

    Returns:
        The names of the segments written (present labels, in id order).

    Raises:
        ValueError: no foreground predicted (a SEG needs one segment), the grid does not
            match the series, or a predicted id that is not a class.
    """
    import highdicom as hd

    sources = _source_datasets(files)
    frames = np.ascontiguousarray(np.transpose(np.asarray(labels), (2, 1, 0)))
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if frames.shape != (len(sources), rows, cols):
        raise ValueError(f"label map {tuple(labels.shape)} does not fit the DICOM series "
                         f"({cols} x {rows} x {len(sources)} slices)")
    present = [int(i) for i in np.unique(frames) if i != 0]
    unknown = [i for i in present if str(i) not in classes]
    if unknown:
        raise ValueError(f"predicted label id {unknown[0]} is not one of the classes "
                         f"{sorted(classes, key=int)}")
    if not present:
        raise ValueError(f"{out}: nothing but background was predicted, and a DICOM SEG needs "
                         "at least one segment; write NIfTI (--output-type nifti) instead")
    lut = np.zeros(int(frames.max()) + 1, dtype=np.uint16)
    lut[present] = np.arange(1, len(present) + 1)  # segment numbers 1..n, in id order
    names = [classes[str(i)] for i in present]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=lut[frames],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(n, name) for n, name in enumerate(names, start=1)],
        series_instance_uid=hd.UID(), series_number=int(sources[0].get("SeriesNumber") or 0) + 900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="mim3d",
        manufacturer_model_name="mim3d predict", software_versions=__version__,
        device_serial_number="0", series_description=description)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out))
    return names


def read_dicom_seg(path: str | Path, files: Sequence[str | Path],
                   classes: Mapping[str, str]) -> np.ndarray:
    """A SEG written by :func:`write_dicom_seg` as ``(X, Y, Z)`` class ids on the series grid.

    Args:
        path: the SEG file.
        files: the source series' slice files, in index order.
        classes: ``{"id": name}``; segments are matched to ids by their label.

    Raises:
        ValueError: a segment whose label is not a class name.
    """
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    ids = {name: int(i) for i, name in classes.items()}
    lut = np.zeros(max(seg.segment_numbers) + 1, dtype=np.int32)
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).segment_label
        if label not in ids:
            raise ValueError(f"{path}: segment {number} {label!r} is not one of the classes")
        lut[number] = ids[label]
    uids = [ds.SOPInstanceUID for ds in _source_datasets(files, pixels=False)]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True,
                                               assert_missing_frames_are_empty=True)
    return np.transpose(lut[pixels], (2, 1, 0))
