"""Light transformer decoder of MiM: visible tokens + mask tokens -> per-token voxel predictions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mim3d.models.layers import TransformerBlock, init_weights, sincos_pos_embed_3d

__all__ = ["DecoderOutput", "MaskedDecoder"]


@dataclass
class DecoderOutput:
    """Output of :class:`MaskedDecoder`.

    Attributes:
        pred: (B, N, out_dim) per-token predictions in raster token order.
        features: (B, N, dim) final-LayerNorm-ed decoder tokens (for cross-level alignment).
    """

    pred: Tensor
    features: Tensor


class MaskedDecoder(nn.Module):
    """MAE-style decoder: embed, insert mask tokens, unshuffle, add position, transformer blocks.

    Args:
        encoder_dim: width E of the encoder tokens.
        dim: decoder width.
        depth: number of transformer blocks.
        num_heads: attention heads (must divide ``dim``).
        grid: token grid (g0, g1, g2); N = g0*g1*g2.
        out_dim: prediction width per token (p^3 * channels; 4096 for 16^3 patches).
        mlp_ratio: MLP expansion.
        grad_checkpointing: recompute the blocks in backward (in training): the decoder sees
            every token of every level, so its blocks keep ~0.7 GiB per MiM base sample.
    """

    def __init__(self, *, encoder_dim: int, dim: int = 576, depth: int = 8, num_heads: int = 16,
                 grid: Sequence[int] = (6, 6, 6), out_dim: int = 4096,
                 mlp_ratio: float = 4.0, grad_checkpointing: bool = False) -> None:
        super().__init__()
        for name, value in (("encoder_dim", encoder_dim), ("dim", dim), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if len(grid) != 3 or any(g < 1 for g in grid):
            raise ValueError(f"grid must be 3 positive ints, got {tuple(grid)}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        self.grid: tuple[int, int, int] = tuple(int(g) for g in grid)
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.dim = dim
        self.grad_checkpointing = grad_checkpointing
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid, dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, norm_eps=1e-6) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def _unshuffle(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """Embed (B, N_vis, E), add mask tokens, put into raster order: (B, N, dim)."""
        b, m, _ = tokens.shape
        if ids_restore.shape != (b, self.num_tokens) or ids_restore.dtype != torch.long:
            raise ValueError(f"ids_restore must be Long (B={b}, N={self.num_tokens}), "
                             f"got {ids_restore.dtype} {tuple(ids_restore.shape)}")
        if m > self.num_tokens:
            raise ValueError(f"got {m} visible tokens for a grid of {self.num_tokens}")
        x = self.embed(tokens)
        x = torch.cat([x, self.mask_token.expand(b, self.num_tokens - m, -1)], dim=1)
        return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, self.dim))

    def _decode(self, x: Tensor) -> DecoderOutput:
        x = x + self.pos_embed
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        features = self.norm(x)
        return DecoderOutput(pred=self.pred(features), features=features)

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> DecoderOutput:
        """Decode.

        Args:
            tokens: (B, N_vis, E) encoder output for the visible tokens, in ``ids_keep`` order.
            ids_restore: (B, N) Long; ``cat([kept, masked])`` gathered by it is raster order.

        Returns:
            :class:`DecoderOutput` with pred (B, N, out_dim) and features (B, N, dim).
        """
        return self._decode(self._unshuffle(tokens, ids_restore))

    def forward_levels(self, tokens: Sequence[Tensor],
                       ids_restore: Sequence[Tensor]) -> DecoderOutput:
        """Decode several mask groups (different visible counts) in one pass over all tokens.

        Args:
            tokens: per group (B_l, N_l, E) encoder outputs.
            ids_restore: per group (B_l, N) Long.

        Returns:
            :class:`DecoderOutput` over the groups stacked in order: (sum B_l, N, ...).
        """
        return self._decode(torch.cat([self._unshuffle(t, r)
                                       for t, r in zip(tokens, ids_restore)]))
