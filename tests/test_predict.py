"""``mim3d predict`` beyond one NIfTI: the run report, DICOM in / DICOM SEG out, batches that
resume and survive a bad case, and the input checks (NaN, non-CT intensities, paths, series)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_nifti
from deploy_runs import CT_DICOM, CT_SMALL, seg_run

from mim3d.cli import main
from mim3d.data.readers import read_volume
from mim3d.engine.inference import file_sha256
from mim3d.engine.predict import PredictOptions, predict_volume

CLASSES = {"1": "spleen", "6": "liver"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return seg_run(tmp_path_factory)


def _phantom(run: Path) -> Path:
    return run.parent / "cohort" / "imagesTr" / "phantom_000.nii.gz"


def _predict(*args: str) -> int:
    return main(["predict", *args])


def test_report_counts_label_volumes_and_stage_timings(run: Path, shared_data: Path,
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    ct, out, report = shared_data / CT_SMALL, tmp_path / "labels.nii.gz", tmp_path / "r.json"
    args = ["-i", str(ct), "-o", str(out), "--model", str(run), "--report", str(report),
            "--device", "cpu", "--preview", str(tmp_path / "overlay.png")]
    assert _predict(*args) == 0
    doc, labels = json.loads(report.read_text()), np.asarray(nib.load(str(out)).dataobj)
    assert set(np.unique(labels)) <= {0, 1, 6}  # channels 2..5 name no class: never predicted
    voxel_ml = 3.0 ** 3 / 1000.0  # the CT's 3 mm voxels
    for name, entry in doc["labels"].items():
        assert CLASSES[str(entry["id"])] == name
        assert entry["voxels"] == int((labels == entry["id"]).sum())
        assert entry["volume_ml"] == pytest.approx(entry["voxels"] * voxel_ml, abs=1e-3)
    assert sum(e["voxels"] for e in doc["labels"].values()) == int((labels > 0).sum()) > 0
    assert set(doc["timings_s"]) == {"read_preprocess", "inference", "postprocess", "write"}
    assert doc["timings_s"]["inference"] > 0 and doc["device"] == "cpu"
    best = next((run / "best").glob("ckpt_*"))
    assert doc["model"]["weights_sha256"] == file_sha256(best / "model.safetensors")
    assert doc["model"]["preset"] == "btcv" and doc["input"]["path"] == str(ct)
    assert doc["preprocessing"]["spacing_mm"] == [4.5] * 3
    assert doc["preprocessing"]["hu_window"] == [-175.0, 250.0]
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert _predict(*args) == 2  # the output exists now
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and err.count("\n") == 1


def test_dicom_series_in_dicom_seg_out(run: Path, shared_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    import pydicom
    from pydicom.sr.codedict import codes

    from mim3d.deploy.dicomseg import read_dicom_seg

    series, nifti, report = shared_data / CT_DICOM, tmp_path / "l.nii.gz", tmp_path / "r.json"
    # a trailing slash used to end in a KeyError after inference
    assert _predict("-i", f"{series}/", "-o", str(nifti), "--model", str(run),
                    "--report", str(report)) == 0
    assert "chose CT series" in capsys.readouterr().out
    doc = json.loads(report.read_text())
    assert doc["input"]["format"] == "dicom" and "20 slices" in doc["input"]["series_note"]
    seg = tmp_path / "labels.dcm"
    assert _predict("-i", str(series), "-o", str(seg), "--model", str(run),
                    "--output-type", "dicom-seg") == 0
    ds, files = pydicom.dcmread(str(seg)), read_volume(series).meta["files"]
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.Modality == "SEG" and ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    referenced = {r.ReferencedSOPInstanceUID
                  for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= {pydicom.dcmread(f, stop_before_pixels=True).file_meta
                          .MediaStorageSOPInstanceUID for f in files}
    names = {s.SegmentLabel: s for s in ds.SegmentSequence}
    predicted = {CLASSES[str(i)] for i in np.unique(nib.load(str(nifti)).dataobj) if i}
    assert set(names) == predicted and predicted
    if "spleen" in names:
        assert names["spleen"].SegmentedPropertyTypeCodeSequence[0].CodeValue == \
            codes.SCT.Spleen.value
    back = read_dicom_seg(seg, files, CLASSES)
    np.testing.assert_array_equal(back, np.asarray(nib.load(str(nifti)).dataobj))


def test_dicom_seg_round_trip_of_a_real_label_map(shared_data: Path, tmp_path: Path) -> None:
    """TotalSegmentator's 31-class map of the DICOM series: written, read back identical."""
    from mim3d.deploy.dicomseg import read_dicom_seg, segment_codes, write_dicom_seg
    from mim3d.engine.predict import _to_input_orientation

    vol = read_volume(shared_data / CT_DICOM)
    labels = read_volume(shared_data / "ct" / "totalseg_example_ct_dicom_seg.nii.gz")
    array = _to_input_orientation(np.asarray(labels.array).astype(np.int32), labels.affine,
                                  vol.meta["orig_axcodes"])[0]
    names = json.loads((shared_data / "totalseg_class_map.json").read_text())["total"]
    written = write_dicom_seg(array, vol.meta["files"], names, tmp_path / "ts.dcm")
    assert len(written) == len(np.unique(array)) - 1 == 31
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "ts.dcm", vol.meta["files"], names),
                                  array)
    category, kind, side = segment_codes("kidney_right")
    assert (category.meaning, kind.value, side.meaning) == ("Anatomical Structure", "64033007",
                                                            "Right")
    assert segment_codes("vertebrae_L5")[1].meaning == "Tissue"  # no code known: generic


def test_batch_resumes_and_skips_a_bad_case(run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    os.symlink(_phantom(run), cases / "good.nii.gz")
    write_nifti(cases / "broken.nii.gz", np.full((24, 24, 24), np.nan, dtype=np.float32))
    out, report = tmp_path / "out", tmp_path / "batch.json"
    args = ["-i", str(cases), "-o", str(out), "--model", str(run), "--report", str(report)]
    assert _predict(*args) == 0
    captured = capsys.readouterr()
    assert "case broken skipped" in captured.err and "NaN" in captured.err
    assert "predicted 1, already done (skipped) 0, failed 1" in captured.out
    doc = json.loads(report.read_text())["cases"]
    assert doc["good"]["status"] == "predicted" and doc["good"]["report"]["labels"]
    assert doc["broken"]["status"] == "failed" and not (out / "broken.nii.gz").exists()
    first = (out / "good.nii.gz").stat().st_mtime_ns
    assert _predict(*args) == 0
    assert "predicted 0, already done (skipped) 1, failed 1" in capsys.readouterr().out
    assert (out / "good.nii.gz").stat().st_mtime_ns == first
    assert _predict(*args, "--overwrite") == 0
    assert "predicted 1" in capsys.readouterr().out
    assert (out / "good.nii.gz").stat().st_mtime_ns != first


def test_bad_inputs_get_one_line_each(run: Path, shared_data: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture,
                                      caplog: pytest.LogCaptureFixture) -> None:
    nan = write_nifti(tmp_path / "nan.nii.gz", np.full((24, 24, 24), np.nan, np.float32))
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((24, 24, 1), np.int16))
    bad = [(nan, "NaN"), (flat, "axis 2 has 1 voxel")]
    bad += [(shared_data / CT_DICOM, "no DICOM series with SeriesInstanceUID '9.9'")]
    for path, why in bad:
        extra = ["--series", "9.9"] if path.is_dir() else []
        out = tmp_path / "x.nii.gz"
        assert _predict("-i", str(path), "-o", str(out), "--model", str(run), *extra) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1 and not out.exists()
    assert _predict("-i", str(nan), "-o", str(tmp_path / "x.dcm"), "--model", str(run),
                    "--output-type", "dicom-seg") == 2
    assert "needs a DICOM series folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _predict("-i", str(_phantom(run)), "-o", str(tmp_path / "x.nii.gz"), "--model",
                        str(run), "--device", "cuda") == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    # MRI-like intensities (0..1800, no air): predicted, with a warning in the log and report
    rng = np.random.default_rng(0)
    mri = write_nifti(tmp_path / "mri.nii.gz", rng.integers(0, 1800, (40, 40, 40)).astype(
        np.int16), affine=np.diag([4.0, 4.0, 4.0, 1.0]))
    with caplog.at_level(logging.WARNING, logger="mim3d.engine.predict"):
        predict_volume(run, mri, tmp_path / "mri_labels.nii.gz",
                       options=PredictOptions(report=tmp_path / "mri.json"))
    assert "expects CT in HU" in caplog.text
    assert "no air" in json.loads((tmp_path / "mri.json").read_text())["warnings"][0]
