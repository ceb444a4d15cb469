"""Crop dataset and step sampler: determinism, padding, body-aware draws, sharding, resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from mim3d.config import DataConfig
from mim3d.data.sampler import PretrainCropDataset, StepSampler, make_loader
from mim3d.data.store import PreparedStore, window_hu

CROP = (32, 32, 32)


def _dataset(store: Path, seed: int = 0, **data: object) -> PretrainCropDataset:
    return PretrainCropDataset(store, crop_size=CROP, data=DataConfig(**data), seed=seed)


def test_same_index_same_crop_and_values(synthetic_store: Path) -> None:
    a, b = _dataset(synthetic_store), _dataset(synthetic_store)
    for index in (0, 1, 17, 10**12):
        x = a[index]
        assert x.shape == (1, *CROP) and x.dtype == torch.float32
        torch.testing.assert_close(x, b[index], rtol=0, atol=0)
        case, start, _ = a.crop_spec(index)
        ref = window_hu(a.store.read_crop(case, start, CROP), (-1000, 1000))
        np.testing.assert_array_equal(x[0].numpy(), ref)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    specs = {a.crop_spec(i)[:2] for i in range(40)}
    assert len(specs) > 30  # different indices give different crops
    assert not torch.equal(a[0], _dataset(synthetic_store, seed=1)[0])


def test_crops_cover_positions_and_pad_small_axes(synthetic_store: Path) -> None:
    ds = _dataset(synthetic_store)
    names = [c.name for c in ds.store.cases]
    starts: dict[str, list] = {n: [] for n in names}
    for i in range(300):
        case, start, _ = ds.crop_spec(i)
        starts[names[case]].append(start)
    assert all(len(v) > 60 for v in starts.values())  # cases drawn uniformly
    ramp = np.array(starts["ramp"])  # 48 x 56 x 40: starts in [0, 16] x [0, 24] x [0, 8]
    assert ramp.min() == 0 and (ramp.max(axis=0) == (16, 24, 8)).all()
    small = np.array(starts["small"])  # 24 x 40 x 40: x centred at -4, y/z random
    assert (small[:, 0] == -4).all() and small[:, 1].max() <= 8
    index = next(i for i in range(300) if names[ds.crop_spec(i)[0]] == "small")
    x = ds[index][0].numpy()
    assert (x[:4] == 0).all() and (x[-4:] == 0).all()  # air (-1000 HU) maps to 0
    assert (x[4:28] > 0).mean() > 0.9


def test_body_aware_prefers_body(synthetic_store: Path) -> None:
    store = PreparedStore.open(synthetic_store)
    half = [c.name for c in store.cases].index("half_body")
    plain = _dataset(store, body_aware=False)
    aware = _dataset(store, body_aware=True, min_body_fraction=0.6, max_crop_tries=10)
    picks = [i for i in range(400) if aware.crop_spec(i)[0] == half][:60]
    fracs_plain = [store.crop_body_fraction(half, plain.crop_spec(i)[1], CROP) for i in picks]
    fracs_aware = [aware.crop_spec(i)[2] for i in picks]
    # Body only where x < 32 and start x uniform on [0, 32]: a crop holds >= 60 % body when
    # start x <= 12, P = 13/33 per draw; with 10 draws P(no success) = (20/33)^10 < 1 %.
    assert np.mean(np.array(fracs_plain) >= 0.6) < 0.55
    assert np.mean(np.array(fracs_aware) >= 0.6) > 0.95
    for i in picks[:10]:
        case, start, frac = aware.crop_spec(i)
        assert frac == pytest.approx(store.crop_body_fraction(case, start, CROP))
        x = aware[i][0].numpy()  # the tensor is that crop: tissue (>0) where the body grid says
        assert abs(float((x > 0).mean()) - frac) < 0.1
    impossible = _dataset(store, body_aware=True, min_body_fraction=1.0, max_crop_tries=3)
    for i in picks[:10]:  # best of 3 draws when none reaches the threshold, never an error
        case, start, frac = impossible.crop_spec(i)
        rng = np.random.default_rng([0, i])
        rng.integers(len(store))
        draws = [impossible._draw_start(rng, store.cases[case].shape) for _ in range(3)]
        best = max(store.crop_body_fraction(case, d, CROP) for d in draws)
        assert frac == pytest.approx(best)


def test_step_sampler_ranks_disjoint_and_resume() -> None:
    def take(sampler: StepSampler, n: int) -> list[int]:
        return list(itertools.islice(iter(sampler), n))

    bs, accum, world = 3, 2, 2
    r0 = take(StepSampler(batch_size=bs, rank=0, world_size=world, accum_steps=accum), 60)
    r1 = take(StepSampler(batch_size=bs, rank=1, world_size=world, accum_steps=accum), 60)
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == list(range(120))  # together the ranks use every index once
    assert r1[:3] == [3, 4, 5] and r0[3:6] == [6, 7, 8]  # micro 1 of step 0 on rank 0
    s = StepSampler(batch_size=bs, rank=1, world_size=world, accum_steps=accum)
    assert s.index(step=4, micro=1, b=2) == ((4 * 2 + 1) * 2 + 1) * 3 + 2
    per_step = bs * accum
    resumed = take(StepSampler(batch_size=bs, rank=1, world_size=world, accum_steps=accum,
                               start_step=4), 60 - 4 * per_step)
    assert resumed == r1[4 * per_step:]
    with pytest.raises(ValueError, match="rank"):
        StepSampler(batch_size=2, rank=2, world_size=2)


@pytest.fixture(scope="module")
def blosc2_store(synthetic_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic store's sources prepared again in the compressed blosc2 format."""
    pytest.importorskip("blosc2", reason="the blosc2 store format needs blosc2 (mim3d[store])")
    from mim3d.data.prepare import prepare

    src = Path(PreparedStore.open(synthetic_store).cases[0].source).parent
    out = tmp_path_factory.mktemp("b2") / "store"
    prepare([src], out, data=DataConfig(), workers=0, progress=False, fmt="blosc2")
    return out


@pytest.mark.parametrize("fmt", ["npy", "blosc2"])
def test_loader_workers_match_in_process(fmt: str, synthetic_store: Path,
                                         request: pytest.FixtureRequest) -> None:
    # The serial pass reads in this process before the workers fork: blosc2 must survive that.
    store = synthetic_store if fmt == "npy" else request.getfixturevalue("blosc2_store")
    ds = _dataset(store, seed=3, body_aware=True)

    def batches(workers: int) -> list[torch.Tensor]:
        sampler = StepSampler(batch_size=2, rank=1, world_size=2, start_step=5)
        loader = make_loader(ds, sampler, batch_size=2, workers=workers, seed=3)
        return list(itertools.islice(iter(loader), 3))

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel):
        assert a.shape == (2, 1, *CROP)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    first = ((5 * 1) * 2 + 1) * 2  # step 5, micro 0, rank 1, b 0
    torch.testing.assert_close(serial[0][0], ds[first], rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, StepSampler(batch_size=4), batch_size=2, workers=0, seed=0)


def test_dataset_checks_store_settings(synthetic_store: Path) -> None:
    with pytest.raises(ValueError, match="spacing"):
        _dataset(synthetic_store, spacing=(1.5, 1.5, 1.5))
    ds = _dataset(synthetic_store, hu_window=(-175.0, 250.0), normalization="window")
    assert ds[0].shape == (1, *CROP)  # a window is applied on the fly: any window works
    z = _dataset(synthetic_store, normalization="zscore")
    case = z.crop_spec(5)[0]
    rec = z.store.cases[case]
    crop = z.store.read_crop(case, z.crop_spec(5)[1], CROP, pad_value=rec.hu_min)
    np.testing.assert_allclose(z[5][0].numpy(), (crop - rec.hu_mean) / rec.hu_std, rtol=1e-5,
                               atol=1e-5)
