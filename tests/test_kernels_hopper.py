"""The Triton depthwise kernels compiled for Hopper (sm_90) on the CPU, with Triton's own ptxas.

The interpreter (``test_kernels.py``) checks the kernels' values but not what the GPU runs. Here
each kernel is compiled ahead of time for an H100 / H200 at MiM base's shapes, with the
specialization Triton's JIT gives those launches (an int argument equal to 1 becomes a
constant, ints divisible by 16 and torch's 16-byte aligned pointers are marked so), and the
machine code is read back: it must build, keep every value in registers (no local-memory
spills) and load channels-last rows with 128-bit loads. Runs in a child process, like
``test_kernels.py``, so the pytest process never imports triton.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TY = {"bfloat16": "bf16", "float32": "fp32"}
# (stage, channels, side, dtype): MiM base's conv stages, 21 level volumes of one sample
SHAPES = [("stage1", 48, 48, "bfloat16"), ("stage2", 96, 24, "bfloat16"),
          ("stage1", 48, 48, "float32")]


def _compile(fn, args: list, consts: dict, tools: Path, num_warps: int = 4) -> dict:
    """Compile ``fn`` for sm_90 as the JIT would for ``args``; registers, spills, loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = inspect.getfullargspec(fn.fn).args
    sig, cx, attrs = {}, dict(consts), {}
    for i, (name, arg) in enumerate(zip(names, args, strict=False)):
        if isinstance(arg, str):  # a pointer to this dtype
            sig[name] = "*" + TY[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg == 1:
            sig[name], cx[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if arg % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    sig |= {name: "constexpr" for name in consts}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage, sass = (subprocess.run([str(tools / "cuobjdump"), flag, f.name],
                                      capture_output=True, text=True, check=True).stdout
                       for flag in ("--dump-resource-usage", "--dump-sass"))
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "local_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
            "loads_128": len(re.findall(r"\bLDG\.E\.128\b", sass))}


def _main() -> None:
    """Child process: every kernel at every shape, as one JSON line."""
    import triton

    from mim3d.kernels import depthwise as dw

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    out = {}
    for stage, c, s, dt in SHAPES:
        n = 21 * s**3
        strides = [s**3 * c, s * s * c, s * c, c, 1]  # (B, D, H, W, C) of channels-last
        wg = dw.WGRAD
        tiles, _ = dw.wgrad_split(n, wg.block_p, wg.tiles)
        shape = [n, c, s, s, s, *strides, *strides]
        for name, bias, flip in (("forward", True, False), ("input_grad", False, True)):
            out[f"{stage}_{dt}_{name}"] = _compile(
                dw._dw_fwd_kernel, [dt, "float32", "float32", dt, *shape],
                {"K": 5, "HAS_BIAS": bias, "FLIP": flip, "BLOCK_P": dw._BLOCK_P,
                 "BLOCK_C": dw._block_c(c)}, tools)
        out[f"{stage}_{dt}_weight_grad"] = _compile(
            dw._dw_wgrad_kernel, [dt, dt, "float32", *shape],
            {"K": 5, "TAPS": wg.taps, "BLOCK_P": wg.block_p, "BLOCK_C": min(wg.block_c, c),
             "TILES": tiles}, tools, wg.num_warps)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def compiled() -> dict:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        pytest.skip("triton is not installed (pip install triton, or a CUDA build of torch): "
                    "the Triton depthwise conv cannot be compiled")
    tools = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip(f"this triton has no NVIDIA ptxas / cuobjdump in {tools}: the kernels "
                    "cannot be compiled for Hopper here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_DEFAULT_FP_FUSION": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", [f"{st}_{dt}_{k}" for st, _, _, dt in SHAPES
                                    for k in ("forward", "input_grad", "weight_grad")])
def test_kernel_builds_for_hopper_without_spills(compiled: dict, kernel: str) -> None:
    """sm_90 machine code: no local memory, registers under the 255 cap, 128-bit row loads."""
    r = compiled[kernel]
    assert r["stack"] == 0 and r["local_ops"] == 0, r  # a spill would read local memory
    assert 0 < r["registers"] < 255, r
    assert r["loads_128"] > 0, r  # channels-last rows are contiguous: vector loads


if __name__ == "__main__":
    _main()
