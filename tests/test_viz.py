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



# ------------------------------------------------- radiological display (all mim3d pictures) ----

def _blob_volume(shape=(20, 24, 28), at=(3, 19, 23), value=1.0) -> np.ndarray:
    """Zeros with a 3-voxel cube at ``at`` (RAS voxel): by default the patient's left (low x),
    anterior (high y) and superior (high z) corner."""
    vol = np.zeros(shape, np.float32)
    x, y, z = at
    vol[x - 1 : x + 2, y - 1 : y + 2, z - 1 : z + 2] = value
    return vol


def _panel_centroid(ax, rgb: np.ndarray, select) -> tuple[float, float]:
    """Centroid of the pixels ``select(rgb)`` inside ``ax``, as fractions (0 = left/top)."""
    box = ax.get_window_extent()
    h = rgb.shape[0]
    r0, r1 = round(h - box.y1), round(h - box.y0)
    c0, c1 = round(box.x0), round(box.x1)
    rows, cols = np.nonzero(select(rgb[r0:r1, c0:c1].astype(int)))
    assert len(rows) > 0, "the blob is not visible in the panel"
    return cols.mean() / (c1 - c0), rows.mean() / (r1 - r0)


def test_display_plane_is_radiological():
    from mim3d.viz import VIEWS, display_plane

    vol = _blob_volume()
    axial, coronal, sagittal = VIEWS
    # Axial (z = 23): rows = y (anterior up), columns = x with the patient's right on the left.
    a = display_plane(vol, axial, 23)
    assert a.shape == (24, 20) and a[24 - 1 - 19, 20 - 1 - 3] == 1
    # Coronal (y = 19): rows = z (superior up), columns = x (right on the left).
    c = display_plane(vol, coronal, 19)
    assert c.shape == (28, 20) and c[28 - 1 - 23, 20 - 1 - 3] == 1
    # Sagittal (x = 3): rows = z (superior up), columns = y (anterior on the left).
    s = display_plane(vol, sagittal, 3)
    assert s.shape == (28, 24) and s[28 - 1 - 23, 24 - 1 - 19] == 1
    assert [v.markers for v in VIEWS] == [("R", "L", "A", "P"), ("R", "L", "S", "I"),
                                         ("A", "P", "S", "I")]
    rgba = display_plane(np.repeat(vol[..., None], 4, axis=-1), axial, 23)
    assert rgba.shape == (24, 20, 4) and rgba[4, 16, 2] == 1


def test_label_overlay_left_blob_lands_on_image_right(tmp_path):
    from matplotlib.image import imread

    from mim3d.viz import label_colour, label_overlay_figure, save_label_overlay
    from mim3d.viz.overlay import LABEL_ALPHA
    from mim3d.viz.planes import figure_rgb

    shape = (40, 36, 30)
    ct = np.full(shape, -1000.0, np.float32)
    ct[4:36, 4:32, 2:28] = 40.0  # soft-tissue body
    labels = _blob_volume(shape, at=(8, 26, 15), value=3).astype(np.uint8)  # patient's left
    labels[28:33, 6:11, 12:17] = 1  # patient's right, posterior: the largest label
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    names = {"1": "liver", "3": "spleen"}
    fig = label_overlay_figure(ct, labels, affine, hu_window=(-175, 250), class_names=names)
    rgb = figure_rgb(fig)
    axial, coronal, sagittal = fig.axes[:3]
    grey = (40.0 + 175.0) / 425.0  # soft tissue in the window, 0..1
    def tinted(label):  # the label's colour blended over soft tissue
        want = 255 * (LABEL_ALPHA * np.asarray(label_colour(label)) + (1 - LABEL_ALPHA) * grey)
        return lambda px: np.abs(px - want).max(-1) <= 6

    x_frac, y_frac = _panel_centroid(axial, rgb, tinted(3))
    assert x_frac > 0.6 and y_frac < 0.5  # the patient's left on the image's right; anterior up
    x_frac, y_frac = _panel_centroid(axial, rgb, tinted(1))
    assert x_frac < 0.4 and y_frac > 0.5  # the patient's right on the left; posterior down
    assert _panel_centroid(coronal, rgb, tinted(1))[0] < 0.4  # right on the left
    assert _panel_centroid(sagittal, rgb, tinted(1))[0] > 0.6  # posterior on the right
    for ax, markers in zip((axial, coronal, sagittal), ("RLAP", "RLSI", "APSI")):
        assert "".join(t.get_text() for t in ax.texts) == markers
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["1 liver", "3 spleen"]
    assert "HU window [-175, 250] (W 425, L 37.5)" in fig._suptitle.get_text()
    out = save_label_overlay(ct, labels, affine, tmp_path / "sub" / "ov.png",
                             hu_window=(-175, 250), class_names=["bg", "liver", "x", "spleen"])
    assert out == tmp_path / "sub" / "ov.png" and imread(out).shape[2] in (3, 4)
    assert [p.name for p in out.parent.iterdir()] == ["ov.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="label map has shape"):
        save_label_overlay(ct, labels[:-1], affine, tmp_path / "bad.png", hu_window=(0, 1),
                           class_names=names)
    assert not (tmp_path / "bad.png").exists()


def test_box_to_display_hand_checked():
    from mim3d.viz import VIEWS
    from mim3d.viz.planes import box_to_display

    box = np.array([[2, 6], [10, 13], [0, 4]])  # x in [2, 6), y in [10, 13), z in [0, 4)
    # Axial of a (20, 24, 28) volume: left edge = column 20 - 6 = 14, top = row 24 - 13 = 11.
    assert box_to_display(box, VIEWS[0], (20, 24, 28)) == (13.5, 10.5, 4.0, 3.0)
    # Sagittal: columns run along y from anterior (y = 23) to posterior, rows along z.
    assert box_to_display(box, VIEWS[2], (20, 24, 28)) == (10.5, 23.5, 3.0, 4.0)


def test_levels_picture_is_radiological_and_states_effective_ratios():
    from mim3d.masking import build_geometry, sample_levels
    from mim3d.viz import levels_figure
    from mim3d.viz.planes import figure_rgb

    geo = build_geometry(crop_sizes=[[32, 32, 32], [16, 16, 16]], input_size=[16, 16, 16],
                         patch_size=4, mask_ratios=[0.6, 0.6], gammas=[2])
    levels = sample_levels(1, geo, torch.Generator().manual_seed(0))
    levels[0].mask[:] = False  # nothing tinted: the blob keeps its pure grey
    box = levels[1].boxes[0].numpy()
    centre = (box[:, 0] + box[:, 1]) // 2
    crop = np.zeros((32, 32, 32), np.float32)
    crop[2:6, centre[1] - 2 : centre[1] + 2, centre[2] - 2 : centre[2] + 2] = 1.0  # far left
    fig = levels_figure(crop, levels, geo, hu_window=(-1000, 1000))
    rgb = figure_rgb(fig)
    white = lambda px: px.min(-1) > 240
    assert _panel_centroid(fig.axes[0], rgb, white)[0] > 0.75  # the patient's left on the right
    assert _panel_centroid(fig.axes[1], rgb, white)[0] > 0.75
    title = fig._suptitle.get_text()
    assert "L1 5/8 = 62.5%" in title and "HU window [-1000, 1000]" in title
    assert "".join(t.get_text() for t in fig.axes[0].texts) == "RLAP"


def test_volume_path_chooses_the_child_followed():
    from mim3d.viz import parse_volume_id

    out = _fake_output("random", norm_pix=True)
    # Sample 1: its level-2 children are volumes [1, 2]; child 1 is volume 2, whose level-3
    # children are volumes [1, 6].
    for path, lineage in (((1,), (1, 2, 1)), ((1, 1), (1, 2, 6)), ((0, 1), (1, 1, 4))):
        vols = reconstruction_volumes(out, patch_size=P, norm_pix=True, sample=1, volume=path)
        for lv, idx, (inp, _, _) in zip(out.levels, lineage, vols):
            np.testing.assert_array_equal(inp, lv.inputs[idx, 0].numpy())
    with pytest.raises(ValueError, match="children 0..1"):
        reconstruction_volumes(out, patch_size=P, norm_pix=True, sample=1, volume=(2,))
    with pytest.raises(ValueError, match="3 steps"):
        reconstruction_volumes(out, patch_size=P, norm_pix=True, sample=1, volume=(0, 0, 0))
    assert parse_volume_id("L3.2.1") == parse_volume_id("2.1") == (2, 1)
    assert parse_volume_id("") == parse_volume_id("L1") == ()
    for bad in ("L2.2.1", "x", "L3.a.1"):
        with pytest.raises(ValueError, match="levels.json"):
            parse_volume_id(bad)


def test_masked_tokens_are_tinted_not_air():
    out = _fake_output("zeros", norm_pix=False)
    for lv in out.levels:
        lv.inputs.zero_()  # all air: an untinted masked token would be black like the air
        lv.target.zero_()
    red = lambda pic: ((pic[..., 0].astype(int) - pic[..., 1]) > 60).sum()
    tinted = red(reconstruction_picture(out, patch_size=P, norm_pix=False))
    for lv in out.levels:
        lv.mask.zero_()
    assert tinted > 2000 and red(reconstruction_picture(out, patch_size=P, norm_pix=False)) == 0
