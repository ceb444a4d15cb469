"""Tests of mim3d.losses against hand-written loop computations on small tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mim3d.losses import (
    byol_alignment,
    infonce_alignment,
    level_weights,
    mim_loss,
    reconstruction_loss,
)

# ----------------------------------------------------------------------------- reference loops


def _recon_loop(pred, target, mask, norm_pix, eps=1e-6):
    """Per-token python loop: mean over masked tokens of mean squared voxel error."""
    errors = []
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            if not bool(mask[b, n]):
                continue
            t = [float(v) for v in target[b, n]]
            if norm_pix:
                mu = sum(t) / len(t)
                var = sum((v - mu) ** 2 for v in t) / len(t)  # population variance
                t = [(v - mu) / math.sqrt(var + eps) for v in t]
            p = [float(v) for v in pred[b, n]]
            errors.append(sum((a - c) ** 2 for a, c in zip(p, t, strict=True)) / len(t))
    return sum(errors) / len(errors)


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _infonce_loop(context, units, parent, parent_unit, tau):
    losses = []
    for i in range(context.shape[0]):
        par = units[int(parent[i])]
        logits = torch.tensor([_cos(context[i], par[u]) / tau for u in range(par.shape[0])])
        target = parent_unit[i : i + 1]
        losses.append(F.cross_entropy(logits[None], target).item())
    return sum(losses) / len(losses)


def _byol_loop(context, units, parent, parent_unit):
    values = [2 - 2 * _cos(context[i], units[int(parent[i]), int(parent_unit[i])])
              for i in range(context.shape[0])]
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- fake model output


@dataclass
class Level:
    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    context: torch.Tensor | None
    unit_features: torch.Tensor | None
    parent: torch.Tensor
    parent_unit: torch.Tensor


@dataclass
class Output:
    levels: list[Level]


def _fake_output(seed=0, levels=3, n=8, p=5, u=(4, 8), d=6, gamma=2, grad=True):
    """Level l has gamma**(l-1) volumes; child j of level l+1 has parent j // gamma."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lv in range(levels):
        b = gamma**lv
        mask = torch.rand(b, n, generator=g) < 0.6
        mask[:, 0] = True
        unit_count = u[lv] if lv < levels - 1 else None
        child = lv > 0
        out.append(Level(
            pred=torch.randn(b, n, p, generator=g).requires_grad_(grad),
            target=torch.randn(b, n, p, generator=g) * 3 + 1,
            mask=mask,
            context=torch.randn(b, d, generator=g).requires_grad_(grad) if child else None,
            unit_features=(torch.randn(b, unit_count, d, generator=g).requires_grad_(grad)
                           if unit_count else None),
            parent=torch.arange(b) // gamma if child else torch.full((b,), -1),
            parent_unit=(torch.randint(0, u[lv - 1], (b,), generator=g) if child
                         else torch.full((b,), -1)),
        ))
    return Output(out)


# ----------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_matches_loop(norm_pix):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 5, 7, generator=g)
    target = torch.randn(2, 5, 7, generator=g) * 4 + 2
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    got = reconstruction_loss(pred, target, mask, norm_pix=norm_pix)
    assert got.item() == pytest.approx(_recon_loop(pred, target, mask, norm_pix), rel=1e-5)


def test_reconstruction_ignores_visible_tokens():
    pred = torch.zeros(1, 3, 4)
    target = torch.zeros(1, 3, 4)
    target[0, 1] = 100.0  # a huge error on a visible token must not count
    mask = torch.tensor([[True, False, True]])
    assert reconstruction_loss(pred, target, mask, norm_pix=False).item() == 0.0


def test_reconstruction_nothing_masked_is_zero_with_grad():
    pred = torch.randn(1, 3, 4, requires_grad=True)
    loss = reconstruction_loss(pred, torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and pred.grad is not None


def test_reconstruction_bad_args():
    x = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="pred and target"):
        reconstruction_loss(x, torch.zeros(1, 3, 5), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        reconstruction_loss(x, x, torch.ones(1, 3))  # not bool
    with pytest.raises(ValueError, match="mask"):
        reconstruction_loss(x, x, torch.ones(1, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- alignment


def _alignment_inputs(seed=2, m=5, bp=2, u=4, d=6):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(m, d, generator=g)
    units = torch.randn(bp, u, d, generator=g)
    parent = torch.tensor([0, 1, 1, 0, 1])[:m]
    parent_unit = torch.tensor([3, 0, 2, 1, 2])[:m]
    return context, units, parent, parent_unit


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_infonce_matches_loop(tau):
    c, p, par, unit = _alignment_inputs()
    got = infonce_alignment(c, p, par, unit, temperature=tau)
    assert got.item() == pytest.approx(_infonce_loop(c, p, par, unit, tau), rel=1e-5)


def test_losses_stay_float32_under_autocast():
    c, p, par, unit = _alignment_inputs()
    ref = infonce_alignment(c, p, par, unit, temperature=0.05)
    pred, target = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    ref_r = reconstruction_loss(pred, target, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = infonce_alignment(c, p, par, unit, temperature=0.05)
        got_r = reconstruction_loss(pred.bfloat16(), target, mask)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert got_r.item() == pytest.approx(
        reconstruction_loss(pred.bfloat16().float(), target, mask).item(), rel=1e-6)
    assert ref_r.dtype == torch.float32


def test_infonce_uses_only_own_parents_units():
    c, p, par, unit = _alignment_inputs()
    before = infonce_alignment(c, p, par, unit, temperature=0.1)
    p2 = p.clone()
    p2[0] = torch.randn_like(p2[0])  # parent 0 changes: children of parent 1 are unaffected
    only_1 = par == 1
    a = infonce_alignment(c[only_1], p, par[only_1], unit[only_1], temperature=0.1)
    b = infonce_alignment(c[only_1], p2, par[only_1], unit[only_1], temperature=0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert before.item() != pytest.approx(
        infonce_alignment(c, p2, par, unit, temperature=0.1).item())


def test_infonce_perfect_alignment_near_zero():
    units = torch.eye(4).repeat(2, 1, 1) * 3.0  # orthogonal units, parents 0 and 1
    parent = torch.tensor([0, 1, 1])
    parent_unit = torch.tensor([2, 0, 3])
    context = units[parent, parent_unit] * 0.5  # same direction as the source unit
    loss = infonce_alignment(context, units, parent, parent_unit, temperature=0.01)
    assert loss.item() < 1e-6


def test_byol_matches_loop_and_range():
    c, p, par, unit = _alignment_inputs()
    got = byol_alignment(c, p, par, unit)
    assert got.item() == pytest.approx(_byol_loop(c, p, par, unit), rel=1e-5)
    same = byol_alignment(p[par, unit] * 2.0, p, par, unit)
    opposite = byol_alignment(-p[par, unit], p, par, unit)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert opposite.item() == pytest.approx(4.0, abs=1e-6)


def test_alignment_bad_args():
    c, p, par, unit = _alignment_inputs()
    with pytest.raises(ValueError, match="temperature"):
        infonce_alignment(c, p, par, unit, temperature=0.0)
    with pytest.raises(ValueError, match="parent indices"):
        infonce_alignment(c, p, par + 1, unit, temperature=0.1)
    with pytest.raises(ValueError, match="parent_unit indices"):
        byol_alignment(c, p, par, unit + 4)
    with pytest.raises(ValueError, match="width"):
        byol_alignment(c[:, :5], p, par, unit)
    with pytest.raises(ValueError, match="parent must be"):
        byol_alignment(c, p, par[:3], unit)


def test_alignment_without_children_is_zero_with_grad():
    units = torch.randn(2, 4, 6, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    context = torch.zeros(0, 6, requires_grad=True)
    loss = infonce_alignment(context, units, empty, empty, temperature=0.1)
    loss.backward()
    assert loss.item() == 0.0 and units.grad is not None


# ----------------------------------------------------------------------------- level weights


@pytest.mark.parametrize(
    ("schedule", "progress", "expected"),
    [
        ("concurrent", 0.0, [1, 1, 1]),
        ("concurrent", 0.7, [1, 1, 1]),
        ("coarse_to_fine", 0.0, [1, 2, 0]),
        ("coarse_to_fine", 0.5, [1, 1.5, 0.5]),
        ("coarse_to_fine", 1.0, [1, 1, 1]),
        ("fine_to_coarse", 0.0, [1, 0, 2]),
        ("fine_to_coarse", 0.25, [1, 0.25, 1.75]),
        ("fine_to_coarse", 1.0, [1, 1, 1]),
        ("level1_only", 0.0, [1, 0, 0]),
        ("level1_only", 1.0, [1, 0, 0]),
    ],
)
def test_level_weights_three_levels(schedule, progress, expected):
    assert level_weights(schedule, levels=3, progress=progress) == pytest.approx(expected)


def test_level_weights_other_level_counts():
    # L = 5: start weights of levels 2..5 interpolate 2 -> 0 (coarse-to-fine)
    assert level_weights("coarse_to_fine", levels=5, progress=0.0) == pytest.approx(
        [1, 2, 4 / 3, 2 / 3, 0])
    assert level_weights("fine_to_coarse", levels=5, progress=0.5) == pytest.approx(
        [1, 0.5, (2 / 3 + 1) / 2, (4 / 3 + 1) / 2, 1.5])
    # L = 2: level 2 is the last level
    assert level_weights("coarse_to_fine", levels=2, progress=0.0) == pytest.approx([1, 0])
    assert level_weights("fine_to_coarse", levels=2, progress=0.0) == pytest.approx([1, 2])
    assert level_weights("coarse_to_fine", levels=1, progress=0.3) == pytest.approx([1])


def test_level_weights_bad_args():
    with pytest.raises(ValueError, match="concurrent, coarse_to_fine"):
        level_weights("simultaneous", levels=3, progress=0.0)
    with pytest.raises(ValueError, match="progress"):
        level_weights("concurrent", levels=3, progress=1.5)
    with pytest.raises(ValueError, match="levels"):
        level_weights("concurrent", levels=0, progress=0.0)


# ----------------------------------------------------------------------------- total loss


def _expected_terms(out, tau=0.1, norm_pix=True, alignment="infonce"):
    lv = out.levels
    recon = [_recon_loop(x.pred.detach(), x.target, x.mask, norm_pix) for x in lv]
    fn = _infonce_loop if alignment == "infonce" else _byol_loop
    align = []
    for i in range(len(lv) - 1):
        child, par = lv[i + 1], lv[i]
        args = (child.context.detach(), par.unit_features.detach(), child.parent,
                child.parent_unit)
        align.append(fn(*args, tau) if alignment == "infonce" else fn(*args))
    return recon, align


@pytest.mark.parametrize("alignment", ["infonce", "byol"])
def test_mim_loss_total_is_sum(alignment):
    out = _fake_output()
    got = mim_loss(out, alignment=alignment, alpha=0.1, temperature=0.1)
    recon, align = _expected_terms(out, alignment=alignment)
    assert set(got) == {"loss", "recon_1", "recon_2", "recon_3", "align_1_2", "align_2_3"}
    for i, value in enumerate(recon):
        assert got[f"recon_{i + 1}"].item() == pytest.approx(value, rel=1e-5)
    assert got["align_1_2"].item() == pytest.approx(align[0], rel=1e-5)
    assert got["align_2_3"].item() == pytest.approx(align[1], rel=1e-5)
    assert got["loss"].item() == pytest.approx(sum(recon) + 0.1 * sum(align), rel=1e-5)


def test_mim_loss_toggles_weights_and_alpha():
    out = _fake_output(seed=3)
    recon, align = _expected_terms(out, norm_pix=False)
    got = mim_loss(out, norm_pix=False, alpha=0.5, recon_levels=[True, False, True],
                   align_pairs=[False, True], weights=[2.0, 5.0, 0.5])
    assert set(got) == {"loss", "recon_1", "recon_3", "align_2_3"}
    expected = 2.0 * recon[0] + 0.5 * recon[2] + 0.5 * align[1]
    assert got["loss"].item() == pytest.approx(expected, rel=1e-5)
    none = mim_loss(out, norm_pix=False, alignment="none")
    assert set(none) == {"loss", "recon_1", "recon_2", "recon_3"}
    assert none["loss"].item() == pytest.approx(sum(recon), rel=1e-5)
    only_align = mim_loss(out, recon_levels=[False] * 3, alpha=1.0)  # Table VIII row 2
    assert only_align["loss"].item() == pytest.approx(
        sum(_expected_terms(out)[1]), rel=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"alignment": "none"},
    {"recon_levels": [False, True, False], "align_pairs": [False, False]},
    {"weights": [1.0, 0.0, 0.0]},
])
def test_mim_loss_every_output_gets_a_gradient(kwargs):
    out = _fake_output(seed=4)
    mim_loss(out, **kwargs)["loss"].backward()
    for lv in out.levels:
        for t in (lv.pred, lv.context, lv.unit_features):
            assert t is None or t.grad is not None


def test_mim_loss_switched_off_nonfinite_output_does_not_poison_total():
    out = _fake_output(seed=5)
    with torch.no_grad():
        out.levels[2].pred[0, 0, 0] = float("inf")
    got = mim_loss(out, recon_levels=[True, True, False])
    assert torch.isfinite(got["loss"])


def test_mim_loss_bad_args():
    out = _fake_output()
    with pytest.raises(ValueError, match="infonce, byol, none"):
        mim_loss(out, alignment="cosine")
    with pytest.raises(ValueError, match="recon_levels needs 3"):
        mim_loss(out, recon_levels=[True, True])
    with pytest.raises(ValueError, match="align_pairs needs 2"):
        mim_loss(out, align_pairs=[True])
    with pytest.raises(ValueError, match="weights needs 3"):
        mim_loss(out, weights=[1.0])
    out.levels[1].context = None
    with pytest.raises(ValueError, match="alignment 1_2"):
        mim_loss(out)
    with pytest.raises(ValueError, match="no levels"):
        mim_loss(Output([]))


def test_mim_loss_alpha_zero_skips_alignment_without_heads():
    """issue 10: ``--set loss.alpha=0`` builds MiM without projection heads (context None);
    the loss must then be the reconstruction sum, not an error about missing context."""
    out = _fake_output(seed=6)
    recon, _ = _expected_terms(out)
    for lv in out.levels:
        lv.context, lv.unit_features = None, None
    got = mim_loss(out, alpha=0.0)
    assert set(got) == {"loss", "recon_1", "recon_2", "recon_3"}
    assert got["loss"].item() == pytest.approx(sum(recon), rel=1e-5)
    with pytest.raises(ValueError, match="alignment 1_2"):  # alpha > 0 still needs the heads
        mim_loss(out, alpha=0.1)


def test_train_step_with_alpha_zero_on_the_tiny_preset():
    """The issue's reproduction: one optimizer step of the tiny preset with loss.alpha=0."""
    import itertools

    from mim3d.config import load_config
    from mim3d.engine.train import train_step
    from mim3d.factory import build_mim, geometry_from_config

    # gammas 2 (7 volumes instead of 21) only for time: the alignment path is the same
    cfg = load_config("pretrain", "tiny", overrides=["loss.alpha=0", "optim.batch_size=1",
                                                     "geometry.gammas=[2,2]"])
    torch.manual_seed(0)
    model = build_mim(cfg)
    assert model.child_head is None and model.parent_head is None  # no alignment heads built
    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    res = train_step(model, opt, itertools.repeat(x), cfg=cfg,
                     geometry=geometry_from_config(cfg.geometry), step=0, rank=0,
                     device=torch.device("cpu"))
    losses = {k: float(v) for k, v in res.losses.items()}  # floats or 0-d tensors
    assert set(losses) == {"loss", "recon_1", "recon_2", "recon_3"}
    assert losses["loss"] == pytest.approx(sum(losses[f"recon_{i}"] for i in (1, 2, 3)), rel=1e-6)
