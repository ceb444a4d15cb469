"""``mim3d export``: a pre-training run's encoder as an encoder file plus its card.

The run folder is read through :mod:`mim3d.runfolder` (checkpoint lookup, ``meta.json``,
the run's own store); this module must not import :mod:`mim3d.engine` (cli -> engine -> transfer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mim3d.config import PretrainConfig
from mim3d.factory import transferable_encoder
from mim3d.models.swinssl import swin_feature_size
from mim3d.runfolder import (
    STORE_DIR,
    CheckpointError,
    locate_checkpoint,
    read_checkpoint_config,
    read_meta,
)
from mim3d.transfer.card import TransferError, error, make_card, read_weights, write_encoder

__all__ = ["export_encoder"]


def _run_config(folder: Path) -> tuple[dict[str, Any], PretrainConfig]:
    """``meta.json`` and the pre-training config of a checkpoint folder."""
    try:
        return read_meta(folder), read_checkpoint_config(folder, "pretrain")
    except ValueError as exc:  # CheckpointError, ConfigError: both name the file
        raise TransferError(f"{exc}; export needs a complete mim3d pre-training checkpoint "
                            "(fine-tuning runs are used as they are)") from exc


def _store_summary(run_dir: Path) -> dict[str, Any]:
    """Cases of the run's own prepared store (a store passed by path is not recorded by runs)."""
    manifest = run_dir / STORE_DIR / "manifest.jsonl"
    if not manifest.is_file():
        return {"store": None, "cases": None}
    try:
        names = {json.loads(line)["name"] for line in manifest.read_text().splitlines() if line}
    except (OSError, ValueError, KeyError, TypeError):  # a summary must not stop the export
        names = None
    return {"store": str(manifest.parent.resolve()), "cases": None if names is None else len(names)}


def _encoder_kwargs(cfg: PretrainConfig) -> dict[str, Any]:
    m, g = cfg.model, cfg.geometry
    if cfg.method == "swinssl":  # size-agnostic: the pre-training roi goes on the card only
        return {"in_channels": m.in_channels, "feature_size": swin_feature_size(m.dims[0])}
    kwargs: dict[str, Any] = {"in_channels": m.in_channels, "input_size": list(g.input_size),
                              "patch_size": g.patch_size, "num_heads": m.num_heads,
                              "mlp_ratio": m.mlp_ratio}
    if m.encoder == "vit":
        return {**kwargs, "dim": m.vit_dim, "depth": m.vit_depth}
    return {**kwargs, "dims": list(m.dims), "depths": list(m.depths)}


def export_encoder(run_or_ckpt: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write a run's pre-trained encoder as ``out`` (safetensors) plus its JSON card.

    Args:
        run_or_ckpt: a run folder (its ``latest`` checkpoint, else the highest ``ckpt_*``), a
            checkpoint folder, or a checkpoint's ``model.safetensors``.
        out: the ``.safetensors`` path; the card goes to the same name with ``.json``.

    Returns:
        (weights path, card path).

    Raises:
        TransferError: no complete checkpoint, damaged files, or weights that do not fit.
    """
    try:
        found = locate_checkpoint(run_or_ckpt)
    except (FileNotFoundError, CheckpointError) as exc:
        raise TransferError(str(exc)) from exc
    meta, cfg = _run_config(found.folder)
    state = read_weights(found.weights)
    prefix, encoder = transferable_encoder(cfg)
    weights = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(f"{prefix}.")}
    target = encoder.state_dict()
    bad = [k for k in target if k not in weights or weights[k].shape != target[k].shape]
    if bad:
        raise error(found.weights, f"{len(bad)} encoder tensor(s) missing or of another shape "
                    f"({', '.join(bad[:3])})", "the checkpoint and its meta.json disagree")
    o = cfg.optim
    training = {"steps": meta.get("step"), "batch_size": o.batch_size,
                "accum_steps": o.accum_steps, **_store_summary(found.run_dir)}
    source = {"kind": "mim3d-checkpoint", "checkpoint": str(found.folder.resolve()),
              "mim3d_version": meta.get("mim3d_version")}
    return write_encoder(weights, make_card(cfg, _encoder_kwargs(cfg), source, training), out)
