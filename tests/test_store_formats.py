"""Store formats: blosc2 == npy voxel for voxel, v1 stores readable, versions, damage, info."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_nifti

from mim3d.cli import main
from mim3d.config import DataConfig
from mim3d.data.formats import BLOSC2_DEFAULTS, Blosc2Format
from mim3d.data.manifest import HU_EDGES, read_quarantine
from mim3d.data.prepare import prepare
from mim3d.data.sampler import PretrainCropDataset
from mim3d.data.store import PreparedStore
from mim3d.data.storetools import store_info, verify_store

pytest.importorskip("blosc2", reason="the blosc2 store format needs blosc2 (mim3d[store])")


def _ct(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = np.full(shape, -1000, np.int16)
    arr[4:-4, 4:-4, 2:-2] = rng.integers(-200, 400, size=[n - 8 for n in shape[:2]] +
                                         [shape[2] - 4])
    return arr


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for i, shape in enumerate([(70, 66, 40), (48, 52, 72), (30, 80, 36)]):
        write_nifti(src / f"case{i}.nii.gz", _ct(shape, i))
    write_nifti(src / "case0_label.nii.gz", (_ct((70, 66, 40), 0) > 0).astype(np.uint8))
    (src / "list.json").write_text(json.dumps({"training": [
        {"image": "case0.nii.gz", "label": "case0_label.nii.gz"},
        {"image": "case1.nii.gz"}, {"image": "case2.nii.gz"}]}))
    return src


@pytest.fixture(scope="module")
def pair(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same inputs prepared as blosc2 and as npy."""
    out = {}
    for fmt in ("blosc2", "npy"):
        out[fmt] = tmp_path_factory.mktemp(fmt) / "store"
        report = prepare([sources / "list.json"], out[fmt], data=DataConfig(), workers=0,
                         progress=False, fmt=fmt, crop_size=(40, 40, 40))
        assert report.prepared == 3 and report.smaller_than_crop == 1, report.messages
    return out


def test_blosc2_equals_npy_voxel_for_voxel(pair: dict[str, Path]) -> None:
    b2, npy = PreparedStore.open(pair["blosc2"]), PreparedStore.open(pair["npy"])
    assert (b2.info["array_format"], npy.info["array_format"]) == ("blosc2", "npy")
    assert b2.info["version"] == 3 and b2.info["format_params"]["chunks"] == [64, 64, 64]
    rng = np.random.default_rng(0)
    for i in range(3):
        rec = b2.cases[i]
        assert rec.sha256 == npy.cases[i].sha256
        full = np.asarray(npy.image(i))
        assert rec.sha256 == hashlib.sha256(full.tobytes()).hexdigest()
        np.testing.assert_array_equal(b2.image(i)[...], full)
        for _ in range(6):  # boxes inside, across chunk borders, and hanging out (padded)
            size = rng.integers(8, 90, size=3)
            start = rng.integers(-20, np.asarray(rec.shape), size=3)
            np.testing.assert_array_equal(b2.read_crop(i, start, size),
                                          npy.read_crop(i, start, size))
    np.testing.assert_array_equal(b2.label(0)[...], np.asarray(npy.label(0)))
    assert b2.label(1) is None
    size = {f: store_info(p)["bytes_on_disk"] for f, p in pair.items()}
    assert size["blosc2"] < 0.75 * size["npy"], size  # half the volume is air


def test_blosc2_layout_spans_short_z_and_tiles_long_volumes(tmp_path: Path) -> None:
    """Short volumes get whole-z chunks (long block rows to copy), long ones 64^3 tiles; a store
    written before ``short_z`` existed keeps 64^3 everywhere, and chunk regions follow."""
    fmt = Blosc2Format()
    assert fmt.layout((300, 512, 224)) == ((16, 256, 224), (4, 16, 224))
    assert fmt.layout((300, 512, 257)) == ((64, 64, 64), (32, 32, 32))
    assert fmt.layout((10, 100, 40)) == ((10, 100, 40), (4, 16, 40))
    old = Blosc2Format(**{k: v for k, v in BLOSC2_DEFAULTS.items() if k != "short_z"})
    assert old.layout((300, 512, 224)) == ((64, 64, 64), (32, 32, 32))
    arr = np.arange(40 * 300 * 30, dtype=np.int16).reshape(40, 300, 30)
    fmt.write(tmp_path / "a.b2nd", arr)
    handle = fmt.open(tmp_path / "a.b2nd")
    assert tuple(handle.chunks) == (16, 256, 30) and tuple(handle.blocks) == (4, 16, 30)
    assert len(fmt.chunk_digests(handle)) == 3 * 2  # ceil(40 / 16) x ceil(300 / 256)
    assert fmt.chunk_region(arr.shape, 5) == ((32, 40), (256, 300), (0, 30))
    np.testing.assert_array_equal(fmt.read_crop(handle, tmp_path / "a.b2nd", (30, 250, -2),
                                                (12, 20, 8), -1)[:10, :, 2:], arr[30:, 250:270, :6])


def test_info_counts_and_histograms(pair: dict[str, Path]) -> None:
    info = store_info(pair["blosc2"])
    store = PreparedStore.open(pair["blosc2"])
    voxels = sum(int(np.prod(c.shape)) for c in store.cases)
    assert (info["cases"], info["total_voxels"], info["labelled"]) == (3, voxels, 1)
    assert info["smaller_than_crop"] == 1 and info["quarantined"] == 0
    assert sum(info["hu_histogram"]["counts"]) == voxels
    air = sum(int((np.asarray(store.image(i)[...]) < HU_EDGES[1]).sum()) for i in range(3))
    assert info["hu_histogram"]["counts"][0] == air
    files = [p for p in (pair["blosc2"] / "cases").rglob("*") if p.suffix in (".b2nd", ".npy")]
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in files)
    raw = 2 * voxels + int(np.prod(store.cases[0].shape))  # int16 images + one uint8 label
    assert info["compression_ratio"] == pytest.approx(raw / info["bytes_on_disk"])
    assert info["spacing_mm"] == {"1x1x1": 3}
    assert main(["store", "info", str(pair["blosc2"]), "--json"]) == 0


def test_verify_names_the_damaged_chunk_and_case(pair: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    for fmt, path in pair.items():
        store = tmp_path / fmt
        shutil.copytree(path, store)
        assert main(["store", "verify", str(store)]) == 0
        image = next((store / "cases" / "case1").glob("image.*"))
        raw = bytearray(image.read_bytes())
        k = len(raw) * 3 // 4  # inside a chunk's compressed bytes (npy: inside the voxels)
        raw[k:k + 64] = bytes(255 - b for b in raw[k:k + 64])
        image.write_bytes(bytes(raw))
        capsys.readouterr()
        assert main(["store", "verify", str(store)]) == 1
        out = capsys.readouterr()
        assert "1 damaged (case1)" in out.out
        damaged = [line for line in out.err.splitlines() if line.startswith("damaged: ")]
        assert damaged and all("case case1:" in line for line in damaged), out.err
        assert any("chunk" in line and "x=" in line for line in damaged), out.err
        report = verify_store(store)
        assert report.checked == 3 and report.damaged_cases == ["case1"]
        other = PreparedStore.open(store)  # the other cases stay usable
        assert other.read_crop(0, (0, 0, 0), (8, 8, 8)).shape == (8, 8, 8)


def test_a_truncated_image_is_one_error_line_and_the_rest_stays_usable(
        pair: dict[str, Path], tmp_path: Path) -> None:
    """Cut in half on disk (both formats; blosc2 files are memory-mapped): reading it raises the
    store's one-line error naming the file, verify reports the case, other cases still read."""
    for fmt, path in pair.items():
        store = tmp_path / fmt
        shutil.copytree(path, store)
        image = next((store / "cases" / "case1").glob("image.*"))
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
        opened = PreparedStore.open(store)
        with pytest.raises(ValueError, match="cannot open") as err:
            opened.read_crop(1, (0, 0, 0), (8, 8, 8))
        assert str(image) in str(err.value) and "\n" not in str(err.value)
        assert opened.read_crop(0, (0, 0, 0), (8, 8, 8)).shape == (8, 8, 8)
        assert verify_store(store).damaged_cases == ["case1"]


def test_v1_store_stays_readable_and_newer_versions_are_refused(
        pair: dict[str, Path], sources: Path, tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    shutil.copytree(pair["npy"], v1)
    info = json.loads((v1 / "store.json").read_text())
    for key in ("array_format", "format_params"):
        info.pop(key)
    (v1 / "store.json").write_text(json.dumps({**info, "version": 1}))
    keep = ("name", "source", "label_source", "shape", "spacing", "affine", "hu_min", "hu_max",
            "hu_mean", "hu_std", "sha256", "has_label", "body_fraction", "prepared")
    lines = [json.loads(line) for line in (v1 / "manifest.jsonl").read_text().splitlines()]
    (v1 / "manifest.jsonl").write_text("".join(
        json.dumps({k: obj[k] for k in keep}) + "\n" for obj in lines))
    for rec in (v1 / "cases").rglob("record.json"):
        rec.unlink()
    old, new = PreparedStore.open(v1), PreparedStore.open(pair["npy"])
    np.testing.assert_array_equal(old.read_crop(2, (-3, 5, 7), (40, 40, 40)),
                                  new.read_crop(2, (-3, 5, 7), (40, 40, 40)))
    assert old.cases[0].hu_hist == [] and verify_store(v1).problems == []
    (v1 / "store.json").write_text(json.dumps({**info, "version": 99}))
    with pytest.raises(ValueError, match="version 99 was written by a newer mim3d"):
        PreparedStore.open(v1)
    (v1 / "store.json").write_text(json.dumps({**info, "version": 2, "array_format": "zstd9"}))
    with pytest.raises(ValueError, match="unknown array format 'zstd9'.*upgrade mim3d"):
        PreparedStore.open(v1)
    with pytest.raises(ValueError, match="holds npy arrays, not blosc2"):
        prepare([sources / "list.json"], pair["npy"], data=DataConfig(), fmt="blosc2",
                progress=False)


def test_no_resampling_preset_trains_on_any_spacing(tmp_path: Path, sources: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "store"
    prepare([sources / "case1.nii.gz"], store, data=DataConfig(spacing=(1.5, 1.5, 1.5)),
            workers=0, progress=False, fmt="blosc2")
    with caplog.at_level(logging.INFO, logger="mim3d.data.sampler"):
        ds = PretrainCropDataset(store, crop_size=(16, 16, 16), data=DataConfig(), seed=0)
    assert ds[0].shape == (1, 16, 16, 16)
    assert any("[1.5, 1.5, 1.5]" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"spacing=\[1.5, 1.5, 1.5\] in the store but"):
        PretrainCropDataset(store, crop_size=(16, 16, 16),
                            data=DataConfig(spacing=(2.0, 2.0, 2.0)), seed=0)
    with pytest.raises(ValueError, match="spacing"):  # preparing into it stays strict
        prepare([sources / "case2.nii.gz"], store, data=DataConfig(), progress=False)


def test_small_volumes_are_counted_logged_or_quarantined(
        tmp_path: Path, sources: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        report = prepare([sources / "list.json"], tmp_path / "a", data=DataConfig(), workers=0,
                         progress=False, fmt="npy", crop_size=(40, 40, 40))
    small = {c.name for c in PreparedStore.open(tmp_path / "a").cases if c.smaller_than_crop}
    assert small == {"case2"} and report.smaller_than_crop == 1
    assert sum("smaller than the level-1 crop" in r.getMessage() for r in caplog.records) == 1
    with caplog.at_level(logging.WARNING, logger="mim3d.data.sampler"):
        PretrainCropDataset(tmp_path / "a", crop_size=(64, 64, 64), data=DataConfig(), seed=0)
    assert any("3 of 3 cases are smaller" in r.getMessage() for r in caplog.records)
    assert main(["prepare", str(sources / "list.json"), "--out", str(tmp_path / "b"),
                 "--preset", "official", "--workers", "0", "--min-size", "40", "--format",
                 "npy"]) == 0
    reasons = {e["name"]: e["reason"] for e in read_quarantine(tmp_path / "b" / "quarantine.jsonl")}
    assert list(reasons) == ["case2"] and "smaller than --min-size (40, 40, 40)" in reasons["case2"]


def test_dicom_folder_with_two_series_records_the_one_read(shared_data: Path,
                                                           tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    folder = tmp_path / "two_series"
    shutil.copytree(shared_data / "ct" / "totalseg_example_ct_dicom", folder)
    first = sorted(folder.iterdir())[:6]
    uid, other = pydicom.dcmread(first[0]).SeriesInstanceUID, generate_uid()
    for k, path in enumerate(first):  # a second, shorter series of the same slices
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = other
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / f"copy_{k}.dcm")
    prepare([folder], tmp_path / "store", data=DataConfig(), workers=0, progress=False,
            fmt="blosc2")
    rec = PreparedStore.open(tmp_path / "store").cases[0]
    assert rec.series_uid == uid and rec.shape == (512, 512, 20)
    assert rec.series_note, "the choice between two series must be explained"
