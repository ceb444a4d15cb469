"""A MiM network that nnU-Net v2 builds from its plans (``architecture.network_class_name``).

nnU-Net locates the class by dotted path and calls it with ``input_channels``, ``num_classes``,
``deep_supervision`` and the plain JSON values of ``arch_kwargs``; its trainer then toggles
``network.decoder.deep_supervision`` and derives the deep-supervision target scales from
``arch_kwargs["strides"]`` (``1 / cumprod(strides)``, all but the coarsest). This network is
:class:`~mim3d.models.downstream.MiMUNETR` (the hybrid encoder, unmasked, plus its
SwinUNETR-style CNN decoder) regrouped into ``encoder`` and ``decoder``, with one 1x1x1
segmentation head per decoder level under ``decoder.seg_layers`` (the keys nnU-Net's
``-pretrained_weights`` loader skips, so a weights file is independent of the class count).

Decoder levels sit at ``R / 2^k``, ``k = 0 .. n-1`` (``n = 4`` for patch 16, ``3`` for patch 8)
and the bottleneck (token map) at ``R / 2^n``; so ``strides`` is ``[[1, 1, 1]] + n * [[2, 2,
2]]`` and deep supervision returns ``n`` logit maps, finest first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock
from torch import Tensor, nn

from mim3d.models.downstream import MiMUNETR

__all__ = ["MiMUNetDecoder", "MiMnnUNet", "decoder_strides"]


def decoder_strides(patch_size: int) -> list[list[int]]:
    """nnU-Net ``strides`` of the network for encoder token size ``patch_size`` (8 or 16)."""
    if patch_size not in (8, 16):
        raise ValueError(f"MiMnnUNet supports encoder patch_size 8 or 16, got {patch_size}")
    levels = 3 + int(math.log2(patch_size // 8))
    return [[1, 1, 1]] + [[2, 2, 2] for _ in range(levels)]


class MiMUNetDecoder(nn.Module):
    """The CNN decoder of a :class:`MiMUNETR` with a segmentation head on every level.

    Args:
        unetr: the network whose ``skips``, ``bottleneck``, ``ups`` and ``out`` are taken over
            (``out`` becomes ``seg_layers[0]``).
        feature_size: its decoder width fs.
        num_classes: logit channels of every head.
        deep_supervision: return every level's logits (finest first) instead of the finest.
    """

    def __init__(self, unetr: MiMUNETR, *, feature_size: int, num_classes: int,
                 deep_supervision: bool = False) -> None:
        super().__init__()
        self.stem_level = unetr.stem_level
        self.skips, self.bottleneck, self.ups = unetr.skips, unetr.bottleneck, unetr.ups
        chans = [feature_size] * (self.stem_level + 1) + [2 * feature_size, 4 * feature_size]
        self.seg_layers = nn.ModuleList(
            [unetr.out] + [UnetOutBlock(3, chans[k], num_classes) for k in range(1, len(self.ups))])
        self.deep_supervision = deep_supervision

    def forward(self, x: Tensor, features: Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Decode the encoder's multi-scale features.

        Args:
            x: (B, C, D, H, W) network input (the level-0 skip).
            features: ``HybridEncoder.forward_features(x)``: stage 1-3 maps and the token map.

        Returns:
            (B, K, D, H, W) logits, or with deep supervision a list of ``len(ups)`` maps
            (B, K, D / 2^k, H / 2^k, W / 2^k), k = 0, 1, ...
        """
        s1, s2, s3, tokens = features
        level0 = x if self.stem_level else torch.cat([x, s1], dim=1)
        inputs = [level0] + ([s1] if self.stem_level else []) + [s2, s3]
        h, outputs = self.bottleneck(tokens), []
        for k in reversed(range(len(self.ups))):
            h = self.ups[k](h, self.skips[k](inputs[k]))
            if self.deep_supervision or k == 0:
                outputs.append(self.seg_layers[k](h))
        return outputs[::-1] if self.deep_supervision else outputs[-1]


class MiMnnUNet(nn.Module):
    """MiM hybrid encoder + U-Net decoder, built by nnU-Net v2 from plain ``arch_kwargs``.

    With ``deep_supervision`` off it computes exactly :class:`MiMUNETR` of the same weights.

    Args:
        input_channels: image channels (nnU-Net passes its dataset's channel count).
        num_classes: segmentation heads' channels (nnU-Net's ``num_segmentation_heads``).
        input_size: (D, H, W) patch size, each a multiple of ``patch_size``.
        patch_size: encoder token size, 8 or 16.
        dims, depths, num_heads, mlp_ratio, drop_path_rate, grad_checkpointing: the
            :class:`~mim3d.models.hybrid.HybridEncoder`'s.
        feature_size: decoder width fs.
        strides: nnU-Net's ``arch_kwargs["strides"]``; must equal :func:`decoder_strides`, as
            nnU-Net derives the deep-supervision targets from it.
        deep_supervision: initial state of ``decoder.deep_supervision``.
    """

    def __init__(self, *, input_channels: int, num_classes: int, input_size: Sequence[int],
                 patch_size: int = 16, dims: Sequence[int] = (48, 96, 192, 384),
                 depths: Sequence[int] = (2, 2, 2, 11), num_heads: int = 12,
                 mlp_ratio: float = 4.0, feature_size: int = 48, drop_path_rate: float = 0.0,
                 strides: Sequence[Sequence[int]] | None = None, deep_supervision: bool = False,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        expected = decoder_strides(patch_size)
        if strides is not None and [list(map(int, s)) for s in strides] != expected:
            raise ValueError(f"strides {[list(s) for s in strides]} do not match the network "
                             f"(patch_size {patch_size} needs {expected}); regenerate the plans "
                             "with `mim3d nnunet`")
        unetr = MiMUNETR(in_channels=input_channels, out_channels=num_classes, roi=input_size,
                         patch_size=patch_size, dims=dims, depths=depths, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, feature_size=feature_size,
                         drop_path_rate=drop_path_rate, grad_checkpointing=grad_checkpointing)
        self.encoder = unetr.encoder
        self.decoder = MiMUNetDecoder(unetr, feature_size=feature_size, num_classes=num_classes,
                                      deep_supervision=deep_supervision)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """(B, input_channels, *input_size) -> logits (B, num_classes, *input_size), or the
        deep-supervision list (finest first) while ``decoder.deep_supervision`` is on."""
        return self.decoder(x, self.encoder.forward_features(x))
