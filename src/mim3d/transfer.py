"""Export and import of pre-trained encoders (DESIGN.md §5), incl. the authors' released file.

An *encoder file* is ``X.safetensors`` holding the encoder's own state-dict keys (no
``encoder.`` prefix) and a JSON card ``X.json`` beside it: architecture, the kwargs that rebuild
the encoder, patch, ROI, spacing, orientation, HU window, channels, training summary. The card is
also embedded in the safetensors metadata, so a renamed file still loads.

Loading returns a :class:`TransferReport` and adapts only what keeps the pre-trained computation:
the stem conv to more input channels, position tables to another token grid, 1x1x1 conv <->
Linear weights. Anything else is a one-line :class:`TransferError` naming the file. Checkpoints
are read here directly: this module must not import :mod:`mim3d.engine` (cli -> engine -> transfer).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mim3d import __version__
from mim3d.config import ConfigError, PretrainConfig, config_from_dict, load_config
from mim3d.factory import transferable_encoder
from mim3d.models.hybrid import HybridEncoder, official_key_to_mim3d
from mim3d.models.layers import sincos_pos_embed_3d
from mim3d.models.swinssl import swin_encoder, swin_feature_size
from mim3d.models.vit import ViTEncoder

__all__ = ["FORMAT", "TransferError", "TransferReport", "encoder_from_card", "export_encoder",
           "import_official", "load_encoder", "load_encoder_into", "read_card",
           "vit_to_monai_key"]

FORMAT = "mim3d-encoder"
FORMAT_VERSION = 1
_POS_RE = re.compile(r"(.+\.)?(pos_embed|position_embeddings)")
_NOT_ENCODER_RE = re.compile(r"decoder_.*|mask_token|aggregate_.*")
_TARGET_ONLY_RE = re.compile(r"(.+\.)?norm_cross_attn\.(weight|bias)")  # unused in MONAI's ViT
_VIT_KEY_RE = re.compile(
    r"patch_embedding\.(patch_embeddings\.(weight|bias)|position_embeddings)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.out_proj|mlp\.linear1|mlp\.linear2)"
    r"\.(weight|bias)")
_DAMAGED = "the file is truncated or damaged: export or download it again"


class TransferError(ValueError):
    """An encoder file or checkpoint that cannot be exported, imported or loaded (one line)."""


@dataclass
class TransferReport:
    """What moving an encoder's weights did.

    Attributes:
        loaded: target keys that received a tensor.
        missing: target keys the file did not provide (they keep their initialisation).
        unexpected: file keys the target does not use (for an import: keys not carried).
        reshaped: target keys whose tensor was adapted (channels, grid, 1x1 conv <-> Linear).
        notes: facts a user should know, one sentence each.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph: counts, a few example keys, then the notes."""
        def few(keys: list[str]) -> str:
            return f" ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""

        head = (f"Loaded {len(self.loaded)} tensors, {len(self.reshaped)} adapted"
                f"{few(self.reshaped)}; missing {len(self.missing)}{few(self.missing)}; "
                f"unexpected {len(self.unexpected)}{few(self.unexpected)}.")
        return " ".join([head, *self.notes])

    def to_dict(self) -> dict[str, list[str]]:
        """A JSON-safe dict of the five lists."""
        return asdict(self)


def _error(path: Path | str, problem: str, action: str) -> TransferError:
    return TransferError(f"{path}: {problem}; {action}")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 160 else text[:157] + "..."


# ------------------------------------------------------------------------- files and cards


def _write_encoder(weights: dict[str, Tensor], card: dict[str, Any],
                   out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` and its card, each atomically (temp file + rename)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise _error(out, "the output name must end in .safetensors", "e.g. encoder.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    card_path, tmp = out.with_suffix(".json"), out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "card": json.dumps(card)})
    os.replace(tmp, out)
    tmp.write_text(json.dumps({**card, "weights_file": out.name}, indent=2) + "\n")
    os.replace(tmp, card_path)
    return out, card_path


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise _error(path, "no such file", "pass an encoder .safetensors file or a checkpoint")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise _error(path, f"not a readable safetensors file ({_one_line(error)})",
                     _DAMAGED) from error


def read_card(path: str | Path) -> dict[str, Any] | None:
    """The card of an encoder file: ``X.json`` beside ``X.safetensors``, else the embedded one."""
    path = Path(path)
    side = path.with_suffix(".json")
    try:
        if side.is_file():
            card = json.loads(side.read_text())
        else:
            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get("card")
            card = json.loads(text) if text else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _error(side, f"unreadable card ({_one_line(error)})", _DAMAGED) from error
    except Exception as error:  # safetensors header errors
        raise _error(path, f"not a readable safetensors file ({_one_line(error)})",
                     _DAMAGED) from error
    if card is not None and (not isinstance(card, dict) or card.get("format") != FORMAT):
        raise _error(side, f"not a {FORMAT} card", "export the encoder with `mim3d export`")
    return card


def encoder_from_card(card: dict[str, Any], **overrides: Any) -> nn.Module:
    """Rebuild a card's encoder; ``overrides`` change e.g. ``in_channels`` or ``input_size``."""
    cls = {"hybrid": HybridEncoder, "vit": ViTEncoder, "swin": swin_encoder}.get(
        card.get("architecture"))
    if cls is None:
        raise TransferError(f"card architecture {card.get('architecture')!r} is unknown; "
                            "expected hybrid, vit or swin")
    return cls(**{**card["encoder_kwargs"], **overrides})


def _card(cfg: PretrainConfig, kwargs: dict[str, Any], source: dict[str, Any],
          training: dict[str, Any]) -> dict[str, Any]:
    g, d = cfg.geometry, cfg.data
    training = {"preset": cfg.name, "mask_ratios": list(g.mask_ratios),
                "crop_sizes": [list(c) for c in g.crop_sizes], **training}
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "architecture": "swin" if cfg.method == "swinssl" else cfg.model.encoder,
            "encoder_kwargs": kwargs, "patch_size": kwargs.get("patch_size", 2),
            "roi": list(g.input_size),
            "spacing": list(d.spacing) if d.spacing else None, "orientation": "RAS",
            "hu_window": list(d.hu_window), "normalization": d.normalization,
            "channels": kwargs["in_channels"], "source": source, "training": training,
            "mim3d_version": __version__}


# ------------------------------------------------------------------------- export of a run


def _locate_checkpoint(path: Path) -> tuple[Path, Path]:
    """(checkpoint folder, weights file) of a run folder, a ckpt folder or a weights file."""
    if path.is_file():
        return path.parent, path
    if (path / "model.safetensors").is_file():
        return path, path / "model.safetensors"
    if not path.is_dir():
        raise _error(path, "no such run, checkpoint folder or file", "check the path")
    pointer = path / "latest"
    name = pointer.read_text().strip() if pointer.is_file() else ""
    done = [p for p in path.glob("ckpt_*") if p.is_dir() and (p / "meta.json").is_file()
            and (p / "model.safetensors").is_file()]
    chosen = path / name if name and path / name in done else max(done, default=None)
    if chosen is None:
        raise _error(path, "holds no complete checkpoint", "pass a run or a ckpt_* folder")
    return chosen, chosen / "model.safetensors"


def _run_config(folder: Path) -> tuple[dict[str, Any], PretrainConfig]:
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        return meta, config_from_dict("pretrain", meta["config"])
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as error:
        raise _error(meta_path, f"holds no usable pre-training config ({_one_line(error)})",
                     "export from a mim3d pre-training checkpoint folder") from error


def _store_summary(folder: Path) -> dict[str, Any]:
    """Cases of the run's own prepared store (a store passed by path is not recorded by runs)."""
    manifest = folder.parent / "store" / "manifest.jsonl"
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
    folder, weights_path = _locate_checkpoint(Path(run_or_ckpt))
    meta, cfg = _run_config(folder)
    state = _read_weights(weights_path)
    prefix, encoder = transferable_encoder(cfg)
    weights = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(f"{prefix}.")}
    target = encoder.state_dict()
    bad = [k for k in target if k not in weights or weights[k].shape != target[k].shape]
    if bad:
        raise _error(weights_path, f"{len(bad)} encoder tensor(s) missing or of another shape "
                     f"({', '.join(bad[:3])})", "the checkpoint and its meta.json disagree")
    o = cfg.optim
    training = {"steps": meta.get("step"), "batch_size": o.batch_size,
                "accum_steps": o.accum_steps, **_store_summary(folder)}
    source = {"kind": "mim3d-checkpoint", "checkpoint": str(folder.resolve()),
              "mim3d_version": meta.get("mim3d_version")}
    return _write_encoder(weights, _card(cfg, _encoder_kwargs(cfg), source, training), out)


# ------------------------------------------------------------------------- the authors' file


def _load_official(file: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(checkpoint, its ``model`` weights); only tensors, containers and Namespace unpickle."""
    if not file.is_file():
        raise _error(file, "no such file", "pass the authors' released .pth checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))  # name the class torch refused
        what = found[1] if found else _one_line(error).split(". ")[0]
        raise _error(file, f"holds a pickled {what}, not only tensors and argparse.Namespace",
                     "refusing to unpickle it; use the authors' original file or re-save only "
                     "its 'model' dict") from error
    except Exception as error:  # zip / stream errors of a damaged file
        raise _error(file, f"cannot be read ({_one_line(error)})", _DAMAGED) from error
    weights = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(weights, dict):
        raise _error(file, "has no 'model' weight dict", "pass the authors' pre-training file")
    return ckpt, {k.removeprefix("module."): v for k, v in weights.items()}


def _official_kwargs(w: dict[str, Tensor], args: dict[str, Any], file: Path) -> dict[str, Any]:
    """HybridEncoder kwargs read off the tensor shapes (num_heads is not in the weights)."""
    try:
        stem, n = w["patch_embed1.proj.weight"], w["pos_embed"].shape[1]
        dims = [int(w[f"patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5)]
        depths = [len({k.split(".")[1] for k in w if k.startswith(f"blocks{s}.")})
                  for s in range(1, 5)]
        mlp_ratio = w["blocks4.0.mlp.fc1.weight"].shape[0] / dims[3]
    except (KeyError, IndexError) as error:
        raise _error(file, f"lacks the MiM encoder tensor {error}",
                     "it is not the authors' MiM pre-training checkpoint") from error
    g = round(n ** (1 / 3))
    if g ** 3 != n:
        raise _error(file, f"pos_embed has {n} tokens, not a cubic grid", "cannot import it")
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
                raise _error(file, f"{key} has shape {tuple(value.shape)}, mim3d's {name} needs"
                             f" {tuple(target[name].shape)}", "it is not the released model")
            value = value.reshape(target[name].shape)
            report.reshaped.append(name)
        weights[name] = value
        report.loaded.append(name)
    report.missing = [k for k in target if k not in weights]
    if report.missing:
        raise _error(file, f"lacks {len(report.missing)} encoder tensor(s) of mim3d's "
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
    card = _card(load_config("pretrain", "official"), kwargs, source, training)
    return (*_write_encoder(weights, card, out), report)


# ------------------------------------------------------------------------- loading


def vit_to_monai_key(name: str) -> str | None:
    """MONAI ``ViT`` key (``UNETR``: prepend ``vit.``) of a mim3d ``ViTEncoder`` key, or None.

    The names are identical by design (see :mod:`mim3d.models.vit`).
    """
    return name if _VIT_KEY_RE.fullmatch(name) else None


def _architecture(keys: Any) -> str | None:
    if "token_proj.weight" in keys:
        return "hybrid"
    if "patch_embed.proj.weight" in keys and "layers1.0.blocks.0.attn.qkv.weight" in keys:
        return "swin"  # MONAI's SwinTransformer (SwinUNETR's swinViT)
    return "vit" if "patch_embedding.patch_embeddings.weight" in keys else None


def _grid(n: int, card: dict[str, Any] | None, module: nn.Module | None) -> tuple[int, ...]:
    """Token grid of an n-row position table: the module's, the card's, else a cube."""
    grid = getattr(module, "grid", None)
    if grid is None and card is not None:
        kw = card["encoder_kwargs"]
        grid = tuple(s // kw["patch_size"] for s in kw["input_size"])
    if grid is None or grid[0] * grid[1] * grid[2] != n:
        grid = (round(n ** (1 / 3)),) * 3
    return tuple(grid)


@dataclass
class _Ctx:
    path: Path
    card: dict[str, Any] | None
    target: nn.Module
    stem: str | None  # the first 5D conv weight: the only one whose input is the image
    report: TransferReport


def _adapt_pos(key: str, value: Tensor, ref: Tensor, ctx: _Ctx) -> Tensor:
    src, dst = _grid(value.shape[1], ctx.card, None), _grid(ref.shape[1], None, ctx.target)
    if src[0] * src[1] * src[2] != value.shape[1] or dst[0] * dst[1] * dst[2] != ref.shape[1]:
        raise _error(ctx.path, f"{key}: cannot tell the token grids of {value.shape[1]} and "
                     f"{ref.shape[1]} tokens", "use the card's input_size")
    ctx.report.reshaped.append(key)
    if torch.allclose(value.float(), sincos_pos_embed_3d(src, value.shape[2]), atol=1e-5):
        ctx.report.notes.append(f"{key}: mim3d's fixed sin-cos, recomputed for grid {dst} "
                                f"(was {src}).")
        return sincos_pos_embed_3d(dst, value.shape[2]).to(ref.dtype)
    ctx.report.notes.append(f"{key}: interpolated trilinearly from grid {src} to {dst}.")
    vol = value.float().reshape(1, *src, -1).permute(0, 4, 1, 2, 3)
    vol = F.interpolate(vol, size=dst, mode="trilinear", align_corners=False)
    return vol.permute(0, 2, 3, 4, 1).reshape(1, -1, value.shape[2]).to(ref.dtype)


def _adapt(key: str, value: Tensor, ref: Tensor, ctx: _Ctx) -> Tensor:
    """``value`` shaped like ``ref``, or a TransferError when no faithful adaptation exists."""
    if value.shape == ref.shape:
        return value
    if _POS_RE.fullmatch(key) and value.ndim == ref.ndim == 3 and value.shape[2] == ref.shape[2]:
        return _adapt_pos(key, value, ref, ctx)
    if key == ctx.stem and value.shape[1] == 1 and value.ndim == 5 and \
            value.shape[:1] + value.shape[2:] == ref.shape[:1] + ref.shape[2:]:
        c = ref.shape[1]  # w/C on every channel: a channel-constant input keeps its response
        ctx.report.reshaped.append(key)
        ctx.report.notes.append(f"{key}: 1 -> {c} input channels (weight repeated, / {c}).")
        return value.repeat(1, c, 1, 1, 1) / c
    if value.shape[:2] == ref.shape[:2] and value.numel() == ref.numel():
        ctx.report.reshaped.append(key)  # a 1x1x1 conv stored as Linear, or the reverse
        return value.reshape(ref.shape)
    raise _error(ctx.path, f"{key} has shape {tuple(value.shape)}, the model needs "
                 f"{tuple(ref.shape)}", "build the model from the card's encoder_kwargs "
                 "(other sizes cannot be adapted)")


def load_encoder(encoder: nn.Module, path: str | Path, *, strict: bool = True) -> TransferReport:
    """Load an encoder file into ``encoder`` (a mim3d encoder, or MONAI's ``ViT`` for a ViT file).

    Adapts the stem conv from 1 to C input channels, position tables to another token grid
    (mim3d's sin-cos is recomputed exactly, other tables are interpolated trilinearly) and
    1x1x1 conv <-> Linear weights.

    Args:
        encoder: the target module.
        path: the ``.safetensors`` file (its card is read when present).
        strict: raise when the file lacks a key of the target (else report it as missing).

    Returns:
        The :class:`TransferReport`.

    Raises:
        TransferError: unreadable file, another architecture, missing encoder keys (strict),
            or shapes that cannot be adapted.
    """
    path = Path(path)
    weights, card = _read_weights(path), read_card(path)
    target = encoder.state_dict()
    have, want = (card or {}).get("architecture") or _architecture(weights), _architecture(target)
    if have != want:
        raise _error(path, f"holds a {have or 'unknown'} encoder but the target "
                     f"{type(encoder).__name__} is a {want or 'non-mim3d'} encoder",
                     f"build the downstream network with a {have} encoder or export another run")
    if have == "vit" and not isinstance(encoder, ViTEncoder):
        weights = {vit_to_monai_key(k) or k: v for k, v in weights.items()}
    stem = next((k for k, v in target.items() if v.ndim == 5 and k.endswith("weight")), None)
    ctx = _Ctx(path, card, encoder, stem, TransferReport())
    adapted = {k: _adapt(k, weights[k], ref, ctx) for k, ref in target.items() if k in weights}
    ctx.report.loaded = list(adapted)  # in the target's state-dict order
    ctx.report.missing = [k for k in target if k not in adapted]
    ctx.report.unexpected = [k for k in weights if k not in target]
    required = [k for k in ctx.report.missing if not _TARGET_ONLY_RE.fullmatch(k)]
    if strict and required:
        raise _error(path, f"lacks {len(required)} encoder key(s) of {type(encoder).__name__} "
                     f"({', '.join(required[:4])})", "export it again or pass strict=False")
    encoder.load_state_dict(adapted, strict=False)
    if len(required) < len(ctx.report.missing):
        ctx.report.notes.append(f"{len(ctx.report.missing) - len(required)} target-only tensors"
                                " (MONAI's unused norm_cross_attn) keep their initialisation.")
    if card is None:
        ctx.report.notes.append("The file has no card: architecture inferred from key names.")
    return ctx.report


def load_encoder_into(network: nn.Module, path: str | Path, *, prefix: str) -> TransferReport:
    """Load an encoder file into ``network.<prefix>`` and report the network's other keys.

    Args:
        network: a downstream network, e.g. MiM-UNETR (``prefix="encoder"``) or MONAI's UNETR
            with a ViT file (``prefix="vit"``).
        path: the encoder ``.safetensors`` file.
        prefix: dotted name of the encoder submodule.

    Returns:
        A report in the network's key names; ``missing`` lists the decoder/head keys.
    """
    try:
        sub = network.get_submodule(prefix)
    except AttributeError as error:
        raise TransferError(f"{type(network).__name__} has no submodule {prefix!r}; pass the "
                            "name of its encoder, e.g. prefix='encoder' or 'vit'") from error
    inner = load_encoder(sub, path)
    others = [k for k in network.state_dict() if not k.startswith(f"{prefix}.")]
    report = TransferReport(
        loaded=[f"{prefix}.{k}" for k in inner.loaded], unexpected=inner.unexpected,
        missing=[f"{prefix}.{k}" for k in inner.missing] + others,
        reshaped=[f"{prefix}.{k}" for k in inner.reshaped], notes=inner.notes)
    report.notes.append(f"{len(others)} tensors outside '{prefix}' (decoder/head) keep their "
                        "initialisation.")
    return report
