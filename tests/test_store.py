"""Prepared store: prepare (values, geometry, resume, quarantine), read_crop, real CT."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_nifti

from mim3d.config import DataConfig
from mim3d.data.prepare import prepare
from mim3d.data.store import (
    PreparedStore,
    crop_array,
    minmax,
    normalize,
    read_manifest,
    window_hu,
    zscore,
)
from mim3d.data.storetools import verify_store

# Non-trivial source orientations: LPS-like flips, and a permutation (array axis 0 along S).
FLIP_XY = np.array([[-0.8, 0, 0, 50.0], [0, -0.9, 0, 60.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
PERMUTED = np.array([[0, 1.2, 0, -10.0], [0, 0, -1.0, 5.0], [2.0, 0, 0, 7.0], [0, 0, 0, 1]])


def _ct(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Body-like int16 HU: air outside an off-centre ellipsoid of noisy soft tissue."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((grid[0] - 0.1) ** 2 + (grid[1] / 0.8) ** 2 + grid[2] ** 2) < 0.6
    arr = np.where(inside, rng.integers(-100, 200, size=shape), -1000)
    return arr.astype(np.int16)


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """RAS voxels and affine by nibabel itself (an independent reference for the store)."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), img.affine


def _prepare(inputs: list, out: Path, **kw: object):
    return prepare(inputs, out, data=kw.pop("data", DataConfig()), progress=False, **kw)


@pytest.fixture()
def three_cases(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    write_nifti(src / "a.nii.gz", _ct((40, 44, 36), 0), FLIP_XY)
    write_nifti(src / "b.nii.gz", _ct((36, 40, 48), 1), PERMUTED)
    write_nifti(src / "c.nii.gz", _ct((48, 40, 40), 2).astype(np.int32), FLIP_XY)
    return src


def test_prepare_stores_ras_voxels_and_geometry(three_cases: Path, tmp_path: Path) -> None:
    report = _prepare([three_cases], tmp_path / "store", workers=2)
    assert (report.prepared, report.skipped, report.quarantined) == (3, 0, 0)
    store = PreparedStore.open(tmp_path / "store")
    assert [c.name for c in store.cases] == ["a", "b", "c"]
    for i, rec in enumerate(store.cases):
        ref, ref_affine = _canonical(three_cases / f"{rec.name}.nii.gz")
        image = store.image(i)[...]
        assert image.dtype == np.int16 and image.shape == ref.shape == rec.shape
        np.testing.assert_array_equal(image, ref)
        np.testing.assert_allclose(rec.affine, ref_affine, atol=1e-5)
        np.testing.assert_allclose(rec.spacing, np.linalg.norm(ref_affine[:3, :3], axis=0))
        assert rec.sha256 == hashlib.sha256(ref.astype(np.int16).tobytes()).hexdigest()
        assert (rec.hu_min, rec.hu_max) == (int(ref.min()), int(ref.max()))
        assert rec.source == str(three_cases / f"{rec.name}.nii.gz") and not rec.has_label
        assert 0.1 < rec.body_fraction < 0.5
        assert store.body(i).shape == tuple(-(-n // 8) for n in rec.shape)
    np.testing.assert_allclose(store.cases[1].spacing, (1.2, 1.0, 2.0))  # permuted source
    info = json.loads((tmp_path / "store" / "store.json").read_text())
    assert info["version"] == 3 and info["data"]["hu_window"] == [-1000.0, 1000.0]
    assert info["array_format"] == "blosc2"  # the default format (see DEFAULT_FORMAT)


def test_resampling_to_spacing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    x, _y, z = np.meshgrid(np.arange(40), np.arange(40), np.arange(20), indexing="ij")
    ramp = (10 * x + 3 * z - 500).astype(np.int16)  # linear: trilinear resampling is exact
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    write_nifti(src / "ramp.nii.gz", ramp, affine)
    label = (x >= 20).astype(np.uint8) + 2 * (z >= 10).astype(np.uint8)
    write_nifti(src / "ramp_label.nii.gz", label, affine)
    datalist = {"training": [{"image": "ramp.nii.gz", "label": "ramp_label.nii.gz"}]}
    (src / "list.json").write_text(json.dumps(datalist))
    data = DataConfig(spacing=(2.0, 2.0, 2.0))
    assert _prepare([src / "list.json"], tmp_path / "store", data=data, workers=0).prepared == 1
    store = PreparedStore.open(tmp_path / "store")
    rec = store.cases[0]
    assert rec.shape == (20, 20, 30)
    np.testing.assert_allclose(rec.spacing, (2.0, 2.0, 2.0))
    np.testing.assert_allclose(np.asarray(rec.affine)[:3, 3], 0.0)  # first voxel centre kept
    i, _j, k = np.meshgrid(np.arange(20), np.arange(20), np.arange(30), indexing="ij")
    zk = np.minimum(k * 2 / 3, 19)  # new voxel k sits at old z index 2k/3 (clamped at the end)
    # 3 mm slices are kept (1.5x the 2 mm target): x is resampled, z interpolated on read
    assert rec.stored_shape == (20, 20, 20) and store.image(0).shape == (20, 20, 20)
    np.testing.assert_allclose(rec.stored_step, (1.0, 1.0, 2 / 3))
    np.testing.assert_allclose(store.volume(0), 10 * 2 * i + 3 * zk - 500, atol=1e-3)
    np.testing.assert_allclose(store.read_crop(0, (-2, 3, 25), (8, 8, 8))[2:, :, :5],
                               (10 * 2 * i + 3 * zk - 500)[:6, 3:11, 25:], atol=1e-3)
    assert verify_store(tmp_path / "store").problems == []
    _prepare([src / "list.json"], tmp_path / "flat", data=data, workers=0,
             coarse_axes="resampled")
    flat = PreparedStore.open(tmp_path / "flat")
    assert flat.cases[0].stored_shape is None and flat.info["coarse_axes"] == "resampled"
    np.testing.assert_array_equal(flat.image(0), np.rint(10 * 2 * i + 3 * zk - 500))
    assert (rec.hu_min, rec.hu_max) == (flat.cases[0].hu_min, flat.cases[0].hu_max)
    lab = store.label(0)
    assert rec.has_label and lab.dtype == np.uint8 and lab.shape == rec.shape
    assert set(np.unique(lab)) == {0, 1, 2, 3}  # nearest: no interpolated label values
    np.testing.assert_array_equal(lab[:, 0, 0], (2 * np.arange(20) >= 20).astype(np.uint8))


def test_rerun_skips_and_interrupted_run_resumes(three_cases: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    _prepare([three_cases], out, workers=0)
    first = {r.name: r.sha256 for r in read_manifest(out / "manifest.jsonl")}
    again = _prepare([three_cases], out, workers=0)
    assert (again.prepared, again.skipped, again.quarantined) == (0, 3, 0)
    # Interruption after c's arrays were written but before its manifest line was appended,
    # plus a half-written line from a crash in the middle of an append.
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])
    assert (out / "cases" / "c" / "image.b2nd").is_file()
    resumed = _prepare([three_cases], out, workers=0)
    assert (resumed.prepared, resumed.skipped) == (1, 2)
    records = read_manifest(out / "manifest.jsonl")
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3
    assert {r.name: r.sha256 for r in records} == first
    with pytest.raises(ValueError, match="spacing"):
        _prepare([three_cases], out, data=DataConfig(spacing=(2.0, 2.0, 2.0)))


def test_bad_cases_are_quarantined_next_to_good_ones(tmp_path: Path) -> None:
    src, labels = tmp_path / "src", tmp_path / "labels"
    src.mkdir()
    labels.mkdir()
    good = _ct((32, 32, 32), 3)
    write_nifti(src / "good.nii.gz", good, FLIP_XY)
    raw = (src / "good.nii.gz").read_bytes()
    (src / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (src / "text.nii.gz").write_text("this is not an image\n")
    write_nifti(src / "flat2d.nii.gz", good[:, :, 0])
    write_nifti(src / "time4d.nii.gz", np.stack([good, good], axis=-1))
    nan = good.astype(np.float32)
    nan[3, 4, 5] = np.nan
    write_nifti(src / "nan.nii.gz", nan)
    write_nifti(src / "constant.nii.gz", np.full((32, 32, 32), -1000, np.int16))
    write_nifti(tmp_path / "paired.nii.gz", good, FLIP_XY)
    write_nifti(labels / "paired_ok.nii.gz", (good > 0).astype(np.uint8), FLIP_XY)
    write_nifti(tmp_path / "mismatch.nii.gz", good, FLIP_XY)
    write_nifti(labels / "mismatch.nii.gz", np.zeros((32, 32, 30), np.uint8), FLIP_XY)
    write_nifti(tmp_path / "shifted.nii.gz", good, FLIP_XY)
    shifted = FLIP_XY.copy()
    shifted[0, 3] += 0.5
    write_nifti(labels / "shifted.nii.gz", (good > 0).astype(np.uint8), shifted)
    datalist = {"training": [
        {"image": "paired.nii.gz", "label": "labels/paired_ok.nii.gz"},
        {"image": "mismatch.nii.gz", "label": "labels/mismatch.nii.gz"},
        {"image": "shifted.nii.gz", "label": "labels/shifted.nii.gz"}]}
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    inputs = [src, tmp_path / "list.json"]

    report = _prepare(inputs, tmp_path / "store", workers=2)
    assert (report.prepared, report.quarantined) == (2, 8), report.messages
    store = PreparedStore.open(tmp_path / "store")
    assert sorted(c.name for c in store.cases) == ["good", "paired"]
    paired = next(i for i, c in enumerate(store.cases) if c.name == "paired")
    np.testing.assert_array_equal(store.label(paired), _canonical(labels / "paired_ok.nii.gz")[0])
    reasons = {e["name"]: e["reason"] for e in _quarantine(tmp_path / "store")}
    expected = {"truncated": "cannot read as NIfTI", "text": "cannot read as NIfTI",
                "flat2d": "2D image", "time4d": "4D image", "nan": "1 NaN",
                "constant": "constant image", "mismatch": "label grid does not match",
                "shifted": "affines differ by up to 0.5"}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
    assert not (tmp_path / "store" / "cases" / "nan").exists()  # no leftovers of bad cases

    rerun = _prepare(inputs, tmp_path / "store", workers=0)
    assert (rerun.prepared, rerun.skipped, rerun.quarantined) == (0, 2, 8)
    assert len(_quarantine(tmp_path / "store")) == 8  # no duplicate lines per source


def _quarantine(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "quarantine.jsonl").read_text().splitlines()]


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a prepared store"):
        PreparedStore.open(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.nii.gz").write_text("nope")
    report = _prepare([tmp_path / "bad"], tmp_path / "store", workers=0)
    assert (report.prepared, report.quarantined, report.in_store) == (0, 1, 0)
    with pytest.raises(ValueError, match="holds no prepared case"):
        PreparedStore.open(tmp_path / "store")


def test_read_crop_equals_slicing_and_pads_with_air(synthetic_store: Path) -> None:
    store = PreparedStore.open(synthetic_store)
    i = [c.name for c in store.cases].index("ramp")
    full = np.asarray(store.image(i))
    crop = store.read_crop(i, (5, 7, 3), (16, 20, 12))
    assert crop.dtype == np.int16
    np.testing.assert_array_equal(crop, full[5:21, 7:27, 3:15])
    for start, size in [((-4, 50, -10), (16, 16, 64)), ((40, -3, 35), (20, 70, 9)),
                        ((60, 0, 0), (4, 4, 4)), ((3, 4, 0), (10, 10, 40))]:
        pad = np.pad(full, 100, constant_values=-1000)
        sl = tuple(slice(s + 100, s + 100 + n) for s, n in zip(start, size))
        np.testing.assert_array_equal(store.read_crop(i, start, size), pad[sl])
        np.testing.assert_array_equal(crop_array(full, start, size, -1000), pad[sl])
    assert (store.read_crop(i, (60, 0, 0), (4, 4, 4)) == -1000).all()
    assert crop_array(full, (-1, 0, 0), (2, 1, 1), 7)[0, 0, 0] == 7
    assert store.shard(1, 2) == [1] and store.shard(0, 2) == [0, 2]


def test_body_grid_marks_the_body_half(synthetic_store: Path) -> None:
    store = PreparedStore.open(synthetic_store)
    i = [c.name for c in store.cases].index("half_body")
    body = np.asarray(store.body(i))
    assert body.shape == (8, 8, 6)
    assert (body[:4] > 0.9).all() and (body[4:] < 0.1).all()  # RAS x < 32 holds the tissue
    assert store.crop_body_fraction(i, (0, 0, 0), (32, 64, 48)) == pytest.approx(1.0, abs=0.05)
    assert store.crop_body_fraction(i, (16, 0, 0), (32, 32, 32)) == pytest.approx(0.5, abs=0.05)
    assert store.crop_body_fraction(i, (-32, 0, 0), (64, 32, 32)) == pytest.approx(0.5, abs=0.05)


def test_body_mask_removes_table_and_keeps_lungs(tmp_path: Path) -> None:
    arr = np.full((64, 64, 40), -1000, np.int16)
    arr[12:52, 20:56, :] = 40  # the patient
    arr[4:60, 6:9, :] = 300  # a 3-voxel thick table plate below, separated by air
    arr[24:40, 32:44, 8:32] = -900  # lung-like air inside the patient counts as body
    write_nifti(tmp_path / "table.nii.gz", arr, np.eye(4))
    _prepare([tmp_path / "table.nii.gz"], tmp_path / "store", workers=0)
    store = PreparedStore.open(tmp_path / "store")
    body = np.asarray(store.body(0))
    assert body[2:6, 3:6].min() > 0.9 and body[:, 0:1].max() == 0.0  # table cells are empty
    assert body[3:5, 4:6, 1:4].min() == 1.0
    assert store.cases[0].body_fraction == pytest.approx(40 * 36 / (64 * 64), abs=0.03)


def test_normalisations() -> None:
    arr = np.array([-2000, -1000, 0, 1000, 3000], dtype=np.int16)
    np.testing.assert_allclose(window_hu(arr, (-1000, 1000)), [0, 0, 0.5, 1, 1])
    assert window_hu(arr, (-1000, 1000)).dtype == np.float32
    z = zscore(arr)
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-5
    np.testing.assert_allclose(minmax(arr), (arr + 2000) / 5000, rtol=1e-6)
    np.testing.assert_allclose(normalize(arr, DataConfig(hu_window=(-175, 250))),
                               np.clip((arr + 175) / 425, 0, 1), rtol=1e-6)
    assert normalize(arr, DataConfig(normalization="zscore")).dtype == np.float32


def test_real_ct_matches_simpleitk(shared_data: Path, tmp_path: Path) -> None:
    ct = shared_data / "ct"
    pairs = [("totalseg_example_ct.nii.gz", "totalseg_example_ct_seg_fast.nii.gz"),
             ("totalseg_example_ct_sm.nii.gz", "totalseg_example_ct_sm_seg.nii.gz"),
             ("totalseg_aorta_example_ct.nii.gz", "totalseg_aorta_example_ct_heart.nii.gz"),
             ("totalseg_example_ct_dicom", "totalseg_example_ct_dicom_seg.nii.gz")]
    datalist = {"training": [{"image": str(ct / a), "label": str(ct / b)} for a, b in pairs]}
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    report = _prepare([tmp_path / "list.json"], tmp_path / "store", workers=2)
    assert (report.prepared, report.quarantined) == (4, 0), report.messages
    store = PreparedStore.open(tmp_path / "store")
    rng = np.random.default_rng(0)
    for i, rec in enumerate(store.cases):
        assert rec.has_label
        ref, ref_label = _sitk_read(Path(rec.source)), _sitk_read(Path(rec.label_source))
        image, label = store.image(i), store.label(i)
        corners = np.array([[a, b, c] for a in (0, rec.shape[0] - 1)
                            for b in (0, rec.shape[1] - 1) for c in (0, rec.shape[2] - 1)])
        points = np.concatenate([corners, rng.integers(0, rec.shape, size=(60, 3))])
        for idx in points:
            ras = np.asarray(rec.affine) @ np.append(idx, 1.0)
            lps = (-ras[0], -ras[1], ras[2])  # ITK works in LPS
            for arr, sitk_image in ((image, ref), (label, ref_label)):
                sidx = np.asarray(sitk_image.TransformPhysicalPointToContinuousIndex(lps))
                assert np.abs(sidx - np.rint(sidx)).max() < 1e-3, (rec.name, idx, sidx)
                where = [int(v) for v in np.rint(sidx)]
                assert int(arr[tuple(idx)]) == int(sitk_image[where]), (rec.name, idx)
        np.testing.assert_allclose(sorted(rec.spacing), sorted(ref.GetSpacing()), rtol=1e-5)
        assert rec.hu_min < -500 < rec.hu_max and 0.05 < rec.body_fraction < 0.95
    shapes = {Path(c.source).name: c.shape for c in store.cases}
    assert shapes["totalseg_example_ct_dicom"] == (512, 512, 20)
    assert shapes["totalseg_example_ct_sm.nii.gz"] == (122, 101, 30)


def _sitk_read(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers inherit the patch")
def test_dead_worker_quarantines_only_its_case(three_cases: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import mim3d.data.casework as prep

    original = prep._write_case

    def crash_on_b(spec, job):  # a segfault in a reader kills the process like this
        if spec.name == "b":
            os._exit(3)
        return original(spec, job)

    monkeypatch.setattr(prep, "_write_case", crash_on_b)
    report = _prepare([three_cases], tmp_path / "store", workers=2)
    assert (report.prepared, report.quarantined) == (2, 1), report.messages
    assert "worker process died" in _quarantine(tmp_path / "store")[0]["reason"]
    monkeypatch.setattr(prep, "_write_case", lambda *a: os._exit(3))
    with pytest.raises(RuntimeError, match="every prepare worker process died"):
        _prepare([three_cases], tmp_path / "store2", workers=2)
