"""The Triton depthwise conv against ``F.conv3d``, on the CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the checks run in a child
process (this file run as a script); the pytest process itself never imports triton and the
variable never reaches other tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# (name, shape (B, C, D, H, W), kernel, layout, dtype, weight-grad split (a config of
# mim3d.kernels.depthwise and fields changed), largest grid z): odd sizes, channel counts that
# are no power of two (and > one channel block), voxel tiles that end mid-volume and span two
# volumes, tap groups that end past k^3, one and several weight-grad partial sums, tiles grown to
# keep the grid under its limit, several memory layouts, the one-tap-per-program split. The
# interpreter runs ~1 ms per tap and tile: sizes stay tiny.
CASES = [
    ("k5_channels_first", (1, 3, 3, 4, 5), 5, "contiguous", "float32", ("WGRAD", {}), 65535),
    ("k3_channels_last", (2, 5, 3, 4, 5), 3, "channels_last", "float32", ("WGRAD", {}), 65535),
    ("k3_channels_last_split_wgrad", (2, 5, 3, 4, 5), 3, "channels_last", "float32",
     ("WGRAD", {"tiles": 1}), 65535),
    ("k3_grid_limit_grows_tiles", (3, 5, 3, 4, 5), 3, "channels_last", "float32",
     ("WGRAD", {"tiles": 1}), 2),
    ("k3_sliced_view_66_channels", (1, 66, 3, 2, 3), 3, "sliced", "float32", ("WGRAD", {}),
     65535),
    ("k5_per_tap_channels_last", (1, 5, 3, 4, 5), 5, "channels_last", "float32",
     ("WGRAD_PER_TAP", {}), 65535),
    ("k3_per_tap_66_channels", (1, 66, 3, 2, 3), 3, "channels_last", "float32",
     ("WGRAD_PER_TAP", {}), 65535),
    ("k3_permuted_bf16", (1, 6, 5, 3, 7), 3, "permuted", "bfloat16", ("WGRAD", {}), 65535),
]


def _layout(x, layout: str):
    """The same values as ``x`` (B, C, D, H, W) in the requested memory layout."""
    import torch

    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "sliced":  # a strided view: every other voxel along W of a wider tensor
        wide = torch.zeros(*x.shape[:4], 2 * x.shape[4], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "permuted":  # (B, W, H, D, C) memory seen as (B, C, D, H, W)
        return x.permute(0, 4, 3, 2, 1).contiguous().permute(0, 4, 3, 2, 1)
    return x.contiguous()


def _check_case(shape: tuple[int, ...], k: int, layout: str, dtype: str,
                wgrad: tuple[str, dict], max_grid: int, seed: int) -> dict:
    """Relative errors of out, dx, dw, db vs float64 ``F.conv3d`` autograd."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from mim3d.kernels import depthwise

    config = dataclasses.replace(getattr(depthwise, wgrad[0]), **wgrad[1])
    depthwise._WGRAD, depthwise._MAX_GRID_YZ = config, max_grid

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    x = torch.randn(*shape, generator=g).to(dt)
    w = torch.randn(shape[1], 1, k, k, k, generator=g)
    b = torch.randn(shape[1], generator=g)
    grad = torch.randn(*shape, generator=g).to(dt)
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    out_ref = F.conv3d(*ref, padding=k // 2, groups=shape[1])
    out_ref.backward(grad.double())
    ours = [_layout(x, layout).requires_grad_(), w.clone().requires_grad_(),
            b.clone().requires_grad_()]
    out = depthwise.depthwise_conv3d_triton(*ours)
    out.backward(_layout(grad, layout))

    def rel(a, r):
        a = a.detach().double()
        return float("nan") if not torch.isfinite(a).all() else float((a - r).norm() / r.norm())

    return {"out": rel(out, out_ref.detach()), "dx": rel(ours[0].grad, ref[0].grad),
            "dw": rel(ours[1].grad, ref[1].grad), "db": rel(ours[2].grad, ref[2].grad),
            "dtypes": [str(out.dtype), str(ours[0].grad.dtype), str(ours[1].grad.dtype)],
            "shape": list(out.shape),
            "split": depthwise.wgrad_split(out[:, 0].numel(), config.block_p, config.tiles)}


def _conv_block_case() -> dict:
    """A masked ConvBlock under bf16 autocast, recomputed in backward (as on CUDA), through the
    Triton kernels against the same block through ``F.conv3d``; and the strides the kernels saw."""
    import torch
    from torch.utils.checkpoint import checkpoint

    import mim3d.kernels.conv as conv_mod
    from mim3d.kernels import depthwise
    from mim3d.models.layers import ConvBlock

    seen = []

    def spy(fn, volumes: int):  # the first ``volumes`` arguments are (B, C, D, H, W) tensors
        def run(*args, **kwargs):
            seen.append((fn.__name__, all(t.stride(1) == 1 for t in args[:volumes])))
            return fn(*args, **kwargs)
        return run

    originals = depthwise.dw_conv3d_forward, depthwise.dw_conv3d_weight_grad, conv_mod._use_triton
    depthwise.dw_conv3d_forward = spy(depthwise.dw_conv3d_forward, 1)
    depthwise.dw_conv3d_weight_grad = spy(depthwise.dw_conv3d_weight_grad, 2)
    conv_mod._use_triton = lambda x, impl: impl != "cudnn"  # the CUDA dispatch, on the CPU
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    block = ConvBlock(8, kernel_size=3)
    x = torch.randn(2, 8, 4, 4, 4, generator=g).contiguous(memory_format=torch.channels_last_3d)
    mask = (torch.rand(2, 1, 4, 4, 4, generator=g) > 0.4).float()
    results = []
    for impl in ("triton", "cudnn"):
        block.depthwise_impl = impl
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = checkpoint(block, xi, mask, use_reentrant=False)
        (y.float() ** 2).mean().backward()
        results.append([y.detach().float(), xi.grad.float(),
                        *(p.grad.float() for p in block.parameters())])
    depthwise.dw_conv3d_forward, depthwise.dw_conv3d_weight_grad, conv_mod._use_triton = originals
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(*results, strict=True)]
    return {"max_rel_error": max(errors), "calls": seen}


def _too_many_voxels_case() -> str | None:
    """The error of a conv over 2^31 voxels (an expanded view: no memory), or None."""
    import torch

    from mim3d.kernels import depthwise

    huge = torch.zeros(1, 2, 1, 1, 1).expand(1, 2, 2**11, 2**11, 2**9)
    try:
        depthwise.dw_conv3d_forward(huge, torch.zeros(2, 1, 3, 3, 3), None)
    except ValueError as e:
        return str(e)
    return None


def _main() -> None:
    """Child process: every case, as one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from mim3d.kernels import depthwise

    out = {name: _check_case(*spec, seed=i) for i, (name, *spec) in enumerate(CASES)}
    depthwise._WGRAD, depthwise._MAX_GRID_YZ = depthwise.WGRAD, 65535
    # MiM base stage 1 in one pass: 21 volumes of 48^3 per sample
    cfg = depthwise.WGRAD
    out["base_split"] = {f"b{b}": depthwise.wgrad_split(21 * b * 48**3, cfg.block_p, cfg.tiles)
                         for b in (28, 29)}
    out["conv_block"] = _conv_block_case()
    out["too_many_voxels"] = _too_many_voxels_case()
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton, or a CUDA build of torch): "
                    "the Triton depthwise conv cannot be checked")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_triton_depthwise_matches_conv3d(interpreted: dict, case: str) -> None:
    """Forward, input, weight and bias gradients within the input precision's error."""
    r = interpreted[case]
    bf16 = "bf16" in case
    tol = 1e-2 if bf16 else 1e-5  # bf16 inputs/outputs: ~3 significant digits
    assert r["out"] < tol and r["dx"] < tol, r
    assert r["dw"] < (1e-2 if bf16 else 1e-5) and r["db"] < tol, r
    want = "torch.bfloat16" if bf16 else "torch.float32"
    assert r["dtypes"] == [want, want, "torch.float32"]  # weight grads stay fp32


def test_conv_block_on_triton_matches_and_stays_channels_last(interpreted: dict) -> None:
    """The encoder's block (mask, bf16 autocast, recompute) gives F.conv3d's values, and every
    kernel launch, forward, recompute and both gradients, gets channels-last memory (C stride
    1: the layout compiled for in ``test_kernels_hopper.py``)."""
    r = interpreted["conv_block"]
    assert r["max_rel_error"] < 2e-2, r  # bf16 activations: ~3 significant digits
    names = [c[0] for c in r["calls"]]
    assert names.count("dw_conv3d_forward") == 3, names  # forward, recompute, input grad
    assert names.count("dw_conv3d_weight_grad") == 1, names
    assert all(channels_last for _, channels_last in r["calls"]), r["calls"]


def test_more_voxels_than_int32_indices_is_one_clear_error(interpreted: dict) -> None:
    message = interpreted["too_many_voxels"]
    assert message and "at most" in message and "depthwise_impl=cudnn" in message, message


def test_weight_grad_split_respects_the_grid_limit(interpreted: dict) -> None:
    """(tiles, slices): 32 x 32-voxel tiles per program, grown only past CUDA's grid limit."""
    assert interpreted["k5_channels_first"]["split"] == [2, 1]  # 60 voxels: 2 tiles, one short
    assert interpreted["k3_channels_last"]["split"] == [4, 1]  # 120 voxels
    assert interpreted["k3_channels_last_split_wgrad"]["split"] == [1, 4]
    assert interpreted["k3_grid_limit_grows_tiles"]["split"] == [3, 2]  # 180 voxels, 2 slices
    assert interpreted["k5_per_tap_channels_last"]["split"] == [1, 1]  # 64-voxel tiles
    big = interpreted["base_split"]
    assert big["b28"] == [32, 63504] and big["b29"] == [33, 63779], big


def test_depthwise_dispatch_rejects_unknown_impl() -> None:
    import torch

    from mim3d.models.layers import ConvBlock, depthwise_conv3d

    with pytest.raises(ValueError, match="depthwise_impl='fast'"):
        depthwise_conv3d(torch.zeros(1, 2, 3, 3, 3), torch.zeros(2, 1, 3, 3, 3), None, 1,
                         impl="fast")
    with pytest.raises(ValueError, match="depthwise_impl"):
        ConvBlock(4, depthwise_impl="fast")


if __name__ == "__main__":
    _main()
