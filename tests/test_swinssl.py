"""Tests of the Swin-UNETR SSL baseline: its model (mim3d.models.swinssl), losses
(mim3d.losses) and views (mim3d.data.views), on the CPU at small sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from torch import Tensor

from mim3d.data.views import cutout_mask, make_two_views
from mim3d.losses import nt_xent, swin_ssl_loss
from mim3d.models.swinssl import InpaintingDecoder, SwinSSL, SwinSSLOutput

# 2 bottleneck tokens (the fewest head_pool="token" allows). Window attention costs the same for
# any feature size (it scales with tokens x window x heads), so the input is kept small instead.
SMALL = {"img_size": (32, 32, 64), "feature_size": 12}
SMALL_X = (1, 32, 32, 64)


def small_model(**overrides: object) -> SwinSSL:
    """Seeded SwinSSL at 32x32x64 with feature size 12."""
    torch.manual_seed(0)
    return SwinSSL(**{**SMALL, **overrides})


def test_shapes_at_the_default_width() -> None:
    torch.manual_seed(0)
    model = SwinSSL(img_size=(32, 32, 64)).eval()  # feature size 48, the fewest tokens allowed
    with torch.no_grad():
        out = model(torch.rand(1, 1, 32, 32, 64))
    assert out.rotation.shape == (1, 4)
    assert out.contrastive.shape == (1, 512)
    assert out.reconstruction.shape == (1, 1, 32, 32, 64)


def test_shapes_anisotropic_multichannel_mean_pool() -> None:
    model = small_model(in_channels=2, img_size=(64, 32, 32), head_pool="mean",
                        rotation_classes=3, contrastive_dim=16).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 2, 64, 32, 32))
    assert out.rotation.shape == (1, 3) and out.contrastive.shape == (1, 16)
    assert out.reconstruction.shape == (1, 2, 64, 32, 32)


def test_encoder_is_swinunetr_feature48_encoder() -> None:
    """Same modules as MONAI's SwinUNETR(feature_size=48): its weights load strictly."""
    ssl = SwinSSL()
    seg = SwinUNETR(in_channels=1, out_channels=2, feature_size=48)
    seg.swinViT.load_state_dict(ssl.swinViT.state_dict(), strict=True)
    assert ssl.decoder.layers[0].in_channels == 768  # stage-4 output: 16 x feature size


def test_decoder_channels() -> None:
    dec = InpaintingDecoder(768, 1)
    convs = [m for m in dec.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (768, 384), (384, 192), (192, 96), (96, 48), (48, 24), (24, 1)]
    assert all(c.kernel_size == (3, 3, 3) for c in convs[:-1]) and convs[-1].kernel_size == (1,) * 3


@pytest.mark.parametrize("kwargs", [{"img_size": (64, 64, 48)}, {"feature_size": 20},
                                    {"img_size": (32, 32, 32)}, {"head_pool": "max"},
                                    {"in_channels": 0}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SwinSSL(**{**SMALL, **kwargs})


def test_wrong_input_size() -> None:
    with pytest.raises(ValueError, match="expected input"):
        small_model()(torch.rand(1, 1, 64, 32, 32))


def test_head_tokens_follow_authors() -> None:
    """Token mode: rotation reads bottleneck token 0, contrastive token 1 (raster order)."""
    model = small_model().eval()
    x = torch.rand(1, *SMALL_X)
    with torch.no_grad():
        tokens = model.swinViT(x, normalize=True)[4].flatten(2).transpose(1, 2)
        out = model(x)
    torch.testing.assert_close(out.rotation, model.rotation_head(tokens[:, 0]))
    torch.testing.assert_close(out.contrastive, model.contrastive_head(tokens[:, 1]))


def _direct_nt_xent(z1: Tensor, z2: Tensor, t: float) -> float:
    """SimCLR's NT-Xent written out with Python loops."""
    z = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    n, b = len(z), z1.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / den)
    return total / n


def _direct_ce(logits: Tensor, labels: Tensor) -> float:
    rows = [-float(r[y]) + math.log(sum(math.exp(float(v)) for v in r))
            for r, y in zip(logits.double(), labels.tolist())]
    return sum(rows) / len(rows)


def test_loss_equals_direct_formula() -> None:
    g = torch.Generator().manual_seed(3)
    b = 3

    def out() -> SwinSSLOutput:
        return SwinSSLOutput(torch.randn(b, 4, generator=g), torch.randn(b, 5, generator=g),
                             torch.rand(b, 1, 2, 2, 2, generator=g))

    o1, o2 = out(), out()
    r1, r2 = torch.tensor([0, 3, 1]), torch.tensor([2, 2, 0])
    x1, x2 = torch.rand(b, 1, 2, 2, 2, generator=g), torch.rand(b, 1, 2, 2, 2, generator=g)
    got = swin_ssl_loss(o1, o2, r1, r2, x1, x2, temperature=0.5, weights=(1.0, 2.0, 3.0))
    rot = _direct_ce(torch.cat([o1.rotation, o2.rotation]), torch.cat([r1, r2]))
    con = _direct_nt_xent(o1.contrastive, o2.contrastive, 0.5)
    rec = float(torch.cat([(o1.reconstruction - x1).abs().flatten(),
                           (o2.reconstruction - x2).abs().flatten()]).double().mean())
    assert float(got["rotation"]) == pytest.approx(rot, rel=1e-5)
    assert float(got["contrastive"]) == pytest.approx(con, rel=1e-5)
    assert float(got["reconstruction"]) == pytest.approx(rec, rel=1e-5)
    assert float(got["loss"]) == pytest.approx(rot + 2 * con + 3 * rec, rel=1e-5)


def test_nt_xent_limits() -> None:
    z = torch.randn(1, 8)
    assert float(nt_xent(z, torch.randn(1, 8))) == 0.0  # B = 1: no negatives
    # identical views, orthogonal samples: positive logit 1/t, negatives 0
    e = torch.eye(2)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    assert float(nt_xent(e, e, 0.5)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        nt_xent(z, torch.randn(2, 8))


def test_every_parameter_gets_a_gradient() -> None:
    model = small_model()
    x = torch.rand(2, *SMALL_X)
    views = make_two_views(x, torch.Generator().manual_seed(0), plane=(2, 3))
    o1, o2 = model(views.inputs[0]), model(views.inputs[1])
    losses = swin_ssl_loss(o1, o2, *views.rotations, *views.targets)
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert all(torch.isfinite(v) for v in losses.values())


def test_two_views_are_rotations_with_cutout() -> None:
    x = torch.rand(3, 1, 16, 24, 24)
    v = make_two_views(x, torch.Generator().manual_seed(1))
    again = make_two_views(x, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(v.inputs[i], again.inputs[i])  # seeded
        assert v.rotations[i].dtype == torch.long and v.rotations[i].shape == (3,)
        assert int(v.rotations[i].min()) >= 0 and int(v.rotations[i].max()) <= 3
        for b in range(3):
            k = int(v.rotations[i][b])
            torch.testing.assert_close(v.targets[i][b], torch.rot90(x[b], k, dims=(2, 3)))
        keep = ~v.masks[i]
        assert torch.equal(v.inputs[i][keep], v.targets[i][keep])  # only the cut-out changes
        share = v.masks[i].flatten(1).float().mean(1)
        assert bool((share > 0).all()) and bool((share <= 0.3).all())


def test_cutout_mask_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        m = cutout_mask((32, 32, 32), g, min_ratio=0.2, max_ratio=0.3)
        assert m.dtype == torch.bool and m.shape == (32, 32, 32)
        assert 0.15 <= float(m.float().mean()) <= 0.3
    with pytest.raises(ValueError):
        cutout_mask((8, 8, 8), g, min_ratio=0.5, max_ratio=0.3)


def test_two_views_rejects_unequal_plane() -> None:
    with pytest.raises(ValueError, match="plane"):
        make_two_views(torch.rand(1, 1, 8, 8, 12), torch.Generator())


def test_l1_matches_functional() -> None:
    o = SwinSSLOutput(torch.zeros(2, 4), torch.randn(2, 3), torch.ones(2, 1, 2, 2, 2))
    x = torch.zeros(2, 1, 2, 2, 2)
    got = swin_ssl_loss(o, o, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                        x, x)
    assert float(got["reconstruction"]) == pytest.approx(float(F.l1_loss(o.reconstruction, x)))
    assert float(got["rotation"]) == pytest.approx(math.log(4.0))
