"""Encoder files and their cards: the one place writing and reading ``X.safetensors`` + ``X.json``.

An *encoder file* is ``X.safetensors`` holding the encoder's own state-dict keys (no ``encoder.``
prefix) and a JSON card ``X.json`` beside it: architecture, the kwargs that rebuild the encoder,
patch, ROI, spacing, orientation, HU window, channels, training summary. The card is also
embedded in the safetensors metadata, so a renamed file still loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mim3d import __version__
from mim3d.config import PretrainConfig
from mim3d.fileio import one_line
from mim3d.models.hybrid import HybridEncoder
from mim3d.models.swinssl import swin_encoder
from mim3d.models.vit import ViTEncoder

__all__ = ["FORMAT", "FORMAT_VERSION", "TransferError", "TransferReport", "encoder_from_card",
           "read_card"]

FORMAT = "mim3d-encoder"
FORMAT_VERSION = 1
DAMAGED = "the file is truncated or damaged: export or download it again"
#: Suffixes of PyTorch pickles (the MiM authors release ``.pth``): not encoder files.
_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".tar", ".bin")


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


def error(path: Path | str, problem: str, action: str) -> TransferError:
    """The one-line error: which file, what is wrong, what to do."""
    return TransferError(f"{path}: {problem}; {action}")


def write_encoder(weights: dict[str, Tensor], card: dict[str, Any],
                  out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` and its card, each atomically (temp file + rename)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise error(out, "the output name must end in .safetensors", "e.g. encoder.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    card_path, tmp = out.with_suffix(".json"), out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "card": json.dumps(card)})
    os.replace(tmp, out)
    tmp.write_text(json.dumps({**card, "weights_file": out.name}, indent=2) + "\n")
    os.replace(tmp, card_path)
    return out, card_path


def _is_zip(path: Path) -> bool:
    """``torch.save`` writes a zip archive (a safetensors file starts with its header length)."""
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of an encoder (or checkpoint weights) file, or a one-line TransferError."""
    if not path.is_file():
        raise error(path, "no such file", "pass an encoder .safetensors file or a checkpoint")
    if path.suffix.lower() in _TORCH_SUFFIXES or _is_zip(path):
        raise error(path, "is a PyTorch checkpoint, not a mim3d encoder file",
                    "convert the MiM authors' checkpoint first: mim3d export --from-official "
                    f"{path} --out ENCODER.safetensors, then pass ENCODER.safetensors")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise error(path, f"not a readable safetensors file ({one_line(exc)})", DAMAGED) from exc


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(side, f"unreadable card ({one_line(exc)})", DAMAGED) from exc
    except Exception as exc:  # safetensors header errors
        raise error(path, f"not a readable safetensors file ({one_line(exc)})", DAMAGED) from exc
    if card is not None and (not isinstance(card, dict) or card.get("format") != FORMAT):
        raise error(side, f"not a {FORMAT} card", "export the encoder with `mim3d export`")
    return card


def card_size(card: dict[str, Any] | None) -> str | None:
    """The encoder size (pretrain preset, the ``--size`` of ``mim3d finetune``) a card records."""
    preset = ((card or {}).get("training") or {}).get("preset")
    return preset if isinstance(preset, str) else None


def encoder_from_card(card: dict[str, Any], **overrides: Any) -> nn.Module:
    """Rebuild a card's encoder; ``overrides`` change e.g. ``in_channels`` or ``input_size``."""
    cls = {"hybrid": HybridEncoder, "vit": ViTEncoder, "swin": swin_encoder}.get(
        card.get("architecture"))
    if cls is None:
        raise TransferError(f"card architecture {card.get('architecture')!r} is unknown; "
                            "expected hybrid, vit or swin")
    return cls(**{**card["encoder_kwargs"], **overrides})


def make_card(cfg: PretrainConfig, kwargs: dict[str, Any], source: dict[str, Any],
              training: dict[str, Any]) -> dict[str, Any]:
    """The card of an encoder built with ``kwargs`` under pre-training config ``cfg``."""
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
