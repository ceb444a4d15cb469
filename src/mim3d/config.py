"""Frozen configuration dataclasses, YAML presets and ``--set`` overrides.

A run is described by one :class:`PretrainConfig` or :class:`FinetuneConfig`. Presets are YAML
files shipped in ``mim3d/presets/{pretrain,downstream}/``; a user file (``--config``) and
``--set section.key=value`` overrides are applied on top, in that order. Every value is checked
when the dataclass is built, and an unknown key or a bad value raises :class:`ConfigError` with
one line that names it (the tree-to-dataclass machinery is :mod:`mim3d.config_tree`). This
module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mim3d.config_tree import (  # re-exported: mim3d.config is the one import for users
    ConfigError,
    apply_override,
    build_dataclass,
    merge_trees,
    parse_override,
    to_dict,
)

Triple = tuple[int, int, int]
Spacing = tuple[float, float, float]

NORMALIZATIONS = ("window", "zscore", "minmax")
ALIGNMENTS = ("infonce", "byol", "none")
SCHEDULES = ("concurrent", "coarse_to_fine", "fine_to_coarse", "level1_only")
ENCODERS = ("hybrid", "vit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METHODS = ("mim", "swinssl")


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config value {key}={value!r} is invalid: {why}")


@dataclass(frozen=True)
class DataConfig:
    """Deterministic preprocessing of one CT volume (shared by prepare, pre-training, fine-tuning).

    Attributes:
        spacing: target voxel size in mm (x, y, z) after RAS orientation; ``None`` keeps native.
        hu_window: HU range mapped linearly to [0, 1] and clipped (``normalization="window"``).
        normalization: ``window`` (CT), ``zscore`` per channel (MRI), or ``minmax`` per volume.
        body_aware: reject random crops holding less than ``min_body_fraction`` body voxels.
        body_hu: voxels above this HU are body candidates (the table is removed at prepare time).
        min_body_fraction: the least share of body voxels a crop must hold when ``body_aware``.
        max_crop_tries: draws before the best crop seen is taken anyway.
    """

    spacing: Spacing | None = None
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    normalization: str = "window"
    body_aware: bool = False
    body_hu: float = -500.0
    min_body_fraction: float = 0.3
    max_crop_tries: int = 10

    def __post_init__(self) -> None:
        if self.spacing is not None:
            _check(len(self.spacing) == 3 and all(s > 0 for s in self.spacing),
                   "data.spacing", self.spacing, "give three positive mm values or null")
        lo, hi = self.hu_window
        _check(lo < hi, "data.hu_window", self.hu_window, "the lower bound must be below the upper")
        _check(self.normalization in NORMALIZATIONS, "data.normalization", self.normalization,
               f"choose one of {', '.join(NORMALIZATIONS)}")
        _check(0.0 <= self.min_body_fraction <= 1.0, "data.min_body_fraction",
               self.min_body_fraction, "must lie in [0, 1]")
        _check(self.max_crop_tries >= 1, "data.max_crop_tries", self.max_crop_tries, "must be >= 1")


@dataclass(frozen=True)
class GeometryConfig:
    """Multi-level geometry of MiM (DESIGN.md §2). Validated fully by ``masking.build_geometry``.

    Attributes:
        crop_sizes: S_l per level in voxels of the preprocessed volume; L = len(crop_sizes).
        input_size: R, the encoder input every level volume is resized to.
        patch_size: token size p in encoder-input voxels.
        mask_ratios: mu_l, fraction of units masked per level.
        gammas: children drawn per parent volume, one per level transition (L - 1 values).
        source: children drawn from ``masked`` units (paper) or ``unmasked`` (Table IX ablation).
        resize_mode: ``trilinear`` (paper: area averaging to shrink, trilinear to enlarge) or
            ``nearest`` (leak-free: whole-number factors, enlarging ones dividing patch_size).
    """

    crop_sizes: tuple[Triple, ...] = ((192, 192, 192), (96, 96, 96), (16, 16, 16))
    input_size: Triple = (96, 96, 96)
    patch_size: int = 16
    mask_ratios: tuple[float, ...] = (0.6, 0.6, 0.6)
    gammas: tuple[int, ...] = (4, 4)
    source: str = "masked"
    resize_mode: str = "trilinear"

    @property
    def levels(self) -> int:
        return len(self.crop_sizes)

    def __post_init__(self) -> None:
        _check(len(self.crop_sizes) >= 1, "geometry.crop_sizes", self.crop_sizes, "need >= 1 level")
        _check(len(self.mask_ratios) == self.levels, "geometry.mask_ratios", self.mask_ratios,
               f"need one ratio per level ({self.levels})")
        _check(len(self.gammas) == self.levels - 1, "geometry.gammas", self.gammas,
               f"need one gamma per level transition ({self.levels - 1})")
        _check(all(0.0 < r < 1.0 for r in self.mask_ratios), "geometry.mask_ratios",
               self.mask_ratios, "each ratio must lie in (0, 1)")
        _check(self.source in ("masked", "unmasked"), "geometry.source", self.source,
               "choose masked or unmasked")
        _check(self.resize_mode in ("trilinear", "nearest"), "geometry.resize_mode",
               self.resize_mode, "choose trilinear or nearest")


@dataclass(frozen=True)
class ModelConfig:
    """Encoder/decoder sizes (DESIGN.md §3). ``encoder="vit"`` is the MAE3D baseline.

    ``depthwise_impl``: the CUDA depthwise conv (``auto`` = Triton when installed, ``triton``,
    ``cudnn``); ``one_pass``: conv stages and decoder once over all levels' volumes
    (``always``), level by level (``never``), or ``auto``: one pass on CUDA, level by level on
    the CPU (measured there: the tiny preset's step is ~20% faster level by level).
    """

    encoder: str = "hybrid"
    in_channels: int = 1
    dims: tuple[int, int, int, int] = (48, 96, 192, 384)
    depths: tuple[int, int, int, int] = (2, 2, 2, 11)
    num_heads: int = 12
    vit_dim: int = 768
    vit_depth: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 576
    decoder_depth: int = 8
    decoder_heads: int = 16
    proj_dim: int = 2048
    drop_path_rate: float = 0.0
    depthwise_impl: str = "auto"
    one_pass: str = "auto"

    def __post_init__(self) -> None:
        _check(self.one_pass in ("auto", "always", "never"), "model.one_pass", self.one_pass,
               "choose auto, always or never")
        _check(self.depthwise_impl in ("auto", "triton", "cudnn"), "model.depthwise_impl",
               self.depthwise_impl, "choose auto, triton or cudnn")
        _check(self.encoder in ENCODERS, "model.encoder", self.encoder,
               f"choose one of {', '.join(ENCODERS)}")
        _check(self.dims[3] % self.num_heads == 0, "model.num_heads", self.num_heads,
               f"must divide the token width dims[3]={self.dims[3]}")
        _check(self.decoder_dim % self.decoder_heads == 0, "model.decoder_heads",
               self.decoder_heads, f"must divide decoder_dim={self.decoder_dim}")
        _check(self.vit_dim % self.num_heads == 0, "model.vit_dim", self.vit_dim,
               f"must be divisible by num_heads={self.num_heads}")
        for key in ("in_channels", "proj_dim", "decoder_depth", "vit_depth"):
            _check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "must be >= 1")


@dataclass(frozen=True)
class LossConfig:
    """Loss terms and their weights (Tables VIII, X, XII; alpha of Eq. 10)."""

    norm_pix: bool = True
    alpha: float = 0.1
    alignment: str = "infonce"
    temperature: float = 0.1
    stop_grad: bool = True
    schedule: str = "concurrent"
    recon_levels: tuple[bool, ...] | None = None
    align_pairs: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        _check(self.alignment in ALIGNMENTS, "loss.alignment", self.alignment,
               f"choose one of {', '.join(ALIGNMENTS)}")
        _check(self.schedule in SCHEDULES, "loss.schedule", self.schedule,
               f"choose one of {', '.join(SCHEDULES)}")
        _check(self.temperature > 0, "loss.temperature", self.temperature, "must be > 0")
        _check(self.alpha >= 0, "loss.alpha", self.alpha, "must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up + cosine, set per optimizer step (Table II).

    ``grad_checkpointing`` recomputes the transformer blocks (encoder and MiM's decoder) in
    backward; ``conv_recompute`` the hybrid encoder's conv blocks and their downsampling (most
    of a step's memory): ``auto`` = on CUDA only.
    ``saved_activations=bf16`` keeps autograd's saved float32 tensors in bfloat16 (half memory).
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    total_steps: int = 45000
    batch_size: int = 4
    accum_steps: int = 1
    grad_clip: float = 1.0
    precision: str = "auto"
    grad_checkpointing: bool = False
    conv_recompute: str = "auto"
    saved_activations: str = "fp32"

    def __post_init__(self) -> None:
        _check(self.conv_recompute in ("auto", "always", "never"), "optim.conv_recompute",
               self.conv_recompute, "choose auto (CUDA only), always or never")
        _check(self.saved_activations in ("fp32", "bf16"), "optim.saved_activations",
               self.saved_activations, "choose fp32 or bf16")
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(self.total_steps >= 1, "optim.total_steps", self.total_steps, "must be >= 1")
        _check(0 <= self.warmup_steps < self.total_steps, "optim.warmup_steps",
               self.warmup_steps, f"must lie in [0, total_steps={self.total_steps})")
        _check(self.batch_size >= 1, "optim.batch_size", self.batch_size, "must be >= 1")
        _check(self.accum_steps >= 1, "optim.accum_steps", self.accum_steps, "must be >= 1")
        _check(self.precision in PRECISIONS, "optim.precision", self.precision,
               f"choose one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class TrainConfig:
    """Run mechanics: seeds, loaders, logging, pictures and checkpoints."""

    seed: int = 0
    workers: int = 2
    log_every: int = 10
    image_every: int = 500
    ckpt_every: int = 1000
    keep_last: int = 3
    deterministic: bool = False
    #: torch.compile the transformer and conv blocks (``engine.train.compile_blocks``)
    compile: bool = False
    #: seconds a torchrun rank waits for its peers in a collective before it stops
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for key in ("log_every", "image_every", "ckpt_every", "keep_last"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")
        _check(self.workers >= 0, "train.workers", self.workers, "must be >= 0")
        _check(self.dist_timeout_s > 0, "train.dist_timeout_s", self.dist_timeout_s, "must be > 0")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pre-training run needs.

    ``method="mim"`` covers MiM and its single-level baselines (MAE3D with ``model.encoder=vit``,
    the hybrid MAE with one level); ``method="swinssl"`` is Swin-UNETR's SSL baseline, which
    reads only the level-1 crop/input size, ``model.dims[0]`` (Swin width 12 * ceil(dims[0] / 12),
    as the downstream SwinUNETR) and ``loss.temperature`` (NT-Xent).
    """

    name: str = "base"
    method: str = "mim"
    data: DataConfig = field(default_factory=DataConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", self.method, f"choose one of {', '.join(METHODS)}")
        if self.method == "swinssl":
            _check(self.geometry.levels == 1, "geometry.crop_sizes", self.geometry.crop_sizes,
                   "method swinssl uses one level")
            _check(self.geometry.crop_sizes[0] == self.geometry.input_size, "geometry.input_size",
                   self.geometry.input_size, "method swinssl needs input_size == crop_sizes[0]")
            _check(self.geometry.input_size[0] == self.geometry.input_size[1],
                   "geometry.input_size", self.geometry.input_size,
                   "method swinssl rotates in the axial plane, so sides x and y must be equal")


@dataclass(frozen=True)
class TaskConfig:
    """A downstream task: what is predicted and how crops are drawn.

    ``labels`` lists the class ids kept (others become background); ``label_aliases`` maps
    source ids onto listed ones first (BraTS stores enhancing tumour as 4 -> class 3).
    """

    task: str = "seg"
    roi: Triple = (96, 96, 96)
    in_channels: int = 1
    num_classes: int = 14
    labels: dict[int, str] | None = None
    label_aliases: dict[int, int] | None = None
    num_samples: int = 2
    pos: float = 1.0
    neg: float = 1.0
    nsd_tolerance_mm: float = 1.0
    sw_overlap: float = 0.5

    def __post_init__(self) -> None:
        _check(self.task in ("seg", "cls"), "task.task", self.task, "choose seg or cls")
        _check(self.num_classes >= 2, "task.num_classes", self.num_classes, "must be >= 2")
        _check(all(r >= 8 for r in self.roi), "task.roi", self.roi, "every side must be >= 8")
        _check(0.0 <= self.sw_overlap < 1.0, "task.sw_overlap", self.sw_overlap,
               "must lie in [0, 1)")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a downstream fine-tuning run needs."""

    name: str = "btcv"
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# Presets.

KINDS = {"pretrain": PretrainConfig, "downstream": FinetuneConfig}


def preset_names(kind: str) -> list[str]:
    """Names of the shipped presets of a kind (``pretrain`` or ``downstream``)."""
    folder = resources.files("mim3d") / "presets" / kind
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset_yaml(kind: str, name: str) -> dict:
    names = preset_names(kind)
    if name not in names:
        raise ConfigError(f"unknown {kind} preset {name!r}; choose one of {', '.join(names)}")
    text = (resources.files("mim3d") / "presets" / kind / f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _preset_dict(kind: str, name: str) -> dict:
    tree = _preset_yaml(kind, name)
    tree.pop("description", None)  # for `mim3d presets`, not a config value
    return tree


def preset_description(kind: str, name: str) -> str:
    """The one-line ``description`` of a shipped preset (``mim3d presets`` lists them)."""
    return str(_preset_yaml(kind, name).get("description", "")).strip()


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got "
                          f"{type(data).__name__}")
    return data


def load_config(kind: str, preset: str, *, config_file: str | Path | None = None,
                overrides: Sequence[str] = ()) -> Any:
    """Resolve a preset + optional YAML file + ``--set`` overrides into a frozen config.

    Args:
        kind: ``pretrain`` or ``downstream``.
        preset: a name from :func:`preset_names`.
        config_file: a YAML file whose sections are merged over the preset.
        overrides: ``section.key=value`` strings, applied last.

    Returns:
        A :class:`PretrainConfig` or :class:`FinetuneConfig`.

    Raises:
        ConfigError: unknown preset, key or a value that cannot work; the message names it.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown config kind {kind!r}; choose pretrain or downstream")
    tree = _preset_dict(kind, preset)
    tree.setdefault("name", preset)
    if config_file is not None:
        tree = merge_trees(tree, _read_yaml(config_file))
    for text in overrides:
        tree = apply_override(tree, *parse_override(text))
    try:
        return build_dataclass(KINDS[kind], tree)
    except TypeError as exc:  # a section given as a scalar, or the like
        raise ConfigError(f"config is invalid: {exc}") from None


def config_from_dict(kind: str, tree: dict) -> Any:
    """Rebuild a config from :func:`to_dict` output (e.g. a run folder's ``config.yaml``)."""
    return build_dataclass(KINDS[kind], tree)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (every run folder holds one)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
