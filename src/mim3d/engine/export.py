"""``mim3d export RUN --format onnx|torchscript|bundle``: a fine-tuned network leaves mim3d.

Every downstream network (MiM-UNETR, UNETR, SwinUNETR, the classifier) exports; LoRA adapters
are merged into plain layers first. The exported graph takes ``(B, C, *roi)`` float32 images
(any batch size B, the run's ROI as spatial size: sliding-window inference feeds it ROI
windows) and returns the logits, seg ``(B, K, *roi)`` or cls ``(B, K)``.

* **ONNX**: opset :data:`ONNX_OPSET` (17, the first with a single ``LayerNormalization`` op,
  which the hybrid encoder, the ViT and Swin use; every other op used - Conv,
  ConvTranspose, InstanceNormalization, MatMul, Softmax, Erf for GELU - is older), a dynamic
  batch axis, checked with ``onnx.checker``, and the mim3d metadata of
  :mod:`mim3d.deploy.onnx_model` so ``mim3d predict --model model.onnx`` needs no run folder.
* **TorchScript**: ``torch.jit.trace`` (the networks have no data-dependent control flow at a
  fixed ROI), with the same metadata as the ``mim3d.json`` extra file.

Before a file is written, the export is run (ONNX Runtime on CPU / the traced module) on a
seeded batch of two inputs and its logits must match PyTorch's within :data:`TOLERANCE`
(:data:`NETWORK_ATOL` for SwinUNETR); the measured difference is recorded in the metadata. Outputs are written to a temporary name and
renamed, and an existing output is refused.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mim3d import __version__
from mim3d.deploy.onnx_model import INPUT_NAME, METADATA_KEY, ONNX_FORMAT, OUTPUT_NAME
from mim3d.engine.inference import LoadedRun, load_run
from mim3d.fileio import write_atomically
from mim3d.runfolder import CONFIG_FILE

__all__ = ["EXPORT_FORMATS", "NETWORK_ATOL", "ONNX_OPSET", "TOLERANCE", "ExportError",
           "export_metadata", "export_run", "exportable_network", "sample_input",
           "save_torchscript", "tolerance_for", "trace_network"]

EXPORT_FORMATS = ("onnx", "torchscript", "bundle")
ONNX_OPSET = 17
#: ``|exported - torch| <= atol + rtol * |torch|`` elementwise, on float32 logits.
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
#: SwinUNETR's instance norms at its 1/32 bottleneck (2^3 voxels for a 64^3 ROI) amplify the
#: float32 rounding differences of ONNX Runtime's kernels: up to 1.5e-3 on a real CT patch
#: (MiM-UNETR, UNETR and the classifier stay below 1e-5).
NETWORK_ATOL = {"swinunetr": 5e-3}
TORCHSCRIPT_FORMAT = "mim3d-torchscript"
TORCHSCRIPT_EXTRA = "mim3d.json"


class ExportError(ValueError):
    """The export cannot be written, or does not reproduce the PyTorch network."""


def exportable_network(loaded: LoadedRun) -> nn.Module:
    """The run's network on the CPU in eval mode without gradients, LoRA merged into plain
    layers."""
    model = copy.deepcopy(loaded.model).cpu().eval()
    if loaded.spec.get("lora_rank"):
        from mim3d.models.lora import merge_lora

        model = merge_lora(model)
    # An inference graph: with no parameter needing a gradient, the networks take their plain
    # tensor-op paths (e.g. the depthwise conv skips its custom autograd Function).
    model.requires_grad_(False)
    return model


def sample_input(spec: dict[str, Any], batch: int = 2, seed: int = 0) -> Tensor:
    """A seeded ``(batch, C, *roi)`` float32 input in [0, 1] (the range after normalisation)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, int(spec["in_channels"]), *map(int, spec["roi"])), generator=gen)


def tolerance_for(network: str) -> dict[str, float]:
    """The ``rtol``/``atol`` an export of ``network`` must meet (:data:`TOLERANCE`)."""
    return {**TOLERANCE, "atol": NETWORK_ATOL.get(network, TOLERANCE["atol"])}


def _compare(exported: Callable[[Tensor], np.ndarray], model: nn.Module, x: Tensor,
             network: str) -> dict[str, Any]:
    with torch.no_grad():
        ref = model(x).float().numpy()
    got = np.asarray(exported(x), dtype=np.float32)
    if got.shape != ref.shape:
        raise ExportError(f"exported logits have shape {got.shape}, PyTorch's {ref.shape}")
    diff, tol = float(np.abs(got - ref).max()), tolerance_for(network)
    ok = bool(np.allclose(got, ref, **tol))
    check = {"batch": int(x.shape[0]), "max_abs_diff": diff, **tol, "passed": ok}
    if not ok:
        raise ExportError(f"exported logits differ from PyTorch's by up to {diff:.3g} (beyond "
                          f"rtol {tol['rtol']}, atol {tol['atol']})")
    return check


def export_metadata(loaded: LoadedRun, fmt: str, check: dict[str, Any]) -> dict[str, Any]:
    return {"format": fmt, "format_version": 1, "mim3d_version": __version__,
            "spec": loaded.spec,
            # YAML text, not a JSON object: JSON would turn the labels' int keys into strings
            "config": (loaded.run_dir / CONFIG_FILE).read_text(),
            "checkpoint": str(loaded.checkpoint.resolve()),
            "weights_sha256": loaded.weights_sha256, "opset": ONNX_OPSET, "check": check,
            "input": {"name": INPUT_NAME, "shape": ["batch", loaded.spec["in_channels"],
                                                    *loaded.spec["roi"]]},
            "output": OUTPUT_NAME}


def _onnx_bytes(model: nn.Module, x: Tensor) -> bytes:
    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on shape checks that the fixed ROI fixes
        torch.onnx.export(model, (x[:1],), buffer, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes,
                          opset_version=ONNX_OPSET, dynamo=False)
    return buffer.getvalue()


def _export_onnx(loaded: LoadedRun, out: Path) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    model, x = exportable_network(loaded), sample_input(loaded.spec)
    proto = onnx.load_from_string(_onnx_bytes(model, x))
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    check = _compare(lambda t: session.run([OUTPUT_NAME], {INPUT_NAME: t.numpy()})[0], model, x,
                     loaded.spec["network"])
    meta = export_metadata(loaded, ONNX_FORMAT, check)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    proto.producer_name, proto.producer_version = "mim3d", __version__
    write_atomically(out, lambda tmp: onnx.save(proto, str(tmp)))
    return meta


def trace_network(loaded: LoadedRun) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The run's network traced by ``torch.jit`` and its check against PyTorch."""
    model, x = exportable_network(loaded), sample_input(loaded.spec)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on the ROI shape checks; deprecation
        traced = torch.jit.trace(model, x[:1], check_trace=False)
    check = _compare(lambda t: traced(t).detach().numpy(), model, x, loaded.spec["network"])
    return traced, check


def save_torchscript(traced: torch.jit.ScriptModule, meta: dict[str, Any], out: Path) -> None:
    """``torch.jit.save`` with the metadata as the ``mim3d.json`` extra file, atomically."""
    extra = {TORCHSCRIPT_EXTRA: json.dumps(meta)}
    write_atomically(out, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files=extra))


def _export_torchscript(loaded: LoadedRun, out: Path) -> dict[str, Any]:
    traced, check = trace_network(loaded)
    meta = export_metadata(loaded, TORCHSCRIPT_FORMAT, check)
    save_torchscript(traced, meta, out)
    return meta


def export_run(run: str | Path, out: str | Path, *, fmt: str,
               checkpoint: str | Path = "best") -> tuple[Path, dict[str, Any]]:
    """Export a fine-tuning run's network (module docstring).

    Args:
        run: the run folder of ``mim3d finetune``.
        out: ``model.onnx``, ``model.ts`` or the bundle folder (must not exist).
        fmt: ``onnx``, ``torchscript`` or ``bundle`` (:mod:`mim3d.engine.bundle`).
        checkpoint: ``best``, ``last`` or a checkpoint folder.

    Returns:
        ``(path, metadata)``: what was written and its metadata; ``metadata["check"]`` holds
        the comparison with PyTorch (``max_abs_diff``, ``rtol``, ``atol``).

    Raises:
        ExportError: unknown format, an existing output, or an export that does not
            reproduce PyTorch; ValueError: not a fine-tuning run.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out}: exists; remove it or choose another --out")
    if Path(run).suffix.lower() == ".onnx":
        raise ExportError(f"{run}: already an export; pass the fine-tuning run folder")
    loaded = load_run(run, checkpoint=checkpoint, device="cpu")
    if fmt == "bundle":
        from mim3d.engine.bundle import write_bundle

        meta = write_bundle(loaded, out)
        return out, {**meta, "check": meta["mim3d"]["export_check"]}
    meta = _export_onnx(loaded, out) if fmt == "onnx" else _export_torchscript(loaded, out)
    return out, meta
