"""Tests of the downstream MONAI transforms and datasets (mim3d.data.transforms)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mim3d.config import load_config
from mim3d.data import readers
from mim3d.data import transforms as T
from mim3d.data.datalists import CaseSpec
from mim3d.data.volume import ImageReadError

NATIVE = (1.0, 0.75, 1.5)  # mm per voxel of the test image
SHAPE = (25, 21, 17)       # extents 24, 15, 24 mm
TARGET = (2.0, 1.5, 2.0)   # divides every extent, so resampled voxels fall on exact positions
ORIGIN = np.array([-10.0, 5.0, 3.0])


def _affine(spacing: tuple[float, ...] = NATIVE) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = ORIGIN
    return aff


def _hu(x_mm: np.ndarray, y_mm: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
    """A HU ramp from -150 (inside BTCV's window) to 333 (clipped at 250)."""
    return -150.0 + 15.0 * x_mm + 5.0 * y_mm + 2.0 * z_mm


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, _affine() if affine is None else affine), str(path))
    return str(path)


@pytest.fixture
def ramp_case(tmp_path: Path) -> dict:
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, NATIVE)], indexing="ij")
    image = _hu(*grid).astype(np.float32)
    label = np.zeros(SHAPE, np.int16)
    label[:12] = 1                 # x < 12 mm
    label[12:, :10] = 6            # x >= 12 mm, y < 7.5 mm
    label[12:, 10:, :8] = 99       # not a BTCV id
    label[12:, 10:, 8:] = 14       # not listed either (BTCV lists 1..13)
    return {"image": _save(tmp_path / "img.nii.gz", image),
            "label": _save(tmp_path / "lab.nii.gz", label), "name": "ramp"}


def _btcv(spacing: tuple[float, float, float] | None = TARGET, roi=(8, 8, 8), **task_kw):
    cfg = load_config("downstream", "btcv")
    data = dataclasses.replace(cfg.data, spacing=spacing)
    return data, dataclasses.replace(cfg.task, roi=roi, **task_kw)


def test_deterministic_window_resample_and_labels(ramp_case: dict) -> None:
    data, task = _btcv()
    det, rand = T.build_transforms(data, task, train=False)
    out = det(dict(ramp_case))
    img, lab = out["image"], out["label"]
    expected_shape = tuple(round((n - 1) * s / t) + 1 for n, s, t in zip(SHAPE, NATIVE, TARGET))
    assert expected_shape == (13, 11, 13)
    assert tuple(img.shape) == (1, *expected_shape) and tuple(lab.shape) == (1, *expected_shape)
    grid = np.meshgrid(*[np.arange(n) * t for n, t in zip(expected_shape, TARGET)], indexing="ij")
    lo, hi = data.hu_window
    want = np.clip((_hu(*grid) - lo) / (hi - lo), 0.0, 1.0)
    assert want.max() == 1.0 and want.min() > 0.0  # clipping exercised, nothing cropped
    np.testing.assert_allclose(img[0].numpy(), want, atol=1e-4)
    np.testing.assert_allclose(img.affine.numpy(), _affine(TARGET), atol=1e-6)
    assert set(np.unique(lab.numpy()).tolist()) == {0.0, 1.0, 6.0}  # 14 and 99 became 0
    assert lab[0, 0, 0, 0] == 1 and lab[0, 6, 0, 0] == 6 and lab[0, 6, 10, 12] == 0
    assert len(rand.transforms) == 0  # evaluation: the random part is the identity


def test_inverse_maps_back_to_the_original_grid(ramp_case: dict) -> None:
    data, task = _btcv(roi=(16, 16, 16))  # padding and resampling both need undoing
    det, _ = T.build_transforms(data, task, train=False)
    out = det(dict(ramp_case))
    back = det.inverse(out)
    assert tuple(back["label"].shape) == (1, *SHAPE)
    np.testing.assert_allclose(back["label"].affine.numpy(), _affine(), atol=1e-5)


def test_crop_foreground_drops_air_and_pads_to_roi(tmp_path: Path) -> None:
    image = np.full((30, 30, 30), -1000.0, np.float32)
    image[5:15, 8:20, 10:13] = 40.0  # a 10 x 12 x 3 body in air
    data, task = _btcv(spacing=None, roi=(8, 8, 8))
    det, _ = T.build_transforms(data, task, train=False)
    out = det({"image": _save(tmp_path / "a.nii.gz", image, np.eye(4)), "name": "a"})
    assert tuple(out["image"].shape) == (1, 10, 12, 8)  # z: 3 body slices padded to the ROI
    assert out["image"].min() == 0.0 and "label" not in out  # inference item without label


def test_remap_labels_numpy_torch_and_aliases() -> None:
    raw = np.array([0, 1, 2, 3, 4, 7, 2.0000001], np.float32)
    assert T.remap_labels(raw, {1: "a", 3: "c"}).tolist() == [0, 1, 0, 3, 0, 0, 0]
    out = T.remap_labels(torch.as_tensor(raw), [1, 2, 3], aliases=load_config("downstream", "brats21").task.label_aliases)
    assert out.tolist() == [0, 1, 2, 3, 3, 0, 2] and out.dtype == torch.float32
    assert T.seg_label_ids(_btcv(labels=None)[1]) == tuple(range(1, 14))
    with pytest.raises(ValueError, match="1..13"):
        T.build_transforms(*_btcv(labels={0: "background", 1: "spleen"}), train=False)


def _pos_fraction(ds, items: int) -> float:
    crops = [c for i in range(items) for c in ds[i % len(ds)]]
    return float(np.mean([bool((c["label"] > 0).any()) for c in crops]))


@pytest.fixture
def blob_case(tmp_path: Path) -> dict:
    image = np.zeros((48, 48, 48), np.float32)  # soft tissue everywhere: HU 0 -> 0.41
    label = np.zeros((48, 48, 48), np.int16)
    label[4:8, 4:8, 4:8] = 3
    return {"image": _save(tmp_path / "b.nii.gz", image, np.eye(4)),
            "label": _save(tmp_path / "bl.nii.gz", label, np.eye(4)), "name": "blob"}


@pytest.mark.parametrize(("pos", "neg", "want"), [(1.0, 1.0, 0.52), (1.0, 3.0, 0.28)])
def test_train_crops_follow_pos_neg_ratio(blob_case, pos, neg, want) -> None:
    data, task = _btcv(spacing=None, roi=(16, 16, 16), pos=pos, neg=neg, num_samples=4)
    ds = T.make_dataset([blob_case], data, task, train=True, seed=1)
    first = ds[0]
    assert isinstance(first, list) and len(first) == 4
    for crop in first:
        assert tuple(crop["image"].shape) == (1, 16, 16, 16)
        assert tuple(crop["label"].shape) == (1, 16, 16, 16) and crop["name"] == "blob"
    # A positive centre always shows the 4^3 organ; a negative one does so only when it lands
    # in the corner (16/48)^3 of the volume, so E = p + (1 - p) * 0.037.
    assert abs(_pos_fraction(ds, 40) - want) < 0.12


def test_same_seed_same_crops(blob_case) -> None:
    data, task = _btcv(spacing=None, roi=(16, 16, 16))
    runs = [T.make_dataset([blob_case], data, task, train=True, seed=s) for s in (5, 5, 6)]
    draws = [[torch.stack([c["image"] for c in ds[0]]) for _ in range(3)] for ds in runs]
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))
    assert not all(torch.equal(a, b) for a, b in zip(draws[0], draws[2]))


@pytest.mark.parametrize("cache", [True, False])
def test_cache_reads_each_file_once(blob_case, tmp_path, monkeypatch, cache) -> None:
    calls: Counter = Counter()
    real = readers.read_volume

    def counting(path, **kw):
        calls[Path(path).name] += 1
        return real(path, **kw)

    monkeypatch.setattr(readers, "read_volume", counting)
    other = {"image": str(tmp_path / "b2.nii.gz"), "label": str(tmp_path / "bl2.nii.gz"),
             "name": "blob2"}
    for key in ("image", "label"):
        Path(other[key]).write_bytes(Path(blob_case[key]).read_bytes())
    data, task = _btcv(spacing=None, roi=(16, 16, 16), num_samples=1)
    ds = T.make_dataset([blob_case, other], data, task, train=True, cache=cache)
    for _epoch in range(2):
        for i in range(len(ds)):
            ds[i]
    reads = 1 if cache else 2  # per file over two epochs
    assert calls == {name: reads for name in ("b.nii.gz", "bl.nii.gz", "b2.nii.gz", "bl2.nii.gz")}


def test_multichannel_stacking_and_zscore(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    chans = [np.zeros((20, 20, 20), np.float32) for _ in range(2)]
    for c, (mu, sd) in zip(chans, [(100.0, 10.0), (-5.0, 2.0)]):
        c[4:16, 4:16, 4:16] = rng.normal(mu, sd, (12, 12, 12))
    paths = [_save(tmp_path / f"c{i}.nii.gz", c, np.eye(4)) for i, c in enumerate(chans)]
    loaded = T.LoadVolumed("image")({"image": paths})["image"]
    assert tuple(loaded.shape) == (2, 20, 20, 20)
    np.testing.assert_array_equal(loaded[1].numpy(), chans[1])

    cfg = load_config("downstream", "brats21")
    data = dataclasses.replace(cfg.data, spacing=None)
    task = dataclasses.replace(cfg.task, roi=(8, 8, 8), in_channels=2)
    out = T.build_transforms(data, task, train=False)[0]({"image": paths, "name": "m"})
    img = out["image"]
    assert tuple(img.shape) == (2, 12, 12, 12)  # cropped to the non-zero brain
    for ch in img:
        assert abs(float(ch.mean())) < 1e-4 and abs(float(ch.std(unbiased=False)) - 1) < 1e-3

    four_d = _save(tmp_path / "4d.nii.gz", np.stack(chans, axis=-1), np.eye(4))
    assert tuple(T.LoadVolumed("image")({"image": four_d})["image"].shape) == (2, 20, 20, 20)
    bad = _save(tmp_path / "bad.nii.gz", np.zeros((20, 20, 19), np.float32), np.eye(4))
    with pytest.raises(ImageReadError, match="co-registered"):
        T.LoadVolumed("image")({"image": [paths[0], bad]})


def test_classification_items(tmp_path: Path) -> None:
    image = np.linspace(-1000, 500, 24 * 24 * 12, dtype=np.float32).reshape(24, 24, 12)
    path = _save(tmp_path / "ct.nii.gz", image, np.eye(4))
    cfg = load_config("downstream", "cc-ccii")
    task = dataclasses.replace(cfg.task, roi=(16, 16, 8))
    for train in (True, False):
        ds = T.make_dataset([{"image": path, "label": 2}], cfg.data, task, train=train)
        item = ds[0]
        assert tuple(item["image"].shape) == (1, 16, 16, 8) and item["name"] == "ct"
        assert item["label"].dtype == torch.long and int(item["label"]) == 2
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    with pytest.raises(ValueError, match="outside 0..2"):
        T.make_dataset([{"image": path, "label": 3}], cfg.data, task, train=False)
    with pytest.raises(ValueError, match="int 'label'"):
        T.make_dataset([CaseSpec("ct", path)], cfg.data, task, train=False)


def test_case_spec_and_checks(ramp_case: dict) -> None:
    data, task = _btcv()
    case = CaseSpec("r", ramp_case["image"], ramp_case["label"])
    item = T.make_dataset([case], data, task, train=False)[0]
    assert item["name"] == "r" and tuple(item["label"].shape) == (1, 13, 11, 13)
    with pytest.raises(ValueError, match="needs a label file"):
        T.make_dataset([CaseSpec("r", ramp_case["image"])], data, task, train=True)
    two = dataclasses.replace(task, in_channels=2)
    with pytest.raises(ImageReadError, match="in_channels=2"):
        T.make_dataset([case], data, two, train=False)


SHARED_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"


@pytest.mark.skipif(not (SHARED_CT / "totalseg_example_ct_dicom").is_dir(),
                    reason="../shared/data/ct (TotalSegmentator test scans) is absent")
def test_real_dicom_series_through_the_btcv_pipeline() -> None:
    case = {"image": str(SHARED_CT / "totalseg_example_ct_dicom"),
            "label": str(SHARED_CT / "totalseg_example_ct_dicom_seg.nii.gz")}
    cfg = load_config("downstream", "btcv")
    task = dataclasses.replace(cfg.task, roi=(32, 32, 16))
    det, _ = T.build_transforms(cfg.data, task, train=False)
    out = det(case)
    # 512 x 512 x 20 at 0.977 x 0.977 x 2.0 mm -> 1.5 x 1.5 x 2.0 mm, then cropped to the body.
    assert out["image"].shape[3] == 20 and out["image"].shape[1] <= 334
    np.testing.assert_allclose(out["image"].pixdim.numpy(), (1.5, 1.5, 2.0), atol=1e-6)
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert set(np.unique(out["label"].numpy()).tolist()) <= set(range(14))
