"""Tests of mim3d.data.readers: formats, geometry, DICOM series choice, errors, validation."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mim3d.data.readers import read_volume, to_ras, validate_volume, write_volume
from mim3d.data.volume import ImageReadError, Volume

DICOM_DIR = "ct/totalseg_example_ct_dicom"


def _oblique_affine() -> np.ndarray:
    """LPS-like flipped, anisotropic, slightly rotated voxel-to-world matrix."""
    theta = np.deg2rad(20.0)
    rot = np.array(
        [[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.8, -1.2, 2.5])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


def _world(affine: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """World coordinates of integer voxel indices ``idx`` (N x 3)."""
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _assert_same_world_values(a: Volume, b: Volume, step: int = 1) -> None:
    """Each voxel of ``a`` (every ``step``-th in-plane) lands on an equal voxel of ``b``."""
    idx = np.indices(a.shape)[:, ::step, ::step, :].reshape(3, -1).T
    mapped = (_world(a.affine, idx) - b.affine[:3, 3]) @ np.linalg.inv(b.affine[:3, :3]).T
    rounded = np.rint(mapped).astype(int)
    np.testing.assert_allclose(mapped, rounded, atol=1e-4)
    got = b.array[rounded[:, 0], rounded[:, 1], rounded[:, 2]]
    np.testing.assert_array_equal(got, a.array[idx[:, 0], idx[:, 1], idx[:, 2]])


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha", ".nhdr", ".mhd"])
def test_round_trip_keeps_values_dtype_and_world_geometry(tmp_path: Path, ext: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 2000, size=(5, 6, 7)).astype(np.int16)
    original = Volume(array, _oblique_affine(), "synthetic")
    path = tmp_path / f"img{ext}"
    write_volume(original, path)
    back = read_volume(path)
    assert back.array.dtype == np.int16
    assert sorted(back.shape) == sorted(array.shape)
    assert nib.aff2axcodes(back.affine) == ("R", "A", "S")
    np.testing.assert_allclose(sorted(back.spacing), [0.8, 1.2, 2.5], atol=1e-5)
    _assert_same_world_values(original, back)
    # a few voxels spelled out: same world point, same value
    for i, j, k in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        world = _world(original.affine, np.array([[i, j, k]]))[0]
        ijk = np.rint(np.linalg.solve(back.affine[:3, :3], world - back.affine[:3, 3])).astype(int)
        assert back.array[tuple(ijk)] == array[i, j, k]


def test_nifti_round_trip_float_and_source_meta(tmp_path: Path) -> None:
    array = np.linspace(-1.0, 1.0, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "sub" / "f.nii.gz"
    write_volume(Volume(array, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    back = read_volume(path)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, array)
    assert back.meta["format"] == "nifti" and back.source == str(path)


def test_nifti_integer_scaling_keeps_integer_hu(tmp_path: Path) -> None:
    raw = np.array([0, 24, 1024, 3000], dtype=np.uint16).reshape(1, 2, 2).repeat(2, axis=0)
    path = tmp_path / "scaled.nii"
    nib.save(nib.Nifti1Image(raw, np.eye(4), dtype=np.uint16), path)
    data = bytearray(path.read_bytes())
    data[112:120] = struct.pack("<ff", 1.0, -1024.0)  # scl_slope, scl_inter
    path.write_bytes(bytes(data))
    vol = read_volume(path)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, raw.astype(np.int32) - 1024)
    data[112:120] = struct.pack("<ff", 0.5, 0.0)
    path.write_bytes(bytes(data))
    halved = read_volume(path)
    assert halved.array.dtype == np.float32
    np.testing.assert_allclose(halved.array, raw / 2.0)


def test_sitk_ras_stored_image_comes_back_c_contiguous(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    write_volume(Volume(array, np.diag([1.0, 2.0, 3.0, 1.0])), tmp_path / "ras.mha")
    vol = read_volume(tmp_path / "ras.mha")
    assert vol.array.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.affine, np.diag([1.0, 2.0, 3.0, 1.0]), atol=1e-9)


def test_to_ras_flipped_and_permuted_maps_world_points_to_same_values() -> None:
    rng = np.random.default_rng(1)
    array = rng.normal(size=(4, 5, 6)).astype(np.float32)
    # array axis 0 runs towards Superior, axis 1 towards Left, axis 2 towards Posterior
    affine = np.array(
        [[0.0, -2.0, 0.0, 50.0], [0.0, 0.0, -3.0, 40.0], [1.0, 0.0, 0.0, -10.0], [0, 0, 0, 1]]
    )
    ras_array, ras_affine = to_ras(array, affine)
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    assert ras_array.shape == (5, 6, 4) and ras_array.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.diag(ras_affine)[:3], [2.0, 3.0, 1.0])
    _assert_same_world_values(Volume(array, affine), Volume(ras_array, ras_affine))


def test_to_ras_leaves_ras_and_2d_alone() -> None:
    array = np.arange(24).reshape(2, 3, 4)
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    out, out_affine = to_ras(array, affine)
    assert out is array
    np.testing.assert_array_equal(out_affine, affine)
    flat = np.zeros((3, 4))
    assert to_ras(flat, affine)[0] is flat


@pytest.fixture(scope="module")
def dicom_volume(shared_data: Path) -> Volume:
    return read_volume(shared_data / DICOM_DIR)


def test_real_dicom_matches_simpleitk_geometry_and_values(
    shared_data: Path, dicom_volume: Volume
) -> None:
    folder = shared_data / DICOM_DIR
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    ref_array = sitk.GetArrayFromImage(ref)  # (z, y, x)
    vol = dicom_volume
    assert vol.shape == (512, 512, 20) and vol.array.dtype == np.int16
    np.testing.assert_allclose(vol.spacing, [0.9765625, 0.9765625, 2.0])
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.meta["format"] == "dicom" and vol.meta["modality"] == "CT"
    assert vol.meta["n_slices"] == 20 and "20 slices" in vol.meta["series_note"]
    assert vol.meta["orig_axcodes"] == "LPS"
    corners = np.array([[i, j, k] for i in (0, 511) for j in (0, 511) for k in (0, 19)])
    for ijk, ras in zip(corners, _world(vol.affine, corners)):
        lps = (-ras[0], -ras[1], ras[2])
        cont = ref.TransformPhysicalPointToContinuousIndex(lps)
        np.testing.assert_allclose(cont, np.rint(cont), atol=1e-4)
        x, y, z = np.rint(cont).astype(int)
        assert vol.array[tuple(ijk)] == ref_array[z, y, x]
    # HU after rescale: air around -1024, some bone
    assert vol.array.min() == ref_array.min() and vol.array.max() == ref_array.max()


def test_real_dicom_grid_matches_its_nifti_label_map(
    shared_data: Path, dicom_volume: Volume
) -> None:
    seg = read_volume(shared_data / "ct" / "totalseg_example_ct_dicom_seg.nii.gz")
    assert seg.meta["orig_axcodes"] == "LAS"  # stored x-flipped; to_ras must agree with DICOM
    assert seg.shape == dicom_volume.shape
    np.testing.assert_allclose(seg.affine, dicom_volume.affine, atol=1e-3)


def test_real_nifti_ct(shared_data: Path) -> None:
    vol = read_volume(shared_data / "ct" / "totalseg_example_ct.nii.gz")
    assert vol.shape == (122, 101, 112)
    np.testing.assert_allclose(vol.spacing, [3.0, 3.0, 3.0])
    assert vol.array.dtype == np.int32
    raw = nib.load(shared_data / "ct" / "totalseg_example_ct.nii.gz")
    np.testing.assert_array_equal(vol.array, np.asanyarray(raw.dataobj))  # already RAS
    assert validate_volume(vol) is None


def _copy_series(src: Path, dst: Path, files: list[Path], **tags: str) -> None:
    """Copy DICOM slices, overriding tags and giving each a fresh SOPInstanceUID."""
    import pydicom
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True, exist_ok=True)
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(dst / f"copy_{n:02d}.dcm")


@pytest.fixture(scope="module")
def two_series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    src = shared_data / DICOM_DIR
    files = sorted(src.iterdir())
    folder = tmp_path_factory.mktemp("two_series")
    for f in files:
        shutil.copy(f, folder / f.name)
    uid = "1.2.826.0.1.3680043.8.498.123456789"
    _copy_series(src, folder, files[:5], SeriesInstanceUID=uid)
    return folder, uid


def test_two_series_picks_largest_ct_and_reports(
    two_series: tuple[Path, str], dicom_volume: Volume
) -> None:
    folder, uid = two_series
    vol = read_volume(folder)
    assert vol.shape == (512, 512, 20)
    # the original slices carry an empty SeriesInstanceUID (anonymised)
    assert vol.meta["series_uid"] == ""
    assert "20 slices" in vol.meta["series_note"] and "of 2 series" in vol.meta["series_note"]
    np.testing.assert_array_equal(vol.array, dicom_volume.array)
    # the pick is explained: the other series is listed with how to choose it
    note = vol.meta["series_note"]
    assert f"others: '{uid}' (CT, 5 slices)" in note and "--series UID" in note
    assert vol.meta["other_series"] == [uid]
    # the slice files in array order (the z axis before RAS reordering), for DICOM SEG output
    assert len(vol.meta["files"]) == 20 and all(Path(f).parent == folder
                                                for f in vol.meta["files"])


def test_series_uid_selects_the_other_series(
    two_series: tuple[Path, str], dicom_volume: Volume
) -> None:
    folder, uid = two_series
    vol = read_volume(folder, series_uid=uid)
    assert vol.shape == (512, 512, 5) and vol.meta["series_uid"] == uid
    # the copies sit on the 20-slice grid: every copied voxel lands on the same value there
    np.testing.assert_allclose(vol.affine[:3, :3], dicom_volume.affine[:3, :3])
    _assert_same_world_values(vol, dicom_volume, step=5)
    with pytest.raises(ImageReadError, match="choose one of") as err:
        read_volume(folder, series_uid="9.9.9")
    assert uid in str(err.value) and "\n" not in str(err.value)


def test_mr_only_dicom_folder_is_refused(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / DICOM_DIR
    _copy_series(src, tmp_path / "mr", sorted(src.iterdir())[:3], Modality="MR")
    with pytest.raises(ImageReadError, match="no CT series") as err:
        read_volume(tmp_path / "mr")
    assert str(tmp_path / "mr") in str(err.value)
    # an explicit series_uid may read another modality
    assert read_volume(tmp_path / "mr", series_uid="").meta["modality"] == "MR"


def _assert_one_line_error(path: Path, match: str) -> None:
    with pytest.raises(ImageReadError, match=match) as err:
        read_volume(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.nii.gz"
    write_volume(Volume(np.arange(4000, dtype=np.int16).reshape(10, 20, 20), np.eye(4)), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(truncated, "cannot read as NIfTI")
    text = tmp_path / "text.nii.gz"
    text.write_text("not an image\n")
    _assert_one_line_error(text, "cannot read as NIfTI")
    plain = tmp_path / "text.nii"
    plain.write_text("not an image either\n" * 30)
    _assert_one_line_error(plain, "cannot read as NIfTI")
    _assert_one_line_error(tmp_path / "missing.nii.gz", "not found")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    _assert_one_line_error(tmp_path / "x.png", "unknown image file extension")
    bad_nrrd = tmp_path / "bad.nrrd"
    bad_nrrd.write_text("NRRD0004\ntype: short\n")
    _assert_one_line_error(bad_nrrd, "SimpleITK cannot read")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(tmp_path / "empty", "no DICOM series")


def test_gz_that_is_not_gzip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "raw.nii.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"\x00" * 400)  # valid gzip, not a NIfTI header
    _assert_one_line_error(path, "cannot read as NIfTI")


def test_singleton_fourth_axis_is_dropped_but_real_4d_kept(tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    arr4 = np.arange(60, dtype=np.int16).reshape(3, 4, 5, 1)
    nib.save(nib.Nifti1Image(arr4, affine), tmp_path / "a.nii.gz")
    vol = read_volume(tmp_path / "a.nii.gz")
    assert vol.shape == (3, 4, 5)
    np.testing.assert_array_equal(vol.array, arr4[..., 0])
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5, 2), np.int16), affine), tmp_path / "b.nii.gz")
    vol4 = read_volume(tmp_path / "b.nii.gz")
    assert vol4.shape == (3, 4, 5, 2)
    assert validate_volume(vol4).startswith("4D image")


def test_validate_volume_reasons() -> None:
    eye = np.eye(4)
    ok = Volume(np.arange(27, dtype=np.int16).reshape(3, 3, 3), eye)
    assert validate_volume(ok) is None
    assert validate_volume(Volume(np.ones((4, 4)), eye)).startswith("2D image")
    assert validate_volume(Volume(np.ones((2, 2, 2, 3)), eye)).startswith("4D image")
    nan = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    nan[1, 1, 1] = np.nan
    assert "1 NaN" in validate_volume(Volume(nan, eye))
    inf = np.arange(27, dtype=np.float64).reshape(3, 3, 3)
    inf[0, 0, 0] = np.inf
    assert "1 inf" in validate_volume(Volume(inf, eye))
    const = validate_volume(Volume(np.full((3, 3, 3), -1024, np.int16), eye))
    assert "constant" in const and "-1024" in const
    assert "axis 2" in validate_volume(Volume(np.arange(9).reshape(3, 3, 1), eye))
    assert "affine" in validate_volume(Volume(ok.array, np.zeros((4, 4))))
