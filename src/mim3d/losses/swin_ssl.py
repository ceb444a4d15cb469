"""Loss of the Swin-UNETR self-supervised baseline (Tang et al., CVPR 2022).

Rotation cross-entropy + NT-Xent contrastive + L1 inpainting over two augmented views. A pure
function of tensors; it reads the three SSL heads of :class:`SwinSSLOutputLike` and never
imports the model code.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SwinSSLOutputLike", "nt_xent", "swin_ssl_loss"]


class SwinSSLOutputLike(Protocol):
    """What :func:`swin_ssl_loss` reads from one view's Swin-UNETR SSL output."""

    rotation: Tensor  # (B, R) rotation logits
    contrastive: Tensor  # (B, P) un-normalised embedding
    reconstruction: Tensor  # (B, C, D, H, W) inpainted volume



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


def swin_ssl_loss(out1: SwinSSLOutputLike, out2: SwinSSLOutputLike, rot_targets1: Tensor,
                  rot_targets2: Tensor, x1: Tensor, x2: Tensor, *, temperature: float = 0.5,
                  weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, Tensor]:
    """Total Swin-UNETR SSL loss (Tang et al., CVPR 2022): rotation CE + NT-Xent + L1 inpainting.

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
