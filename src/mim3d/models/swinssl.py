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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import Tensor, nn

__all__ = [
    "InpaintingDecoder",
    "SwinSSL",
    "SwinSSLOutput",
    "SwinSSLViews",
    "cutout_mask",
    "make_two_views",
    "nt_xent",
    "swin_encoder",
    "swin_feature_size",
    "swin_ssl_loss",
]

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
        self._validate(in_channels, img_size, feature_size, rotation_classes, contrastive_dim,
                       head_pool)
        self.in_channels = in_channels
        self.img_size = tuple(int(s) for s in img_size)
        self.head_pool = head_pool
        self.swinViT = swin_encoder(in_channels=in_channels, feature_size=feature_size)
        dim = feature_size * 16
        self.rotation_head = nn.Linear(dim, rotation_classes)
        self.contrastive_head = nn.Linear(dim, contrastive_dim)
        self.decoder = InpaintingDecoder(dim, in_channels)

    @staticmethod
    def _validate(in_channels: int, img_size: Sequence[int], feature_size: int,
                  rotation_classes: int, contrastive_dim: int, head_pool: str) -> None:
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if len(img_size) != 3 or any(int(s) < _DOWNSCALE or int(s) % _DOWNSCALE
                                     for s in img_size):
            raise ValueError(f"img_size {tuple(img_size)} must be 3 sizes divisible by 32")
        if feature_size < 12 or feature_size % 12:
            raise ValueError(f"feature_size must be a positive multiple of 12, got {feature_size}")
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


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR) loss between two views of the same B samples.

    Each of the 2B embeddings has its other view as the positive and the remaining 2B - 2 as
    negatives; the loss is the mean over all 2B anchors of
    ``-log(exp(s_pos / t) / sum_{k != anchor} exp(s_k / t))`` with cosine similarities ``s``.
    With B = 1 there are no negatives and the loss is exactly 0.

    Args:
        z1: (B, P) embeddings of view 1.
        z2: (B, P) embeddings of view 2.
        temperature: t > 0.

    Returns:
        Scalar float32 tensor.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1, z2 must both be (B, P), got {tuple(z1.shape)}, {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # an anchor is not its own negative
    target = (torch.arange(2 * b, device=z.device) + b) % (2 * b)
    return F.cross_entropy(logits, target)


def swin_ssl_loss(out1: SwinSSLOutput, out2: SwinSSLOutput, rot_targets1: Tensor,
                  rot_targets2: Tensor, x1: Tensor, x2: Tensor, *, temperature: float = 0.5,
                  weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, Tensor]:
    """Total Swin-UNETR SSL loss: rotation CE + NT-Xent contrast + L1 inpainting.

    Args:
        out1, out2: model outputs of the two augmented views.
        rot_targets1, rot_targets2: (B,) Long rotation labels of the views.
        x1, x2: (B, C, D, H, W) inpainting targets (the rotated views *before* cutout).
        temperature: NT-Xent temperature (0.5 in the paper).
        weights: (rotation, contrastive, reconstruction) weights (all 1 in the paper).

    Returns:
        ``{"loss", "rotation", "contrastive", "reconstruction"}`` scalar float32 tensors. The
        rotation CE and the L1 are means over both views (all samples, all voxels).
    """
    rot = F.cross_entropy(torch.cat([out1.rotation, out2.rotation]).float(),
                          torch.cat([rot_targets1, rot_targets2]))
    con = nt_xent(out1.contrastive, out2.contrastive, temperature)
    rec = F.l1_loss(torch.cat([out1.reconstruction, out2.reconstruction]).float(),
                    torch.cat([x1, x2]).float())
    total = weights[0] * rot + weights[1] * con + weights[2] * rec
    return {"loss": total, "rotation": rot, "contrastive": con, "reconstruction": rec}


@dataclass
class SwinSSLViews:
    """Two augmented views of a batch (index 0 and 1 of every tuple).

    Attributes:
        inputs: (B, C, D, H, W) rotated views with cutout regions replaced by noise.
        targets: (B, C, D, H, W) rotated views before cutout (the inpainting targets).
        rotations: (B,) Long labels k: the view is ``rot90(x, k)`` in ``plane``.
        masks: (B, 1, D, H, W) bool, True where the view was cut out.
    """

    inputs: tuple[Tensor, Tensor]
    targets: tuple[Tensor, Tensor]
    rotations: tuple[Tensor, Tensor]
    masks: tuple[Tensor, Tensor]


def cutout_mask(size: Sequence[int], generator: torch.Generator, *, max_ratio: float = 0.3,
                min_ratio: float = 0.1, box_fraction: tuple[float, float] = (0.125, 0.25),
                max_boxes: int = 200) -> Tensor:
    """Union of random boxes covering a random share of a volume (inner cutout).

    A target share is drawn uniformly in [min_ratio, max_ratio]; boxes with edges drawn
    uniformly in ``box_fraction`` of each side are added until the share is reached. A box that
    would push the share above ``max_ratio`` is skipped, so the cut-out share never exceeds it
    (the paper: "masked volume ratio up to 30%").

    Args:
        size: (D, H, W).
        generator: CPU random source.
        max_ratio, min_ratio: bounds of the cut-out share.
        box_fraction: (lo, hi) box edge as a fraction of each side.
        max_boxes: box draws before giving up on reaching the target share.

    Returns:
        (D, H, W) bool, True = cut out.
    """
    if not 0.0 <= min_ratio <= max_ratio < 1.0:
        raise ValueError(f"need 0 <= min_ratio <= max_ratio < 1, got {min_ratio}, {max_ratio}")
    dims = [int(s) for s in size]
    mask = torch.zeros(dims, dtype=torch.bool)
    target = min_ratio + (max_ratio - min_ratio) * float(torch.rand((), generator=generator))
    limit = int(max_ratio * mask.numel())
    lo = [max(1, int(box_fraction[0] * s)) for s in dims]
    hi = [max(l, min(s, int(box_fraction[1] * s))) for l, s in zip(lo, dims)]
    covered = 0
    for _ in range(max_boxes):
        if covered >= target * mask.numel():
            break
        edges = [int(torch.randint(a, b + 1, (), generator=generator)) for a, b in zip(lo, hi)]
        starts = [int(torch.randint(0, s - e + 1, (), generator=generator))
                  for s, e in zip(dims, edges)]
        box = tuple(slice(a, a + e) for a, e in zip(starts, edges))
        added = int((~mask[box]).sum())
        if covered + added > limit:
            continue
        mask[box] = True
        covered += added
    return mask


def _one_view(x: Tensor, generator: torch.Generator, plane: tuple[int, int],
              ratio: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rotate each sample by a random multiple of 90 degrees, then cut out random boxes."""
    b = x.shape[0]
    ks = torch.randint(0, 4, (b,), generator=generator)
    target = torch.stack([torch.rot90(x[i], int(ks[i]), dims=(plane[0] - 1, plane[1] - 1))
                          for i in range(b)])
    masks = torch.stack([cutout_mask(x.shape[2:], generator, min_ratio=ratio[0],
                                     max_ratio=ratio[1])
                         for _ in range(b)]).unsqueeze(1).to(x.device)
    # noise uniform in each sample's own intensity range, so a cut-out box is not trivially flat
    lo = target.amin(dim=(1, 2, 3, 4), keepdim=True)
    hi = target.amax(dim=(1, 2, 3, 4), keepdim=True)
    noise = torch.rand(target.shape, generator=generator).to(x.device, x.dtype)
    inputs = torch.where(masks, lo + (hi - lo) * noise, target)
    return inputs, target, ks.to(x.device), masks


def make_two_views(x: Tensor, generator: torch.Generator, *, plane: tuple[int, int] = (3, 4),
                   cutout_ratio: tuple[float, float] = (0.1, 0.3)) -> SwinSSLViews:
    """Two independently rotated and cut-out views of a batch (Tang et al.'s augmentation).

    Args:
        x: (B, C, D, H, W) volumes (any device; random draws use the CPU ``generator``).
        generator: the only random source, so views are reproducible.
        plane: the two axes of ``x`` rotated in; the default (H, W) is the axial plane of a
            RAS volume stored (D, H, W) = (z, y, x). Both sides must be equal.
        cutout_ratio: (min, max) share of each view that is cut out (see :func:`cutout_mask`).

    Returns:
        :class:`SwinSSLViews`.
    """
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, D, H, W), got {tuple(x.shape)}")
    if sorted(plane) not in ([2, 3], [2, 4], [3, 4]) or x.shape[plane[0]] != x.shape[plane[1]]:
        raise ValueError(f"plane {plane} must be two spatial axes of equal size; x is "
                         f"{tuple(x.shape)}")
    v1 = _one_view(x, generator, plane, cutout_ratio)
    v2 = _one_view(x, generator, plane, cutout_ratio)
    return SwinSSLViews(inputs=(v1[0], v2[0]), targets=(v1[1], v2[1]),
                        rotations=(v1[2], v2[2]), masks=(v1[3], v2[3]))
