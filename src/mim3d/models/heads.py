"""Projection heads for MiM's cross-level alignment.

Design choices (the paper only says "MLP" with width D = 2048):

* Two layers, ``Linear -> GELU -> Linear``: the smallest non-linear head, as in SimCLR/MoCo v3
  projection heads without their BatchNorm.
* No BatchNorm: one MiM sample yields 21 correlated volumes and per-GPU batches are tiny, so
  batch statistics would be noisy and couple the two sides of the contrast; it would also need
  SyncBN under DDP.
* No output normalisation: the InfoNCE loss uses cosine similarity, which normalises anyway.
"""

from __future__ import annotations

from torch import Tensor, nn

from mim3d.models.layers import init_weights

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Module):
    """Two-layer MLP projection head.

    Args:
        in_dim: input width (the decoder width, 576 for the base model).
        hidden_dim: hidden width.
        out_dim: output width.
    """

    def __init__(self, *, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        return self.fc2(self.act(self.fc1(x)))
