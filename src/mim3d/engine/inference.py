"""A fine-tuned network ready for inference, from a run folder or an exported ONNX file.

Shared by :mod:`mim3d.engine.evaluate` and :mod:`mim3d.engine.predict`. Both rebuild what the
run trained with (``RUN/finetune.json`` + ``RUN/config.yaml``, or the same two embedded in an
ONNX export's metadata) and preprocess every image exactly as validation did in training
(:func:`mim3d.data.transforms.build_transforms` with ``train=False``: RAS, the preset's spacing,
intensity, body crop, padding). Segmentation runs a sliding window with the preset's overlap and
Gaussian blending, takes the arg-max, and maps the label map back through the inverse of that
preprocessing (MONAI ``Invertd``, nearest neighbour) onto the image's original grid.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.data import MetaTensor
from monai.transforms import Invertd
from torch import nn

from mim3d.config import FinetuneConfig, config_from_dict
from mim3d.data import readers
from mim3d.data.volume import Volume
from mim3d.engine.checkpoint import load_checkpoint
from mim3d.engine.downstream_run import build_network, predict_logits
from mim3d.engine.train import autocast_context
from mim3d.evaluation import sliding_window_predict
from mim3d.runfolder import (
    BEST_DIR,
    CONFIG_FILE,
    MODEL_FILE,
    SPEC_FILE,
    SPEC_FORMAT,
    CheckpointError,
    find_latest,
)

__all__ = ["LoadedRun", "ReadCapture", "file_sha256", "load_run", "resolve_device",
           "segment_case", "unused_channels"]


@dataclass
class LoadedRun:
    """A fine-tuned network ready for inference, with what describes it.

    Attributes:
        run_dir: the run folder, or the ONNX file it came from.
        spec: the run's ``finetune.json``.
        cfg: the run's resolved config.
        model: the PyTorch network, or an :class:`~mim3d.deploy.onnx_model.OnnxNetwork`.
        checkpoint: the checkpoint folder (or the ONNX file) the weights came from.
        device: where the network runs.
        weights_sha256: SHA-256 of the weights file (``model.safetensors`` or the ``.onnx``).
        runtime: ``torch`` or ``onnxruntime``.
    """

    run_dir: Path
    spec: dict[str, Any]
    cfg: FinetuneConfig
    model: nn.Module
    checkpoint: Path
    device: torch.device
    weights_sha256: str = ""
    runtime: str = "torch"

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts about the model, for reports and side-car files."""
        return {"run": str(self.run_dir.resolve()), "checkpoint": str(self.checkpoint.resolve()),
                "network": self.spec["network"], "size": self.spec["size"],
                "preset": self.cfg.name, "pretrained": self.spec.get("pretrained"),
                "lora_rank": self.spec.get("lora_rank"), "runtime": self.runtime,
                "weights_sha256": self.weights_sha256}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> CUDA when PyTorch sees one, else CPU; ``cpu``/``cuda`` as asked.

    Raises:
        ValueError: an unknown device name, or ``cuda`` without a visible CUDA device.
    """
    name = "auto" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: PyTorch sees no CUDA device here; use --device cpu")
    return torch.device(name)


def _checkpoint_folder(run: Path, which: str | Path) -> Path:
    if str(which) in ("best", "last"):
        where = run / BEST_DIR if str(which) == "best" else run
        found = find_latest(where) if where.is_dir() else None
        if found is None:
            raise CheckpointError(f"{run}: no {which} checkpoint; has the run trained a step? "
                                  "(checkpoint='last' takes the newest training checkpoint)")
        return found
    folder = find_latest(which)
    if folder is None:
        raise CheckpointError(f"{which}: not a checkpoint folder; pass best, last or a ckpt_*")
    return folder


def _load_onnx(path: Path, device: torch.device) -> LoadedRun:
    from mim3d.deploy.onnx_model import OnnxNetwork, read_metadata

    meta = read_metadata(path)
    cfg = config_from_dict("downstream", yaml.safe_load(meta["config"]))
    return LoadedRun(path, meta["spec"], cfg, OnnxNetwork(path, device), path, device,
                     file_sha256(path), runtime="onnxruntime")


def load_run(run: str | Path, *, checkpoint: str | Path = "best",
             device: str | torch.device | None = None) -> LoadedRun:
    """Rebuild a fine-tuning run's network and load its weights.

    Args:
        run: the run folder of ``mim3d finetune``, or an ``.onnx`` file of ``mim3d export``.
        checkpoint: ``best`` (highest validation score), ``last``, or a checkpoint folder
            (ignored for an ONNX file).
        device: ``auto`` (default), ``cpu`` or ``cuda``.

    Raises:
        ValueError: not a fine-tuning run or mim3d export; CheckpointError: no such or a
            damaged checkpoint.
    """
    run, where = Path(run), resolve_device(device)
    if run.suffix.lower() == ".onnx":
        return _load_onnx(run, where)
    spec_path = run / SPEC_FILE
    if not spec_path.is_file() or not (run / CONFIG_FILE).is_file():
        raise ValueError(f"{run}: not a fine-tuning run (no {SPEC_FILE} / {CONFIG_FILE}); pass "
                         "the --out folder of `mim3d finetune` or a model.onnx it exported")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{spec_path}: not a {SPEC_FORMAT} file")
    cfg = config_from_dict("downstream", yaml.safe_load((run / CONFIG_FILE).read_text()))
    folder = _checkpoint_folder(run, checkpoint)
    model = build_network(spec)
    load_checkpoint(folder, model=model, restore_rng=False)
    return LoadedRun(run, spec, cfg, model.to(where).eval(), folder, where,
                     file_sha256(folder / MODEL_FILE))


class ReadCapture:
    """A reader that remembers the volumes it read (original geometry, orientation, labels).

    Args:
        series_uid: the DICOM SeriesInstanceUID to read from a folder (None: the readers' choice).
    """

    def __init__(self, series_uid: str | None = None) -> None:
        self.volumes: dict[str, Volume] = {}
        self.series_uid = series_uid

    def __call__(self, path: str) -> Volume:
        key = str(Path(path))  # one spelling per path: "dir/" and "dir" are the same case
        vol = readers.read_volume(key, series_uid=self.series_uid if Path(key).is_dir() else None)
        self.volumes[key] = vol
        return vol

    def get(self, path: str) -> Volume:
        """The volume read from ``path`` (any spelling of it)."""
        return self.volumes[str(Path(path))]


def unused_channels(spec: dict[str, Any]) -> list[int]:
    """Output channels of a seg network that are no class: ids the label map does not list.

    A datalist naming spleen 1 and liver 6 gives a 7-channel network whose channels 2..5 are
    only ever trained towards background; the arg-max is taken over background and the listed
    classes alone, so a label map never holds an id without a name.
    """
    listed = {0, *(int(i) for i in spec["classes"])}
    return [c for c in range(int(spec["num_classes"])) if c not in listed]


def _logits(loaded: LoadedRun, image: torch.Tensor, progress: bool) -> torch.Tensor:
    task = loaded.cfg.task
    with autocast_context(loaded.device, loaded.cfg.optim.precision):
        if task.task == "seg" and progress:
            return sliding_window_predict(loaded.model, image, roi=task.roi,
                                          overlap=task.sw_overlap, mode="gaussian",
                                          device=loaded.device, progress=True).float().cpu()
        return predict_logits(loaded.model, image, task, loaded.device)


def segment_case(loaded: LoadedRun, ds: Any, index: int, capture: ReadCapture, *,
                 progress: bool = False, timer: Any = None) -> tuple[np.ndarray, Volume]:
    """Label map ``(X, Y, Z)`` int32 of case ``index`` on its image's original (RAS) grid.

    Args:
        loaded: the network.
        ds: a dataset of :func:`mim3d.data.transforms.make_dataset` (``train=False``) whose
            reader is ``capture``.
        index: the case.
        capture: the reader that read it (gives the original volume back).
        progress: a progress bar (with ETA) over the sliding windows.
        timer: a :class:`mim3d.deploy.report.StageTimer` to time ``read_preprocess``,
            ``inference`` and ``postprocess`` in.

    Returns:
        ``(labels, volume)``: the label ids and the volume as read.
    """
    def stage(name: str) -> AbstractContextManager[Any]:
        return timer.stage(name) if timer is not None else nullcontext()

    with stage("read_preprocess"):
        image = ds[index]["image"]
    with stage("inference"):
        logits = _logits(loaded, image.as_tensor()[None], progress)
    with stage("postprocess"):
        logits[:, unused_channels(loaded.spec)] = float("-inf")
        pred = MetaTensor(logits.argmax(1).float(), affine=image.affine)
        # Invertd replays the image's recorded operations backwards (unpad, uncrop, resample to
        # the original affine) with nearest-neighbour interpolation, so label ids stay intact.
        invert = Invertd(keys="pred", transform=ds.transform, orig_keys="image",
                         nearest_interp=True)
        back = invert({"image": image, "pred": pred})["pred"]
    source = image.meta["filename_or_obj"]
    vol = capture.get(source if isinstance(source, str) else source[0])
    if tuple(back.shape[1:]) != vol.shape[:3]:
        raise RuntimeError(f"inverse preprocessing gave {tuple(back.shape[1:])}, not the "
                           f"image grid {vol.shape[:3]}")
    return np.rint(back[0].numpy()).astype(np.int32), vol
