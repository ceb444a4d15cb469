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
# (name, shape (B, C, D, H, W), kernel, layout, dtype, voxel tiles per weight-grad program):
# odd sizes, channel counts that are no power of two (and > one 64-channel block), voxel tiles
# (64) that end mid-volume and span two volumes, one and several weight-grad partial sums,
# several memory layouts. The interpreter runs ~1 ms per tap and tile: sizes stay tiny.
CASES = [
    ("k5_channels_first", (1, 3, 3, 4, 5), 5, "contiguous", "float32", 16),
    ("k3_channels_last", (2, 5, 3, 4, 5), 3, "channels_last", "float32", 16),
    ("k3_channels_last_split_wgrad", (2, 5, 3, 4, 5), 3, "channels_last", "float32", 1),
    ("k3_sliced_view_66_channels", (1, 66, 3, 2, 3), 3, "sliced", "float32", 16),
    ("k3_permuted_bf16", (1, 6, 5, 3, 7), 3, "permuted", "bfloat16", 16),
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


def _check_case(shape: tuple[int, ...], k: int, layout: str, dtype: str, tiles: int,
                seed: int) -> dict:
    """Relative errors of out, dx, dw, db vs float64 ``F.conv3d`` autograd."""
    import torch
    import torch.nn.functional as F

    from mim3d.kernels import depthwise

    depthwise._WGRAD_TILES = tiles

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
            "shape": list(out.shape)}


def _main() -> None:
    """Child process: every case, as one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps({name: _check_case(*spec, seed=i)
                      for i, (name, *spec) in enumerate(CASES)}))


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
