"""CUDA only: cuDNN's 3D depthwise conv by memory layout and precision, alone and in a MiM step.

The hybrid encoder's ConvBlocks feed the 5^3 depthwise conv a channels-last view. On an H200,
cuDNN's channels-last bf16 depthwise *weight-gradient* kernel took 98% of a MiM base step, so
``depthwise_conv3d`` handed cuDNN channels-first memory on CUDA; since issue 12 the library's
default there is mim3d's Triton kernel (``library``; ``library_wgrad_per_tap`` is the same with
the first weight-gradient split, one tap per program), cuDNN channels-first is ``library_cudnn``.
This script measures those and the four cuDNN layouts x precisions side by side in one run: the
conv alone (fwd+bwd, batch 2) and one real ``train_step`` of the ``base`` preset on a 192^3 level-1 crop (21 volumes,
bf16 autocast), with ``depthwise_conv3d`` replaced by each variant.

    PYTHONPATH=src python3 benchmarks/depthwise_cuda.py        # GPU only, ~1 min
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _step_profile import conv_seconds, median_seconds
from torch import Tensor

from mim3d.config import load_config
from mim3d.engine.train import train_step
from mim3d.factory import build_mim, geometry_from_config
from mim3d.kernels import depthwise
from mim3d.models import layers

OUT = Path(__file__).parent / "results" / "depthwise_cuda.json"
Conv = Callable[[Tensor, Tensor, Tensor | None, int, str], Tensor]


def _variant(fp32: bool, channels_last: bool) -> Conv:
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format

    def conv(x: Tensor, w: Tensor, b: Tensor | None, padding: int, impl: str = "") -> Tensor:
        dtype = torch.float32 if fp32 else x.dtype
        with torch.autocast("cuda", enabled=False):
            y = F.conv3d(x.to(dtype).contiguous(memory_format=fmt), w.to(dtype),
                         None if b is None else b.to(dtype), padding=padding, groups=w.shape[0])
        return y.to(x.dtype)

    return conv


VARIANTS = {"bf16_channels_last": _variant(False, True),
            "bf16_channels_first": _variant(False, False),
            "fp32_channels_last": _variant(True, True),
            "fp32_channels_first": _variant(True, False)}


def conv_alone(conv: Conv, shape: tuple[int, ...]) -> float:
    """Median fwd+bwd seconds of one depthwise 5^3 conv on a bf16 channels-last input."""
    return conv_seconds(conv, shape, torch.device("cuda"))


def mim_step(conv: Conv) -> tuple[float, float]:
    """(median seconds, peak MiB) of a base-preset train_step on one 192^3 crop."""
    layers.depthwise_conv3d = conv  # ConvBlock looks the function up at call time
    cfg = load_config("pretrain", "base", overrides=["optim.batch_size=1", "optim.precision=bf16"])
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_mim(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, geo, step = torch.rand(1, 1, 192, 192, 192, device=dev), geometry_from_config(cfg.geometry), [0]

    def once() -> None:
        train_step(model, opt, itertools.repeat(x), cfg=cfg, geometry=geo, step=step[0], rank=0,
                   device=dev)
        step[0] += 1

    torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(once, dev, runs=4)
    return seconds, torch.cuda.max_memory_allocated() / 2**20


def main() -> int:
    if not torch.cuda.is_available():
        print("depthwise_cuda.py needs a CUDA GPU", file=sys.stderr)
        return 2
    original, results = layers.depthwise_conv3d, {}
    try:
        def cudnn(x: Tensor, w: Tensor, b: Tensor | None, padding: int, impl: str = "") -> Tensor:
            return original(x, w, b, padding, "cudnn")

        runs = {"library": (original, depthwise.WGRAD),
                "library_wgrad_per_tap": (original, depthwise.WGRAD_PER_TAP),
                "library_cudnn": (cudnn, None), **{k: (v, None) for k, v in VARIANTS.items()}}
        for name, (conv, wgrad) in runs.items():
            depthwise._WGRAD = wgrad or depthwise.WGRAD  # the split the backward passes use
            step_s, peak = mim_step(conv)
            results[name] = {"dw_2x48x48^3_s": conv_alone(conv, (2, 48, 48, 48, 48)),
                             "dw_2x96x24^3_s": conv_alone(conv, (2, 96, 24, 24, 24)),
                             "mim_sample_step_s": step_s, "peak_mib": peak}
            torch.cuda.empty_cache()
    finally:
        layers.depthwise_conv3d, depthwise._WGRAD = original, depthwise.WGRAD
    speedup = (results["bf16_channels_last"]["mim_sample_step_s"]
               / results["bf16_channels_first"]["mim_sample_step_s"])
    for name, r in results.items():
        print(f"RESULT mim_sample_step_s_{name} {r['mim_sample_step_s']:.4g}")
        print(f"RESULT dw_2x48x48^3_s_{name} {r['dw_2x48x48^3_s']:.4g}")
    print(f"RESULT mim_step_speedup_channels_first {speedup:.3g}")
    OUT.write_text(json.dumps({"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(0),
                               "torch": torch.__version__, "variants": results,
                               "mim_step_speedup_channels_first": speedup}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
