"""Loading an encoder file into a downstream network, adapting only what keeps its computation.

Adapted: the stem conv to more input channels, position tables to another token grid (mim3d's
sin-cos is recomputed exactly, other tables are interpolated trilinearly), 1x1x1 conv <-> Linear
weights. Anything else is a one-line :class:`~mim3d.transfer.card.TransferError` naming the file
and, for another encoder size, the ``--size`` its card records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mim3d.models.layers import sincos_pos_embed_3d
from mim3d.models.vit import ViTEncoder
from mim3d.transfer.card import (
    TransferError,
    TransferReport,
    card_size,
    error,
    read_card,
    read_weights,
)

__all__ = ["load_encoder", "load_encoder_into", "vit_to_monai_key"]

_POS_RE = re.compile(r"(.+\.)?(pos_embed|position_embeddings)")
_TARGET_ONLY_RE = re.compile(r"(.+\.)?norm_cross_attn\.(weight|bias)")  # unused in MONAI's ViT
_VIT_KEY_RE = re.compile(
    r"patch_embedding\.(patch_embeddings\.(weight|bias)|position_embeddings)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.out_proj|mlp\.linear1|mlp\.linear2)"
    r"\.(weight|bias)")
#: The downstream network (``mim3d finetune --network``) that hosts each encoder architecture.
_NETWORK_OF = {"hybrid": "mim-unetr (or classifier)", "vit": "unetr", "swin": "swinunetr"}


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
        raise error(ctx.path, f"{key}: cannot tell the token grids of {value.shape[1]} and "
                    f"{ref.shape[1]} tokens", "fine-tune at the roi the card records")
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
    size = card_size(ctx.card)
    if size is None:
        raise error(ctx.path, f"{key} has shape {tuple(value.shape)}, the model needs "
                    f"{tuple(ref.shape)}", "build the network at the encoder's own size (other "
                    "sizes cannot be adapted)")
    raise error(ctx.path, f"{key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(ref.shape)}: the encoder was pre-trained at size {size!r}",
                f"fine-tune with --size {size} (other sizes cannot be adapted)")


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
    weights, card = read_weights(path), read_card(path)
    target = encoder.state_dict()
    have, want = (card or {}).get("architecture") or _architecture(weights), _architecture(target)
    if have != want:
        hint = f"--network {_NETWORK_OF[have]}" if have in _NETWORK_OF else "another --network"
        raise error(path, f"holds a {have or 'unknown'} encoder but the target "
                    f"{type(encoder).__name__} is a {want or 'non-mim3d'} encoder",
                    f"fine-tune it with {hint}, or export another run")
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
        raise error(path, f"lacks {len(required)} encoder key(s) of {type(encoder).__name__} "
                    f"({', '.join(required[:4])})", "export it again from a complete "
                    "pre-training run")
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
    except AttributeError as exc:
        raise TransferError(f"{type(network).__name__} has no submodule {prefix!r}; pass the "
                            "name of its encoder, e.g. prefix='encoder' or 'vit'") from exc
    inner = load_encoder(sub, path)
    others = [k for k in network.state_dict() if not k.startswith(f"{prefix}.")]
    report = TransferReport(
        loaded=[f"{prefix}.{k}" for k in inner.loaded], unexpected=inner.unexpected,
        missing=[f"{prefix}.{k}" for k in inner.missing] + others,
        reshaped=[f"{prefix}.{k}" for k in inner.reshaped], notes=inner.notes)
    report.notes.append(f"{len(others)} tensors outside '{prefix}' (decoder/head) keep their "
                        "initialisation.")
    return report
