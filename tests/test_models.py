"""Tests of mim3d.models: layers, hybrid and ViT encoders, decoder, heads (CPU, tiny sizes)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mim3d.models.decoder import MaskedDecoder
from mim3d.models.heads import ProjectionHead
from mim3d.models.hybrid import HybridEncoder, official_key_to_mim3d
from mim3d.models.layers import (
    ConvBlock,
    DropPath,
    depthwise_conv3d,
    patch_linear,
    sincos_pos_embed_3d,
)
from mim3d.models.vit import ViTEncoder

OFFICIAL_KEYS = (Path(__file__).resolve().parents[2] / "shared" / "reference"
                 / "official_mim_checkpoint_keys.txt")
# Sum of the numel of every encoder tensor (all but pos_embed) in the authors' released base
# checkpoint; DESIGN section 3 rounds it to "~34 M". Our base encoder must match it exactly.
OFFICIAL_ENCODER_PARAMS = 33_891_600
TINY = {"input_size": (32, 32, 32), "patch_size": 8, "dims": (16, 32, 64, 128),
        "depths": (1, 1, 1, 2), "num_heads": 4}


def tiny_encoder(**overrides: object) -> HybridEncoder:
    """Seeded tiny hybrid encoder (32^3 input, patch 8) in eval mode."""
    torch.manual_seed(0)
    return HybridEncoder(**{**TINY, **overrides}).eval()


def random_masks(batch: int, n: int, n_keep: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """MAE-convention masks: (ids_keep ascending, ids_restore, bool mask True = masked)."""
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.rand(batch, n, generator=g).argsort(dim=1)
    keep = shuffle[:, :n_keep].sort(dim=1).values
    rest = shuffle[:, n_keep:].sort(dim=1).values
    ids_restore = torch.cat([keep, rest], dim=1).argsort(dim=1)
    mask = torch.ones(batch, n, dtype=torch.bool).scatter_(1, keep, False)
    return keep, ids_restore, mask


def voxel_mask(mask: Tensor, grid: tuple[int, int, int], p: int) -> Tensor:
    """(B, N) token mask -> (B, 1, D, H, W) bool voxel mask (True = masked)."""
    m = mask.view(-1, *grid).float()
    for axis in (1, 2, 3):
        m = m.repeat_interleave(p, dim=axis)
    return m.bool().unsqueeze(1)


# ----------------------------------------------------------------------------- layers


def test_sincos_embedding_formula_rows_and_padding() -> None:
    """Hand-computed entries, distinct rows, zero padding when dim % 6 != 0."""
    grid, dim = (3, 4, 5), 36
    emb = sincos_pos_embed_3d(grid, dim)
    assert emb.shape == (1, 60, dim) and not emb.requires_grad
    # token (1, 2, 3) -> flat (1*4 + 2)*5 + 3 = 33; axis 1 (H) cos block, frequency i = 2:
    # column 2*1*F + F + 2 = 20 with F = 6, value cos(2 * 10000**(-2/6))
    assert emb[0, 33, 20].item() == pytest.approx(math.cos(2 * 10000 ** (-2 / 6)), abs=1e-6)
    assert emb[0, 33, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)  # axis 0, i = 0
    assert torch.cdist(emb[0], emb[0]).add(torch.eye(60) * 1e9).min() > 1e-3  # distinct rows
    padded = sincos_pos_embed_3d(grid, 40)
    assert torch.equal(padded[..., 36:], torch.zeros(1, 60, 4))
    assert torch.equal(padded[..., :36], emb)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_sincos_matches_monai_up_to_axis_block_order() -> None:
    """Same frequencies as MONAI's builder; only the axis blocks are ordered differently."""
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    grid, dim, f = (2, 3, 4), 24, 4
    ours = sincos_pos_embed_3d(grid, dim)[0]
    theirs = build_sincos_position_embedding(list(grid), dim, 3).detach()[0]
    perm = list(range(2 * f, 4 * f)) + list(range(2 * f)) + list(range(4 * f, 6 * f))
    torch.testing.assert_close(ours[:, perm], theirs, atol=1e-5, rtol=0)


def test_patch_linear_equals_conv3d() -> None:
    """The matmul form of a kernel = stride Conv3d, with and without a token index."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, 12, 4)
    conv = torch.nn.Conv3d(5, 7, 4, stride=4)
    ref = conv(x).permute(0, 2, 3, 4, 1)  # (2, 2, 3, 1, 7)
    out = patch_linear(x.permute(0, 2, 3, 4, 1), conv.weight, conv.bias, 4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    index = torch.tensor([[5, 0, 3], [1, 2, 4]])
    sel = patch_linear(x.permute(0, 2, 3, 4, 1), conv.weight, conv.bias, 4, index)
    expected = ref.reshape(2, 6, 7).gather(1, index[..., None].expand(-1, -1, 7))
    torch.testing.assert_close(sel, expected)


@pytest.mark.parametrize("channels_last", [True, False])
def test_depthwise_conv_gradients(channels_last: bool) -> None:
    """The custom depthwise backward (flipped-kernel data grad, swapped-role weight grad).

    Compared with autograd through ``F.conv3d`` in float32 (double would hit PyTorch's slow
    reference conv and take seconds under gradcheck).
    """
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 6, 5, 7).to(memory_format=fmt)
    w, b = torch.randn(3, 1, 5, 5, 5), torch.randn(3)
    grad = torch.randn(2, 3, 6, 5, 7)
    grads = []
    for fn in (depthwise_conv3d, lambda *a: F.conv3d(*a[:3], padding=a[3], groups=3)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = fn(*leaves, 2)
        out.backward(grad)
        grads.append([out.detach()] + [t.grad for t in leaves])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_convblock_layouts() -> None:
    """ConvBlock gives the same result for channels-first and channels-last input."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 5, 6)
    blk = ConvBlock(8).eval()
    mask = (torch.rand(2, 1, 4, 5, 6) > 0.5).float()
    out_cf = blk(x, mask)
    out_cl = blk(x.to(memory_format=torch.channels_last_3d), mask)
    assert out_cf.shape == x.shape
    torch.testing.assert_close(out_cf, out_cl)


def test_drop_path() -> None:
    """Identity in eval, per-sample 0 or 1/(1-p) in training, p validated."""
    x = torch.ones(64, 3)
    dp = DropPath(0.5)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    with pytest.raises(ValueError, match="1.0"):
        DropPath(1.0)


# ----------------------------------------------------------------------------- hybrid encoder


@pytest.fixture(scope="module")
def base_encoder() -> HybridEncoder:
    """The base encoder, built once per module."""
    torch.manual_seed(0)
    return HybridEncoder().eval()


def test_base_encoder_size_and_features(base_encoder: HybridEncoder) -> None:
    """Base size equals the released checkpoint's; multi-scale shapes at 96^3."""
    n = sum(p.numel() for p in base_encoder.parameters())
    assert n == OFFICIAL_ENCODER_PARAMS
    assert abs(n - 34e6) / 34e6 < 0.015  # DESIGN's "~34 M" is 2 significant figures
    assert base_encoder.grid == (6, 6, 6) and base_encoder.num_tokens == 216
    assert base_encoder.embed_dim == 384
    assert not any(name == "pos_embed" for name, _ in base_encoder.named_parameters())
    with torch.no_grad():
        feats = base_encoder.forward_features(torch.randn(1, 1, 96, 96, 96))
    shapes = [tuple(f.shape) for f in feats]
    assert shapes == [(1, 48, 48, 48, 48), (1, 96, 24, 24, 24), (1, 192, 12, 12, 12),
                      (1, 384, 6, 6, 6)]


def test_tiny_forward_backward() -> None:
    """Masked forward shape and a finite, non-zero gradient for every parameter."""
    enc = tiny_encoder().train()
    x = torch.randn(2, 1, 32, 32, 32)
    keep, _, _ = random_masks(2, 64, 25)
    out = enc(x, keep)
    assert out.shape == (2, 25, 128)
    out.square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("patch_size", "size"), [(8, (32, 32, 32)), (16, (64, 32, 48))])
def test_no_leak_from_masked_voxels(patch_size: int, size: tuple[int, int, int]) -> None:
    """Visible-token outputs ignore masked voxels exactly, yet react to visible ones."""
    enc = tiny_encoder(patch_size=patch_size, input_size=size)
    n = enc.num_tokens
    keep, _, mask = random_masks(2, n, max(2, int(n * 0.4)), seed=patch_size)
    vmask = voxel_mask(mask, enc.grid, patch_size)
    torch.manual_seed(1)
    x = torch.randn(2, 1, *size)
    x_noisy = torch.where(vmask, 10 * torch.randn_like(x), x)
    with torch.no_grad():
        ref, changed = enc(x, keep), enc(x_noisy, keep)
    torch.testing.assert_close(changed, ref, atol=1e-5, rtol=0)
    # the check has teeth: a single visible voxel does move the output
    b, t = 0, int(keep[0, 0])
    i, j, k = t // (enc.grid[1] * enc.grid[2]), t // enc.grid[2] % enc.grid[1], t % enc.grid[2]
    x_vis = x.clone()
    voxel = (b, 0, i * patch_size, j * patch_size, k * patch_size)
    x_vis[voxel] = -5.0 if x[voxel] > 0 else 5.0
    with torch.no_grad():
        assert (enc(x_vis, keep) - ref).abs().max() > 1e-3
    # and no gradient path exists from visible outputs back to masked voxels
    xg = x.clone().requires_grad_()
    enc(xg, keep).sum().backward()
    assert xg.grad[vmask].abs().max() == 0
    assert xg.grad[~vmask].abs().max() > 0


def test_patch32_anisotropic_feature_shapes() -> None:
    """Patch 32 uses a stride-4 stem; feature maps follow an anisotropic input."""
    enc = tiny_encoder(patch_size=32, input_size=(64, 64, 32))
    assert enc.grid == (2, 2, 1)
    with torch.no_grad():
        feats = enc.forward_features(torch.randn(1, 1, 64, 64, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16, 8), (32, 8, 8, 4), (64, 4, 4, 2),
                                                   (128, 2, 2, 1)]


def test_all_visible_equals_unmasked() -> None:
    """ids_keep=None is the same computation as keeping every token."""
    enc = tiny_encoder()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        full = enc(x)
        same = enc(x, torch.arange(64).expand(2, -1).contiguous())
    assert full.shape == (2, 64, 128)
    torch.testing.assert_close(same, full, atol=1e-5, rtol=1e-5)


def test_grad_checkpointing_same_gradients() -> None:
    """Checkpointed transformer blocks give the same gradients."""
    x = torch.randn(1, 1, 32, 32, 32)
    keep, _, _ = random_masks(1, 64, 20)
    grads = []
    for ckpt in (False, True):
        enc = tiny_encoder(grad_checkpointing=ckpt).train()
        enc(x, keep).sum().backward()
        grads.append(enc.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(("kwargs", "bad"), [
    ({"patch_size": 12}, "12"),
    ({"dims": (16, 32, 64)}, r"\(16, 32, 64\)"),
    ({"depths": (1, 1, 2)}, r"\(1, 1, 2\)"),
    ({"input_size": (32, 32, 36)}, "36"),
    ({"num_heads": 5}, "5"),
    ({"drop_path_rate": 1.5}, "1.5"),
])
def test_hybrid_rejects_bad_args(kwargs: dict, bad: str) -> None:
    """Bad constructor arguments raise ValueError naming the value."""
    with pytest.raises(ValueError, match=bad):
        HybridEncoder(**{**TINY, **kwargs})


def test_hybrid_rejects_bad_inputs() -> None:
    """Wrong input size or malformed ids_keep raise ValueError."""
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="40"):
        enc(torch.zeros(1, 1, 32, 32, 40))
    with pytest.raises(ValueError, match="ids_keep"):
        enc(torch.zeros(1, 1, 32, 32, 32), torch.zeros(1, 3))


# ----------------------------------------------------------------------------- official keys


def _official_keys() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every key in the released checkpoint, '<i>' expanded."""
    if not OFFICIAL_KEYS.exists():
        pytest.skip(f"{OFFICIAL_KEYS} not found (../shared absent)")
    counts = {"blocks1": 2, "blocks2": 2, "blocks3": 2, "blocks4": 11, "decoder_blocks": 8}
    keys = []
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape_txt = line.split(" ", 1)
        shape = tuple(int(s) for s in re.findall(r"\d+", shape_txt))
        n_rep = counts[name.split(".")[0]] if "<i>" in name else 1
        keys += [(name.replace("<i>", str(i)), shape) for i in range(n_rep)]
    return keys


def test_official_encoder_keys_map(base_encoder: HybridEncoder) -> None:
    """Every official encoder key maps to a distinct mim3d key of equal numel, and back."""
    ours = base_encoder.state_dict()
    encoder_re = re.compile(r"(patch_embed[1-5]|blocks[1-4]|stage[1-3]_output_decode|norm"
                            r"|pos_embed)(\.|$)")
    mapped, total = {}, 0
    for name, shape in _official_keys():
        target = official_key_to_mim3d(name)
        if not encoder_re.match(name):
            assert target is None, name
            continue
        assert target in ours, (name, target)
        assert ours[target].numel() == math.prod(shape), (name, target)
        mapped[name] = target
        total += math.prod(shape) if name != "pos_embed" else 0
    assert len(set(mapped.values())) == len(mapped) == len(ours)  # a bijection
    assert total == OFFICIAL_ENCODER_PARAMS


# ----------------------------------------------------------------------------- decoder, heads


def test_decoder_unshuffle_and_order_invariance() -> None:
    """ids_restore places tokens as a hand-built unshuffle does, whatever the kept order."""
    torch.manual_seed(0)
    dec = MaskedDecoder(encoder_dim=12, dim=16, depth=2, num_heads=4, grid=(2, 2, 3),
                        out_dim=5).eval()
    b, n, m = 2, 12, 5
    table = torch.randn(b, n, 12)  # encoder output of every raster position
    keep, ids_restore, mask = random_masks(b, n, m, seed=3)
    with torch.no_grad():
        out = dec(table.gather(1, keep[..., None].expand(-1, -1, 12)), ids_restore)
        # hand-built unshuffle: embedded token where visible, mask token where masked
        x = torch.where(mask[..., None], dec.mask_token.expand(b, n, -1), dec.embed(table))
        x = x + dec.pos_embed
        for blk in dec.blocks:
            x = blk(x)
        ref = dec.pred(dec.norm(x))
        # the same visible set listed in another order gives the same per-token prediction
        keep2 = keep.flip(1)
        masked = torch.nonzero(mask)[:, 1].view(b, -1)
        restore2 = torch.cat([keep2, masked], 1).argsort(1)
        out2 = dec(table.gather(1, keep2[..., None].expand(-1, -1, 12)), restore2)
    assert out.pred.shape == (b, n, 5) and out.features.shape == (b, n, 16)
    torch.testing.assert_close(out.pred, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2.pred, out.pred, atol=1e-5, rtol=1e-5)
    assert dec.mask_token.requires_grad and "pos_embed" in dict(dec.named_buffers())


def test_decoder_and_head_reject_bad_args() -> None:
    """ValueError on bad decoder/head arguments and bad ids_restore."""
    with pytest.raises(ValueError, match="5"):
        MaskedDecoder(encoder_dim=8, dim=16, num_heads=5)
    dec = MaskedDecoder(encoder_dim=8, dim=16, depth=1, num_heads=4, grid=(2, 2, 2), out_dim=3)
    with pytest.raises(ValueError, match="ids_restore"):
        dec(torch.zeros(1, 3, 8), torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="in_dim"):
        ProjectionHead(in_dim=0)


def test_projection_head_shape() -> None:
    """Head maps (..., in_dim) to (..., out_dim)."""
    head = ProjectionHead(in_dim=16, hidden_dim=32, out_dim=8)
    assert head(torch.randn(3, 5, 16)).shape == (3, 5, 8)


# ----------------------------------------------------------------------------- ViT


def test_vit_maps_onto_monai_vit() -> None:
    """Our state dict loads into MONAI's ViT by name, with equal shapes and equal outputs."""
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    ours = ViTEncoder(input_size=(32, 32, 32), patch_size=8, dim=48, depth=3, num_heads=4).eval()
    theirs = ViT(in_channels=1, img_size=(32, 32, 32), patch_size=8, hidden_size=48, mlp_dim=192,
                 num_layers=3, num_heads=4, proj_type="conv", qkv_bias=True).eval()
    their_shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    for k, v in ours.state_dict().items():
        assert their_shapes[k] == v.shape, k
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(".norm_cross_attn." in k for k in result.missing_keys)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        final, hidden = theirs(x)
        torch.testing.assert_close(ours(x), final, atol=1e-5, rtol=1e-5)
        feats = ours.forward_features(x, layers=(2, 3))
    torch.testing.assert_close(feats[0], hidden[1].transpose(1, 2).reshape(2, 48, 4, 4, 4),
                               atol=1e-5, rtol=1e-5)
    assert feats[1].shape == (2, 48, 4, 4, 4)


def test_vit_masked_forward_and_errors() -> None:
    """Visible-token forward/backward, default feature taps, and argument errors."""
    torch.manual_seed(0)
    vit = ViTEncoder(input_size=(32, 32, 32), patch_size=8, dim=24, depth=4, num_heads=4)
    keep, _, _ = random_masks(2, 64, 16)
    out = vit(torch.randn(2, 1, 32, 32, 32), keep)
    assert out.shape == (2, 16, 24)
    out.sum().backward()
    assert len(vit.forward_features(torch.randn(1, 1, 32, 32, 32))) == 4
    with pytest.raises(ValueError, match="12"):
        ViTEncoder(input_size=(32, 32, 32), patch_size=12)
    with pytest.raises(ValueError, match="layers"):
        vit.forward_features(torch.randn(1, 1, 32, 32, 32), layers=(0,))
