"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent

#: ``--set`` overrides that shrink the ``tiny`` preset to ~0.5 M parameters for engine tests.
SHRINK = [
    "model.depths=[1,1,1,1]", "model.dims=[8,16,32,64]", "model.num_heads=2",
    "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
    "model.proj_dim=32", "optim.batch_size=1", "train.workers=0", "train.deterministic=true",
    "optim.total_steps=40", "optim.warmup_steps=4", "train.log_every=1",
    "train.image_every=1000", "train.ckpt_every=1000",
]  # fmt: skip


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-CT folder ``../shared/data`` beside the checkout (skips the test when absent)."""
    path = (_REPO_ROOT.parent / "shared" / "data").resolve()
    if not path.is_dir():
        reason = "real-CT tests need the shared data folder beside the checkout"
        pytest.skip(f"../shared/data not found: {reason}")
    return path


# --- prepared-store fixtures (tests/test_store.py, tests/test_sampler.py) ---------------------


def write_nifti(path: Path, array, affine=None) -> Path:
    """Write ``array`` as NIfTI with ``affine`` (default: 1 mm, x and y flipped, i.e. LPS-like)."""
    import nibabel as nib
    import numpy as np

    if affine is None:
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=float))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared store of three small synthetic CTs (native spacing, window normalisation).

    Cases (RAS shapes): ``half_body`` 64x64x48 with soft tissue only where x < 32 (air beside
    it); ``ramp`` 48x56x40 with a distinct HU at every voxel; ``small`` 24x40x40, narrower than a
    32-voxel crop along x.
    """
    import numpy as np

    from mim3d.config import DataConfig
    from mim3d.data.prepare import prepare

    src = tmp_path_factory.mktemp("synthetic_src")
    rng = np.random.default_rng(7)
    half = np.full((64, 64, 48), -1000, dtype=np.int16)
    half[32:] = rng.integers(0, 80, size=(32, 64, 48))  # array x 32..63 -> RAS x 0..31 (x flipped)
    ramp = (np.arange(48 * 56 * 40).reshape(48, 56, 40) % 3000 - 1000).astype(np.int16)
    small = rng.integers(-1000, 1000, size=(24, 40, 40)).astype(np.int16)
    for name, arr in (("half_body", half), ("ramp", ramp), ("small", small)):
        write_nifti(src / f"{name}.nii.gz", arr)
    store = tmp_path_factory.mktemp("synthetic") / "store"
    report = prepare([src], store, data=DataConfig(), workers=0, progress=False)
    assert report.prepared == 3, report.messages
    return store
