"""Coarse axes kept at source spacing (store format version 3): the interpolation against
scipy's trilinear resampling, crops against a fully resampled store, verify, info, settings.

Tolerances: a kept store rounds to int16 HU once before the coarse axes are interpolated, a
resampled store once after, so their crops differ by at most 1 HU (+ float32 error).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_nifti

from mim3d.config import DataConfig
from mim3d.data.prepare import prepare
from mim3d.data.preprocess import (
    axis_weights,
    interpolate_axis,
    resample_to_spacing,
    stored_spacing,
)
from mim3d.data.sampler import PretrainCropDataset
from mim3d.data.store import PreparedStore
from mim3d.data.storetools import merge_stores, store_info, verify_store

SPACING = (1.5, 1.5, 1.5)
# a thick-slice case (z kept), a fine one (nothing kept), a coarse in-plane one (x, y kept)
CASES = {"thick": ((40, 36, 14), (1.0, 1.2, 3.0)), "fine": ((30, 28, 26), (1.0, 1.0, 1.25)),
         "coarse": ((16, 18, 40), (2.5, 2.0, 0.8))}


def test_stored_spacing_keeps_axes_at_least_1_2x_coarser() -> None:
    assert stored_spacing((0.7, 0.7, 3.0), SPACING) == (1.5, 1.5, 3.0)
    assert stored_spacing((1.79, 1.8, 1.0), SPACING) == (1.5, 1.8, 1.5)  # 1.8 = 1.2 x 1.5


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("step", [0.5, 0.6, 0.37])
def test_interpolation_equals_scipy_trilinear_on_every_axis(axis: int, step: float) -> None:
    rng = np.random.default_rng(axis)
    src = rng.normal(size=(21, 17, 13)).astype(np.float32) * 100
    affine = np.diag([*(1.0 / step if a == axis else 1.0 for a in range(3)), 1.0])
    full, _ = resample_to_spacing(src, affine, (1.0, 1.0, 1.0), order=1)
    first, count = 3, full.shape[axis] - 5  # a window that ends inside the volume
    s0, w = axis_weights(first, count, step, src.shape[axis])
    assert w.shape[0] < src.shape[axis]  # only the band the window needs is read
    band = np.take(src, np.arange(s0, s0 + w.shape[0]), axis=axis)
    got = interpolate_axis(band, axis, w)
    want = np.take(full, np.arange(first, first + count), axis=axis)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    end = interpolate_axis(src, axis, axis_weights(0, full.shape[axis], step, src.shape[axis])[1])
    np.testing.assert_allclose(end, full, rtol=0, atol=1e-4)  # edge clamp included


def test_interpolate_axis_refuses_weights_of_another_length() -> None:
    with pytest.raises(ValueError, match="4 weight rows for 5 voxels"):
        interpolate_axis(np.zeros((5, 2, 2)), 0, np.zeros((4, 3), np.float32))


def _ct(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Smooth body-like HU content (the store's body grid needs tissue)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g * g for g in grid) < 0.8
    noise = rng.integers(-100, 300, size=shape)
    return np.where(body, 40 + noise, -1000).astype(np.int16)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = tmp_path_factory.mktemp("src")
    for seed, (name, (shape, spacing)) in enumerate(CASES.items()):
        write_nifti(src / f"{name}.nii.gz", _ct(shape, seed), np.diag([*spacing, 1.0]))
    files = [src / f"{n}.nii.gz" for n in CASES]
    out = {}
    for key, fmt, coarse in [("kept_npy", "npy", "kept"), ("kept_blosc2", "blosc2", "kept"),
                             ("resampled", "npy", "resampled")]:
        if fmt == "blosc2":
            pytest.importorskip("blosc2", reason="the blosc2 store format needs blosc2")
        out[key] = tmp_path_factory.mktemp(key) / "store"
        report = prepare(files, out[key], data=DataConfig(spacing=SPACING), workers=0,
                         progress=False, fmt=fmt, coarse_axes=coarse)
        assert report.prepared == 3, report.messages
    return out


def test_kept_store_crops_equal_resampled_store_crops(stores: dict[str, Path]) -> None:
    flat = PreparedStore.open(stores["resampled"])
    rng = np.random.default_rng(0)
    for key in ("kept_npy", "kept_blosc2"):
        kept = PreparedStore.open(stores[key])
        assert kept.info["coarse_axes"] == "kept" and kept.info["version"] == 3
        for i in range(3):
            a, b = kept.cases[i], flat.cases[i]
            assert a.shape == b.shape and a.affine == b.affine and a.name == b.name
            assert abs(a.hu_mean - b.hu_mean) < 0.5
            assert abs(a.body_fraction - b.body_fraction) < 0.02
            want = {"coarse": (1.0 / 2.5 * 1.5, 1.5 / 2.0, 1.0), "fine": None,
                    "thick": (1.0, 1.0, 0.5)}[a.name]
            assert (a.stored_step is None) == (want is None)
            if want is not None:
                np.testing.assert_allclose(a.stored_step, want)
                assert kept.image(i).shape == a.stored_shape != a.shape
            np.testing.assert_allclose(kept.volume(i), flat.volume(i), rtol=0, atol=1.0 + 1e-3)
            for _ in range(6):  # boxes inside, across the edges and wholly outside
                start = [int(rng.integers(-n // 2, n)) for n in a.shape]
                size = [int(rng.integers(1, n + 4)) for n in a.shape]
                np.testing.assert_allclose(kept.read_crop(i, start, size, pad_value=-1000),
                                           flat.read_crop(i, start, size, pad_value=-1000),
                                           rtol=0, atol=1.0 + 1e-3)


def test_training_crops_of_kept_and_resampled_stores_agree(stores: dict[str, Path]) -> None:
    data = DataConfig(spacing=SPACING)
    ds = {k: PretrainCropDataset(stores[k], crop_size=(16, 16, 16), data=data, seed=3)
          for k in stores}
    lo, hi = data.hu_window
    for i in range(8):
        ref = ds["resampled"][i]
        for key in ("kept_npy", "kept_blosc2"):
            got = ds[key][i]
            assert got.dtype == ref.dtype and got.shape == ref.shape == (1, 16, 16, 16)
            np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0,
                                       atol=1.0 / (hi - lo) + 1e-6)


def test_info_and_verify_know_kept_axes(stores: dict[str, Path], tmp_path: Path) -> None:
    for path in stores.values():
        assert verify_store(path).problems == []
    info, flat = store_info(stores["kept_npy"]), store_info(stores["resampled"])
    assert (info["kept_coarse"], flat["kept_coarse"]) == (2, 0)
    assert info["total_voxels"] == flat["total_voxels"]  # both count the cases' grids
    assert info["bytes_on_disk"] < 0.8 * flat["bytes_on_disk"]
    damaged = tmp_path / "damaged"
    shutil.copytree(stores["kept_npy"], damaged)
    store = PreparedStore.open(damaged)
    i = [c.name for c in store.cases].index("thick")
    path = store.array_path(i, "image")
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # the chunk is named in the file's voxels: z=0:14, not the grid's 27
    path.write_bytes(bytes(raw))
    shape = store.cases[i].stored_shape
    problems = verify_store(damaged).problems
    assert len(problems) == 2 and problems[0].startswith("case thick: image chunk 0 "
                                                         f"(x=0:{shape[0]}, y=0:{shape[1]}, "
                                                         f"z=0:{shape[2]})")
    assert "SHA-256" in problems[1]


def test_settings_are_kept_per_store(stores: dict[str, Path], tmp_path: Path) -> None:
    files = [str(PreparedStore.open(stores["resampled"]).cases[0].source)]
    with pytest.raises(ValueError, match="has coarse axes resampled, not kept"):
        prepare(files, stores["resampled"], data=DataConfig(spacing=SPACING),
                coarse_axes="kept", progress=False)
    with pytest.raises(ValueError, match="coarse_axes must be one of kept, resampled"):
        prepare(files, tmp_path / "new", data=DataConfig(spacing=SPACING), coarse_axes="half",
                progress=False)
    with pytest.raises(ValueError, match="coarse_axes differs"):
        merge_stores([stores["kept_npy"], stores["resampled"]], tmp_path / "merged")
    old = tmp_path / "v2"  # a version 2 store has no coarse_axes: it was resampled
    shutil.copytree(stores["resampled"], old)
    meta = json.loads((old / "store.json").read_text())
    del meta["coarse_axes"]
    (old / "store.json").write_text(json.dumps({**meta, "version": 2}))
    assert PreparedStore.open(old).info["coarse_axes"] == "resampled"
    report = prepare(files, old, data=DataConfig(spacing=SPACING), progress=False, workers=0)
    assert report.skipped == 1
    (old / "store.json").write_text(json.dumps({**meta, "coarse_axes": "sideways"}))
    with pytest.raises(ValueError, match="coarse_axes 'sideways'.*upgrade mim3d"):
        PreparedStore.open(old)
