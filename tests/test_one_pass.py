"""One pass over MiM's levels == level by level; conv recompute; level cutting; the sync-free step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mim3d.engine.train as train_mod
from mim3d.config import load_config
from mim3d.factory import build_mim, geometry_from_config
from mim3d.losses import mim_loss
from mim3d.masking import GeometryError, build_geometry, sample_levels
from mim3d.models.hybrid import HybridEncoder
from mim3d.models.mim import cut_level_volumes

SMALL = ["model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]", "model.num_heads=2",
         "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
         "model.proj_dim=32", "model.vit_dim=32", "model.vit_depth=1",
         # tiny's three levels, shrunk: 32^3 crop -> 16^3 inputs, 2^3 tokens of 8^3
         "geometry.crop_sizes=[[32,32,32],[16,16,16],[8,8,8]]", "geometry.input_size=[16,16,16]"]


def _outputs_and_grads(model, x, masks, cfg):
    model.zero_grad(set_to_none=True)
    out = model(x, masks)
    loss = mim_loss(out, norm_pix=cfg.loss.norm_pix, alpha=cfg.loss.alpha,
                    alignment=cfg.loss.alignment, temperature=cfg.loss.temperature)["loss"]
    loss.backward()
    tensors = [t.detach() for lv in out.levels
               for t in (lv.pred, lv.context, lv.unit_features) if t is not None]
    return loss.detach(), tensors, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("encoder", ["hybrid", "vit"])
def test_one_pass_equals_level_by_level(encoder: str) -> None:
    """Same outputs, loss and gradient of every parameter, within float32 tolerance."""
    cfg = load_config("pretrain", "tiny", overrides=SMALL + [f"model.encoder={encoder}"])
    torch.manual_seed(0)
    model = build_mim(cfg)
    x = torch.rand(2, 1, *cfg.geometry.crop_sizes[0], generator=torch.Generator().manual_seed(1))
    masks = sample_levels(2, geometry_from_config(cfg.geometry), torch.Generator().manual_seed(2))
    results = []
    for one_pass in (True, False):
        model.one_pass = one_pass
        results.append(_outputs_and_grads(model, x, masks, cfg))
    (loss_a, out_a, grad_a), (loss_b, out_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in grad_a.values())  # every parameter takes part
    for name, g in grad_a.items():
        torch.testing.assert_close(g, grad_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grad_checkpointing_reaches_the_decoder_and_keeps_gradients() -> None:
    """``optim.grad_checkpointing`` recomputes encoder and decoder blocks: same loss and
    gradients as without it."""
    cfg = load_config("pretrain", "tiny", overrides=SMALL + ["optim.grad_checkpointing=true"])
    torch.manual_seed(0)
    model = build_mim(cfg).train()
    assert model.decoder.grad_checkpointing and model.encoder.grad_checkpointing
    x = torch.rand(2, 1, *cfg.geometry.crop_sizes[0], generator=torch.Generator().manual_seed(1))
    masks = sample_levels(2, geometry_from_config(cfg.geometry), torch.Generator().manual_seed(2))
    results = []
    for on in (True, False):
        model.decoder.grad_checkpointing = model.encoder.grad_checkpointing = on
        results.append(_outputs_and_grads(model, x, masks, cfg))
    (loss_a, _, grad_a), (loss_b, _, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    for name, g in grad_a.items():
        torch.testing.assert_close(g, grad_b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("depths", [(1, 1, 1, 1), (2, 0, 1, 1)])
def test_conv_recompute_same_gradients_and_batched_levels(depths: tuple[int, ...]) -> None:
    """Recomputed conv blocks and downsamplings (in pieces of 1 volume; a stage of two blocks,
    one of none) give the same gradients, and ``forward_levels`` equals separate calls per
    level."""
    torch.manual_seed(0)
    kw = {"input_size": (16, 16, 32), "patch_size": 8, "dims": (8, 16, 32, 64),
          "depths": depths, "num_heads": 2}
    enc = HybridEncoder(**kw, conv_recompute="never").train()
    x = torch.randn(3, 1, 16, 16, 32)
    keep = [torch.randperm(16)[:5].sort().values.expand(1, -1).contiguous(),
            torch.stack([torch.randperm(16)[:7].sort().values for _ in range(2)])]
    grads = []
    for mode in ("never", "always"):
        enc.conv_recompute, enc.recompute_chunk = mode, 1
        enc.zero_grad(set_to_none=True)
        outs = enc.forward_levels(x, keep)
        sum(o.square().sum() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        together = enc.forward_levels(x, keep)
        apart = [enc(x[:1], keep[0]), enc(x[1:], keep[1])]
    for a, b in zip(together, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cutting_uses_area_averaging_and_gathers_boxes() -> None:
    """Shrinking by 3 averages 3^3 blocks (trilinear would skip voxels); boxes are exact."""
    x1 = torch.randn(2, 1, 24, 24, 24)
    boxes = torch.tensor([[[0, 12], [6, 18], [12, 24]], [[3, 15], [0, 12], [9, 21]]])
    roots = torch.tensor([1, 0])
    cut = cut_level_volumes(x1, boxes, roots, (12, 12, 12), (12, 12, 12), "none")
    torch.testing.assert_close(cut[0], x1[1, :, 0:12, 6:18, 12:24])
    torch.testing.assert_close(cut[1], x1[0, :, 3:15, 0:12, 9:21])
    whole = torch.tensor([[[0, 24]] * 3] * 2)
    small = cut_level_volumes(x1, whole, torch.arange(2), (24, 24, 24), (8, 8, 8), "area")
    torch.testing.assert_close(small, F.avg_pool3d(x1, 3))
    geo = build_geometry(crop_sizes=[(72,) * 3, (24,) * 3], input_size=(24,) * 3, patch_size=8,
                         mask_ratios=[0.6, 0.6], gammas=[4])
    assert [g.resize for g in geo] == ["area", "none"]


def _nearest_geometry(mode: str):
    return build_geometry(crop_sizes=[(64,) * 3, (32,) * 3, (8,) * 3], input_size=(32,) * 3,
                          patch_size=8, mask_ratios=[0.6] * 3, gammas=[4, 4], resize_mode=mode)


def _tokens(v: torch.Tensor) -> torch.Tensor:
    """(32, 32, 32) -> (64 tokens, 8^3 voxels) on a 4^3 grid of 8^3 patches."""
    return v.reshape(4, 8, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(64, -1)


def test_nearest_resize_is_leak_free_at_level_3() -> None:
    """With resize_mode=nearest a visible level-3 token's input depends only on native voxels
    of its own token; with trilinear it also depends on its masked neighbours' voxels."""
    changed = {}
    for mode in ("nearest", "trilinear"):
        geo = _nearest_geometry(mode)
        masks = sample_levels(1, geo, torch.Generator().manual_seed(3))
        m3 = masks[2]
        x1 = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(4))
        noisy = x1.clone()
        (z0, _), (y0, _), (w0, _) = m3.boxes[0].tolist()
        for t in m3.ids_mask[0].tolist():  # 8^3 native voxels, 4^3 tokens of 2^3 native each
            i, j, k = t // 16, t // 4 % 4, t % 4
            noisy[0, 0, z0 + 2 * i:z0 + 2 * i + 2, y0 + 2 * j:y0 + 2 * j + 2,
                  w0 + 2 * k:w0 + 2 * k + 2] += 5.0
        vis = torch.zeros(64, dtype=torch.bool)
        vis[m3.ids_keep[0]] = True
        args = (m3.boxes[:1], torch.zeros(1, dtype=torch.long), (8, 8, 8), (32, 32, 32),
                geo[2].resize)
        a, b = (cut_level_volumes(v, *args) for v in (x1, noisy))
        changed[mode] = (_tokens(a[0, 0]) - _tokens(b[0, 0]))[vis].abs().max().item()
    assert changed["nearest"] == 0.0 and changed["trilinear"] > 0.1
    with pytest.raises(GeometryError, match="resize_mode=nearest: level 3"):
        build_geometry(crop_sizes=[(192,) * 3, (96,) * 3, (16,) * 3], input_size=(96,) * 3,
                       patch_size=16, mask_ratios=[0.6] * 3, gammas=[4, 4],
                       resize_mode="nearest")


def test_step_returns_device_tensors_and_reads_the_device_once(monkeypatch) -> None:
    """Losses and norm stay tensors; one finite-check read per step (accumulation 2)."""
    cfg = load_config("pretrain", "tiny", overrides=SMALL + ["optim.accum_steps=2",
                                                            "optim.batch_size=1"])
    torch.manual_seed(0)
    model = build_mim(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reads = []
    real = train_mod._all_finite
    monkeypatch.setattr(train_mod, "_all_finite", lambda f: reads.append(1) or real(f))
    batches = iter([torch.rand(1, 1, 32, 32, 32) for _ in range(2)])
    res = train_mod.train_step(model, opt, batches, cfg=cfg,
                               geometry=geometry_from_config(cfg.geometry), step=0, rank=0,
                               device=torch.device("cpu"))
    assert len(reads) == 1
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in res.losses.values())
    assert isinstance(res.grad_norm, torch.Tensor) and float(res.grad_norm) > 0
    terms = sum(float(v) for k, v in res.losses.items() if k.startswith("recon"))
    assert float(res.losses["loss"]) == pytest.approx(
        terms + cfg.loss.alpha * sum(float(v) for k, v in res.losses.items()
                                     if k.startswith("align")), rel=1e-5)


def test_packed_mask_copy_keeps_every_field() -> None:
    """The one-buffer-per-dtype copy restores every field with its shape, dtype and values."""
    cfg = load_config("pretrain", "tiny", overrides=SMALL)
    masks = sample_levels(2, geometry_from_config(cfg.geometry), torch.Generator().manual_seed(0))
    moved = train_mod.packed_copy(masks, torch.device("cpu"))
    for a, b in zip(masks, moved, strict=True):
        for name in ("mask", "ids_keep", "ids_mask", "ids_restore", "unit_mask", "boxes",
                     "parent", "parent_unit"):
            ta, tb = getattr(a, name), getattr(b, name)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


def test_bf16_saved_activations_round_only_what_backward_reads() -> None:
    """``optim.saved_activations=bf16``: the same forward, gradients within bf16 rounding of the
    fp32 ones, but not equal to them (the hooks did act)."""
    from mim3d.engine.train import saved_activations_context

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                              torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    grads, outs = [], []
    for mode in ("fp32", "bf16"):
        net.zero_grad()
        with saved_activations_context(mode):
            y = net(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.equal(outs[0], outs[1])  # forward untouched
    rel = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert 0 < rel < 2e-2, rel
    with pytest.raises(ValueError, match="optim.saved_activations"):
        load_config("pretrain", "tiny", overrides=["optim.saved_activations=fp8"])
