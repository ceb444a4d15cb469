"""A fine-tuned run (segmentation or classification) as a MONAI bundle folder.

Layout::

    BUNDLE/configs/metadata.json   versions, output channels and class names
                                   (network_data_format), mim3d's spec and preprocessing
    BUNDLE/configs/inference.json  preprocessing, inferer, post-processing, saver
    BUNDLE/models/model.ts         the network traced by torch.jit (mim3d.engine.export)
    BUNDLE/docs/README.md          how to run it, what it writes

Run it from the bundle folder with MONAI alone (no mim3d needed)::

    python -m monai.bundle run --config_file configs/inference.json \
        --image CT.nii.gz --output_dir out/

The preprocessing is the run's, with MONAI's own transforms: LoadImaged + EnsureChannelFirstd,
Orientationd RAS, Spacingd to the preset's spacing (bilinear), the preset's intensity
normalisation (HU window -> [0, 1] clipped, z-score on non-zero voxels, or min-max),
CropForegroundd on voxels > 0 (!= 0 after z-score), SpatialPadd to the ROI; a classifier's
volume is then centre-cropped to exactly the ROI (CenterSpatialCropd). That is the pipeline of
:mod:`mim3d.data.transforms` with ``train=False``; one list of steps serves both tasks.

* **Segmentation**: Gaussian sliding windows with the preset's overlap, the arg-max over
  background and the named classes, ``Invertd`` (nearest neighbour) back onto the input's grid
  and ``SaveImaged`` as ``<name>_seg.nii.gz``. The labels match ``mim3d predict``'s on the same
  CT (100% of voxels on the test CT). One known difference: where an input voxel centre falls
  *exactly* midway between two model-grid voxels (rational spacing ratios such as 3 mm data on
  a 4 mm model grid), MONAI's nearest neighbour (``grid_sample``, ties to even) and mim3d's
  (SciPy, ties upward) may pick different neighbours; with a 4 mm model on 3 mm data that
  changed 5% of the voxels of an untrained network's map, at label boundaries.
* **Classification**: one forward pass (``SimpleInferer``), a softmax over the classes and
  MONAI's ``ClassificationSaver`` handler, which writes ``predictions.csv`` in the output
  folder: one row per image, no header, ``<image path>,<p_0>,...,<p_{K-1}>`` with the
  probabilities in class-index order (``metadata.json`` ``outputs.pred.channel_def`` names
  them). They agree with ``mim3d evaluate``'s class probabilities on the same CT (exactly on
  the test CT; the test allows 1e-5 for float32 rounding).
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

__all__ = ["BUNDLE_VERSION", "CLS_OUTPUT", "inference_config", "metadata", "write_bundle"]

BUNDLE_VERSION = "0.1.0"
#: The file a classification bundle writes into ``--output_dir``.
CLS_OUTPUT = "predictions.csv"
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


def _load(data: Any) -> list[dict[str, Any]]:
    """Read, channel first, RAS and the preset's voxel size."""
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    ]
    if data.spacing is not None:
        steps.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(data.spacing),
                      "mode": "bilinear"})
    return steps


def _crop_pad(data: Any, roi: list[int]) -> list[dict[str, Any]]:
    """Crop to the body (the voxels the normalisation leaves above zero), pad to the ROI."""
    crop = {"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
            "allow_smaller": True}
    if data.normalization == "zscore":
        crop["select_fn"] = "$lambda x: x != 0"
    return [crop, {"_target_": "SpatialPadd", "keys": "image", "spatial_size": roi,
                   "mode": "constant"}]


def _preprocessing(loaded: LoadedRun) -> list[dict[str, Any]]:
    data, task = loaded.cfg.data, loaded.cfg.task
    roi = list(task.roi)
    steps = [*_load(data), *_intensity(data), *_crop_pad(data, roi)]
    if task.task == "cls":  # as mim3d's evaluation: the classifier sees exactly one ROI
        steps.append({"_target_": "CenterSpatialCropd", "keys": "image", "roi_size": roi})
    return [*steps, {"_target_": "EnsureTyped", "keys": "image"}]


def _seg_stages(loaded: LoadedRun) -> dict[str, Any]:
    """Sliding-window inferer and arg-max -> inverted label map -> NIfTI post-processing."""
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
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": list(task.roi),
               "sw_batch_size": 2, "overlap": float(task.sw_overlap), "mode": "gaussian"}
    return {"inferer": inferer, "postprocessing": {"_target_": "Compose", "transforms": post},
            "handlers": []}


def _cls_stages() -> dict[str, Any]:
    """One forward pass, softmax, and the probabilities to ``CLS_OUTPUT`` by MONAI's handler."""
    post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    saver = {"_target_": "ClassificationSaver", "output_dir": "@output_dir",
             "filename": CLS_OUTPUT, "overwrite": True,
             # the evaluator decollates: state.batch / state.output are lists of item dicts
             "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
             "output_transform": "$monai.handlers.from_engine(['pred'])"}
    return {"inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {"_target_": "Compose", "transforms": post}, "handlers": [saver]}


def inference_config(loaded: LoadedRun) -> dict[str, Any]:
    """``configs/inference.json`` of the run (module docstring)."""
    stages = _cls_stages() if loaded.spec["task"] == "cls" else _seg_stages(loaded)
    return {
        "imports": ["$import monai", "$import numpy", "$import torch"],
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
        **stages,
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }


def _pred_format(loaded: LoadedRun) -> dict[str, Any]:
    """``network_data_format.outputs.pred``: a label map, or K class probabilities."""
    spec = loaded.spec
    if spec["task"] == "cls":
        return {"type": "probabilities", "format": "classes",
                "num_channels": spec["num_classes"], "spatial_shape": [], "dtype": "float32",
                "value_range": [0, 1], "is_patch_data": False,
                "channel_def": dict(spec["classes"])}
    return {"type": "image", "format": "segmentation", "num_channels": spec["num_classes"],
            "spatial_shape": list(spec["roi"]), "dtype": "float32", "value_range": [],
            "is_patch_data": True, "channel_def": {"0": "background", **spec["classes"]}}


def metadata(loaded: LoadedRun, check: dict[str, Any]) -> dict[str, Any]:
    """``configs/metadata.json``: versions, input/output format with the class names, and the
    run's mim3d spec, preprocessing and export check."""
    spec, pred = loaded.spec, _pred_format(loaded)
    window = loaded.cfg.data.hu_window if loaded.cfg.data.normalization == "window" else None
    image = {"type": "image", "format": "hounsfield" if window else "magnitude",
             "modality": "CT" if window else "unknown", "num_channels": spec["in_channels"],
             "spatial_shape": list(spec["roi"]), "dtype": "float32", "value_range": [0, 1],
             "is_patch_data": spec["task"] == "seg", "channel_def": {"0": "image"}}
    kind = "classification" if spec["task"] == "cls" else "segmentation"
    return {
        "schema": _SCHEMA, "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by mim3d {__version__}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "required_packages_version": {},
        "name": f"mim3d {spec['network']} ({loaded.cfg.name})",
        "task": f"CT {kind}: {', '.join(spec['classes'].values())}",
        "description": f"{spec['network']} (size {spec['size']}) fine-tuned with mim3d, preset "
                       f"{loaded.cfg.name}; classes: {json.dumps(pred['channel_def'])}",
        "authors": "mim3d export", "copyright": "see the training data's licence",
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": pred}},
        "mim3d": {"spec": spec, "preprocessing": preprocessing_of(loaded.cfg),
                  "weights_sha256": loaded.weights_sha256, "export_check": check},
    }


_README = """# {name}

Exported by mim3d {version}. Classes: {labels}.

    cd THIS_FOLDER
    python -m monai.bundle run --config_file configs/inference.json \\
        --image /path/to/ct.nii.gz --output_dir /path/to/out

{output}
"""
_SEG_OUTPUT = "The label map is written as `<image name>_seg.nii.gz` on the input's own grid."
_CLS_OUTPUT = ("The class probabilities are written to `{file}`: one row per image, no header, "
               "`<image path>,{columns}` (softmax, class-index order).")


def _readme(loaded: LoadedRun, meta: dict[str, Any]) -> str:
    classes = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    if loaded.spec["task"] == "cls":
        output = _CLS_OUTPUT.format(file=CLS_OUTPUT,
                                    columns=",".join(f"p_{n}" for n in classes.values()))
    else:
        output = _SEG_OUTPUT
    labels = ", ".join(f"{k} {v}" for k, v in classes.items())
    return _README.format(name=meta["name"], version=__version__, labels=labels, output=output)


def write_bundle(loaded: LoadedRun, out: Path) -> dict[str, Any]:
    """Write the bundle folder ``out`` (must not exist) of a segmentation or classification
    run; returns its metadata. The folder appears whole or not at all."""
    from mim3d.engine.export import (
        TORCHSCRIPT_FORMAT,
        export_metadata,
        save_torchscript,
        trace_network,
    )

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
        (tmp / "docs" / "README.md").write_text(_readme(loaded, meta))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta
