"""Import of the MiM authors' released pre-training checkpoint (``.pth``) as a mim3d encoder file.

Only tensors, plain containers and ``argparse.Namespace`` are unpickled; the key names and shapes
of their file are listed in ``reference/official_mim_checkpoint_keys.txt``.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mim3d.config import load_config
from mim3d.fileio import one_line
from mim3d.models.hybrid import HybridEncoder, official_key_to_mim3d
from mim3d.models.layers import sincos_pos_embed_3d
from mim3d.transfer.card import (
    DAMAGED,
    TransferReport,
    error,
    make_card,
    write_encoder,
)

__all__ = ["import_official"]

_NOT_ENCODER_RE = re.compile(r"decoder_.*|mask_token|aggregate_.*")


def _load_official(file: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(checkpoint, its ``model`` weights); only tensors, containers and Namespace unpickle."""
    if not file.is_file():
        raise error(file, "no such file", "pass the authors' released .pth checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # name the class torch refused
        what = found[1] if found else one_line(exc).split(". ")[0]
        raise error(file, f"holds a pickled {what}, not only tensors and argparse.Namespace",
                    "refusing to unpickle it; use the authors' original file or re-save only "
                    "its 'model' dict") from exc
    except Exception as exc:  # zip / stream errors of a damaged file
        raise error(file, f"cannot be read ({one_line(exc)})", DAMAGED) from exc
    weights = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(weights, dict):
        raise error(file, "has no 'model' weight dict", "pass the authors' pre-training file")
    return ckpt, {k.removeprefix("module."): v for k, v in weights.items()}


def _official_kwargs(w: dict[str, Tensor], args: dict[str, Any], file: Path) -> dict[str, Any]:
    """HybridEncoder kwargs read off the tensor shapes (num_heads is not in the weights)."""
    try:
        stem, n = w["patch_embed1.proj.weight"], w["pos_embed"].shape[1]
        dims = [int(w[f"patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5)]
        depths = [len({k.split(".")[1] for k in w if k.startswith(f"blocks{s}.")})
                  for s in range(1, 5)]
        mlp_ratio = w["blocks4.0.mlp.fc1.weight"].shape[0] / dims[3]
    except (KeyError, IndexError) as exc:
        raise error(file, f"lacks the MiM encoder tensor {exc}",
                    "it is not the authors' MiM pre-training checkpoint") from exc
    g = round(n ** (1 / 3))
    if g ** 3 != n:
        raise error(file, f"pos_embed has {n} tokens, not a cubic grid", "cannot import it")
    patch = 8 * int(stem.shape[2])  # the stem stride is patch_size / 8
    return {"in_channels": int(stem.shape[1]), "input_size": [g * patch] * 3,
            "patch_size": patch, "dims": dims, "depths": depths,
            "num_heads": int(args.get("num_heads", 12)), "mlp_ratio": float(mlp_ratio)}


def _pos_embed_note(theirs: Tensor, grid: tuple[int, int, int]) -> str:
    """Compare their position table with mim3d's sin-cos, also with permuted axis blocks."""
    ours = sincos_pos_embed_3d(grid, theirs.shape[-1])[0]
    width = 2 * (theirs.shape[-1] // 6)  # [sin | cos] columns per axis
    blocks = [ours[:, a * width:(a + 1) * width] for a in range(3)] + [ours[:, 3 * width:]]
    for order in ((0, 1, 2), (1, 0, 2), (0, 2, 1), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        cand = torch.cat([blocks[a] for a in (*order, 3)], dim=1)
        if torch.allclose(theirs[0].float(), cand, atol=1e-4):
            how = "equals mim3d's sin-cos" if order == (0, 1, 2) else \
                f"is mim3d's sin-cos with its axis blocks in order {order}"
            return f"Their pos_embed {how}; carried unchanged."
    diff = (theirs[0].float() - ours).abs().max().item()
    return (f"Their pos_embed differs from mim3d's sin-cos (max |diff| {diff:.3g}); carried "
            "unchanged since their transformer was trained with it (it replaces mim3d's fixed "
            "buffer on loading, and is interpolated for another ROI).")


def _official_notes(report: TransferReport, theirs: dict[str, Tensor],
                    kwargs: dict[str, Any]) -> list[str]:
    foreign = [k for k in report.unexpected if not _NOT_ENCODER_RE.fullmatch(k)]
    grid = tuple(s // kwargs["patch_size"] for s in kwargs["input_size"])
    kept = len(report.unexpected) - len(foreign)
    notes = [f"{kept} decoder/head tensors (decoder_*, mask_token, aggregate_*) not carried.",
             f"{len(report.reshaped)} 1x1x1 conv weights became Linear by a reshape.",
             _pos_embed_note(theirs["pos_embed"], grid),
             "Token order is raster over the array axes in both codes: no permutation.",
             "The authors pre-trained with mask ratios 0.5/0.6/0.5 (the paper says 0.6).",
             f"num_heads={kwargs['num_heads']} is not stored in the weights (base: 12)."]
    if foreign:
        notes.append(f"{len(foreign)} unrecognised tensors were skipped ({foreign[:3]}).")
    return notes


def _map_official(theirs: dict[str, Tensor], target: dict[str, Tensor],
                  file: Path) -> tuple[dict[str, Tensor], TransferReport]:
    """Rename to mim3d keys; values unchanged, 1x1x1 convs reshaped to Linear."""
    report, weights = TransferReport(), {}
    for key, value in theirs.items():
        name = official_key_to_mim3d(key)
        if name not in target:
            report.unexpected.append(key)
            continue
        if value.shape != target[name].shape:
            if value.numel() != target[name].numel():
                raise error(file, f"{key} has shape {tuple(value.shape)}, mim3d's {name} needs"
                             f" {tuple(target[name].shape)}", "it is not the released model")
            value = value.reshape(target[name].shape)
            report.reshaped.append(name)
        weights[name] = value
        report.loaded.append(name)
    report.missing = [k for k in target if k not in weights]
    if report.missing:
        raise error(file, f"lacks {len(report.missing)} encoder tensor(s) of mim3d's "
                     f"HybridEncoder ({', '.join(report.missing[:4])})", "cannot import it")
    return weights, report


def import_official(file: str | Path, out: str | Path) -> tuple[Path, Path, TransferReport]:
    """Import the MiM authors' released pre-training checkpoint as a mim3d encoder file.

    Only tensors, plain containers and ``argparse.Namespace`` (their ``args``) are unpickled.
    Every encoder tensor keeps its values; the conv blocks' 1x1x1 convs, ``(C_out, C_in, 1, 1,
    1)`` there, become mim3d's ``nn.Linear`` ``(C_out, C_in)`` by a reshape (``reshaped``).
    Decoder and alignment-head keys are not carried (``unexpected``). No token permutation is
    needed: both codes flatten the ``(B, C, a0, a1, a2)`` map in raster order over the array
    axes (their "h, w, d" is mim3d's "D, H, W"), and both lay CT arrays out as RAS (x, y, z).

    Returns:
        (weights path, card path, report).

    Raises:
        TransferError: unreadable file, foreign pickled classes, or missing encoder tensors.
    """
    file = Path(file)
    ckpt, theirs = _load_official(file)
    raw = ckpt.get("args")
    raw = vars(raw) if isinstance(raw, argparse.Namespace) else raw if isinstance(raw, dict) else {}
    args = {k: v for k, v in raw.items() if isinstance(v, (str, int, float, bool, type(None)))}
    kwargs = _official_kwargs(theirs, args, file)
    weights, report = _map_official(theirs, HybridEncoder(**kwargs).state_dict(), file)
    report.notes += _official_notes(report, theirs, kwargs)
    epoch = ckpt.get("epoch")
    training = {"epoch": epoch if isinstance(epoch, int) else None, "steps": None}
    source = {"kind": "official", "file": str(file.resolve()), "args": args}
    card = make_card(load_config("pretrain", "official"), kwargs, source, training)
    return (*write_encoder(weights, card, out), report)
