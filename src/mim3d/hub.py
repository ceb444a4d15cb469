"""Encoders in the Hugging Face layout, and the one resolver every encoder argument goes through.

A Hugging Face folder holds ``config.json`` (the encoder card plus ``library_name``),
``model.safetensors`` (the encoder file: the same tensors, with the card embedded in its
metadata) and ``README.md`` (the model card). :func:`resolve_encoder` turns what a user passes
as an encoder (``--pretrained``, ``mim3d nnunet``) into an encoder ``.safetensors`` path:

* ``X.safetensors``: itself;
* a folder in the layout above: its ``model.safetensors``, after checking ``config.json``;
* ``hf://OWNER/NAME[@REVISION]``: downloaded by ``huggingface_hub`` into its normal cache
  (``HF_HOME``), or taken from that cache when ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors import safe_open

from mim3d.fileio import read_json_object

__all__ = ["CONFIG_FILE", "HF_PREFIX", "MODEL_CARD", "WEIGHTS_FILE", "HubError",
           "resolve_encoder", "write_hf_folder"]

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE, MODEL_CARD = "config.json", "model.safetensors", "README.md"
HF_PREFIX = "hf://"
_HF_RE = re.compile(r"hf://([\w.-]+)/([\w.-]+)(?:@([\w./-]+))?")
_REEXPORT = "re-export it with `mim3d export RUN --hf DIR` or download it again"


class HubError(ValueError):
    """An encoder argument, Hugging Face folder or Hub download that cannot be used (one line)."""


# ------------------------------------------------------------------------- resolving


def _check_folder(folder: Path, spec: str) -> Path:
    """``folder/model.safetensors`` after checking that the layout is complete and consistent."""
    from mim3d.transfer import FORMAT, read_card  # lazily: resolving a name needs no torch

    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / n).is_file()]
    if missing:
        raise HubError(f"{spec}: Hugging Face folder {folder} lacks {' and '.join(missing)} "
                       f"(it needs {CONFIG_FILE} and {WEIGHTS_FILE}); {_REEXPORT}")
    config = read_json_object(folder / CONFIG_FILE, lambda problem: HubError(
        f"{folder / CONFIG_FILE}: {problem}; {_REEXPORT}"))
    if config.get("format") != FORMAT:
        raise HubError(f"{folder / CONFIG_FILE}: not a mim3d encoder config (format "
                       f"{FORMAT!r} missing); {_REEXPORT}")
    weights = folder / WEIGHTS_FILE
    card = read_card(weights)
    if card is not None and card.get("architecture") != config.get("architecture"):
        raise HubError(f"{folder}: {CONFIG_FILE} says {config.get('architecture')} but "
                       f"{WEIGHTS_FILE} holds a {card.get('architecture')} encoder; {_REEXPORT}")
    return weights


def _download(spec: str) -> Path:
    """Snapshot folder of ``hf://OWNER/NAME[@REV]`` in huggingface_hub's cache."""
    match = _HF_RE.fullmatch(spec)
    if match is None:
        raise HubError(f"{spec}: expected hf://OWNER/NAME or hf://OWNER/NAME@REVISION")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as error:
        raise HubError(f"{spec}: hf:// needs huggingface_hub; pip install 'mim3d[hub]'") from error
    owner, name, revision = match.groups()
    try:
        folder = snapshot_download(f"{owner}/{name}", revision=revision,
                                   allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, MODEL_CARD])
    except Exception as error:  # its error types differ across versions; all become one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        offline = "HF_HUB_OFFLINE=1, " if constants.HF_HUB_OFFLINE else ""
        raise HubError(f"{spec}: not found on the Hub nor in the cache {constants.HF_HUB_CACHE} "
                       f"({offline}{type(error).__name__}: {first[:120]}); check the name, or "
                       "run once online to fill the cache") from error
    logger.info("%s -> %s", spec, folder)
    return Path(folder)


def resolve_encoder(spec: str | Path) -> Path:
    """The encoder ``.safetensors`` path for a file, a Hugging Face folder or ``hf://``.

    Args:
        spec: ``X.safetensors`` (returned as is; the loaders check it), a folder holding
            ``config.json`` + ``model.safetensors``, or ``hf://OWNER/NAME[@REVISION]``.

    Returns:
        Path of the encoder weights (its card is embedded or beside it).

    Raises:
        HubError: a folder missing a file or with a foreign config, a bad ``hf://`` name, or a
            repository neither reachable nor cached.
    """
    text = os.fspath(spec)
    if text.startswith(HF_PREFIX):
        return _check_folder(_download(text), text)
    path = Path(text)
    return _check_folder(path, text) if path.is_dir() else path


# ------------------------------------------------------------------------- writing


def _count_parameters(weights: Path) -> int:
    with safe_open(str(weights), framework="pt") as handle:
        names = list(handle.keys())  # a safetensors handle is not iterable
        return sum(math.prod(handle.get_slice(k).get_shape()) for k in names
                   if not k.endswith("pos_embed"))  # a fixed buffer, not a parameter


def _model_card(card: dict[str, Any], params: int, license_id: str, folder: Path) -> str:
    """README.md: YAML front matter for the Hub, then what a user needs to use the encoder."""
    kw, train, source = card["encoder_kwargs"], card.get("training") or {}, card.get("source") or {}
    spacing = card.get("spacing")
    arch = card["architecture"]
    lines = [
        "---", f"license: {license_id}", "library_name: mim3d",
        "tags: [medical-imaging, ct, 3d, self-supervised, masked-image-modeling, mim]",
        "pipeline_tag: image-feature-extraction", "---", "",
        f"# {folder.name}: MiM pre-trained {arch} encoder (mim3d)", "",
        ("Self-supervised MiM (Mask in Mask) encoder for 3D CT, exported by "
        f"mim3d {card.get('mim3d_version')}."), "",
        "## Architecture", "",
        f"- `{arch}` encoder, {params / 1e6:.2f} M parameters; kwargs: `{json.dumps(kw)}`",
        f"- token (patch) size {card.get('patch_size')}, pre-training ROI {card.get('roi')}", "",
        "## Input", "",
        f"- voxel spacing: {f'{spacing} mm (x, y, z)' if spacing else 'native (not resampled)'}",
        f"- orientation: {card.get('orientation')} (array axes along +R, +A, +S)",
        f"- intensity: {card.get('normalization')}"
        + (f", HU window {card.get('hu_window')} mapped to [0, 1] and clipped"
           if card.get("normalization") == "window" else ""),
        f"- channels: {card.get('channels')}", "",
        "## Pre-training data", "",
        (f"- source: {source.get('kind')}; preset {train.get('preset')}, steps "
        f"{train.get('steps')}, mask ratios {train.get('mask_ratios')}"),
        f"- crop sizes per level: {train.get('crop_sizes')}; cases: {train.get('cases')}", "",
        "## Licence", "", f"`{license_id}`"
        + (" (the MiM authors' released weights carry no licence)"
           if source.get("kind") == "official" else ""), "",
        "## How to load it", "", "```", "# mim3d fine-tuning (a local copy of this folder works too)",
        "mim3d finetune --task seg --data DATALIST --out RUN --pretrained hf://OWNER/NAME",
        "# nnU-Net v2 (after nnUNetv2_plan_and_preprocess -d N)",
        "mim3d nnunet hf://OWNER/NAME --dataset N", "```", "",
        ("From Python: `mim3d.transfer.load_encoder(encoder, mim3d.hub.resolve_encoder("
        "'hf://OWNER/NAME'))`; `HF_HUB_OFFLINE=1` uses the cache only."), ""]
    return "\n".join(lines)


def write_hf_folder(encoder: str | Path, out: str | Path, *, license_id: str = "other") -> Path:
    """Write an encoder file (with its card) as a Hugging Face folder.

    ``config.json`` is the card plus ``library_name``/``model_type``; ``model.safetensors`` is a
    copy of the encoder file (card embedded); ``README.md`` the model card. Each file is written
    through a temporary and renamed; other files in ``out`` (e.g. ``.git``) are left alone.

    Args:
        encoder: an encoder ``.safetensors`` from ``mim3d export``.
        out: the folder (created).
        license_id: the model card's ``license`` (a Hub licence id, e.g. ``apache-2.0``).

    Returns:
        ``out``.

    Raises:
        HubError: the encoder has no mim3d card.
    """
    from mim3d.transfer import read_card

    encoder, out = Path(encoder), Path(out)
    card = read_card(encoder) if encoder.is_file() else None
    if card is None:
        raise HubError(f"{encoder}: not a mim3d encoder file with a card; export it with "
                       "`mim3d export`")
    out.mkdir(parents=True, exist_ok=True)
    config = {**card, "weights_file": WEIGHTS_FILE, "library_name": "mim3d",
              "model_type": f"mim3d-{card['architecture']}"}
    tmp = {n: out / f".{n}.tmp-{os.getpid()}" for n in (WEIGHTS_FILE, CONFIG_FILE, MODEL_CARD)}
    try:
        shutil.copyfile(encoder, tmp[WEIGHTS_FILE])
        tmp[CONFIG_FILE].write_text(json.dumps(config, indent=2) + "\n")
        tmp[MODEL_CARD].write_text(_model_card(card, _count_parameters(encoder), license_id, out))
        for name, path in tmp.items():
            os.replace(path, out / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return out
