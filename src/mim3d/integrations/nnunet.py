"""nnU-Net v2 hand-off: a plans variant naming a mim3d network, and a pre-trained weights file.

nnU-Net builds its network from the plans by dotted class path (``architecture.
network_class_name`` + plain ``arch_kwargs``), and ``nnUNetv2_train ... -pretrained_weights F``
loads ``torch.load(F)["network_weights"]`` after checking that every key of the network except
those containing ``.seg_layers.`` is present with the same shape. :func:`write_handoff` reads a
dataset that nnU-Net has fingerprinted and planned, and writes into
``$nnUNet_preprocessed/Dataset<N>_<name>/``:

* ``<plans-name>.json``: nnU-Net's plans with one configuration whose network is
  :class:`~mim3d.models.nnunet_net.MiMnnUNet` (encoder sizes from the card, nnU-Net's patch size
  rounded down to whole tokens), its own ``data_identifier``, and the encoder card's spacing and
  intensity mapping (see :func:`write_handoff` for which side wins);
* ``mim3d_pretrained.pth``: every network key but the segmentation heads; the encoder from the
  MiM file, the decoder freshly initialised from a seed.

Training, preprocessing, inference and evaluation stay nnU-Net's own commands.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from mim3d import __version__
from mim3d.fileio import read_json_object
from mim3d.models.nnunet_net import MiMnnUNet, decoder_strides
from mim3d.transfer import load_encoder_into, read_card

__all__ = ["NETWORK_CLASS", "WEIGHTS_FILE", "NnUNetError", "NnUNetFolders", "NnUNetHandoff",
           "find_dataset", "nnunet_folders", "write_handoff"]

logger = logging.getLogger(__name__)

NETWORK_CLASS = f"{MiMnnUNet.__module__}.{MiMnnUNet.__qualname__}"
WEIGHTS_FILE = "mim3d_pretrained.pth"
_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_SCHEMES = {"zscore": "ZScoreNormalization", "minmax": "RescaleTo01Normalization"}


class NnUNetError(ValueError):
    """nnU-Net folders, plans or an encoder that cannot be handed off (one line)."""


def _plan_hint(n: str) -> str:
    return (f"run `nnUNetv2_plan_and_preprocess -d {n}` (or `nnUNetv2_extract_fingerprint -d {n}`"
            f" then `nnUNetv2_plan_experiment -d {n}`) first")


@dataclass(frozen=True)
class NnUNetFolders:
    """nnU-Net's three folders, from its environment variables."""

    raw: Path
    preprocessed: Path
    results: Path


def nnunet_folders(environ: Mapping[str, str] | None = None) -> NnUNetFolders:
    """The folders named by ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``."""
    env = os.environ if environ is None else environ
    missing = [k for k in _ENV if not env.get(k)]
    if missing:
        raise NnUNetError(f"environment variable(s) {', '.join(missing)} not set; export "
                          "nnUNet_raw, nnUNet_preprocessed and nnUNet_results as for nnU-Net's "
                          "own commands")
    return NnUNetFolders(*(Path(env[k]) for k in _ENV))


def find_dataset(dataset: str | int, folders: NnUNetFolders) -> str:
    """nnU-Net's folder name ``Dataset<NNN>_<name>`` of a planned dataset id or name."""
    text = str(dataset)
    if text.startswith("Dataset"):
        pattern = text
    elif text.isdigit():
        pattern = f"Dataset{int(text):03d}_*"
    else:
        raise NnUNetError(f"--dataset {text!r} is neither an id (e.g. 501) nor a DatasetNNN_Name")
    planned = sorted(p.name for p in folders.preprocessed.glob(pattern) if p.is_dir())
    if len(planned) > 1:
        raise NnUNetError(f"{folders.preprocessed}: several folders match dataset {text} "
                          f"({', '.join(planned)}); pass the full DatasetNNN_Name")
    if planned:
        return planned[0]
    where = "is in nnUNet_raw but" if any(folders.raw.glob(pattern)) else "is not in nnUNet_raw and"
    raise NnUNetError(f"dataset {text} {where} has not been planned by nnU-Net "
                      f"({folders.preprocessed} has no {pattern}); {_plan_hint(text)}")


def _read_json(path: Path, what: str, todo: str) -> dict[str, Any]:
    if not path.is_file():
        raise NnUNetError(f"{path}: no such {what}; {todo}")
    return read_json_object(path, lambda problem: NnUNetError(f"{path}: {what}: {problem}; "
                                                              f"{todo}"))


def _configuration(plans: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The configuration with its ``inherits_from`` chain resolved, as nnU-Net resolves it."""
    configs = plans.get("configurations") or {}
    chain: list[str] = []
    while name not in chain:
        if name not in configs:
            raise NnUNetError(f"{path}: no configuration {name!r} (it has "
                              f"{', '.join(configs) or 'none'}); choose one with --configuration")
        chain.append(name)
        name = configs[name].get("inherits_from", name)
    cfg: dict[str, Any] = {}
    for link in reversed(chain):
        cfg.update(copy.deepcopy(configs[link]))
    if cfg.get("previous_stage"):
        raise NnUNetError(f"{path}: {chain[0]} is a cascade stage; hand off 3d_fullres or "
                          "3d_lowres (a cascade needs predictions of the stage before)")
    if len(cfg.get("patch_size", ())) != 3:
        raise NnUNetError(f"{path}: {chain[0]} is not a 3D configuration; MiMnnUNet is 3D, "
                          "use 3d_fullres or 3d_lowres")
    for key in ("inherits_from", "next_stage"):  # the variant holds this one configuration
        cfg.pop(key, None)
    return cfg


def _hybrid_card(encoder: Path) -> dict[str, Any]:
    if not encoder.is_file():
        raise NnUNetError(f"{encoder}: no such encoder file; pass a .safetensors from "
                          "`mim3d export`, a Hugging Face folder or hf://OWNER/NAME")
    card = read_card(encoder)
    if card is None:
        raise NnUNetError(f"{encoder}: has no mim3d card; write it with `mim3d export`")
    arch = card.get("architecture")
    if arch != "hybrid":
        raise NnUNetError(f"{encoder}: holds a {arch} encoder, mim3d nnunet needs a MiM hybrid "
                          "encoder; export a MiM run (or the authors' file with --from-official)")
    patch = card["encoder_kwargs"]["patch_size"]
    if patch not in (8, 16):
        raise NnUNetError(f"{encoder}: encoder patch size {patch}; MiMnnUNet supports 8 or 16")
    return card


def _patch_size(planned: Sequence[int], p: int, override: Sequence[int] | None) -> list[int]:
    """nnU-Net's patch rounded down to whole tokens (at least one), or ``override``."""
    size = [int(s) for s in override] if override else [max(p, int(s) // p * p) for s in planned]
    if len(size) != 3 or any(s < p or s % p for s in size):
        raise NnUNetError(f"patch size {size} must be 3 multiples of the encoder's token size {p}")
    if math.prod(s // p for s in size) < 2:
        raise NnUNetError(f"patch size {size} holds a single {p}^3 token, on which the "
                          "decoder's instance norm fails; use a larger --patch-size")
    return size


def _arch_kwargs(card: dict[str, Any], patch: list[int]) -> dict[str, Any]:
    kw = card["encoder_kwargs"]
    return {"input_size": patch, "patch_size": kw["patch_size"], "dims": list(kw["dims"]),
            "depths": list(kw["depths"]), "num_heads": kw["num_heads"],
            "mlp_ratio": kw["mlp_ratio"], "feature_size": kw["dims"][0], "drop_path_rate": 0.0,
            "strides": decoder_strides(kw["patch_size"])}


def _array_world_axes(raw: Path, plans: dict[str, Any]) -> list[int]:
    """World axis (0 R-L, 1 A-P, 2 S-I) of each of nnU-Net's image array axes (untransposed).

    nnU-Net's readers give arrays in SimpleITK order (index axes reversed); the reorienting
    nibabel reader first turns the image to RAS.
    """
    if plans.get("image_reader_writer") == "NibabelIOWithReorient":
        return [2, 1, 0]
    meta = _read_json(raw / "dataset.json", "nnU-Net dataset.json",
                      "pass --spacing nnunet, or restore the raw dataset")
    ending = meta.get("file_ending", ".nii.gz")
    images = sorted((raw / "imagesTr").glob(f"*_0000{ending}"))
    if not images:
        raise NnUNetError(f"{raw / 'imagesTr'}: no *_0000{ending} image to read the axes from; "
                          "pass --spacing nnunet")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(images[0]))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise NnUNetError(f"{images[0]}: a {reader.GetDimension()}D image; MiMnnUNet is 3D")
    direction = np.asarray(reader.GetDirection()).reshape(3, 3)  # column i: index axis i
    return [int(np.argmax(np.abs(direction[:, i]))) for i in (2, 1, 0)]


def _reconcile_spacing(cfg: dict[str, Any], plans: dict[str, Any], card: dict[str, Any],
                       raw: Path, mode: str, notes: list[str]) -> None:
    theirs = list(cfg["spacing"])
    if mode == "nnunet" or card.get("spacing") is None:
        why = "--spacing nnunet" if mode == "nnunet" else \
            "the encoder card states none, it was pre-trained at native spacing"
        notes.append(f"spacing: nnU-Net's {theirs} mm kept ({why}).")
        return
    per_axis = [float(card["spacing"][w]) for w in _array_world_axes(raw, plans)]
    cfg["spacing"] = [per_axis[t] for t in plans.get("transpose_forward", (0, 1, 2))]
    notes.append(f"spacing: the encoder's {cfg['spacing']} mm (nnU-Net's array order) replaces "
                 f"nnU-Net's {theirs}, as the encoder's features were learnt at that physical "
                 "scale; --spacing nnunet keeps nnU-Net's.")


def _reconcile_intensity(plans: dict[str, Any], cfg: dict[str, Any], card: dict[str, Any],
                         notes: list[str]) -> None:
    """The encoder's input mapping wins: its first layers were trained on it."""
    norm, schemes = card.get("normalization", "window"), list(cfg["normalization_schemes"])
    if norm in _SCHEMES:
        cfg["normalization_schemes"] = [_SCHEMES[norm]] * len(schemes)
        notes.append(f"intensity: {_SCHEMES[norm]} on every channel (the encoder's {norm}) "
                     f"replaces nnU-Net's {schemes}.")
        return
    lo, hi = (float(v) for v in card["hu_window"])
    props = plans["foreground_intensity_properties_per_channel"]
    ct = [c for c, s in enumerate(schemes) if s == "CTNormalization"]
    for c in ct:  # CTNormalization clips to the percentiles, then (x - mean) / std
        props[str(c)] = {**props[str(c)], "percentile_00_5": lo, "percentile_99_5": hi,
                         "mean": lo, "std": hi - lo}
    if ct:
        notes.append(f"intensity: channel(s) {ct} map HU [{lo:g}, {hi:g}] -> [0, 1] clipped, "
                     "the encoder's window, through nnU-Net's CTNormalization (its foreground "
                     "percentiles and z-score are replaced).")
    if len(ct) < len(schemes):
        notes.append(f"intensity: channel(s) {[c for c in range(len(schemes)) if c not in ct]} "
                     "are not CT for nnU-Net and keep its normalisation; the encoder was "
                     "pre-trained on windowed CT.")


@dataclass
class NnUNetHandoff:
    """What :func:`write_handoff` wrote and decided.

    Attributes:
        dataset: nnU-Net's dataset folder name.
        plans: the written plans file.
        weights: the written ``-pretrained_weights`` file.
        loaded: network keys taken from the encoder file.
        initialised: network keys freshly initialised from the seed (written to the file).
        skipped: keys not written (segmentation heads: nnU-Net initialises them) and encoder
            file keys the network does not use.
        decisions: how the card and nnU-Net's plans were reconciled, then the encoder
            transfer's notes (adapted tensors), one sentence each.
    """

    dataset: str
    plans: Path
    weights: Path
    loaded: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Several lines: the transfer counts, then the decisions."""
        head = (f"transfer: {len(self.loaded)} encoder tensors loaded, {len(self.initialised)} "
                f"initialised from the seed, {len(self.skipped)} skipped "
                f"({', '.join(self.skipped[:2])}{', ...' if len(self.skipped) > 2 else ''})")
        return "\n".join([head, *self.decisions])


def _network_weights(arch: dict[str, Any], channels: int, classes: int, encoder: Path,
                     seed: int) -> tuple[dict[str, torch.Tensor], Any, list[str]]:
    """(weights without heads, transfer report, head keys) of a seeded network + encoder."""
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        net = MiMnnUNet(input_channels=channels, num_classes=classes, **arch)
    report = load_encoder_into(net, encoder, prefix="encoder")
    state = net.state_dict()
    heads = [k for k in state if ".seg_layers." in k]
    return {k: v.contiguous() for k, v in state.items() if k not in heads}, report, heads


def _write_pair(weights: dict[str, Any], plans: dict[str, Any], weights_path: Path,
                plans_path: Path) -> None:
    """Write both files through temporaries, so a failure leaves neither half-written."""
    tmps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in (weights_path, plans_path)]
    try:
        torch.save(weights, tmps[0])
        tmps[1].write_text(json.dumps(plans, indent=2) + "\n")
        os.replace(tmps[0], weights_path)
        os.replace(tmps[1], plans_path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _dataset_sizes(folder: Path) -> tuple[int, int]:
    """(input channels, segmentation heads) of nnU-Net's copy of dataset.json."""
    meta = _read_json(folder / "dataset.json", "dataset.json", _plan_hint(folder.name))
    channels = len(meta.get("channel_names") or meta.get("modality") or {})
    labels = meta.get("labels") or {}
    regions = any(isinstance(v, list) for v in labels.values())
    heads = len([k for k in labels if k != "ignore"]) - int(regions)  # regions: no background
    if channels < 1 or heads < 1:
        raise NnUNetError(f"{folder / 'dataset.json'}: needs channel_names and labels")
    return channels, max(heads, 2)


def _variant(plans: dict[str, Any], cfg: dict[str, Any], card: dict[str, Any], *,
             raw: Path, configuration: str, plans_name: str, patch_size: Sequence[int] | None,
             batch_size: int | None, spacing: str) -> tuple[dict[str, Any], list[str]]:
    """The mim3d plans (one configuration) and the reconciliation decisions."""
    plans = copy.deepcopy(plans)
    token = card["encoder_kwargs"]["patch_size"]
    arch = _arch_kwargs(card, _patch_size(cfg["patch_size"], token, patch_size))
    decisions = [(f"patch size: {arch['input_size']} voxels (nnU-Net planned "
                  f"{cfg['patch_size']}; encoder token size {token}, card ROI {card.get('roi')}).")]
    if batch_size is not None:
        if batch_size < 1:
            raise NnUNetError(f"--batch-size must be >= 1, got {batch_size}")
        decisions.append(f"batch size: {batch_size} (nnU-Net planned {cfg['batch_size']}).")
    planned = {"spacing": cfg["spacing"], "patch_size": cfg["patch_size"],
               "batch_size": cfg["batch_size"], "normalization_schemes": cfg["normalization_schemes"],
               "foreground_intensity_properties_per_channel":
                   copy.deepcopy(plans["foreground_intensity_properties_per_channel"])}
    cfg.update(data_identifier=f"{plans_name}_{configuration}", patch_size=arch["input_size"],
               batch_size=batch_size or cfg["batch_size"],
               architecture={"network_class_name": NETWORK_CLASS, "arch_kwargs": arch,
                             "_kw_requires_import": []})
    _reconcile_spacing(cfg, plans, card, raw, spacing, decisions)
    _reconcile_intensity(plans, cfg, card, decisions)
    plans.update(plans_name=plans_name, configurations={configuration: cfg})
    plans["mim3d"] = {"card": card, "decisions": decisions, "nnunet_planned": planned,
                      "mim3d_version": __version__}
    return plans, decisions


def write_handoff(encoder: str | Path, dataset: str | int, *, configuration: str = "3d_fullres",
                  plans_name: str = "nnUNetPlans_mim3d", source_plans: str = "nnUNetPlans",
                  seed: int = 0, patch_size: Sequence[int] | None = None,
                  batch_size: int | None = None, spacing: str = "encoder",
                  environ: Mapping[str, str] | None = None) -> NnUNetHandoff:
    """Write the mim3d plans variant and ``mim3d_pretrained.pth`` for a planned dataset.

    Reconciliation: the encoder card's intensity mapping always wins (the stem was trained on
    it; for ``window`` it is expressed through nnU-Net's CTNormalization); its spacing wins when
    it states one (features are scale-specific; ``spacing="nnunet"`` keeps nnU-Net's); nnU-Net
    keeps the patch size (rounded down to whole tokens; the encoder takes any multiple of its
    token size, its sin-cos positions are recomputed), batch size, resampling and augmentation.

    Args:
        encoder: encoder ``.safetensors`` of a MiM (hybrid) run (resolve folders and
            ``hf://`` with :func:`mim3d.hub.resolve_encoder` first).
        dataset: nnU-Net dataset id or ``DatasetNNN_Name``.
        configuration: nnU-Net configuration to hand off (3D, not a cascade stage).
        plans_name: identifier of the written plans (``-p`` of nnU-Net's commands).
        source_plans: identifier of nnU-Net's plans to start from (e.g. a ResEnc preset's).
        seed: seeds the decoder's initialisation.
        patch_size: (D, H, W) in nnU-Net's array order, multiples of the token size.
        batch_size: replaces nnU-Net's planned batch size.
        spacing: ``encoder`` (the card's, when it has one) or ``nnunet``.
        environ: environment holding nnU-Net's folder variables (default ``os.environ``).

    Returns:
        The :class:`NnUNetHandoff` report.

    Raises:
        NnUNetError: missing variables, unplanned dataset, missing configuration, another
            architecture; nothing is written then.
    """
    folders = nnunet_folders(environ)
    name = find_dataset(dataset, folders)
    if plans_name == source_plans:
        raise NnUNetError(f"--plans-name {plans_name} would overwrite nnU-Net's own plans")
    if spacing not in ("encoder", "nnunet"):
        raise NnUNetError(f"spacing must be 'encoder' or 'nnunet', got {spacing!r}")
    encoder, folder = Path(encoder), folders.preprocessed / name
    card = _hybrid_card(encoder)
    source = folder / f"{source_plans}.json"
    plans = _read_json(source, "plans file", _plan_hint(str(dataset)))
    cfg = _configuration(plans, configuration, source)
    plans, decisions = _variant(plans, cfg, card, raw=folders.raw / name,
                                configuration=configuration, plans_name=plans_name,
                                patch_size=patch_size, batch_size=batch_size, spacing=spacing)
    arch = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    weights, report, heads = _network_weights(arch, *_dataset_sizes(folder), encoder, seed)
    loaded = set(report.loaded)
    handoff = NnUNetHandoff(
        dataset=name, plans=folder / f"{plans_name}.json", weights=folder / WEIGHTS_FILE,
        loaded=report.loaded, initialised=[k for k in weights if k not in loaded],
        skipped=heads + report.unexpected, decisions=decisions + report.notes)
    source_info = {"encoder": str(encoder.resolve()), "seed": seed, "source_plans": source_plans}
    plans["mim3d"].update(source_info)
    _write_pair({"network_weights": weights, "mim3d": {**source_info, "plans": plans_name}},
                plans, handoff.weights, handoff.plans)
    logger.info("wrote %s and %s", handoff.plans, handoff.weights)
    return handoff
