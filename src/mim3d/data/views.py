"""Swin-UNETR SSL's view augmentation (Tang et al., CVPR 2022): two rotated, cut-out views.

Each view rotates every sample by a random multiple of 90 degrees in one plane (the label of the
rotation head), then replaces random boxes covering up to 30 % of it by noise (the inpainting
input); the rotated volume before cutout is the inpainting target. Every draw comes from one CPU
``torch.Generator``, so views are reproducible and a resumed run redraws them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SwinSSLViews", "cutout_mask", "make_two_views"]


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
