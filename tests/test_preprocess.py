"""One preprocessing for both paths (mim3d.data.preprocess): the pre-training store and the
fine-tuning MONAI pipeline give the same array for the same real CT.

Tolerances: grids (shape, affine) agree to 1e-6 mm; windowed intensities to
``0.5 / (hi - lo) + 1e-6``, because the store keeps int16 HU (rounding moves a value by at most
0.5 HU before the window) and both compute in float32.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mim3d.config import DataConfig, load_config
from mim3d.data.prepare import prepare
from mim3d.data.preprocess import resample_to_grid, resample_to_spacing, spacing_grid, window_hu
from mim3d.data.store import PreparedStore, normalize
from mim3d.data.transforms import build_transforms

CT = "totalseg_example_ct_sm.nii.gz"  # 122 x 101 x 30 at 3 mm, RAS, int16 HU


def test_spacing_grid_spans_the_voxel_centres() -> None:
    affine = np.diag([1.0, 0.75, 1.5, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 3.0)
    shape, new = spacing_grid((25, 21, 17), affine, (2.0, 1.5, 2.0))
    assert shape == (13, 11, 13)  # round((n - 1) * old / new) + 1: extents 24, 15, 24 mm
    np.testing.assert_allclose(new, np.diag([2.0, 1.5, 2.0, 1.0]) + np.pad(
        affine[:3, 3:], ((0, 1), (3, 0))), atol=1e-12)


def test_resampling_a_linear_ramp_is_exact_and_inverts() -> None:
    x, y, z = np.meshgrid(np.arange(20), np.arange(16), np.arange(12), indexing="ij")
    ramp = (10.0 * x - 4.0 * y + 2.5 * z).astype(np.float32)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    out, new = resample_to_spacing(ramp, affine, (2.0, 2.0, 1.5), order=1)
    i, j, k = np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij")
    np.testing.assert_allclose(out, 20.0 * i - 8.0 * j + 1.25 * k, atol=1e-4)  # trilinear: exact
    back = resample_to_grid(out, new, affine, ramp.shape, order=1)
    inside = (slice(0, 19), slice(0, 15), slice(None))  # past the last new centre: edge values
    np.testing.assert_allclose(back[inside], ramp[inside], atol=1e-4)
    labels = (x >= 10).astype(np.uint8)
    lab, _ = resample_to_spacing(labels, affine, (2.0, 2.0, 1.5), order=0)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1}


def test_window_hu_maps_and_clips() -> None:
    got = window_hu(np.array([-2000, -175, 37.5, 250, 900]), (-175, 250))
    np.testing.assert_allclose(got, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    assert got.dtype == np.float32


def _store_array(path: Path, data: DataConfig, out: Path) -> tuple[np.ndarray, np.ndarray]:
    report = prepare([path], out, data=data, workers=0, progress=False)
    assert report.in_store == 1, report.messages
    store = PreparedStore.open(out)
    return normalize(store.volume(0), data), np.asarray(store.cases[0].affine, float)


def _finetune_array(path: Path, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    task = dataclasses.replace(load_config("downstream", "btcv").task, roi=(16, 16, 16))
    det, _ = build_transforms(data, task, train=False)
    image = det({"image": str(path), "name": "ct"})["image"]
    return image[0].numpy(), image.affine.numpy()


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 2.0), None])
@pytest.mark.parametrize("flip", [False, True])
def test_store_and_finetuning_give_the_same_array(shared_data: Path, tmp_path: Path,
                                                  spacing: tuple[float, ...] | None,
                                                  flip: bool) -> None:
    """BTCV's spacing and window on a real CT; ``flip`` stores it LPS so both must orient it."""
    src = shared_data / "ct" / CT
    if flip:  # same world content, x and y axes stored reversed
        img = nib.load(str(src))
        flipped = np.asarray(img.dataobj)[::-1, ::-1]
        aff = img.affine @ np.array([[-1, 0, 0, flipped.shape[0] - 1],
                                     [0, -1, 0, flipped.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
        src = tmp_path / "lps.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), aff), str(src))
        assert nib.aff2axcodes(aff) == ("L", "P", "S")
    data = dataclasses.replace(load_config("downstream", "btcv").data, spacing=spacing)
    stored, store_affine = _store_array(src, data, tmp_path / "store")
    tuned, tuned_affine = _finetune_array(src, data)
    # fine-tuning then crops to the body (and pads): find its box inside the store's grid
    np.testing.assert_allclose(tuned_affine[:3, :3], store_affine[:3, :3], atol=1e-6)
    offset = np.linalg.solve(store_affine[:3, :3], tuned_affine[:3, 3] - store_affine[:3, 3])
    start = np.round(offset).astype(int)
    np.testing.assert_allclose(offset, start, atol=1e-6)  # on the same voxel grid
    assert np.all(start >= 0) and np.all(start + tuned.shape <= stored.shape)  # no padding here
    box = tuple(slice(a, a + n) for a, n in zip(start, tuned.shape, strict=True))
    lo, hi = data.hu_window
    np.testing.assert_allclose(tuned, stored[box], rtol=0, atol=0.5 / (hi - lo) + 1e-6)
    if spacing is not None:
        assert stored.shape == (243, 201, 44)  # round((n - 1) * 3 / s) + 1 on every axis
    assert tuned.size > 0.3 * stored.size  # the body crop keeps the body: a real comparison
