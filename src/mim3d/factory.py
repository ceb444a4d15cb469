"""Build networks from configs and presets: the one place where config values become kwargs.

Models under :mod:`mim3d.models` take plain keyword arguments only; this module sits above them
(engine, transfer and cli import it) and turns a :class:`~mim3d.config.PretrainConfig` or a
pretrain preset name into those arguments.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from torch import nn

from mim3d.config import GeometryConfig, ModelConfig, PretrainConfig, load_config, preset_names
from mim3d.masking import LevelGeometry, build_geometry
from mim3d.models.downstream import (
    NETWORKS,
    MiMClassifier,
    MiMUNETR,
    build_swinunetr,
    build_unetr,
    check_roi,
)
from mim3d.models.hybrid import HybridEncoder
from mim3d.models.mim import MiM
from mim3d.models.swinssl import SwinSSL, swin_encoder, swin_feature_size
from mim3d.models.vit import ViTEncoder

_log = logging.getLogger(__name__)


def geometry_from_config(cfg: GeometryConfig) -> tuple[LevelGeometry, ...]:
    """Validated level geometry (raises ``GeometryError`` naming the bad value).

    Mask ratios are applied in whole units, so the effective ratio can differ from the one
    asked for (level 1 of the default geometry masks 5 of 8 octants, 62.5%): it is logged.
    """
    geometry = build_geometry(crop_sizes=cfg.crop_sizes, input_size=cfg.input_size,
                              patch_size=cfg.patch_size, mask_ratios=cfg.mask_ratios,
                              gammas=cfg.gammas, source=cfg.source,
                              resize_mode=cfg.resize_mode)
    _log_effective_ratios(geometry)
    return geometry


@functools.lru_cache(maxsize=32)
def _log_effective_ratios(geometry: tuple[LevelGeometry, ...]) -> None:
    """Log the whole-unit mask ratios once per geometry and process (it is built many times)."""
    _log.info("effective mask ratios (whole units): %s", "; ".join(
        f"level {g.level} {g.n_masked}/{g.n_units} = {g.n_masked / g.n_units:.1%} "
        f"(asked {g.mask_ratio:.1%})" for g in geometry))


def build_encoder(model: ModelConfig, *, input_size: tuple[int, int, int], patch_size: int,
                  grad_checkpointing: bool = False, conv_recompute: str = "never") -> nn.Module:
    """The hybrid encoder (MiM) or the plain ViT (MAE3D baseline) of a config."""
    if model.encoder == "vit":
        return ViTEncoder(in_channels=model.in_channels, input_size=input_size,
                          patch_size=patch_size, dim=model.vit_dim, depth=model.vit_depth,
                          num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
                          grad_checkpointing=grad_checkpointing)
    return HybridEncoder(in_channels=model.in_channels, input_size=input_size,
                         patch_size=patch_size, dims=model.dims, depths=model.depths,
                         num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
                         drop_path_rate=model.drop_path_rate,
                         grad_checkpointing=grad_checkpointing,
                         depthwise_impl=model.depthwise_impl, conv_recompute=conv_recompute)


def uses_alignment(cfg: PretrainConfig) -> bool:
    """Whether any cross-level alignment term is on (else no projection heads are built)."""
    pairs = cfg.loss.align_pairs
    return (cfg.loss.alignment != "none" and cfg.geometry.levels > 1 and cfg.loss.alpha > 0
            and (pairs is None or any(pairs)))


def build_mim(cfg: PretrainConfig) -> MiM:
    """The full pre-training model of a config."""
    geo = geometry_from_config(cfg.geometry)
    encoder = build_encoder(cfg.model, input_size=cfg.geometry.input_size,
                            patch_size=cfg.geometry.patch_size,
                            grad_checkpointing=cfg.optim.grad_checkpointing,
                            conv_recompute=cfg.optim.conv_recompute)
    m = cfg.model
    return MiM(encoder=encoder, geometry=geo, in_channels=m.in_channels,
               patch_size=cfg.geometry.patch_size, input_size=cfg.geometry.input_size,
               decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
               decoder_heads=m.decoder_heads, mlp_ratio=m.mlp_ratio, proj_dim=m.proj_dim,
               align=uses_alignment(cfg), stop_grad=cfg.loss.stop_grad,
               one_pass={"auto": None, "always": True, "never": False}[m.one_pass],
               decoder_checkpointing=cfg.optim.grad_checkpointing)


def build_swinssl(cfg: PretrainConfig) -> SwinSSL:
    """Swin-UNETR's SSL model of a ``method: swinssl`` config (Swin width from ``dims[0]``)."""
    return SwinSSL(in_channels=cfg.model.in_channels, img_size=cfg.geometry.input_size,
                   feature_size=swin_feature_size(cfg.model.dims[0]))


def build_pretrain_model(cfg: PretrainConfig) -> nn.Module:
    """The model a pre-training run trains: :class:`MiM`, or :class:`SwinSSL` for ``swinssl``."""
    return build_swinssl(cfg) if cfg.method == "swinssl" else build_mim(cfg)


def transferable_encoder(cfg: PretrainConfig) -> tuple[str, nn.Module]:
    """``(prefix, module)``: the part of the pre-training model that ``mim3d export`` writes,
    freshly built (the hybrid/ViT ``encoder`` of MiM, or the ``swinViT`` of SwinSSL)."""
    if cfg.method == "swinssl":
        return "swinViT", swin_encoder(in_channels=cfg.model.in_channels,
                                       feature_size=swin_feature_size(cfg.model.dims[0]))
    return "encoder", build_encoder(cfg.model, input_size=cfg.geometry.input_size,
                                    patch_size=cfg.geometry.patch_size)


def build_downstream(*, network: str, size: str, in_channels: int, out_channels: int,
                     roi: Sequence[int], grad_checkpointing: bool = False) -> nn.Module:
    """A downstream network at the encoder size of pretrain preset ``size``.

    Sizes come from ``load_config("pretrain", size).model`` and its ``geometry.patch_size``:
    ``mim-unetr`` / ``classifier`` use the hybrid encoder (decoder width fs = dims[0]: 48 for
    base), ``unetr`` the ViT (``vit_dim``, ``vit_depth``, ``num_heads``, ``mlp_ratio``), and
    ``swinunetr`` the smallest multiple of 12 >= dims[0] as feature size (as ``swin-ssl``).

    Args:
        network: one of :data:`NETWORKS`.
        size: a pretrain preset name (tiny, small, base, ...).
        in_channels: image channels.
        out_channels: classes (segmentation logit channels, or classifier logits).
        roi: input size; equal to the preset's ``geometry.input_size`` for an exact load of
            the pre-trained encoder (its fixed position embedding depends on the grid).
        grad_checkpointing: recompute encoder blocks in backward.

    Returns:
        The network; its pre-trained part sits under ``ENCODER_PREFIX[network]``.
    """
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; choose one of {', '.join(NETWORKS)}")
    sizes = preset_names("pretrain")
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(sizes)}")
    cfg = load_config("pretrain", size)
    m, p = cfg.model, cfg.geometry.patch_size
    if network == "swinunetr":
        roi = check_roi(roi, 32, "SwinUNETR downsamples 32x")
        if roi == (32, 32, 32):
            raise ValueError("roi (32, 32, 32) leaves SwinUNETR a single bottleneck voxel, "
                             "on which instance norm fails; use a larger roi")
        return build_swinunetr(in_channels=in_channels, out_channels=out_channels,
                               feature_size=swin_feature_size(m.dims[0]),
                               use_checkpoint=grad_checkpointing)
    if network == "unetr":
        return build_unetr(in_channels=in_channels, out_channels=out_channels, roi=roi,
                           patch_size=p, hidden_size=m.vit_dim, num_layers=m.vit_depth,
                           num_heads=m.num_heads, mlp_dim=int(m.vit_dim * m.mlp_ratio))
    common = {"in_channels": in_channels, "roi": roi, "patch_size": p, "dims": m.dims,
              "depths": m.depths, "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio,
              "drop_path_rate": m.drop_path_rate, "grad_checkpointing": grad_checkpointing}
    if network == "classifier":
        return MiMClassifier(num_classes=out_channels, **common)
    return MiMUNETR(out_channels=out_channels, feature_size=m.dims[0], **common)
