"""The MiM module end to end: level volumes, per-level outputs and gradients to every parameter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mim3d.config import load_config
from mim3d.factory import build_mim, geometry_from_config
from mim3d.losses import mim_loss
from mim3d.masking import patchify, sample_levels

SMALL = ["model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]", "model.num_heads=2",
         "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
         "model.proj_dim=32", "model.vit_dim=32", "model.vit_depth=1"]


def _run(overrides: list[str], batch: int = 2, seed: int = 0):
    cfg = load_config("pretrain", "tiny", overrides=SMALL + overrides)
    torch.manual_seed(seed)
    model = build_mim(cfg)
    geo = geometry_from_config(cfg.geometry)
    x = torch.rand(batch, 1, *cfg.geometry.crop_sizes[0])
    masks = sample_levels(batch, geo, torch.Generator().manual_seed(seed))
    return cfg, model, x, masks, model(x, masks)


@pytest.mark.parametrize("overrides", [
    [], ["loss.alignment=byol"], ["loss.stop_grad=false"],
    ["model.encoder=vit"], ["loss.recon_levels=[true,false,true]"],
])
def test_every_parameter_gets_a_gradient(overrides):
    cfg, model, _, _, out = _run(overrides)
    losses = mim_loss(out, norm_pix=cfg.loss.norm_pix, alpha=cfg.loss.alpha,
                      alignment=cfg.loss.alignment, temperature=cfg.loss.temperature,
                      recon_levels=cfg.loss.recon_levels)
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # every term is a real function of the outputs, not a constant
    assert all(v.requires_grad for v in losses.values())


def test_level_volumes_are_the_boxes_of_the_level1_crop():
    cfg, _model, x, masks, out = _run([])
    r = cfg.geometry.input_size
    level1 = F.interpolate(x, size=r, mode="trilinear", align_corners=False)
    torch.testing.assert_close(out.levels[0].inputs, level1)
    for lv in (1, 2):
        m = masks[lv]
        for i in (0, len(m.parent) - 1):
            root = i // 4 if lv == 1 else masks[1].parent[m.parent[i]]
            (a0, a1), (b0, b1), (c0, c1) = m.boxes[i].tolist()
            box = x[int(root), :, a0:a1, b0:b1, c0:c1][None]
            want = box if tuple(box.shape[2:]) == tuple(r) else F.interpolate(
                box, size=r, mode="trilinear", align_corners=False)
            torch.testing.assert_close(out.levels[lv].inputs[i:i + 1], want)
    for level in out.levels:
        torch.testing.assert_close(level.target, patchify(level.inputs, cfg.geometry.patch_size))


def test_output_shapes_and_alignment_features():
    _cfg, _, _, _, out = _run([], batch=2)
    n, p3 = 4 ** 3, 8 ** 3
    assert [lv.pred.shape for lv in out.levels] == [(2, n, p3), (8, n, p3), (32, n, p3)]
    assert out.levels[0].context is None and out.levels[2].unit_features is None
    assert out.levels[0].unit_features.shape == (2, 8, 32)   # 8 octant units at level 1
    assert out.levels[1].unit_features.shape == (8, 64, 32)  # 64 token units at level 2
    assert out.levels[1].context.shape == (8, 32) and out.levels[2].context.shape == (32, 32)
    assert [int(lv.mask.sum(1)[0]) for lv in out.levels] == [40, 38, 38]


def test_single_level_model_has_no_heads_and_wrong_inputs_fail():
    cfg = load_config("pretrain", "tiny", overrides=SMALL + [
        "geometry.crop_sizes=[[32,32,32]]", "geometry.mask_ratios=[0.75]", "geometry.gammas=[]"])
    model = build_mim(cfg)
    assert model.child_head is None and model.parent_head is None
    geo = geometry_from_config(cfg.geometry)
    x = torch.rand(1, 1, 32, 32, 32)
    out = model(x, sample_levels(1, geo, torch.Generator().manual_seed(0)))
    assert len(out.levels) == 1 and int(out.levels[0].mask.sum()) == 48
    with pytest.raises(ValueError, match="level-1 crop shape"):
        model(torch.rand(1, 1, 16, 16, 16), sample_levels(1, geo, torch.Generator()))
