"""Downstream networks (DESIGN.md section 3): segmentation and classification on top of the
pre-trained encoders, plus the MONAI baselines.

* :class:`MiMUNETR` - the hybrid encoder run on all tokens with a SwinUNETR-style CNN decoder.
* :func:`build_unetr` - MONAI ``UNETR`` hosting a mim3d :class:`~mim3d.models.vit.ViTEncoder`
  (the "MiM + UNETR" row of Table V); :func:`mim3d.transfer.load_encoder_into` fills its ``vit``.
* :func:`build_swinunetr` - MONAI ``SwinUNETR`` (from scratch, or with a Swin-UNETR SSL encoder).
* :class:`MiMClassifier` - hybrid encoder, global average pool, MLP head.

:func:`mim3d.factory.build_downstream` builds any of them at the encoder size of a pretrain
preset, so an encoder pre-trained with preset ``X`` loads key- and shape-identically into the
network of size ``X`` (under :data:`ENCODER_PREFIX`), when ``roi`` equals the preset's
``geometry.input_size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import UNETR, SwinUNETR, ViT
from torch import Tensor, nn

from mim3d.models.hybrid import HybridEncoder

__all__ = [
    "ENCODER_PREFIX",
    "NETWORKS",
    "MiMClassifier",
    "MiMUNETR",
    "build_swinunetr",
    "build_unetr",
    "check_roi",
]

NETWORKS = ("mim-unetr", "unetr", "swinunetr", "classifier")
# Where the pre-trained encoder lives in each network: load its state dict under this prefix.
ENCODER_PREFIX = {"mim-unetr": "encoder", "classifier": "encoder", "unetr": "vit",
                  "swinunetr": "swinViT"}


def check_roi(roi: Sequence[int], multiple: int, what: str) -> tuple[int, int, int]:
    """``roi`` as 3 ints, each a positive multiple of ``multiple`` (else ValueError naming ``what``)."""
    roi = tuple(roi)
    if len(roi) != 3 or any(int(r) != r or r < multiple or r % multiple for r in roi):
        raise ValueError(f"roi {roi} must be 3 ints, each a positive multiple of {multiple} "
                         f"({what})")
    return tuple(int(r) for r in roi)  # type: ignore[return-value]


class MiMUNETR(nn.Module):
    """Hybrid encoder (unmasked) + SwinUNETR-style CNN decoder with skips.

    For patch 16 (base: 48@R/2, 96@R/4, 192@R/8, 384@R/16) the decoder works on 5 levels
    R/2^k, k = 0..4, with ``fs = feature_size`` channels (fs, fs, 2fs, 4fs, 8fs)::

        level 0  UnetrBasicBlock(image)          fs @ R       (SwinUNETR's encoder1)
        level 1  UnetrBasicBlock(stage 1)        fs @ R/2
        level 2  UnetrBasicBlock(stage 2)       2fs @ R/4
        level 3  UnetrBasicBlock(stage 3)       4fs @ R/8
        level 4  UnetrBasicBlock(token map)     8fs @ R/16   (bottleneck)
        UnetrUpBlock k+1 -> k with the level-k skip, k = 3..0; UnetOutBlock -> logits @ R

    For patch 8 stage 1 is already at full resolution, so level 0's block sees the image and
    stage 1 concatenated, and there are 4 levels (fs, 2fs, 4fs, 8fs).

    Args:
        in_channels: image channels.
        out_channels: segmentation classes (logit channels).
        roi: (D, H, W) input size, each divisible by ``patch_size``.
        patch_size: encoder token size, 8 or 16.
        dims, depths, num_heads, mlp_ratio, drop_path_rate, grad_checkpointing: the
            :class:`HybridEncoder`'s.
        feature_size: decoder width fs.
        norm_name: MONAI norm of the decoder blocks.
    """

    def __init__(self, *, in_channels: int = 1, out_channels: int,
                 roi: Sequence[int] = (96, 96, 96), patch_size: int = 16,
                 dims: Sequence[int] = (48, 96, 192, 384), depths: Sequence[int] = (2, 2, 2, 11),
                 num_heads: int = 12, mlp_ratio: float = 4.0, feature_size: int = 48,
                 drop_path_rate: float = 0.0, norm_name: str | tuple = "instance",
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        if patch_size not in (8, 16):
            raise ValueError(f"MiMUNETR supports patch_size 8 or 16, got {patch_size} (with 32 "
                             "no encoder stage lands at R/2 to give that level a skip)")
        roi = check_roi(roi, patch_size, f"patch_size {patch_size}")
        for name, value in (("out_channels", out_channels), ("feature_size", feature_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.encoder = HybridEncoder(in_channels=in_channels, input_size=roi,
                                     patch_size=patch_size, dims=dims, depths=depths,
                                     num_heads=num_heads, mlp_ratio=mlp_ratio,
                                     drop_path_rate=drop_path_rate,
                                     grad_checkpointing=grad_checkpointing)
        self.stem_level = int(math.log2(patch_size // 8))  # level of stage 1: 0 or 1
        fs = feature_size
        chans = [fs] * (self.stem_level + 1) + [2 * fs, 4 * fs, 8 * fs]
        skip_in = [in_channels] + ([dims[0]] if self.stem_level else []) + list(dims[1:3])
        if not self.stem_level:
            skip_in[0] += dims[0]
        levels = len(chans) - 1

        def basic(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm_name,
                                   res_block=True)

        self.skips = nn.ModuleList(basic(skip_in[k], chans[k]) for k in range(levels))
        self.bottleneck = basic(dims[3], chans[levels])
        self.ups = nn.ModuleList(
            UnetrUpBlock(3, chans[k + 1], chans[k], kernel_size=3, upsample_kernel_size=2,
                         norm_name=norm_name, res_block=True) for k in range(levels))
        self.out = UnetOutBlock(3, fs, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, *roi) -> logits (B, out_channels, *roi)."""
        s1, s2, s3, tokens = self.encoder.forward_features(x)
        level0 = x if self.stem_level else torch.cat([x, s1], dim=1)
        inputs = [level0] + ([s1] if self.stem_level else []) + [s2, s3]
        h = self.bottleneck(tokens)
        for k in reversed(range(len(self.ups))):
            h = self.ups[k](h, self.skips[k](inputs[k]))
        return self.out(h)


class _UNETR(UNETR):
    """MONAI 1.6 ``UNETR`` with a configurable ViT depth and patch size 8 or 16.

    MONAI fixes depth 12 and patch 16; both are rebuilt here when they differ. Skips tap the
    outputs of blocks ``d/4, d/2, 3d/4`` (0-based; MONAI's 3, 6, 9 for d = 12). For patch 8 the
    tokens sit at R/8, so the R/8 skip (``encoder4``) and its up block (``decoder5``) drop out
    and ``encoder2/3`` upsample 4x / 2x.
    """

    def __init__(self, *, in_channels: int, out_channels: int, roi: tuple[int, int, int],
                 patch_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 mlp_dim: int, feature_size: int) -> None:
        # MONAI checks img_size against its fixed patch 16; the ViT is rebuilt below anyway
        monai_roi = tuple(16 * math.ceil(r / 16) for r in roi)
        super().__init__(in_channels=in_channels, out_channels=out_channels, img_size=monai_roi,
                         feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim,
                         num_heads=num_heads, proj_type="conv", norm_name="instance",
                         res_block=True, qkv_bias=True)  # MAE/mim3d ViTs have a qkv bias
        if num_layers != 12 or patch_size != 16 or monai_roi != roi:
            self.vit = ViT(in_channels=in_channels, img_size=roi, patch_size=patch_size,
                           hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers,
                           num_heads=num_heads, proj_type="conv", classification=False,
                           qkv_bias=True)
            self.num_layers = num_layers
            self.patch_size = (patch_size,) * 3
            self.feat_size = tuple(r // patch_size for r in roi)
            self.proj_view_shape = [*self.feat_size, hidden_size]
        # token grid under the name mim3d encoders use (mim3d.transfer reads it to fit
        # position tables to a non-cubic roi)
        self.vit.grid = tuple(self.feat_size)
        if patch_size == 8:
            kw = {"spatial_dims": 3, "kernel_size": 3, "stride": 1, "upsample_kernel_size": 2,
                  "norm_name": "instance", "conv_block": True, "res_block": True}
            self.encoder2 = UnetrPrUpBlock(in_channels=hidden_size, out_channels=2 * feature_size,
                                           num_layer=1, **kw)
            self.encoder3 = UnetrPrUpBlock(in_channels=hidden_size, out_channels=4 * feature_size,
                                           num_layer=0, **kw)
            self.encoder4 = None
            self.decoder5 = None
            self.decoder4 = UnetrUpBlock(3, hidden_size, 4 * feature_size, kernel_size=3,
                                         upsample_kernel_size=2, norm_name="instance",
                                         res_block=True)
        self.taps = tuple(num_layers * q // 4 for q in (1, 2, 3))

    def forward(self, x_in: Tensor) -> Tensor:
        """(B, C, *roi) -> logits (B, out_channels, *roi)."""
        x, hidden = self.vit(x_in)
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(self.proj_feat(hidden[self.taps[0]]))
        enc3 = self.encoder3(self.proj_feat(hidden[self.taps[1]]))
        dec = self.proj_feat(x)
        if self.decoder5 is not None:
            dec = self.decoder5(dec, self.encoder4(self.proj_feat(hidden[self.taps[2]])))
        dec = self.decoder3(self.decoder4(dec, enc3), enc2)
        return self.out(self.decoder2(dec, enc1))


def build_unetr(*, in_channels: int, out_channels: int, roi: Sequence[int], patch_size: int = 16,
                hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                mlp_dim: int = 3072, feature_size: int = 16) -> UNETR:
    """MONAI ``UNETR`` whose ``vit`` matches a mim3d ``ViTEncoder`` of the same sizes.

    The ViT is built with a conv patch embedding, qkv bias, no class token and MONAI's
    learnable position embedding (filled by :func:`mim3d.transfer.load_encoder_into`). Skip taps
    and the patch-8 variant: see :class:`_UNETR`; depth 12 / patch 16 computes exactly MONAI's UNETR.

    Args:
        in_channels: image channels.
        out_channels: segmentation classes.
        roi: (D, H, W), each divisible by ``patch_size``.
        patch_size: 8 or 16.
        hidden_size, num_layers, num_heads, mlp_dim: the ViT's (``dim``, ``depth``,
            ``num_heads``, ``dim * mlp_ratio`` of ``ViTEncoder``).
        feature_size: UNETR decoder width.

    Returns:
        A ``UNETR`` instance; ``forward`` maps (B, C, *roi) -> (B, out_channels, *roi).
    """
    if patch_size not in (8, 16):
        raise ValueError(f"build_unetr supports patch_size 8 or 16, got {patch_size}")
    roi = check_roi(roi, patch_size, f"patch_size {patch_size}")
    if num_layers < 4:
        raise ValueError(f"num_layers must be >= 4 (skips tap d/4, d/2, 3d/4), got {num_layers}")
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if min(in_channels, out_channels, mlp_dim, feature_size) < 1:
        raise ValueError("in_channels, out_channels, mlp_dim and feature_size must be >= 1, got "
                         f"{(in_channels, out_channels, mlp_dim, feature_size)}")
    return _UNETR(in_channels=in_channels, out_channels=out_channels, roi=roi,
                  patch_size=patch_size, hidden_size=hidden_size, num_layers=num_layers,
                  num_heads=num_heads, mlp_dim=mlp_dim, feature_size=feature_size)


def build_swinunetr(*, in_channels: int, out_channels: int, feature_size: int = 48,
                    depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                    drop_path_rate: float = 0.0, use_checkpoint: bool = False,
                    use_v2: bool = False) -> SwinUNETR:
    """MONAI ``SwinUNETR`` (MONAI 1.6 takes no ``img_size``); its ``swinViT`` takes a
    ``swin-ssl`` pre-trained encoder.

    Inputs must have every side divisible by 32 (patch 2, then four 2x merges) and more than
    one voxel at R/32 (the instance norm of its bottleneck fails on a single voxel), e.g. not
    32^3; 32 x 32 x 64 is the smallest usable.

    Args:
        in_channels: image channels.
        out_channels: segmentation classes.
        feature_size: embedding width, a multiple of 12 (MONAI's requirement).
        depths, num_heads: Swin stages.
        drop_path_rate: stochastic depth.
        use_checkpoint: gradient checkpointing.
        use_v2: SwinUNETR-V2 residual conv blocks.

    Returns:
        ``SwinUNETR``: (B, in_channels, D, H, W) -> (B, out_channels, D, H, W).
    """
    if feature_size < 12 or feature_size % 12:
        raise ValueError(f"feature_size must be a positive multiple of 12, got {feature_size}")
    if min(in_channels, out_channels) < 1:
        raise ValueError(f"in/out_channels must be >= 1, got {(in_channels, out_channels)}")
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, depths=tuple(depths),
                     num_heads=tuple(num_heads), feature_size=feature_size,
                     dropout_path_rate=drop_path_rate, use_checkpoint=use_checkpoint,
                     use_v2=use_v2)


class MiMClassifier(nn.Module):
    """Hybrid encoder (unmasked) -> mean of the final tokens -> MLP head.

    Args:
        in_channels: image channels.
        num_classes: output logits.
        roi: (D, H, W) input size, each divisible by ``patch_size``.
        patch_size, dims, depths, num_heads, mlp_ratio, drop_path_rate, grad_checkpointing:
            the :class:`HybridEncoder`'s.
        hidden: head hidden width.
        dropout: head dropout before the last Linear.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int, roi: Sequence[int],
                 patch_size: int = 16, dims: Sequence[int] = (48, 96, 192, 384),
                 depths: Sequence[int] = (2, 2, 2, 11), num_heads: int = 12,
                 mlp_ratio: float = 4.0, hidden: int = 512, dropout: float = 0.0,
                 drop_path_rate: float = 0.0, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if num_classes < 1 or hidden < 1:
            raise ValueError(f"num_classes and hidden must be >= 1, got {(num_classes, hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        roi = check_roi(roi, patch_size, f"patch_size {patch_size}")
        self.encoder = HybridEncoder(in_channels=in_channels, input_size=roi,
                                     patch_size=patch_size, dims=dims, depths=depths,
                                     num_heads=num_heads, mlp_ratio=mlp_ratio,
                                     drop_path_rate=drop_path_rate,
                                     grad_checkpointing=grad_checkpointing)
        e = dims[3]
        self.head = nn.Sequential(nn.LayerNorm(e), nn.Linear(e, hidden), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, *roi) -> logits (B, num_classes)."""
        return self.head(self.encoder(x).mean(dim=1))
