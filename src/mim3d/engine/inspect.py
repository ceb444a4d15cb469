"""Look inside MiM: the nested level masks of a CT, and a checkpoint's reconstructions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mim3d.config import PretrainConfig, config_from_dict
from mim3d.data.preview import load_level1_crop
from mim3d.engine.checkpoint import CheckpointError, load_checkpoint
from mim3d.factory import build_mim, geometry_from_config
from mim3d.masking import levels_to_json, sample_levels
from mim3d.models.mim import MiM
from mim3d.runfolder import find_latest
from mim3d.viz import hu_window_of, parse_volume_id, save_levels_png, save_reconstruction_png


def mask_preview(ct: str | Path, out_dir: str | Path, cfg: PretrainConfig,
                 seed: int = 0) -> tuple[Path, Path]:
    """Write ``levels.json`` (boxes and masked tokens of every level) and ``levels.png``.

    Args:
        ct: a CT file or DICOM series folder; its body-centred level-1 crop is used.
        out_dir: output folder (created).
        cfg: the pre-training config whose geometry and preprocessing apply.
        seed: seeds the masks.

    Returns:
        The JSON and PNG paths.
    """
    geometry = geometry_from_config(cfg.geometry)
    crop, spacing = load_level1_crop(ct, cfg.data, geometry[0].crop_size)
    levels = sample_levels(1, geometry, torch.Generator().manual_seed(seed),
                           source=cfg.geometry.source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "levels.json", out / "levels.png"
    json_path.write_text(json.dumps(levels_to_json(levels, geometry), indent=1))
    save_levels_png(crop, levels, geometry, png_path, hu_window=hu_window_of(cfg.data),
                    spacing=spacing)
    return json_path, png_path


def load_pretrained(run_or_ckpt: str | Path) -> tuple[MiM, PretrainConfig, Path]:
    """Rebuild a run's MiM model from its newest (or the given) checkpoint.

    Raises:
        CheckpointError: no complete checkpoint, or its files are damaged.
    """
    folder = find_latest(run_or_ckpt)
    if folder is None:
        raise CheckpointError(f"no complete checkpoint in {run_or_ckpt}: pass a run folder "
                              "or one of its ckpt_* folders")
    meta = json.loads((folder / "meta.json").read_text())
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{folder / 'meta.json'} holds no run config; it is not a "
                              "mim3d pre-training checkpoint")
    cfg = config_from_dict("pretrain", meta["config"])
    if cfg.method != "mim":
        raise CheckpointError(f"{folder} is a {cfg.method} run, not MiM: mim3d visualize draws "
                              "MiM levels; the run's own pictures are in its pictures/ folder")
    model = build_mim(cfg)
    load_checkpoint(folder, model=model, restore_rng=False)
    return model.eval(), cfg, folder


def visualize_checkpoint(run_or_ckpt: str | Path, cts: str | Path | Sequence[str | Path],
                         out_png: str | Path, seed: int = 0, *, sample: int = 0,
                         volume: str = "") -> Path:
    """Input / masked input / reconstruction per level for any checkpoint and CTs (Fig. 10).

    The CTs form one batch (each body-centred level-1 crop is one sample, masks drawn from
    ``seed``); the picture follows batch ``sample`` and, below level 1, the child volume named
    by ``volume`` (an id of ``levels.json`` such as ``L3.2.1``; default the first children).

    Returns:
        The checkpoint folder that was used.

    Raises:
        ValueError: ``sample`` or ``volume`` names no volume of this geometry.
    """
    paths = [cts] if isinstance(cts, (str, Path)) else list(cts)
    if not 0 <= sample < len(paths):
        raise ValueError(f"--sample {sample} is out of range: {len(paths)} CT(s) given "
                         f"(choose 0..{len(paths) - 1})")
    path = parse_volume_id(volume)
    model, cfg, folder = load_pretrained(run_or_ckpt)
    geometry = model.geometry
    crops = [load_level1_crop(ct, cfg.data, geometry[0].crop_size)[0] for ct in paths]
    x = torch.from_numpy(np.stack(crops))[:, None]
    levels = sample_levels(len(paths), geometry, torch.Generator().manual_seed(seed),
                           source=cfg.geometry.source)
    with torch.no_grad():
        output = model(x, levels)
    save_reconstruction_png(output, out_png, patch_size=cfg.geometry.patch_size,
                            norm_pix=cfg.loss.norm_pix, sample=sample, volume=path,
                            hu_window=hu_window_of(cfg.data))
    return folder
