"""Tests for mim3d.data.phantom: determinism, HU plausibility, anatomy, labels and cohort files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mim3d.data.phantom import LABELS, TISSUE_HU, make_phantom, write_cohort
from mim3d.data.volume import Volume

ORGANS = range(1, 14)


@pytest.fixture(scope="module")
def case0() -> tuple[Volume, Volume]:
    return make_phantom(seed=0)


@pytest.fixture(scope="module")
def case1() -> tuple[Volume, Volume]:
    return make_phantom(seed=1)


def _core(lab: np.ndarray, k: int) -> np.ndarray:
    """Voxels of label ``k`` away from its partial-volume rim."""
    return ndimage.binary_erosion(lab == k)


def _nifti(root: Path, i: int) -> np.ndarray:
    return np.asarray(nib.load(root / f"imagesTr/phantom_{i:03d}.nii.gz").dataobj)


def world_centroid(label: Volume, ids: int | tuple[int, ...]) -> np.ndarray:
    """Mean world (RAS mm) position of the voxels carrying any of ``ids``."""
    idx = np.argwhere(np.isin(label.array, ids)).mean(axis=0)
    return label.affine[:3, :3] @ idx + label.affine[:3, 3]


def test_labels_contract() -> None:
    btcv = ["spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver",
            "stomach", "aorta", "inferior_vena_cava", "portal_and_splenic_veins", "pancreas",
            "right_adrenal_gland", "left_adrenal_gland"]
    assert [LABELS[i] for i in ORGANS] == btcv
    assert LABELS[0] == "background"
    assert [LABELS[i] for i in range(14, 18)] == ["body", "bone", "lung", "gas"]


def test_same_seed_same_case_other_seed_differs(case0, case1) -> None:
    image, label = make_phantom(seed=0)
    np.testing.assert_array_equal(image.array, case0[0].array)
    np.testing.assert_array_equal(label.array, case0[1].array)
    assert not np.array_equal(case1[0].array, case0[0].array)
    assert not np.array_equal(case1[1].array, case0[1].array)


def test_dtypes_shape_and_shared_affine(case0) -> None:
    image, label = case0
    assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
    assert image.shape == label.shape == (128, 128, 96)
    np.testing.assert_array_equal(image.affine, label.affine)
    np.testing.assert_allclose(image.affine[:3, :3], np.diag([1.5, 1.5, 2.0]))
    centre = image.affine @ np.array([*((np.array(image.shape) - 1) / 2), 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    assert set(np.unique(label.array)) <= set(LABELS)


@pytest.mark.parametrize("case", ["case0", "case1"])
def test_every_label_present(case, request) -> None:
    label = request.getfixturevalue(case)[1]
    counts = np.bincount(label.array.ravel(), minlength=len(LABELS))
    for i in LABELS:
        assert counts[i] >= 20, f"{LABELS[i]} has {counts[i]} voxels"


def test_organs_lie_inside_body(case0) -> None:
    lab = case0[1].array
    organs = (lab >= 1) & (lab <= 13)
    touching_outside = ndimage.binary_dilation(organs) & (lab == 0)
    assert not touching_outside.any()


def test_tissue_hu_plausible(case0) -> None:
    image, label = case0
    hu, lab = image.array.astype(np.float64), label.array
    mean, sd = TISSUE_HU["liver"]
    liver = hu[_core(lab, 6)].mean()
    assert mean - 2 * sd - 5 <= liver <= mean + 2 * sd + 5
    assert abs(liver - image.meta["hu"]["liver"]) < 5  # the drawn value is what is rendered
    assert hu[_core(lab, 1)].mean() == pytest.approx(image.meta["hu"]["spleen"], abs=5)
    assert hu[_core(lab, 8)].mean() > 120  # arterial-phase aorta
    assert hu[lab == 16].mean() < -700
    assert hu[lab == 15].mean() > 200
    assert hu[_core(lab, 17)].mean() < -900
    assert abs(np.median(hu[lab == 0]) + 1000) < 20
    assert hu[:, -5:, :].mean() < -950  # the air in front of the patient
    noise = hu[:, -5:, :].std()
    assert noise == pytest.approx(image.meta["noise_sd"], rel=0.15)
    assert 8 < noise < 25


def test_anatomy_in_ras_world(case0, case1) -> None:
    for _, label in (case0, case1):
        liver, spleen = world_centroid(label, 6), world_centroid(label, 1)
        assert liver[0] > 0 > spleen[0]  # RAS+: +x is the patient's right
        assert world_centroid(label, 2)[0] > world_centroid(label, 3)[0]
        assert world_centroid(label, 9)[0] > world_centroid(label, 8)[0]  # IVC right of aorta
        assert world_centroid(label, 16)[2] > liver[2]  # lungs superior
        lab, aff = label.array, label.affine
        bone = np.argwhere(lab == 15)
        x_mm = aff[0, 0] * bone[:, 0] + aff[0, 3]
        spine_y = (aff[1, 1] * bone[np.abs(x_mm) < 15, 1] + aff[1, 3]).mean()
        assert spine_y < world_centroid(label, 8)[1]  # spine posterior to the aorta


def test_table_below_body(case0) -> None:
    image, label = case0
    body_rows = np.nonzero((label.array > 0).any(axis=(0, 2)))[0]
    below = image.array[:, : body_rows.min(), :]
    assert (label.array[:, : body_rows.min(), :] == 0).all()
    # A dense (curved) table line under most of the width, along the whole scan.
    assert (below.max(axis=1) > 100).mean() > 0.8


def test_other_geometry() -> None:
    image, label = make_phantom(shape=(64, 56, 40), spacing=(3.0, 3.5, 5.0), seed=3)
    assert image.shape == label.shape == (64, 56, 40)
    assert image.spacing == pytest.approx((3.0, 3.5, 5.0))
    assert {1, 6, 8, 15, 16} <= set(np.unique(label.array))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"shape": (31, 64, 64)}, "shape"), ({"shape": (64, 64)}, "shape"),
     ({"spacing": (1.0, 0.0, 1.0)}, "spacing"), ({"spacing": (1.0, -2.0, 1.0)}, "-2.0"),
     ({"seed": -1}, "seed")],
)
def test_make_phantom_rejects_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_phantom(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n": 0}, "n must"), ({"n": 2, "shape": (32, 16, 32)}, "16"),
     ({"n": 2, "spacing": (1.0, 1.0, 0.0)}, "spacing"), ({"n": 2, "seed": -3}, "seed"),
     ({"n": True}, "n must"), ({"n": 2, "val_fraction": 1.0}, "val_fraction")],
)
def test_write_cohort_rejects_bad_arguments(tmp_path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        write_cohort(tmp_path, **kwargs)


SMALL = {"shape": (40, 40, 32), "spacing": (4.0, 4.0, 5.0)}


def test_write_cohort_datalist_and_files(tmp_path) -> None:
    path = write_cohort(tmp_path / "cohort", 4, seed=5, val_fraction=0.3, **SMALL)
    assert path == tmp_path / "cohort" / "dataset.json"
    data = json.loads(path.read_text())
    assert data["labels"] == {str(k): v for k, v in LABELS.items()}
    assert data["modality"] == {"0": "CT"} and data["numTraining"] == 4
    assert {"name", "description"} <= set(data)
    assert len(data["training"]) == 2 and len(data["validation"]) == 2  # ceil(4 * 0.3)
    names = [e["image"] for e in data["training"] + data["validation"]]
    assert names == [f"imagesTr/phantom_{i:03d}.nii.gz" for i in range(4)]
    for entry in data["training"] + data["validation"]:
        img = nib.load(path.parent / entry["image"])
        lab = nib.load(path.parent / entry["label"])
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert img.shape == lab.shape == SMALL["shape"]
        np.testing.assert_allclose(img.affine, lab.affine)
        np.testing.assert_allclose(img.header.get_zooms(), SMALL["spacing"])
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        hu = np.asarray(img.dataobj)
        assert hu.dtype == np.int16 and hu.min() >= -1024 and hu.max() > 200
        assert set(np.unique(np.asarray(lab.dataobj))) <= set(LABELS)


def test_write_cohort_is_deterministic_and_independent_of_n(tmp_path) -> None:
    a = write_cohort(tmp_path / "a", 3, seed=9, **SMALL).parent
    b = write_cohort(tmp_path / "b", 1, seed=9, **SMALL).parent
    c = write_cohort(tmp_path / "c", 2, seed=10, **SMALL).parent
    np.testing.assert_array_equal(_nifti(a, 0), _nifti(b, 0))
    assert not np.array_equal(_nifti(a, 0), _nifti(a, 1))
    assert not np.array_equal(_nifti(a, 0), _nifti(c, 0))


@pytest.mark.parametrize(("n", "frac"), [(1, 0.2), (2, 0.2), (5, 0.2), (3, 0.0), (3, 0.9)])
def test_write_cohort_split_sizes(tmp_path, n, frac) -> None:
    data = json.loads(write_cohort(tmp_path, n, val_fraction=frac, **SMALL).read_text())
    n_val = min(math.ceil(n * frac), n - 1) if n >= 2 else 0
    assert len(data["validation"]) == n_val
    assert len(data["training"]) == n - n_val
    assert Path(tmp_path / data["training"][0]["label"]).is_file()
