"""The depthwise 'same' stride-1 Conv3d of the hybrid encoder, dispatched by device.

* CPU: oneDNN, with a backward made of forward convolutions (:class:`_DepthwiseConv3dFn`),
  several times faster than oneDNN's backward kernels.
* CUDA: the Triton kernels of :mod:`mim3d.kernels.depthwise` (default when triton is
  installed), or cuDNN on channels-first memory (``impl="cudnn"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mim3d.kernels import triton_available

__all__ = ["DEPTHWISE_IMPLS", "depthwise_conv3d"]


def _dw_weight_grad(x: Tensor, grad: Tensor, pad: int) -> Tensor:
    """Weight gradient of a depthwise 'same' conv, (C, 1, k, k, k).

    dW[c] = sum_b xcorr(pad(x[b, c]), grad[b, c]) is itself a depthwise *forward* conv of the
    padded input with the gradient as kernel; oneDNN runs it ~3x faster than its backward-weights
    kernel (CPU, 2 x 48 x 48^3: 0.11 s vs 0.32 s).
    """
    xp = F.pad(x, (pad,) * 6)
    c = x.shape[1]
    gw = F.conv3d(xp[:1], grad[0].unsqueeze(1), groups=c)
    for b in range(1, x.shape[0]):
        gw = gw + F.conv3d(xp[b:b + 1], grad[b].unsqueeze(1), groups=c)
    return gw.transpose(0, 1).contiguous()


class _DepthwiseConv3dFn(torch.autograd.Function):
    """Depthwise stride-1 'same' Conv3d whose backward uses only forward convolutions (CPU).

    For stride 1, odd kernel and 'same' padding, d(input) = conv(grad, flip(w)), and d(weight)
    is :func:`_dw_weight_grad`. oneDNN's channels-last depthwise forward kernel is much faster
    than its backward kernels (measured at 2 x 48 x 48^3 on 2 cores: data grad 0.03 s vs
    0.24 s), which cut a base encoder fwd+bwd step (batch 2, 96^3) from 5.6 s to 3.4 s.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        c, pad = weight.shape[0], ctx.padding
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = F.conv3d(grad, weight.flip(2, 3, 4), padding=pad, groups=c)
        if ctx.needs_input_grad[1]:
            gw = _dw_weight_grad(x.contiguous(memory_format=torch.channels_last_3d), grad, pad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=(0, 2, 3, 4))
        return gx, gw, gb, None


#: ``auto``: Triton on CUDA when triton is installed, else cuDNN; ``triton`` / ``cudnn`` force one.
DEPTHWISE_IMPLS = ("auto", "triton", "cudnn")


def _use_triton(x: Tensor, impl: str) -> bool:
    """Whether the depthwise conv of ``x`` runs through :mod:`mim3d.kernels.depthwise`."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl={impl!r}: choose one of {', '.join(DEPTHWISE_IMPLS)}")
    if x.device.type != "cuda" or impl == "cudnn":
        return False
    available = triton_available()
    if impl == "triton" and not available:
        raise ValueError("depthwise_impl='triton' needs the triton package (it ships with CUDA "
                         "builds of torch); install it or set model.depthwise_impl=cudnn")
    return available


def depthwise_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int,
                     impl: str = "auto") -> Tensor:
    """Depthwise stride-1 'same' Conv3d with a fast backward on CPU and on CUDA.

    On CPU (when a gradient is needed) this uses :class:`_DepthwiseConv3dFn`. On CUDA it runs
    the Triton kernels of :mod:`mim3d.kernels.depthwise` (``impl`` ``auto`` or ``triton``) on the
    channels-last memory as it comes, or cuDNN (``impl="cudnn"``) on channels-first memory:
    cuDNN's channels-last 3D depthwise weight-gradient kernel is ~20x slower (H200, bf16,
    2 x 48 x 48^3: 0.121 s vs 0.0064 s fwd+bwd) and took 98% of a MiM base step
    (``benchmarks/results/depthwise_cuda.json``).

    Args:
        x: (B, C, D, H, W), ideally channels-last memory.
        weight: (C, 1, k, k, k) with k odd and ``padding = k // 2``.
        bias: (C,) or None.
        padding: k // 2.
        impl: one of :data:`DEPTHWISE_IMPLS` (only CUDA inputs look at it).

    Returns:
        (B, C, D, H, W).
    """
    if _use_triton(x, impl):
        from mim3d.kernels.depthwise import depthwise_conv3d_triton  # imports triton

        return depthwise_conv3d_triton(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad and x.device.type == "cpu":
        return _DepthwiseConv3dFn.apply(x, weight, bias, padding)
    if x.device.type == "cuda":
        x = x.contiguous()
    return F.conv3d(x, weight, bias, padding=padding, groups=weight.shape[0])
