"""Building blocks shared by the mim3d encoders and decoder.

Layout convention: the public shape of a volume feature map is ``(B, C, D, H, W)``, but the
hybrid encoder keeps it in ``torch.channels_last_3d`` *memory*. A ``permute(0, 2, 3, 4, 1)`` of
such a tensor is then a free, contiguous ``(B, D, H, W, C)`` view, on which LayerNorm and 1x1x1
convolutions (stored as ``nn.Linear``) run as plain row-wise ops and large matmuls; only the
depthwise 5^3 convolution needs the channel-first view, and oneDNN / cuDNN have fast
channels-last depthwise kernels. This avoids every layout copy inside a conv block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mim3d.kernels.conv import DEPTHWISE_IMPLS, depthwise_conv3d

__all__ = [
    "DEPTHWISE_IMPLS",
    "ConvBlock",
    "DropPath",
    "Mlp",
    "SelfAttention",
    "TransformerBlock",
    "depthwise_conv3d",
    "init_weights",
    "patch_linear",
    "run_grouped",
    "sincos_pos_embed_3d",
]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training.

    Args:
        p: probability of dropping the branch, in [0, 1).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Scale kept samples by 1/(1-p) so the expectation is unchanged; (B, ...) -> (B, ...)."""
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        """Show p in the module repr."""
        return f"p={self.p}"


class Mlp(nn.Module):
    """Two-layer MLP with GELU, applied on the last axis.

    Sub-module names (``linear1``, ``linear2``) follow MONAI's ``MLPBlock`` so ViT weights map
    1:1 onto MONAI's ViT/UNETR.

    Args:
        dim: input and output width.
        hidden_dim: hidden width.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.linear2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim)."""
        return self.linear2(self.act(self.linear1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    The qkv output is laid out as (3, heads, head_dim), the same as MONAI's ``SABlock`` and
    timm/MAE, so fused weights are interchangeable.

    Args:
        dim: token width; must be divisible by ``num_heads``.
        num_heads: number of heads.
        qkv_bias: whether the qkv projection has a bias (MAE: yes).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, dim) -> (B, N, dim)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias on the fused qkv projection.
        drop_path: stochastic-depth probability of both residual branches.
        norm_eps: LayerNorm epsilon (1e-6 as in MAE/ConvMAE; 1e-5 for MONAI compatibility).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, dim) -> (B, N, dim)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvBlock(nn.Module):
    """Masked convolutional block of the hybrid encoder (MCMAE/ConvMAE style, 3D).

    ``x + conv2(DWConv5(mask * conv1(LN(x))))`` then ``x + MLP(LN(x))``. The 1x1x1 convs
    ``conv1``/``conv2`` and the MLP are ``nn.Linear`` on the channels-last view (a checkpoint's
    ``(C, C, 1, 1, 1)`` weight maps here by a reshape). The mask zeroes masked voxels right before
    the depthwise conv, the only op that mixes voxels, so visible voxels never see masked content.

    Args:
        dim: channels C.
        mlp_ratio: MLP hidden width / dim.
        kernel_size: depthwise kernel size (odd).
        drop_path: stochastic-depth probability.
        norm_eps: LayerNorm epsilon.
        depthwise_impl: CUDA implementation of the depthwise conv, see :func:`depthwise_conv3d`.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, kernel_size: int = 5,
                 drop_path: float = 0.0, norm_eps: float = 1e-6,
                 depthwise_impl: str = "auto") -> None:
        super().__init__()
        if depthwise_impl not in DEPTHWISE_IMPLS:
            raise ValueError(f"depthwise_impl={depthwise_impl!r}: choose one of "
                             f"{', '.join(DEPTHWISE_IMPLS)}")
        self.depthwise_impl = depthwise_impl
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.conv1 = nn.Linear(dim, dim)
        self.dwconv = nn.Conv3d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv2 = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask_vox: Tensor | None = None) -> Tensor:
        """Apply the block.

        Args:
            x: (B, C, D, H, W), ideally in ``channels_last_3d`` memory.
            mask_vox: (B, 1, D, H, W) with 1 = visible, 0 = masked, or None (no masking).

        Returns:
            (B, C, D, H, W) in ``channels_last_3d`` memory.
        """
        h = x.permute(0, 2, 3, 4, 1)  # (B, D, H, W, C); a view for channels-last input
        y = self.conv1(self.norm1(h))
        if mask_vox is not None:
            # masking after conv1 also zeroes its bias, so masked voxels contribute exactly 0
            y = y * mask_vox.permute(0, 2, 3, 4, 1).to(y.dtype)  # keep bf16 under autocast
        y = depthwise_conv3d(y.permute(0, 4, 1, 2, 3), self.dwconv.weight, self.dwconv.bias,
                             self.dwconv.padding[0], self.depthwise_impl).permute(0, 2, 3, 4, 1)
        h = h + self.drop_path(self.conv2(y))
        h = h + self.drop_path(self.mlp(self.norm2(h)))
        return h.permute(0, 4, 1, 2, 3)


def patch_linear(x_cl: Tensor, weight: Tensor, bias: Tensor | None, k: int,
                 index: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """Non-overlapping Conv3d (kernel = stride = k) on a channels-last map, as one matmul.

    Equivalent to ``F.conv3d(x, weight, bias, stride=k)``. Patches are copied out in
    (kz, ky, kx, C) order, which keeps runs of k*C contiguous, and the (small) weight is
    permuted to match instead. With ``index`` only the selected output positions are computed,
    which is how masked pre-training skips the work for masked tokens.

    Args:
        x_cl: (B, D, H, W, C) input, D/H/W divisible by k.
        weight: (C_out, C, k, k, k) Conv3d weight.
        bias: (C_out,) or None.
        k: kernel size and stride.
        index: optional (M, K) Long flat raster indices into the (D/k, H/k, W/k) output grid.
        rows: optional (M,) Long: the volume of ``x_cl`` each row of ``index`` refers to
            (default: row i is volume i, M = B); only with ``index``.

    Returns:
        (B, D/k, H/k, W/k, C_out), or (M, K, C_out) when ``index`` is given.
    """
    b, d, h, w, c = x_cl.shape
    g = (d // k, h // k, w // k)
    v = x_cl.reshape(b, g[0], k, g[1], k, g[2], k, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    w2 = weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)
    if index is None:
        return F.linear(v.reshape(b, *g, k**3 * c), w2, bias)
    i0 = torch.div(index, g[1] * g[2], rounding_mode="floor")
    i1 = torch.div(index, g[2], rounding_mode="floor") % g[1]
    i2 = index % g[2]
    bi = (torch.arange(b, device=index.device) if rows is None else rows).unsqueeze(1)
    patches = v[bi, i0, i1, i2]  # (M, K, k, k, k, C): one copy of the selected patches only
    return F.linear(patches.reshape(index.shape[0], index.shape[1], -1), w2, bias)


def run_grouped(ids_keep: Sequence[Tensor],
                fn: Callable[[Tensor, Tensor | None], Tensor]) -> list[Tensor]:
    """Run a token stage once per group of mask sets with the same visible count.

    The volumes of all sets are stacked set after set (set i has ``ids_keep[i].shape[0]``).
    Sets of equal width are concatenated into one call, so e.g. MiM's levels 2 and 3 (86 of 216
    tokens visible each) share one transformer pass.

    Args:
        ids_keep: per set (B_i, N_i) Long visible-token indices.
        fn: ``fn(index (M, K), rows (M,) or None) -> (M, K, E)``; ``rows`` are the stacked
            volume of every row (None: the single set, row i = volume i).

    Returns:
        Per set (B_i, N_i, E).
    """
    if len(ids_keep) == 1:
        return [fn(ids_keep[0], None)]
    sizes = [int(k.shape[0]) for k in ids_keep]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(ids_keep):
        groups.setdefault(int(k.shape[1]), []).append(i)
    out: list[Tensor] = [ids_keep[0]] * len(ids_keep)
    for members in groups.values():
        dev = ids_keep[members[0]].device
        index = torch.cat([ids_keep[i] for i in members])
        rows = torch.cat([torch.arange(starts[i], starts[i] + sizes[i], device=dev)
                          for i in members])
        for i, t in zip(members, fn(index, rows).split([sizes[i] for i in members])):
            out[i] = t
    return out


def sincos_pos_embed_3d(grid: tuple[int, int, int], dim: int,
                        temperature: float = 10000.0) -> Tensor:
    """Fixed 3D sine-cosine position embedding in raster token order.

    The width is split evenly over the three grid axes: with ``F = dim // 6``, columns
    ``[2aF, 2aF + F)`` hold ``sin(pos_a * omega)`` and ``[2aF + F, 2(a+1)F)`` hold
    ``cos(pos_a * omega)`` for axis a = 0, 1, 2 (array axes D, H, W), where
    ``omega_i = temperature ** (-i / F)``, i = 0..F-1. When ``dim`` is not divisible by 6 the
    last ``dim - 6F`` columns are zero. (MONAI's builder uses the same frequencies with the
    axis blocks in order 1, 0, 2.)

    Args:
        grid: token grid (g0, g1, g2); token (i, j, k) has flat index (i*g1 + j)*g2 + k.
        dim: embedding width (>= 6).
        temperature: frequency base.

    Returns:
        (1, g0*g1*g2, dim) float32 tensor.
    """
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive ints, got {grid}")
    if dim < 6:
        raise ValueError(f"dim must be >= 6 for a 3D sin-cos embedding, got {dim}")
    f = dim // 6
    omega = temperature ** (-torch.arange(f, dtype=torch.float64) / f)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    parts = []
    for pos in axes:
        ang = pos.reshape(-1, 1) * omega  # (N, F)
        parts += [torch.sin(ang), torch.cos(ang)]
    emb = torch.cat(parts, dim=1)
    emb = F.pad(emb, (0, dim - 6 * f))
    return emb.float().unsqueeze(0)


def init_weights(module: nn.Module) -> None:
    """MAE-style initialisation, for use with ``nn.Module.apply``.

    Linear: xavier-uniform weight, zero bias. LayerNorm: ones / zeros. Dense Conv3d (the patch
    embeddings and fusion projections): xavier-uniform on the flattened (C_out, C_in*k^3) view,
    as MAE does for its patch embedding, default bias. Depthwise convs keep PyTorch's default.
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv3d) and module.groups == 1:
        w = module.weight
        bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))
        nn.init.uniform_(w, -bound, bound)
        # bias keeps PyTorch's default, as in MAE. A zero bias would make a kernel-1 stem on one
        # channel followed by LayerNorm scale-invariant, i.e. blind to everything but sign(x).
