"""ONNX files written by ``mim3d export --format onnx``: their mim3d metadata and a runtime.

An exported file carries one ``metadata_props`` entry, key :data:`METADATA_KEY`, whose value is a
JSON object: ``format`` (:data:`ONNX_FORMAT`), ``format_version``, ``mim3d_version``, ``spec``
(the run's ``finetune.json``), ``config`` (its resolved ``config.yaml`` as YAML text),
``weights_sha256``, ``opset`` and the export-time ``check`` against PyTorch. That is all ``mim3d predict`` needs
to preprocess an image as the run did, so the run folder is not needed at inference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["METADATA_KEY", "ONNX_FORMAT", "NotAMim3dExport", "OnnxNetwork", "read_metadata"]

METADATA_KEY = "mim3d"
ONNX_FORMAT = "mim3d-onnx"
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class NotAMim3dExport(ValueError):
    """An ONNX (or TorchScript) file that ``mim3d export`` did not write."""


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The mim3d metadata of an exported ONNX file (module docstring).

    Raises:
        FileNotFoundError: no such file.
        NotAMim3dExport: not an ONNX file, or one without (valid) mim3d metadata.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise NotAMim3dExport(f"{path}: not a readable ONNX file ({type(err).__name__}); pass "
                              "a file written by `mim3d export RUN --format onnx`") from err
    props = {p.key: p.value for p in model.metadata_props}
    try:
        meta = json.loads(props[METADATA_KEY])
        ok = meta.get("format") == ONNX_FORMAT and {"spec", "config"} <= set(meta)
    except (KeyError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise NotAMim3dExport(f"{path}: an ONNX file without mim3d metadata (not a mim3d "
                              "export); export the fine-tuning run with `mim3d export RUN "
                              "--format onnx`")
    return meta


def _providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError("--device cuda: this onnxruntime has no CUDAExecutionProvider; install "
                         "onnxruntime-gpu or use --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxNetwork(nn.Module):
    """An exported network run by ONNX Runtime, callable like the PyTorch one.

    ``forward`` takes ``(B, C, D, H, W)`` float images and returns the logits (seg
    ``(B, K, D, H, W)``, cls ``(B, K)``) as a float32 tensor on the input's device, so
    :func:`mim3d.evaluation.sliding_window_predict` drives it unchanged. It has no parameters.

    Args:
        path: the ``.onnx`` file.
        device: ``cpu`` (CPUExecutionProvider) or ``cuda`` (CUDAExecutionProvider).
    """

    def __init__(self, path: str | Path, device: torch.device) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's warnings are not the user's concern
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                            providers=_providers(device))

    def forward(self, x: Tensor) -> Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)
