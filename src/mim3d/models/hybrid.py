"""Hybrid convolution + transformer encoder of MiM (MCMAE/ConvMAE extended to 3D).

Base configuration (input 96^3, patch 16), see DESIGN.md section 3::

    stage 1  patchify k2 (1->48), LN, GELU, 2 masked conv blocks      48 @ 48^3
    stage 2  patchify k2 (48->96), LN, GELU, 2 conv blocks            96 @ 24^3
    stage 3  patchify k2 (96->192), LN, GELU, 2 conv blocks          192 @ 12^3
    stage 4  patchify k2 (192->384), LN, GELU, Linear, + sincos pos   216 x 384
    stage 5  visible tokens only, 11 transformer blocks            N_vis x 384
    stage 6  + patchify(stage 1/2/3, k = 8/4/2) -> 384, final LN   N_vis x 384

Masked content never reaches visible tokens: every op except the depthwise convs is per voxel
or a non-overlapping, token-aligned patchify, and the depthwise convs only see
``mask * features``. Feature maps live in channels-last memory; all non-overlapping convs run
as one matmul each (:func:`~mim3d.models.layers.patch_linear`), and the stage-4 embedding and
the fusion projections are computed for visible tokens only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mim3d.models.layers import (
    DEPTHWISE_IMPLS,
    ConvBlock,
    TransformerBlock,
    init_weights,
    patch_linear,
    run_grouped,
    sincos_pos_embed_3d,
)

__all__ = ["CONV_RECOMPUTE", "HybridEncoder", "PatchMerge", "official_key_to_mim3d"]

_NORM_EPS = 1e-6  # as in MAE / ConvMAE, so imported official weights behave the same
#: ``auto``: recompute the conv blocks in backward on CUDA only; ``always`` / ``never`` on every device.
CONV_RECOMPUTE = ("auto", "always", "never")


class PatchMerge(nn.Module):
    """Non-overlapping Conv3d (kernel = stride = k), LayerNorm over channels, GELU.

    The weight is kept in ``nn.Conv3d`` layout (checkpoint-compatible) but applied as a matmul
    on the channels-last map.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        k: kernel size and stride.
    """

    def __init__(self, in_channels: int, out_channels: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.proj = nn.Conv3d(in_channels, out_channels, k, stride=k)
        self.norm = nn.LayerNorm(out_channels, eps=_NORM_EPS)
        self.act = nn.GELU()

    def forward(self, x_cl: Tensor, index: Tensor | None = None,
                rows: Tensor | None = None) -> Tensor:
        """(B, D, H, W, C) -> (B, D/k, H/k, W/k, C_out), or (M, K, C_out) for ``index`` (M, K)
        (of the volumes ``rows``, see :func:`~mim3d.models.layers.patch_linear`)."""
        y = patch_linear(x_cl, self.proj.weight, self.proj.bias, self.k, index, rows)
        return self.act(self.norm(y))


def _check_positive_ints(name: str, values: Sequence[int], length: int, minimum: int) -> None:
    if len(values) != length or any(int(v) != v or v < minimum for v in values):
        raise ValueError(f"{name} must be {length} ints >= {minimum}, got {tuple(values)}")


class HybridEncoder(nn.Module):
    """MiM hybrid encoder. See the module docstring for the architecture.

    Args:
        in_channels: image channels.
        input_size: (D, H, W) of the input; each divisible by ``patch_size``.
        patch_size: token size in input voxels, one of 8, 16, 32 (stem stride = patch_size/8).
        dims: channels of stages 1-4 (stage 4 = token width).
        depths: conv blocks in stages 1-3 and transformer blocks in stage 4.
        num_heads: attention heads of the transformer blocks.
        mlp_ratio: MLP expansion of conv and transformer blocks.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        grad_checkpointing: recompute transformer blocks in backward (saves memory).
        depthwise_impl: CUDA depthwise conv, one of ``auto`` (Triton when installed),
            ``triton``, ``cudnn`` (see :func:`~mim3d.models.layers.depthwise_conv3d`).
        conv_recompute: recompute the conv blocks of stages 1-3 and their downsampling in
            backward, ``recompute_chunk`` volumes at a time (their activations are most of a
            step's memory): one of :data:`CONV_RECOMPUTE`.
        recompute_chunk: volumes per recomputed piece (bounds the memory of one recompute).

    Attributes:
        grid: token grid (g0, g1, g2).
        num_tokens: g0*g1*g2.
        embed_dim: dims[3].
    """

    def __init__(self, *, in_channels: int = 1, input_size: Sequence[int] = (96, 96, 96),
                 patch_size: int = 16, dims: Sequence[int] = (48, 96, 192, 384),
                 depths: Sequence[int] = (2, 2, 2, 11), num_heads: int = 12,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False, depthwise_impl: str = "auto",
                 conv_recompute: str = "auto", recompute_chunk: int = 4) -> None:
        super().__init__()
        self._validate(in_channels, input_size, patch_size, dims, depths, num_heads, mlp_ratio,
                       drop_path_rate)
        if depthwise_impl not in DEPTHWISE_IMPLS or conv_recompute not in CONV_RECOMPUTE:
            raise ValueError(f"depthwise_impl={depthwise_impl!r} must be one of "
                             f"{DEPTHWISE_IMPLS} and conv_recompute={conv_recompute!r} one of "
                             f"{CONV_RECOMPUTE}")
        if recompute_chunk < 1:
            raise ValueError(f"recompute_chunk must be >= 1, got {recompute_chunk}")
        self.conv_recompute = conv_recompute
        self.recompute_chunk = recompute_chunk
        self.in_channels = in_channels
        self.input_size = tuple(int(s) for s in input_size)
        self.patch_size = patch_size
        self.grid: tuple[int, int, int] = tuple(s // patch_size for s in self.input_size)
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.embed_dim = dims[3]
        self.grad_checkpointing = grad_checkpointing
        # token size in stage-s voxels (8, 4, 2): the fusion kernel and the mask upsampling factor
        self.stage_factors = (8, 4, 2)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(4)]

        chans = (in_channels, *dims)
        strides = (patch_size // 8, 2, 2, 2)
        self.downsamples = nn.ModuleList(
            PatchMerge(chans[i], chans[i + 1], strides[i]) for i in range(4))
        self.conv_stages = nn.ModuleList(
            nn.ModuleList(ConvBlock(dims[s], mlp_ratio, drop_path=dpr[starts[s] + j],
                                    norm_eps=_NORM_EPS, depthwise_impl=depthwise_impl)
                          for j in range(depths[s]))
            for s in range(3))
        self.token_proj = nn.Linear(dims[3], dims[3])
        self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid, dims[3]))
        self.blocks = nn.ModuleList(
            TransformerBlock(dims[3], num_heads, mlp_ratio, drop_path=dpr[starts[3] + j],
                             norm_eps=_NORM_EPS) for j in range(depths[3]))
        self.fusion = nn.ModuleList(
            nn.Conv3d(dims[s], dims[3], f, stride=f) for s, f in enumerate(self.stage_factors))
        self.norm = nn.LayerNorm(dims[3], eps=_NORM_EPS)
        self.apply(init_weights)

    @staticmethod
    def _validate(in_channels: int, input_size: Sequence[int], patch_size: int,
                  dims: Sequence[int], depths: Sequence[int], num_heads: int,
                  mlp_ratio: float, drop_path_rate: float) -> None:
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if patch_size not in (8, 16, 32):
            raise ValueError(f"patch_size must be 8, 16 or 32, got {patch_size}")
        _check_positive_ints("input_size", input_size, 3, 1)
        if any(s % patch_size for s in input_size):
            raise ValueError(f"input_size {tuple(input_size)} must be divisible by "
                             f"patch_size {patch_size}")
        _check_positive_ints("dims", dims, 4, 1)
        _check_positive_ints("depths", depths, 4, 0)
        if num_heads < 1 or dims[3] % num_heads:
            raise ValueError(f"dims[3]={dims[3]} must be divisible by num_heads={num_heads}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")

    def _check_input(self, x: Tensor, ids_keep: Sequence[Tensor] | None) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"expected input (B, {self.in_channels}, *{self.input_size}), "
                             f"got {tuple(x.shape)}")
        if ids_keep is None:
            return
        if sum(k.shape[0] for k in ids_keep) != x.shape[0]:
            raise ValueError(f"ids_keep cover {[k.shape[0] for k in ids_keep]} volumes, the "
                             f"input has {x.shape[0]}")
        for k in ids_keep:
            if k.ndim != 2 or k.shape[1] > self.num_tokens or k.dtype != torch.long:
                raise ValueError(f"ids_keep must be Long (B, N_vis<={self.num_tokens}), got "
                                 f"{k.dtype} {tuple(k.shape)}")

    def _stage_masks(self, vis: Tensor) -> list[Tensor]:
        """Visible-token mask (B, N) upsampled to stages 1-3, each (B, 1, D_s, H_s, W_s)."""
        b = vis.shape[0]
        g0, g1, g2 = self.grid
        vis = vis.view(b, g0, 1, g1, 1, g2, 1)
        masks = []
        for f in self.stage_factors:
            m = vis.expand(b, g0, f, g1, f, g2, f).reshape(b, g0 * f, g1 * f, g2 * f, 1)
            masks.append(m.permute(0, 4, 1, 2, 3))
        return masks

    def _recompute(self, x: Tensor) -> bool:
        on = self.conv_recompute == "always" or (self.conv_recompute == "auto" and x.is_cuda)
        return on and self.training and torch.is_grad_enabled()

    def _stage_entry(self, s: int) -> Callable[[Tensor, Tensor | None], Tensor]:
        """Stage ``s``'s downsampling and first conv block: (B, D, H, W, C) channels-last in,
        (B, C_s, D_s, H_s, W_s) out. Recomputed as one piece: the downsampling's LayerNorm and
        GELU would otherwise keep two float32 copies of the stage's map for backward (on CUDA,
        autocast runs LayerNorm in float32), about 1.1 GiB per MiM base sample."""
        ds, blocks = self.downsamples[s], self.conv_stages[s]

        def run(h_cl: Tensor, mask: Tensor | None) -> Tensor:
            h = ds(h_cl).permute(0, 4, 1, 2, 3)
            return blocks[0](h, mask) if len(blocks) else h

        return run

    def _block(self, blk: Callable[[Tensor, Tensor | None], Tensor], h: Tensor,
               mask: Tensor | None, recompute: bool) -> Tensor:
        """One conv block (or a stage entry); recomputed in backward piece by piece, so that one
        recompute holds the activations of ``recompute_chunk`` volumes only."""
        if not recompute:
            return blk(h, mask)
        n = self.recompute_chunk
        pieces = [checkpoint(blk, h[i:i + n], None if mask is None else mask[i:i + n],
                             use_reentrant=False) for i in range(0, h.shape[0], n)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _conv_stages(self, x: Tensor, vis: Tensor | None) -> list[Tensor]:
        """Stages 1-3. Returns three channels-last maps (B, D_s, H_s, W_s, dims[s])."""
        masks = [None] * 3 if vis is None else self._stage_masks(vis)
        recompute = self._recompute(x)
        h = x.permute(0, 2, 3, 4, 1)
        maps = []
        for s in range(3):
            h = self._block(self._stage_entry(s), h, masks[s], recompute)  # channels-last
            for blk in self.conv_stages[s][1:]:
                h = self._block(blk, h, masks[s], recompute)
            h = h.permute(0, 2, 3, 4, 1)
            maps.append(h)
        return maps

    def _run_blocks(self, tokens: Tensor) -> Tensor:
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            tokens = checkpoint(blk, tokens, use_reentrant=False) if use_ckpt else blk(tokens)
        return tokens

    def _tokens(self, maps: list[Tensor], ids_keep: Tensor | None,
                rows: Tensor | None = None) -> Tensor:
        """Stages 4-6 for the volumes ``rows`` of the maps (all when None): (M, N_vis, E)."""
        b = maps[2].shape[0] if ids_keep is None else ids_keep.shape[0]
        e = self.embed_dim
        tokens = self.downsamples[3](maps[2], ids_keep, rows).reshape(b, -1, e)
        pos = self.pos_embed if ids_keep is None else self.pos_embed[0][ids_keep]
        tokens = self._run_blocks(self.token_proj(tokens) + pos)
        for s, f in enumerate(self.stage_factors):
            conv = self.fusion[s]
            tokens = tokens + patch_linear(maps[s], conv.weight, conv.bias, f, ids_keep,
                                           rows).reshape(b, -1, e)
        return self.norm(tokens)

    def forward(self, x: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """Encode a batch of volumes.

        Args:
            x: (B, C, D, H, W) input of size ``input_size``.
            ids_keep: optional (B, N_vis) Long raster indices of the visible tokens (ascending
                by convention). None = no masking, all N tokens (downstream use).

        Returns:
            (B, N_vis, E) visible-token features in ``ids_keep`` order, or (B, N, E).
        """
        if ids_keep is None:
            self._check_input(x, None)
            return self._tokens(self._conv_stages(x, None), None)
        return self.forward_levels(x, [ids_keep])[0]

    def forward_levels(self, x: Tensor, ids_keep: Sequence[Tensor]) -> list[Tensor]:
        """Encode volumes of several mask groups (MiM's levels) in one pass.

        Stages 1-3 run once over all volumes; the token stages run once per group of equal
        visible count (MiM base: level 1 keeps 81 tokens, levels 2 and 3 keep 86 each).

        Args:
            x: (sum B_l, C, D, H, W) the groups' volumes stacked in order.
            ids_keep: per group (B_l, N_l) Long raster indices of its visible tokens.

        Returns:
            Per group (B_l, N_l, E), as ``forward(x_l, ids_keep_l)`` would give.
        """
        self._check_input(x, list(ids_keep))
        vis = torch.cat([torch.zeros(k.shape[0], self.num_tokens, device=x.device,
                                     dtype=x.dtype).scatter_(1, k, 1.0) for k in ids_keep])
        maps = self._conv_stages(x, vis)
        return run_grouped(ids_keep, lambda index, rows: self._tokens(maps, index, rows))

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Unmasked multi-scale features for segmentation decoders.

        Args:
            x: (B, C, D, H, W).

        Returns:
            [stage1 (B, dims0, D/s, H/s, W/s), stage2 (B, dims1, ...), stage3 (B, dims2, ...),
            tokens (B, E, g0, g1, g2)] with s = patch_size/8 (for the base model
            48@48^3, 96@24^3, 192@12^3, 384@6^3). Maps are in channels-last memory.
        """
        self._check_input(x, None)
        maps = self._conv_stages(x, None)
        tokens = self._tokens(maps, None)
        out = [m.permute(0, 4, 1, 2, 3) for m in maps]
        out.append(tokens.reshape(x.shape[0], *self.grid, -1).permute(0, 4, 1, 2, 3))
        return out


_OFFICIAL_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"pos_embed|norm\.(weight|bias)"), lambda m: m[0]),
    (re.compile(r"patch_embed([1-4])\.(proj|norm)\.(weight|bias)"),
     lambda m: f"downsamples.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    (re.compile(r"patch_embed5\.(weight|bias)"), lambda m: f"token_proj.{m[1]}"),
    (re.compile(r"stage([1-3])_output_decode\.(weight|bias)"),
     lambda m: f"fusion.{int(m[1]) - 1}.{m[2]}"),
    (re.compile(r"blocks([1-3])\.(\d+)\.(norm1|norm2|conv1|conv2|attn|mlp\.fc1|mlp\.fc2)"
                r"\.(weight|bias)"),
     lambda m: f"conv_stages.{int(m[1]) - 1}.{m[2]}.{_CONV_PART[m[3]]}.{m[4]}"),
    (re.compile(r"blocks4\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
                r"\.(weight|bias)"),
     lambda m: f"blocks.{m[1]}.{_BLOCK_PART[m[2]]}.{m[3]}"),
)
_CONV_PART = {"norm1": "norm1", "norm2": "norm2", "conv1": "conv1", "conv2": "conv2",
              "attn": "dwconv", "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}
_BLOCK_PART = {"norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn.qkv",
               "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}


def official_key_to_mim3d(name: str) -> str | None:
    """Map an encoder key of the authors' released checkpoint to a :class:`HybridEncoder` key.

    The mapping is a pure rename; values need at most a reshape to the target shape: the 1x1x1
    convs of the conv blocks (``conv1``, ``conv2``, ``mlp.fc1/fc2``, stored (C_out, C_in, 1, 1,
    1) there) are ``nn.Linear`` (C_out, C_in) here. Everything else has identical shapes. Both
    use raster token order over the array axes of the input, so ``pos_embed`` rows correspond
    (it is a fixed buffer here; an importer may keep mim3d's own).

    Args:
        name: checkpoint key without the ``model.`` / ``module.`` prefix.

    Returns:
        The mim3d state-dict key, or None for keys that are not part of the encoder
        (decoder, mask token, alignment heads).
    """
    for pattern, target in _OFFICIAL_RULES:
        match = pattern.fullmatch(name)
        if match is not None:
            return target(match)
    return None
