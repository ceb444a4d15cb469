"""Process-level settings that make CPU training faster."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

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
