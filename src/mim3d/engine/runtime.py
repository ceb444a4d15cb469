"""Process-level settings that make CPU training faster, and the memory a training step needs."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS.

    A 96^3 training step frees and re-allocates tensors of tens of MB every step. glibc maps
    blocks above 32 MB straight from the OS and unmaps them on free, so every step pays for the
    kernel zeroing fresh pages (about 30% of CPU time measured on the base model). Raising the
    mmap and trim thresholds keeps those blocks for reuse; the price is that the process keeps
    its peak memory. A no-op (returning False) off glibc.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1 and ok
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok


# ------------------------------------------------------------------------------ memory

#: Peak memory of a training step over the activations autograd keeps for backward: the
#: gradients being formed in backward and the allocator's slack (measured on the CPU for the
#: tiny classifier and MiM-UNETR: peak RSS 1.1x to 1.5x the saved tensors).
PEAK_OVER_SAVED = 1.5
#: Weights, gradients and AdamW's two moments, in units of the weights.
PARAM_COPIES = 4


class MemoryEstimateError(ValueError):
    """One training step would need more memory than this machine has."""


def saved_activation_bytes(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Bytes autograd keeps for backward in one forward pass of ``input_shape`` (B, C, D, H, W).

    The forward runs on a copy of ``model`` on the ``meta`` device: shapes only, no memory and
    almost no time, so the figure is exact for the network as built (gradient checkpointing
    included: recomputed blocks keep nothing).
    """
    ghost = copy.deepcopy(model).to("meta").train(model.training)
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        base = t if t._base is None else t._base  # views share their base's memory
        seen[id(base)] = base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ghost(torch.empty(tuple(input_shape), device="meta"))
    return sum(seen.values())


def estimate_step_bytes(model: nn.Module, input_shape: Sequence[int], precision: str) -> int:
    """Peak memory of one training step (see :data:`PEAK_OVER_SAVED`, :data:`PARAM_COPIES`).

    Activations are counted in fp32; bf16/fp16 autocast on a GPU keeps about half of that.
    """
    saved = saved_activation_bytes(model, input_shape)
    if precision in ("bf16", "fp16"):
        saved //= 2
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(PEAK_OVER_SAVED * saved) + PARAM_COPIES * params


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory for a run: the GPU's free memory, else the smaller of ``MemAvailable`` and
    the cgroup's limit minus its use (a container); ``None`` when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip() if (cgroup / "memory.max").is_file() \
            else "max"
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_step_memory(model: nn.Module, input_shape: Sequence[int], *, device: torch.device,
                      precision: str, what: str) -> int:
    """Refuse, before anything is written, a run whose training step cannot fit in memory.

    Args:
        model: the network as it will train.
        input_shape: one micro-batch ``(B, C, D, H, W)``.
        device: where it will train.
        precision: ``optim.precision`` as resolved for the device (fp32, bf16, fp16).
        what: the network, for the message.

    Returns:
        The estimate in bytes.

    Raises:
        MemoryEstimateError: the estimate exceeds the available memory; the message says how
            much is needed and what lowers it.
    """
    need = estimate_step_bytes(model, input_shape, precision)
    have = available_memory_bytes(device)
    if have is not None and need > have:
        gib = 2**30
        raise MemoryEstimateError(
            f"one training step of {what} on {tuple(input_shape)} inputs needs about "
            f"{need / gib:.1f} GiB, but {have / gib:.1f} GiB are available on {device.type}; "
            "lower optim.batch_size (keep the effective batch with optim.accum_steps), "
            "task.roi or task.num_samples, or set optim.grad_checkpointing=true")
    return need
