"""Tests of the reconstruction volumes and picture in mim3d.viz (values checked on fake outputs)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mim3d.masking import patchify
from mim3d.viz import (
    MASK_FILL,
    reconstruction_picture,
    reconstruction_volumes,
    save_reconstruction_png,
)

P = 4
R = (8, 12, 16)  # anisotropic token grid (2, 3, 4) catches axis mix-ups
C = 2  # channel 0 is drawn; channel 1 must not leak in
EPS = 1e-6
# Level-2 / level-3 parents, deliberately not parent-major: the first child of sample 1 is
# volume 1 at level 2 (parent-major would say 2) and its first child is volume 3 at level 3.
PARENTS = ([-1, -1], [0, 1, 1, 0], [3, 2, 0, 1, 1, 0, 2, 3])
LINEAGE_OF_1 = (1, 1, 3)


def _normalised(target: torch.Tensor) -> torch.Tensor:
    """Per-token normalisation of the loss (population variance)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, unbiased=False, keepdim=True)
    return (target - mean) / torch.sqrt(var + EPS)


def _fake_output(pred_mode: str, *, norm_pix: bool, seed: int = 0) -> SimpleNamespace:
    """Three levels of random volumes in [0, 1] with random masks and known parents.

    ``pred_mode``: ``"perfect"`` (the loss's target), ``"zeros"`` or ``"random"``.
    """
    gen = torch.Generator().manual_seed(seed)
    levels = []
    for lvl, parent in enumerate(PARENTS, start=1):
        b = len(parent)
        inputs = torch.rand(b, C, *R, generator=gen)
        target = patchify(inputs, P)
        mask = torch.rand(b, target.shape[1], generator=gen) < 0.6
        if pred_mode == "perfect":
            pred = _normalised(target) if norm_pix else target.clone()
        elif pred_mode == "zeros":
            pred = torch.zeros_like(target)
        else:
            pred = torch.randn(target.shape, generator=gen)
        levels.append(SimpleNamespace(
            level=lvl, inputs=inputs, pred=pred, target=target, mask=mask,
            parent=torch.tensor(parent), boxes=torch.zeros(b, 3, 2, dtype=torch.long)))
    return SimpleNamespace(levels=levels)


def _tokens(vol: np.ndarray, patch: int = P) -> torch.Tensor:
    """``(N, p^3)`` tokens of a single-channel volume."""
    return patchify(torch.from_numpy(vol)[None, None], patch)[0]


@pytest.mark.parametrize("norm_pix", [True, False])
def test_perfect_prediction_reconstructs_input(norm_pix):
    out = _fake_output("perfect", norm_pix=norm_pix)
    vols = reconstruction_volumes(out, patch_size=P, norm_pix=norm_pix, sample=1, eps=EPS)
    assert len(vols) == 3
    for inp, masked, recon in vols:
        for a in (inp, masked, recon):
            assert a.dtype == np.float32 and a.shape == R
        np.testing.assert_allclose(recon, inp, atol=1e-5)


def test_zero_prediction_with_norm_pix_gives_token_means():
    out = _fake_output("zeros", norm_pix=True)
    vols = reconstruction_volumes(out, patch_size=P, norm_pix=True, sample=1, eps=EPS)
    for lv, idx, (inp, _, recon) in zip(out.levels, LINEAGE_OF_1, vols):
        mask = lv.mask[idx]
        assert mask.any() and (~mask).any()
        # Means over the whole token (both channels), as the loss normalises it.
        means = lv.target[idx].mean(dim=-1)  # (N,)
        rec = _tokens(recon)
        torch.testing.assert_close(rec[mask], means[mask, None].expand(-1, P**3))
        torch.testing.assert_close(rec[~mask], _tokens(inp)[~mask])


def test_random_prediction_without_norm_pix_is_copied_on_masked_tokens():
    out = _fake_output("random", norm_pix=False)
    vols = reconstruction_volumes(out, patch_size=P, norm_pix=False, sample=1)
    for lv, idx, (_, _, recon) in zip(out.levels, LINEAGE_OF_1, vols):
        mask = lv.mask[idx]
        # Channel 0 is the first of every C values within a token (channel fastest).
        pred_c0 = lv.pred[idx][:, ::C]
        torch.testing.assert_close(_tokens(recon)[mask], pred_c0[mask])


@pytest.mark.parametrize("fill", [MASK_FILL, 0.5])
def test_masked_input_is_input_on_visible_tokens_and_fill_elsewhere(fill):
    out = _fake_output("random", norm_pix=True)
    vols = reconstruction_volumes(out, patch_size=P, norm_pix=True, sample=1, fill=fill)
    for lv, idx, (inp, masked, _) in zip(out.levels, LINEAGE_OF_1, vols):
        mask = lv.mask[idx]
        tok = _tokens(masked)
        torch.testing.assert_close(tok[~mask], _tokens(inp)[~mask])
        assert torch.all(tok[mask] == fill)


@pytest.mark.parametrize("sample, lineage", [(0, (0, 0, 2)), (1, LINEAGE_OF_1)])
def test_volumes_follow_parent(sample, lineage):
    out = _fake_output("random", norm_pix=True)
    vols = reconstruction_volumes(out, patch_size=P, norm_pix=True, sample=sample)
    for lv, idx, (inp, _, _) in zip(out.levels, lineage, vols):
        np.testing.assert_array_equal(inp, lv.inputs[idx, 0].numpy())


def test_bad_sample_and_orphan_volume_raise():
    out = _fake_output("random", norm_pix=True)
    with pytest.raises(ValueError, match="out of range"):
        reconstruction_volumes(out, patch_size=P, norm_pix=True, sample=2)
    out.levels[2].parent = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2])
    with pytest.raises(ValueError, match="has no child"):
        reconstruction_volumes(out, patch_size=P, norm_pix=True, sample=1)


def test_picture_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    out = _fake_output("random", norm_pix=True)
    pic = reconstruction_picture(out, patch_size=P, norm_pix=True, sample=1)
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3
    assert pic.shape[0] > 200 and pic.shape[1] > 600
    assert pic.std() > 20 and len(np.unique(pic)) > 50
    path = tmp_path / "recon.png"
    saved = save_reconstruction_png(out, path, patch_size=P, norm_pix=True, sample=1)
    np.testing.assert_array_equal(saved, pic)
    back = imread(path)
    assert back.shape[:2] == pic.shape[:2]
    np.testing.assert_array_equal(np.round(back[..., :3] * 255).astype(np.uint8), pic)


def test_single_level_output():
    out = _fake_output("perfect", norm_pix=True)
    out.levels = out.levels[:1]
    vols = reconstruction_volumes(out, patch_size=P, norm_pix=True, sample=0, eps=EPS)
    assert len(vols) == 1
    np.testing.assert_allclose(vols[0][2], vols[0][0], atol=1e-5)
    pic = reconstruction_picture(out, patch_size=P, norm_pix=True)
    assert pic.dtype == np.uint8 and pic.shape[2] == 3


def test_real_tiny_model_output(tmp_path):
    try:
        from mim3d.config import load_config
        from mim3d.factory import build_mim
        from mim3d.masking import sample_levels
    except ImportError as exc:
        pytest.skip(f"MiM model not importable yet: {exc}")
    cfg = load_config("pretrain", "tiny")
    torch.manual_seed(0)
    model = build_mim(cfg).eval()
    geo = model.geometry
    masks = sample_levels(2, geo, torch.Generator().manual_seed(0))
    x1 = torch.rand(2, cfg.model.in_channels, *geo[0].crop_size)
    with torch.no_grad():
        out = model(x1, masks)
    p = cfg.geometry.patch_size
    norm_pix = getattr(cfg.loss, "norm_pix", True)
    vols = reconstruction_volumes(out, patch_size=p, norm_pix=norm_pix, sample=1)
    assert len(vols) == len(geo)
    idx = 1
    for i, (lv, (inp, masked, recon)) in enumerate(zip(out.levels, vols)):
        if i:  # first child of the volume drawn one level up
            idx = int((lv.parent == idx).nonzero()[0])
        assert inp.shape == tuple(cfg.geometry.input_size)
        np.testing.assert_array_equal(inp, lv.inputs[idx, 0].numpy())
        assert np.isfinite(recon).all()
        visible = ~lv.mask[idx]
        torch.testing.assert_close(_tokens(recon, p)[visible], _tokens(inp, p)[visible])
        torch.testing.assert_close(_tokens(masked, p)[visible], _tokens(inp, p)[visible])
    pic = save_reconstruction_png(out, tmp_path / "real.png", patch_size=p, norm_pix=norm_pix,
                                  sample=1)
    assert pic.dtype == np.uint8 and pic.shape[2] == 3 and pic.std() > 10

