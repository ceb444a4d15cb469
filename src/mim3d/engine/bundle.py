"""A fine-tuned segmentation run as a MONAI bundle folder.

Layout::

    BUNDLE/configs/metadata.json   versions, label names (network_data_format), mim3d's spec
    BUNDLE/configs/inference.json  preprocessing, sliding window, post-processing, saver
    BUNDLE/models/model.ts         the network traced by torch.jit (mim3d.engine.export)
    BUNDLE/docs/README.md          how to run it

Run it from the bundle folder with MONAI alone (no mim3d needed)::

    python -m monai.bundle run --config_file configs/inference.json \
        --image CT.nii.gz --output_dir out/

The preprocessing is the run's, with MONAI's own transforms: LoadImaged + EnsureChannelFirstd,
Orientationd RAS, Spacingd to the preset's spacing (bilinear), the preset's intensity
normalisation (HU window -> [0, 1] clipped, z-score on non-zero voxels, or min-max),
CropForegroundd on voxels > 0 (!= 0 after z-score), SpatialPadd to the ROI; then Gaussian sliding
windows with the preset's overlap, the arg-max over background and the named classes,
``Invertd`` (nearest neighbour) back onto the input's grid and ``SaveImaged`` as
``<name>_seg.nii.gz``. That is the pipeline of :mod:`mim3d.data.transforms` with
``train=False``, so the bundle's labels match ``mim3d predict``'s on the same CT (100% of
voxels on the test CT). One known difference: where an input voxel centre falls *exactly*
midway between two model-grid voxels (rational spacing ratios such as 3 mm data on a 4 mm
model grid), MONAI's nearest neighbour (``grid_sample``, ties to even) and mim3d's (SciPy,
ties upward) may pick different neighbours; with a 4 mm model on 3 mm data that changed 5% of
the voxels of an untrained network's map, at label boundaries.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from mim3d import __version__
from mim3d.deploy.report import preprocessing_of
from mim3d.engine.inference import LoadedRun, unused_channels

__all__ = ["BUNDLE_VERSION", "inference_config", "metadata", "write_bundle"]

BUNDLE_VERSION = "0.1.0"
_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
           "meta_schema_20220324.json")


def _intensity(data: Any) -> list[dict[str, Any]]:
    if data.normalization == "window":
        lo, hi = data.hu_window
        return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": float(lo),
                 "a_max": float(hi), "b_min": 0.0, "b_max": 1.0, "clip": True}]
    if data.normalization == "zscore":
        return [{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True,
                 "channel_wise": True}]
    return [{"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}]


def _preprocessing(loaded: LoadedRun) -> list[dict[str, Any]]:
    data, task = loaded.cfg.data, loaded.cfg.task
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    ]
    if data.spacing is not None:
        steps.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(data.spacing),
                      "mode": "bilinear"})
    steps += _intensity(data)
    crop = {"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
            "allow_smaller": True}
    if data.normalization == "zscore":
        crop["select_fn"] = "$lambda x: x != 0"
    steps += [crop, {"_target_": "SpatialPadd", "keys": "image",
                     "spatial_size": list(task.roi), "mode": "constant"},
              {"_target_": "EnsureTyped", "keys": "image"}]
    return steps


def inference_config(loaded: LoadedRun) -> dict[str, Any]:
    """``configs/inference.json`` of the run (module docstring)."""
    task = loaded.cfg.task
    dtype = "$numpy.uint8" if int(loaded.spec["num_classes"]) <= 256 else "$numpy.uint16"
    post = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": "image", "nearest_interp": True, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
             "output_postfix": "seg", "output_dtype": dtype, "resample": False,
             "separate_folder": False, "print_log": False}]
    unused = unused_channels(loaded.spec)
    if unused:  # as mim3d predict: the arg-max runs over background and the named classes
        post.insert(0, {"_target_": "Lambdad", "keys": "pred",
                        "func": f"$lambda x: x.index_fill(0, torch.tensor({unused}), "
                                "float('-inf'))"})
    return {
        "imports": ["$import numpy", "$import torch"],
        "bundle_root": ".",
        "image": "",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "datalist": "$[{'image': @image}]",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(loaded)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(task.roi),
                    "sw_batch_size": 2, "overlap": float(task.sw_overlap), "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "amp": False},
        "run": ["$@evaluator.run()"],
    }


def metadata(loaded: LoadedRun, check: dict[str, Any]) -> dict[str, Any]:
    """``configs/metadata.json``: versions, input/output format with the label names, and the
    run's mim3d spec, preprocessing and export check."""
    spec, roi = loaded.spec, list(loaded.spec["roi"])
    channels = {"0": "background", **spec["classes"]}
    window = loaded.cfg.data.hu_window if loaded.cfg.data.normalization == "window" else None
    image = {"type": "image", "format": "hounsfield" if window else "magnitude",
             "modality": "CT" if window else "unknown", "num_channels": spec["in_channels"],
             "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1],
             "is_patch_data": True, "channel_def": {"0": "image"}}
    pred = {"type": "image", "format": "segmentation", "num_channels": spec["num_classes"],
            "spatial_shape": roi, "dtype": "float32", "value_range": [],
            "is_patch_data": True, "channel_def": channels}
    return {
        "schema": _SCHEMA, "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by mim3d {__version__}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "required_packages_version": {},
        "name": f"mim3d {spec['network']} ({loaded.cfg.name})",
        "task": f"CT segmentation: {', '.join(spec['classes'].values())}",
        "description": f"{spec['network']} (size {spec['size']}) fine-tuned with mim3d, preset "
                       f"{loaded.cfg.name}; labels: {json.dumps(channels)}",
        "authors": "mim3d export", "copyright": "see the training data's licence",
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": pred}},
        "mim3d": {"spec": spec, "preprocessing": preprocessing_of(loaded.cfg),
                  "weights_sha256": loaded.weights_sha256, "export_check": check},
    }


_README = """# {name}

Exported by mim3d {version}. Labels: {labels}.

    cd THIS_FOLDER
    python -m monai.bundle run --config_file configs/inference.json \\
        --image /path/to/ct.nii.gz --output_dir /path/to/out

The label map is written as `<image name>_seg.nii.gz` on the input's own grid.
"""


def write_bundle(loaded: LoadedRun, out: Path) -> dict[str, Any]:
    """Write the bundle folder ``out`` (must not exist); returns its metadata.

    Raises:
        ValueError: a classification run (the bundle's pipeline segments).
    """
    from mim3d.engine.export import (
        TORCHSCRIPT_FORMAT,
        export_metadata,
        save_torchscript,
        trace_network,
    )

    if loaded.spec["task"] != "seg":
        raise ValueError(f"{loaded.run_dir}: --format bundle exports segmentation runs; export "
                         "a classifier with --format onnx or torchscript")
    traced, check = trace_network(loaded)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        (tmp / "configs").mkdir(parents=True)
        (tmp / "docs").mkdir()
        save_torchscript(traced, export_metadata(loaded, TORCHSCRIPT_FORMAT, check),
                         tmp / "models" / "model.ts")
        meta = metadata(loaded, check)
        for name, doc in (("metadata.json", meta), ("inference.json", inference_config(loaded))):
            (tmp / "configs" / name).write_text(json.dumps(doc, indent=2) + "\n")
        labels = ", ".join(f"{k} {v}" for k, v in loaded.spec["classes"].items())
        (tmp / "docs" / "README.md").write_text(
            _README.format(name=meta["name"], version=__version__, labels=labels))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta
