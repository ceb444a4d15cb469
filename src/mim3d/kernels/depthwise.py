"""Triton depthwise 3D convolution ('same' padding, stride 1, odd cubic kernel) for CUDA.

The hybrid encoder's 5^3 depthwise convs are memory-bound: per output voxel and channel they do
k^3 multiply-adds on data that fits in cache, so the floor is one read of the input and one write
of the output. cuDNN's 3D depthwise kernels are far from it (``benchmarks/depthwise_cuda.py``).

Layout: every kernel takes explicit strides for the (B, D, H, W, C) axes, so any memory format
works; the encoder hands over channels-last memory, where a program's channel block is one
contiguous run per voxel (coalesced loads). Arithmetic is fp32 whatever the input dtype.

* forward ``y[p] = sum_t x[p + t - pad] * w[t] + b``: one program per (tile of voxels, block of
  channels), looping over the k^3 taps; the tap-shifted tiles come from L1/L2.
* input gradient: the forward kernel on the output gradient with the kernel flipped
  (``dx = conv(dy, flip(w))`` for stride 1, odd k, 'same' padding).
* weight gradient ``dw[c, t] = sum_p x[p + t - pad, c] * dy[p, c]``: one program per (group
  of 8 consecutive taps, channel block, slice of voxels) writes fp32 partial sums; the partials
  are added by ``torch.sum``, so the result is deterministic (no atomics). :class:`WgradConfig`
  sets the split; :data:`WGRAD_PER_TAP` (one tap per program) is the first version.

Cost model, MiM base stage 1, one volume (48 channels at 48^3, bf16, k = 5): one pass is 125
FMAs per output = 1.33 GFLOP, 20 us at the H200's ~67 TFLOP/s fp32, and moves 21 MB, 5 us at
~4.3 TB/s: the floor is the CUDA cores' arithmetic, ~60 us for forward + both gradients. cuDNN
(channels-first) took 3.25 ms per volume (``results/depthwise_cuda.json``), ~50x that floor.
Expected here, not yet measured on a GPU: forward and input gradient bound by L1 traffic (k^3
shifted tile loads), ~50-100 us each. The weight gradient is bound by how often its programs
read x and dy from L2: with one tap per program that is 2 x 125 reads of the volume (~2.7 GB,
~0.4 ms); with 8 taps per program each dy tile is read once for 8 taps, whose shifted x tiles
share cache lines, so ~16 x (1 + ~1.6) reads (~0.45 GB), and the L1 traffic of ~60 us becomes
the bound. ``benchmarks/depthwise_cuda.py`` times both splits side by side.

Without CUDA the kernels still run through Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported), which is how the tests check them on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["WGRAD", "WGRAD_PER_TAP", "WgradConfig", "depthwise_conv3d_triton",
           "dw_conv3d_forward", "dw_conv3d_weight_grad"]

_BLOCK_P = 64  # voxels per forward program: 64 x (up to 64) channels = 4096 fp32 accumulators
_MAX_BLOCK_C = 64
_MAX_GRID_YZ = 65535  # CUDA's limit on a launch grid's 2nd and 3rd dimensions
_MAX_VOXELS = 2**31 - 2**16  # flat voxel indices are int32 in the kernels (room for a tile)


@triton.jit
def _voxel_coords(p, D, H, W):
    """Flat voxel index over (B, D, H, W) -> (b, d, h, w)."""
    w = p % W
    t = p // W
    h = t % H
    t = t // H
    return t // D, t % D, h, w


@triton.jit
def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, C, D, H, W,
                   sxb, sxd, sxh, sxw, sxc, syb, syd, syh, syw, syc,
                   K: tl.constexpr, HAS_BIAS: tl.constexpr, FLIP: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm, cm = p < N, c < C
    b, d, h, w = _voxel_coords(p, D, H, W)
    base = b.to(tl.int64) * sxb
    coff = c.to(tl.int64)[None, :] * sxc
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(K * K * K):
        dd = d + t // (K * K) - K // 2
        hh = h + (t // K) % K - K // 2
        ww = w + t % K - K // 2
        ok = pm & (dd >= 0) & (dd < D) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        off = base + dd.to(tl.int64) * sxd + hh.to(tl.int64) * sxh + ww.to(tl.int64) * sxw
        xv = tl.load(x_ptr + off[:, None] + coff, mask=ok[:, None] & cm[None, :], other=0.0)
        tap = K * K * K - 1 - t if FLIP else t
        wv = tl.load(w_ptr + c * (K * K * K) + tap, mask=cm, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    out = (b.to(tl.int64) * syb + d.to(tl.int64) * syd + h.to(tl.int64) * syh
           + w.to(tl.int64) * syw)
    tl.store(y_ptr + out[:, None] + c.to(tl.int64)[None, :] * syc,
             acc.to(y_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])


@triton.jit
def _dw_wgrad_kernel(x_ptr, g_ptr, part_ptr, N, C, D, H, W,
                     sxb, sxd, sxh, sxw, sxc, sgb, sgd, sgh, sgw, sgc,
                     K: tl.constexpr, TAPS: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr, TILES: tl.constexpr):
    t = tl.program_id(0) * TAPS + tl.arange(0, TAPS)  # this program's taps, flat over k^3
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2)
    tm, cm = t < K * K * K, c < C
    kd = (t // (K * K) - K // 2)[:, None]
    kh = ((t // K) % K - K // 2)[:, None]
    kw = (t % K - K // 2)[:, None]
    gc = c.to(tl.int64)[None, :] * sgc
    xc = c.to(tl.int64)[None, None, :] * sxc
    acc = tl.zeros([TAPS, BLOCK_P, BLOCK_C], dtype=tl.float32)
    for i in range(TILES):
        p = (s * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < N
        b, d, h, w = _voxel_coords(p, D, H, W)
        goff = (b.to(tl.int64) * sgb + d.to(tl.int64) * sgd + h.to(tl.int64) * sgh
                + w.to(tl.int64) * sgw)
        gv = tl.load(g_ptr + goff[:, None] + gc, mask=pm[:, None] & cm[None, :], other=0.0)
        dd, hh, ww = d[None, :] + kd, h[None, :] + kh, w[None, :] + kw  # (TAPS, BLOCK_P)
        ok = (tm[:, None] & pm[None, :] & (dd >= 0) & (dd < D) & (hh >= 0) & (hh < H)
              & (ww >= 0) & (ww < W))
        xoff = (b.to(tl.int64)[None, :] * sxb + dd.to(tl.int64) * sxd + hh.to(tl.int64) * sxh
                + ww.to(tl.int64) * sxw)
        xv = tl.load(x_ptr + xoff[:, :, None] + xc, mask=ok[:, :, None] & cm[None, None, :],
                     other=0.0)
        acc += xv.to(tl.float32) * gv.to(tl.float32)[None, :, :]  # one g tile for TAPS taps
    dst = (s.to(tl.int64) * (K * K * K) + t)[:, None] * C + c[None, :]
    tl.store(part_ptr + dst, tl.sum(acc, axis=1), mask=tm[:, None] & cm[None, :])


@dataclass(frozen=True)
class WgradConfig:
    """How the weight-gradient kernel splits its work.

    Attributes:
        taps: taps per program (a power of two; consecutive taps over the flat k^3): the
            program loads each output-gradient tile once for all of them.
        block_p: voxels per tile.
        block_c: channels per program, at most (fewer when the conv has fewer).
        tiles: voxel tiles per program (its slice of voxels; fewer partial sums to add).
        num_warps: warps per program.
    """

    taps: int
    block_p: int
    block_c: int
    tiles: int
    num_warps: int = 4


#: The default: 8 taps per program, so 16 programs cover a 5^3 kernel's taps instead of 125
#: (about 6x fewer reads from L2, see the module's cost model); 128-168 registers and no spills
#: on sm_90 (``tests/test_kernels_hopper.py``).
WGRAD = WgradConfig(taps=8, block_p=32, block_c=32, tiles=32)
#: The first version: one tap per program (``benchmarks/depthwise_cuda.py`` times both).
WGRAD_PER_TAP = WgradConfig(taps=1, block_p=64, block_c=64, tiles=16)
_WGRAD = WGRAD  # what :func:`dw_conv3d_weight_grad` uses unless told otherwise


def _strides(x: Tensor) -> tuple[int, int, int, int, int]:
    """Element strides of a (B, C, D, H, W) tensor in (B, D, H, W, C) order."""
    sb, sc, sd, sh, sw = x.stride()
    return sb, sd, sh, sw, sc


def _check(x: Tensor, weight: Tensor) -> int:
    """Validate shapes; return the kernel size k."""
    if x.ndim != 5 or weight.ndim != 5 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"depthwise conv needs x (B, C, D, H, W) and weight (C, 1, k, k, k); "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    k = weight.shape[2]
    if weight.shape[2:] != (k, k, k) or k % 2 != 1:
        raise ValueError(f"the Triton depthwise conv needs an odd cubic kernel, got "
                         f"{tuple(weight.shape[2:])}")
    if x.numel() // max(1, x.shape[1]) > _MAX_VOXELS:
        raise ValueError(f"the Triton depthwise conv takes at most {_MAX_VOXELS} voxels "
                         f"(B x D x H x W), got {tuple(x.shape)}; split the batch or set "
                         f"model.depthwise_impl=cudnn")
    return k


def _block_c(c: int) -> int:
    return min(_MAX_BLOCK_C, triton.next_power_of_2(c))


def dw_conv3d_forward(x: Tensor, weight: Tensor, bias: Tensor | None, *, flip: bool = False,
                      out_dtype: torch.dtype | None = None) -> Tensor:
    """Depthwise 'same' stride-1 conv (cross-correlation, like ``F.conv3d``).

    Args:
        x: (B, C, D, H, W), any strides, fp32 / bf16 / fp16.
        weight: (C, 1, k, k, k), k odd; read in fp32.
        bias: (C,) or None.
        flip: use the kernel mirrored on all three axes (the input gradient).
        out_dtype: dtype of the result (default ``x.dtype``).

    Returns:
        (B, C, D, H, W) in channels-last memory.
    """
    k = _check(x, weight)
    b, c, d, h, w = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype,
                    memory_format=torch.channels_last_3d)
    n, bc = b * d * h * w, _block_c(c)
    wf = weight.detach().reshape(c, k ** 3).float().contiguous()
    bf = bias.detach().float().contiguous() if bias is not None else wf
    grid = (triton.cdiv(n, _BLOCK_P), triton.cdiv(c, bc))
    _dw_fwd_kernel[grid](x, wf, bf, y, n, c, d, h, w, *_strides(x), *_strides(y), K=k,
                         HAS_BIAS=bias is not None, FLIP=flip, BLOCK_P=_BLOCK_P, BLOCK_C=bc)
    return y


def wgrad_split(n: int, block_p: int, tiles: int) -> tuple[int, int]:
    """Voxel tiles per weight-gradient program and the number of voxel slices (grid z).

    ``tiles`` grows past the one asked for when ``n`` voxels would need more than CUDA's 65535
    slices (at 1024 voxels a slice: a 48^3 stage of more than 606 volumes, i.e. batch 29 in
    one pass).
    """
    tiles = max(min(tiles, triton.cdiv(n, block_p)), triton.cdiv(n, block_p * _MAX_GRID_YZ))
    return tiles, triton.cdiv(n, block_p * tiles)


def dw_conv3d_weight_grad(x: Tensor, grad: Tensor, k: int,
                          config: WgradConfig | None = None) -> Tensor:
    """Weight gradient (C, 1, k, k, k) in fp32 of the conv of ``x`` whose output grad is ``grad``.

    Args:
        x: (B, C, D, H, W) conv input, any strides.
        grad: (B, C, D, H, W) gradient of the conv output, any strides.
        k: kernel size (odd).
        config: how the work is split (default :data:`WGRAD`).
    """
    cfg = config or _WGRAD
    b, c, d, h, w = x.shape
    n, bc = b * d * h * w, min(cfg.block_c, triton.next_power_of_2(c))
    tiles, slices = wgrad_split(n, cfg.block_p, cfg.tiles)
    part = torch.empty(slices, k ** 3, c, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(k ** 3, cfg.taps), triton.cdiv(c, bc), slices)
    _dw_wgrad_kernel[grid](x, grad, part, n, c, d, h, w, *_strides(x), *_strides(grad), K=k,
                           TAPS=cfg.taps, BLOCK_P=cfg.block_p, BLOCK_C=bc, TILES=tiles,
                           num_warps=cfg.num_warps)
    return part.sum(dim=0).t().reshape(c, 1, k, k, k)


class _TritonDepthwiseFn(torch.autograd.Function):
    """Autograd wrapper: forward, input gradient and weight gradient all through Triton."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                out_dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return dw_conv3d_forward(x, weight, bias, out_dtype=out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = dw_conv3d_forward(grad, weight, None, flip=True, out_dtype=x.dtype)
        if ctx.needs_input_grad[1]:
            gw = dw_conv3d_weight_grad(x, grad, weight.shape[2]).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=(0, 2, 3, 4), dtype=torch.float32).to(weight.dtype)
        return gx, gw, gb, None


def depthwise_conv3d_triton(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Differentiable depthwise 'same' stride-1 conv through Triton.

    Under autocast the result has the autocast dtype (as cuDNN's conv would); otherwise
    ``x.dtype``. Gradients: input in ``x.dtype``, weight and bias in their own dtype, all
    accumulated in fp32.

    Args:
        x: (B, C, D, H, W), any strides (channels-last memory is the fast case).
        weight: (C, 1, k, k, k), k odd.
        bias: (C,) or None.

    Returns:
        (B, C, D, H, W) in channels-last memory.
    """
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if x.dtype != out_dtype:  # autocast would cast a float32 input before cuDNN, too
        x = x.to(out_dtype)
    return _TritonDepthwiseFn.apply(x, weight, bias, out_dtype)
