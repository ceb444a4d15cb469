"""Custom GPU kernels (Triton). Importing this package never imports triton itself."""

from __future__ import annotations

import importlib.util

__all__ = ["triton_available"]


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it ships with CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None
