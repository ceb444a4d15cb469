"""Swin-UNETR's self-supervised pre-training model (Tang et al., CVPR 2022), the Table XI baseline.

Built on MONAI's public ``SwinTransformer`` with exactly the encoder that MONAI's ``SwinUNETR``
builds for ``feature_size=48`` (embed 48, window 7, patch 2, depths (2, 2, 2, 2), heads
(3, 6, 12, 24), no patch norm, "merging" downsampling, LayerNorm-ed stage outputs). The encoder
sits under the attribute ``swinViT``, as in ``SwinUNETR``, so ``model.swinViT.state_dict()``
loads strictly into ``SwinUNETR(feature_size=48).swinViT``.

Three proxy tasks share the bottleneck (768 @ /32, i.e. 3^3 tokens at 96^3):

* rotation: Linear(768 -> 4) on one bottleneck token, CE against the 0/90/180/270 degree label;
* contrastive: Linear(768 -> 512) on another bottleneck token, NT-Xent between two views;
* inpainting: a convolutional decoder, five stages of Conv3d 3^3 (halving channels) +
  InstanceNorm + LeakyReLU + x2 trilinear upsampling (768 -> 384 -> 192 -> 96 -> 48 -> 24, /32 ->
  full size), then a 1^3 Conv3d to the input channels; L1 against the un-cut view.

Token choice: the authors read the rotation logits from bottleneck token 0 and the contrastive
embedding from token 1 (``head_pool="token"``, the default, to reproduce their baseline);
``head_pool="mean"`` uses the global average instead. The cost of either is negligible next to
the encoder and decoder.

The losses (:func:`mim3d.losses.swin_ssl_loss`, :func:`mim3d.losses.nt_xent`) and the two-view
augmentation (:func:`mim3d.data.views.make_two_views`) live with the other losses and data code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from monai.networks.nets.swin_unetr import SwinTransformer
from torch import Tensor, nn

__all__ = ["InpaintingDecoder", "SwinSSL", "SwinSSLOutput", "swin_encoder", "swin_feature_size"]

_DOWNSCALE = 32  # patch 2 x four 2x merges: the bottleneck is input / 32


def swin_feature_size(width: int) -> int:
    """The Swin embedding width of a model size: ``width`` (the hybrid encoder's first stage,
    ``model.dims[0]``) rounded up to a multiple of 12, as SwinUNETR requires (48 -> 48, 16 -> 24).
    Pre-training and the downstream SwinUNETR both use it, so their encoders match."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return 12 * -(-int(width) // 12)


def swin_encoder(*, in_channels: int = 1, feature_size: int = 48) -> SwinTransformer:
    """MONAI's ``SwinTransformer`` exactly as ``SwinUNETR`` builds it (its ``swinViT``).

    Args:
        in_channels: image channels.
        feature_size: embedding width, a positive multiple of 12.

    Returns:
        The encoder; ``forward(x, normalize=True)`` gives five feature maps, the last at /32.
    """
    if feature_size < 12 or feature_size % 12:
        raise ValueError(f"feature_size must be a positive multiple of 12, got {feature_size}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return SwinTransformer(
        in_chans=in_channels, embed_dim=feature_size, window_size=(7, 7, 7),
        patch_size=(2, 2, 2), depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), mlp_ratio=4.0,
        qkv_bias=True, norm_layer=nn.LayerNorm, patch_norm=False, spatial_dims=3,
        downsample="merging")


@dataclass
class SwinSSLOutput:
    """Output of :class:`SwinSSL` for one view.

    Attributes:
        rotation: (B, rotation_classes) rotation logits.
        contrastive: (B, contrastive_dim) un-normalised embedding.
        reconstruction: (B, C, D, H, W) inpainted volume.
    """

    rotation: Tensor
    contrastive: Tensor
    reconstruction: Tensor


class InpaintingDecoder(nn.Module):
    """Conv3d-IN-LeakyReLU-upsample stages from the bottleneck back to the input size.

    Args:
        in_channels: bottleneck channels (768 for feature size 48).
        out_channels: image channels.
        stages: number of x2 stages (5 undoes the /32 of the Swin encoder).
    """

    def __init__(self, in_channels: int, out_channels: int, stages: int = 5) -> None:
        super().__init__()
        if in_channels % 2**stages:
            raise ValueError(f"in_channels={in_channels} must be divisible by 2**{stages}")
        layers: list[nn.Module] = []
        ch = in_channels
        for _ in range(stages):
            layers += [nn.Conv3d(ch, ch // 2, 3, padding=1), nn.InstanceNorm3d(ch // 2),
                       nn.LeakyReLU(), nn.Upsample(scale_factor=2, mode="trilinear")]
            ch //= 2
        layers.append(nn.Conv3d(ch, out_channels, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, d, h, w) -> (B, out_channels, d * 2**stages, h * 2**stages, w * 2**stages)."""
        return self.layers(x)


class SwinSSL(nn.Module):
    """Swin ViT + rotation, contrastive and inpainting heads (Tang et al., CVPR 2022).

    Args:
        in_channels: image channels C.
        img_size: (D, H, W) the model is built for; each divisible by 32, at least 2 voxels at
            /32 in total. Only validated (the Swin encoder itself is size-agnostic), so a wrong
            input size fails early and clearly.
        feature_size: Swin embedding width (48 in the paper; divisible by 12 as in SwinUNETR).
        rotation_classes: rotation labels (4: 0/90/180/270 degrees).
        contrastive_dim: width of the contrastive embedding.
        head_pool: ``"token"`` (authors: token 0 -> rotation, token 1 -> contrastive) or
            ``"mean"`` (global average of the bottleneck for both).
    """

    def __init__(self, *, in_channels: int = 1, img_size: Sequence[int] = (96, 96, 96),
                 feature_size: int = 48, rotation_classes: int = 4, contrastive_dim: int = 512,
                 head_pool: str = "token") -> None:
        super().__init__()
        # in_channels and feature_size are checked by swin_encoder below
        self._validate(img_size, rotation_classes, contrastive_dim, head_pool)
        self.in_channels = in_channels
        self.img_size = tuple(int(s) for s in img_size)
        self.head_pool = head_pool
        self.swinViT = swin_encoder(in_channels=in_channels, feature_size=feature_size)
        dim = feature_size * 16
        self.rotation_head = nn.Linear(dim, rotation_classes)
        self.contrastive_head = nn.Linear(dim, contrastive_dim)
        self.decoder = InpaintingDecoder(dim, in_channels)

    @staticmethod
    def _validate(img_size: Sequence[int], rotation_classes: int, contrastive_dim: int,
                  head_pool: str) -> None:
        if len(img_size) != 3 or any(int(s) < _DOWNSCALE or int(s) % _DOWNSCALE
                                     for s in img_size):
            raise ValueError(f"img_size {tuple(img_size)} must be 3 sizes divisible by 32")
        if rotation_classes < 2 or contrastive_dim < 1:
            raise ValueError(f"need rotation_classes >= 2 and contrastive_dim >= 1, got "
                             f"{rotation_classes}, {contrastive_dim}")
        if head_pool not in ("token", "mean"):
            raise ValueError(f"head_pool must be 'token' or 'mean', got {head_pool!r}")
        n_tokens = 1
        for s in img_size:
            n_tokens *= int(s) // _DOWNSCALE
        if n_tokens < 2:  # token heads need tokens 0 and 1; InstanceNorm needs >= 2 voxels
            raise ValueError(f"img_size {tuple(img_size)} gives {n_tokens} bottleneck voxel at "
                             "/32; need >= 2 (e.g. 32x32x64 or 64^3)")

    def forward(self, x: Tensor) -> SwinSSLOutput:
        """Run one (augmented) view.

        Args:
            x: (B, C, D, H, W) with (D, H, W) == ``img_size``.

        Returns:
            :class:`SwinSSLOutput` with rotation (B, 4), contrastive (B, 512) and
            reconstruction (B, C, D, H, W).
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected input (B, {self.in_channels}, *{self.img_size}), "
                             f"got {tuple(x.shape)}")
        bottleneck = self.swinViT(x.contiguous(), normalize=True)[4]  # (B, 16F, D/32, H/32, W/32)
        tokens = bottleneck.flatten(2).transpose(1, 2)  # (B, n, 16F), raster order
        if self.head_pool == "token":
            rot_in, con_in = tokens[:, 0], tokens[:, 1]
        else:
            rot_in = con_in = tokens.mean(dim=1)
        return SwinSSLOutput(rotation=self.rotation_head(rot_in),
                             contrastive=self.contrastive_head(con_in),
                             reconstruction=self.decoder(bottleneck))
