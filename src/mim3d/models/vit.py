"""Plain 3D ViT encoder (MAE3D baseline; the "MiM + UNETR" encoder).

Parameter names map 1:1 onto MONAI 1.6's ``monai.networks.nets.ViT`` (and so onto
``UNETR.vit``), with identical shapes and identical computation:

=========================================  =========================================
mim3d ``ViTEncoder``                        MONAI ``ViT`` (``UNETR``: prefix ``vit.``)
=========================================  =========================================
patch_embedding.patch_embeddings.{w,b}      patch_embedding.patch_embeddings.{w,b}
patch_embedding.position_embeddings         patch_embedding.position_embeddings
blocks.i.norm1 / norm2                      blocks.i.norm1 / norm2
blocks.i.attn.qkv / attn.out_proj           blocks.i.attn.qkv / attn.out_proj
blocks.i.mlp.linear1 / mlp.linear2          blocks.i.mlp.linear1 / mlp.linear2
norm                                        norm
=========================================  =========================================

Build the MONAI side with ``proj_type="conv"``, ``qkv_bias=True`` (MAE uses a qkv bias; MONAI's
default is False), ``hidden_size=dim``, ``mlp_dim=int(dim * mlp_ratio)``, ``num_layers=depth``,
``num_heads``, ``dropout_rate=0``, ``classification=False``. Load with ``strict=False``: MONAI's
blocks also hold an unused ``norm_cross_attn`` LayerNorm that mim3d does not have; those keys
are the only missing ones. LayerNorm eps is MONAI's 1e-5, so outputs match too.
The position embedding here is a fixed sin-cos buffer (raster token order over (D, H, W), as
MONAI's conv patch embedding flattens); it overrides whatever MONAI initialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mim3d.models.layers import TransformerBlock, init_weights, run_grouped, sincos_pos_embed_3d

__all__ = ["PatchEmbedding", "ViTEncoder"]

_NORM_EPS = 1e-5  # MONAI's nn.LayerNorm default, so a mapped MONAI ViT computes the same thing


class PatchEmbedding(nn.Module):
    """Conv3d patch embedding plus a fixed sin-cos position embedding.

    Args:
        in_channels: image channels.
        grid: token grid (g0, g1, g2).
        patch_size: patch edge in voxels.
        dim: token width.
    """

    def __init__(self, in_channels: int, grid: tuple[int, int, int], patch_size: int,
                 dim: int) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv3d(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("position_embeddings", sincos_pos_embed_3d(grid, dim))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, N, dim) tokens in raster order, position embedding added."""
        return self.patch_embeddings(x).flatten(2).transpose(1, 2) + self.position_embeddings


def _select(tokens: Tensor, index: Tensor, rows: Tensor | None) -> Tensor:
    """Tokens (B, N, E) -> (M, K, E) at ``index`` (M, K) of volumes ``rows`` (default 0..M-1)."""
    if rows is None:
        return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return tokens[rows.unsqueeze(1), index]


class ViTEncoder(nn.Module):
    """Plain 3D vision transformer, ViT-B/16 by default.

    Args:
        in_channels: image channels.
        input_size: (D, H, W), each divisible by ``patch_size``.
        patch_size: patch edge in voxels.
        dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP expansion.
        qkv_bias: bias on the fused qkv projection (MAE: True).
        grad_checkpointing: recompute blocks in backward to save memory.

    Attributes:
        grid: token grid (g0, g1, g2).
        num_tokens: g0*g1*g2.
        embed_dim: ``dim``.
    """

    def __init__(self, *, in_channels: int = 1, input_size: Sequence[int] = (96, 96, 96),
                 patch_size: int = 16, dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if patch_size < 1 or len(input_size) != 3 or any(s < 1 or s % patch_size
                                                         for s in input_size):
            raise ValueError(f"input_size {tuple(input_size)} must be 3 positive ints divisible"
                             f" by patch_size {patch_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        self.in_channels = in_channels
        self.input_size = tuple(int(s) for s in input_size)
        self.patch_size = patch_size
        self.grid: tuple[int, int, int] = tuple(s // patch_size for s in self.input_size)
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.embed_dim = dim
        self.grad_checkpointing = grad_checkpointing
        self.patch_embedding = PatchEmbedding(in_channels, self.grid, patch_size, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_eps=_NORM_EPS)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=_NORM_EPS)
        self.apply(init_weights)

    def _embed(self, x: Tensor, ids_keep: Tensor | None) -> Tensor:
        self._check_input(x)
        tokens = self.patch_embedding(x)
        if ids_keep is None:
            return tokens
        self._check_ids(ids_keep, x.shape[0])
        return _select(tokens, ids_keep, None)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"expected input (B, {self.in_channels}, *{self.input_size}), "
                             f"got {tuple(x.shape)}")

    @staticmethod
    def _check_ids(ids_keep: Tensor, batch: int) -> None:
        if ids_keep.ndim != 2 or ids_keep.shape[0] != batch or ids_keep.dtype != torch.long:
            raise ValueError(f"ids_keep must be Long (B={batch}, N_vis), "
                             f"got {ids_keep.dtype} {tuple(ids_keep.shape)}")

    def _transform(self, tokens: Tensor) -> Tensor:
        for i in range(len(self.blocks)):
            tokens = self._block(i, tokens)
        return self.norm(tokens)

    def _block(self, i: int, tokens: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.blocks[i], tokens, use_reentrant=False)
        return self.blocks[i](tokens)

    def forward(self, x: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """Encode a batch of volumes.

        Args:
            x: (B, C, D, H, W) of size ``input_size``.
            ids_keep: optional (B, N_vis) Long raster indices of visible tokens; None = all.

        Returns:
            (B, N_vis, dim) in ``ids_keep`` order, or (B, N, dim); final LayerNorm applied.
        """
        return self._transform(self._embed(x, ids_keep))

    def forward_levels(self, x: Tensor, ids_keep: Sequence[Tensor]) -> list[Tensor]:
        """Encode volumes of several mask groups: one patch embedding over all of them, one
        transformer pass per group of equal visible count.

        Args:
            x: (sum B_l, C, D, H, W) the groups' volumes stacked in order.
            ids_keep: per group (B_l, N_l) Long visible-token indices.

        Returns:
            Per group (B_l, N_l, dim).
        """
        self._check_input(x)
        if sum(k.shape[0] for k in ids_keep) != x.shape[0]:
            raise ValueError(f"ids_keep cover {[k.shape[0] for k in ids_keep]} volumes, the "
                             f"input has {x.shape[0]}")
        for k in ids_keep:
            self._check_ids(k, k.shape[0])
        tokens = self.patch_embedding(x)
        return run_grouped(ids_keep,
                           lambda index, rows: self._transform(_select(tokens, index, rows)))

    def forward_features(self, x: Tensor, layers: Sequence[int] | None = None) -> list[Tensor]:
        """Unmasked hidden states of selected blocks, as maps for a UNETR-style decoder.

        Args:
            x: (B, C, D, H, W).
            layers: 1-based block indices; default (d/4, d/2, 3d/4, d) (each >= 1), i.e.
                (3, 6, 9, 12) for depth 12 as in the UNETR paper. (MONAI's UNETR instead taps
                0-based ``hidden_states_out[3, 6, 9]``, i.e. blocks 4, 7, 10.) The last block's
                output, if selected, gets the final LayerNorm, as UNETR's bottleneck does.

        Returns:
            One (B, dim, g0, g1, g2) map per entry of ``layers``.
        """
        depth = len(self.blocks)
        if layers is None:
            layers = tuple(max(1, depth * q // 4) for q in (1, 2, 3, 4))
        layers = tuple(layers)
        if not layers or any(i < 1 or i > depth for i in layers):
            raise ValueError(f"layers must be 1-based block indices in [1, {depth}], got {layers}")
        tokens = self._embed(x, None)
        states = []
        for i in range(depth):
            tokens = self._block(i, tokens)
            states.append(tokens)
        states[-1] = self.norm(states[-1])
        b = x.shape[0]
        return [states[i - 1].transpose(1, 2).reshape(b, -1, *self.grid) for i in layers]
