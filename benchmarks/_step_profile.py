"""Where a training step's time goes, by op family (``benchmarks/gpu_pretrain.py``'s profile).

A kernel's family comes from, in order: the ``mim3d::<family>`` profiler scope it ran in (the
library's level cutting, mask drawing and copy, loss and update calls are wrapped in one, see
:func:`library_scopes`); the optimizer's own ``Optimizer.step`` scope; the names of the ops that
launched it, outermost first (in backward that is the autograd node, named after its forward
op, e.g. ``NativeLayerNormBackward0``); and last its kernel name (Triton launches have no op).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import mim3d.engine.train as train_mod
import mim3d.models.mim as mim_mod

# (family, substrings of an op / autograd node / kernel name);
# the first family any name matches wins, names taken outermost first
FAMILIES = (
    ("attention", ("scaled_dot_product", "flash", "fmha", "attention", "Sdpa", "sdpa")),
    ("depthwise_conv", ("_TritonDepthwiseFn", "_dw_", "onvolution", "conv", "fprop", "dgrad",
                        "wgrad", "depthwise")),
    ("loss", ("NllLoss", "nll_loss", "LogSoftmax", "log_softmax", "PowBackward", "NanToNum")),
    ("level_cutting", ("Upsample", "upsample", "AvgPool", "avg_pool", "adaptive_avg")),
    ("convs_and_linears", ("aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "matmul",
                           "MmBackward", "AddmmBackward", "BmmBackward", "gemm", "Gemm",
                           "nvjet", "cutlass", "xmma")),
    ("masking_gather_scatter", ("ndex", "ather", "catter", "aten::cat", "CatBackward",
                                "masked", "nonzero", "argsort", "sort")),
    ("norms_elementwise", ("layer_norm", "LayerNorm", "gelu", "Gelu", "aten::", "Backward",
                           "elementwise", "vectorized", "reduce")),
)
SCOPES = ((train_mod, "compute_losses", "loss"), (train_mod, "sample_levels", "masking"),
          (train_mod, "masks_to_device", "masking"),
          (train_mod, "_clip_check_update", "optimizer"),
          (mim_mod, "cut_level_volumes", "level_cutting"))


def _scoped(fn: Callable[..., Any], family: str) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(f"mim3d::{family}"):
            return fn(*args, **kwargs)

    return run


@contextlib.contextmanager
def library_scopes() -> Iterator[None]:
    """Wrap the library's level cutting, masking, loss and update calls in profiler scopes."""
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in SCOPES]
    for mod, name, family in SCOPES:
        setattr(mod, name, _scoped(getattr(mod, name), family))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def classify(names: list[str], kernel: str = "") -> str:
    """Op family of a kernel (or CPU op) from its op chain (outermost first) and name."""
    scopes = [n[len("mim3d::"):] for n in names if n.startswith("mim3d::")]
    if scopes:
        return scopes[-1]
    if any("Optimizer.step" in n or "clip_grad" in n for n in names):
        return "optimizer"
    if kernel.startswith("Memcpy HtoD"):
        return "host_to_device_copies"
    for name in [*names, kernel]:
        for family, patterns in FAMILIES:
            if any(p in name for p in patterns):
                return family
    return "other"


def _chain(evt: Any) -> list[str]:
    names = []
    while evt is not None:
        names.append(evt.name)
        evt = evt.cpu_parent
    return names[::-1]


def family_times(prof: torch.profiler.profile, cuda: bool) -> dict[str, float]:
    """Seconds per family: device kernels on CUDA, self CPU time of the ops on the CPU."""
    events = prof.events()
    times: Counter[str] = Counter()
    if not cuda:
        for e in events:
            times[classify(_chain(e))] += e.self_cpu_time_total / 1e6
        return dict(times)
    left = Counter()  # kernel time by name not reached through a CPU op (Triton launches)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            left[e.name] += e.device_time_total / 1e6
    for e in events:
        for k in getattr(e, "kernels", []):
            times[classify(_chain(e), k.name)] += k.duration / 1e6
            left[k.name] -= k.duration / 1e6
    for name, seconds in left.items():
        if seconds > 1e-9:
            times[classify([], name)] += seconds
    return dict(times)


def machine(dev: torch.device) -> dict[str, Any]:
    """The GPU (or CPU), torch, CUDA, Triton and Python that a result was measured with."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    return {"device": str(dev), "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda"
            else None, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so host timers see it done."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


def gemm_peak(dev: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
              reps: int = 6) -> float:
    """Best FLOP/s (2 n^3 per product) of an n x n @ n x n ``torch.mm`` over ``reps`` runs on
    random data, after one warm-up run."""
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(reps + 1):
        sync(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def median_seconds(fn: Callable[[], object], dev: torch.device, warmup: int = 2,
                   runs: int = 5) -> float:
    """Median wall time of ``fn`` between device syncs, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def conv_seconds(conv: Callable[..., Tensor], shape: tuple[int, ...], dev: torch.device,
                 impl: str = "auto") -> float:
    """Median seconds of one 5^3 depthwise conv ``conv(x, w, b, padding, impl)``, forward and
    both gradients, on a channels-last (B, C, D, H, W) input: bf16 under bf16 autocast on CUDA,
    as inside the encoder; fp32 on the CPU."""
    cuda = dev.type == "cuda"
    x = torch.randn(*shape, device=dev, dtype=torch.bfloat16 if cuda else torch.float32)
    x = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    w = torch.randn(shape[1], 1, 5, 5, 5, device=dev, requires_grad=True)
    b = torch.zeros(shape[1], device=dev, requires_grad=True)

    def once() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            y = conv(x, w, b, 2, impl)
        y.float().sum().backward()

    return median_seconds(once, dev)


def depthwise_ms(dev: torch.device,
                 shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, float]]:
    """Milliseconds of one 5^3 depthwise conv, forward + both gradients, per implementation.

    ``shapes`` name (B, C, D, H, W) inputs (see :func:`conv_seconds`). On CUDA: cuDNN
    (channels-first, the ``before`` path), the Triton kernels with the default weight-gradient
    split, and with one tap per weight-gradient program; on the CPU the library's CPU path.
    """
    from mim3d.kernels import triton_available
    from mim3d.kernels.conv import depthwise_conv3d

    variants: dict[str, tuple[str, Any]] = {"cudnn": ("cudnn", None)}
    if dev.type == "cuda" and triton_available():
        from mim3d.kernels import depthwise  # imports triton

        variants |= {"triton": ("triton", depthwise.WGRAD),
                     "triton_wgrad_per_tap": ("triton", depthwise.WGRAD_PER_TAP)}
    out: dict[str, dict[str, float]] = {}
    for name, (impl, split) in variants.items():
        if split is not None:  # the split the backward pass reads
            depthwise._WGRAD = split
        try:
            out[name] = {label: 1e3 * conv_seconds(depthwise_conv3d, shape, dev, impl)
                         for label, shape in shapes.items()}
        finally:
            if split is not None:
                depthwise._WGRAD = depthwise.WGRAD
    return out

