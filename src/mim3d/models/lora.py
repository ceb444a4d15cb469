"""LoRA fine-tuning of a pre-trained encoder through ``peft`` (paper Tables XIII-XIV).

:func:`apply_lora` adds rank-r adapters (``peft.inject_adapter_in_model``, works on plain
``nn.Module`` s) to the encoder's attention projections and its convolution blocks' 1x1 convs,
freezes every other encoder weight and leaves the rest of the network (decoder / head) fully
trainable. :func:`merge_lora` folds the adapters back into plain layers for export.

Which layers can carry LoRA (HybridEncoder, peft 0.21):

* ``blocks.i.attn.qkv`` / ``attn.out_proj`` (``nn.Linear``) - targeted.
* conv blocks' 1x1 convs ``conv1``, ``conv2``, ``mlp.linear1``, ``mlp.linear2`` (stored as
  ``nn.Linear`` on the channels-last view, called through their ``forward``) - targeted.
* ``dwconv`` (depthwise 5^3 ``Conv3d``) - *not supported*: peft's Conv3d LoRA needs
  ``rank % groups == 0`` (groups = C = 48..192) and cannot merge grouped convs; besides, the
  encoder applies this weight functionally (``depthwise_conv3d``), which would bypass a wrapper.
* ``downsamples.i.proj`` / ``fusion.i`` (dense non-overlapping ``Conv3d``) - *not targeted*:
  peft supports dense Conv3d, but the encoder applies these weights functionally
  (``patch_linear``), so peft's wrapper ``forward`` would never run and the adapter would be
  silently ignored.

A MONAI ViT (``UNETR.vit``, ``target="vit"``) gets its ``attn.qkv`` / ``attn.out_proj``.
Load pre-trained weights *before* applying LoRA: peft renames wrapped weights to
``<layer>.base_layer.weight``; :func:`merge_lora` restores the original names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

try:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError as exc:  # peft is the optional "lora" extra
    raise ImportError("mim3d.models.lora needs peft: pip install 'mim3d[lora]'") from exc

__all__ = ["LoraReport", "apply_lora", "merge_lora"]

# Names relative to the target module. Attention: mim3d/MONAI blocks ("out_proj") and timm-style
# ("proj"). Conv-block 1x1 convs: the HybridEncoder's conv stages (Linear on channels-last).
_ATTENTION = re.compile(r"(.+\.)?attn\.(qkv|out_proj|proj)")
_CONV_1X1 = re.compile(r"(.+\.)?conv_stages\.\d+\.\d+\.(conv1|conv2|mlp\.linear1|mlp\.linear2)")
_FUNCTIONAL_CONV = re.compile(r"(.+\.)?(downsamples\.\d+\.proj|fusion\.\d+)")
_LORA_PARAM = re.compile(r".*\.lora_(A|B)\..*")


@dataclass(frozen=True)
class LoraReport:
    """What :func:`apply_lora` did.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha (update scale alpha / r).
        targeted_modules: full module names that got an adapter.
        skipped_modules: Conv3d modules of the target left frozen without an adapter -> why.
        trainable_params: parameters with ``requires_grad`` (adapters + decoder/head).
        total_params: all parameters of the model, adapters included.
        trainable_share: trainable_params / total_params.
        lora_params: adapter parameters only.
        encoder_params: parameters of the target module without adapters (what full
            fine-tuning would update there).
        encoder_share: lora_params / encoder_params, the paper's "Update Param." (ratio of
            LoRA's trainable parameters to full fine-tuning's, excluding the new decoder/head).
    """

    rank: int
    alpha: float
    targeted_modules: list[str]
    skipped_modules: dict[str, str]
    trainable_params: int
    total_params: int
    trainable_share: float
    lora_params: int
    encoder_params: int
    encoder_share: float


def _validate(rank: int, alpha: float | None, dropout: float) -> float:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1 (paper: 4, 8, 16), got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    # alpha = r gives scale 1: the update B @ A is added as is, whatever the rank
    return float(rank) if alpha is None else float(alpha)


def _skip_reason(name: str, conv: nn.Conv3d) -> str:
    if conv.groups > 1:
        return (f"grouped Conv3d (groups={conv.groups}): peft LoRA needs rank % groups == 0 "
                "and cannot merge it")
    if _FUNCTIONAL_CONV.fullmatch(name):
        return "weight applied functionally (patch_linear): a peft wrapper would be bypassed"
    return "patch embedding: neither attention nor a conv-block layer"


def _select(target: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Adapter targets (names relative to ``target``) and skipped Conv3d modules -> reason."""
    chosen, skipped = [], {}
    for name, module in target.named_modules():
        if isinstance(module, nn.Linear) and (_ATTENTION.fullmatch(name)
                                              or _CONV_1X1.fullmatch(name)):
            chosen.append(name)
        elif isinstance(module, nn.Conv3d):
            skipped[name] = _skip_reason(name, module)
    return chosen, skipped


def _count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def apply_lora(model: nn.Module, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
               target: str = "encoder") -> tuple[nn.Module, LoraReport]:
    """Add LoRA adapters to ``model.<target>`` in place and freeze its other weights.

    Adapters start as a no-op (peft initialises B = 0), so the output is unchanged until the
    first update. Everything outside ``target`` keeps ``requires_grad=True``.

    Args:
        model: a network holding a pre-trained encoder, e.g. ``MiMUNETR``, ``MiMClassifier``
            (``target="encoder"``) or ``UNETR`` (``target="vit"``).
        rank: LoRA rank r (paper: 4, 8, 16).
        alpha: LoRA alpha; the update is scaled by alpha / rank. Default: ``rank`` (scale 1).
        dropout: dropout on the adapter input.
        target: name of the submodule to adapt (see ``downstream.ENCODER_PREFIX``).

    Returns:
        (the same model, mutated; its :class:`LoraReport`).

    Raises:
        ValueError: invalid rank/alpha/dropout, unknown target, target already adapted, or
            nothing to adapt in it.
    """
    alpha_f = _validate(rank, alpha, dropout)
    try:
        sub = model.get_submodule(target)
    except AttributeError:
        raise ValueError(f"model has no submodule {target!r}") from None
    if any(isinstance(m, BaseTunerLayer) for m in sub.modules()):
        raise ValueError(f"{target!r} already has LoRA adapters; merge_lora first")
    chosen, skipped = _select(sub)
    if not chosen:
        raise ValueError(f"no attention or conv-block Linear layers found in {target!r}")
    encoder_params = _count(sub)
    names = [f"{target}.{n}" for n in chosen]
    config = LoraConfig(r=rank, lora_alpha=alpha_f, lora_dropout=dropout, target_modules=names,
                        bias="none")
    inject_adapter_in_model(config, model)
    prefix = f"{target}."
    for name, param in model.named_parameters():
        # peft froze the whole model; only the target's own weights stay frozen
        param.requires_grad_(not name.startswith(prefix) or bool(_LORA_PARAM.fullmatch(name)))
    lora = sum(p.numel() for n, p in model.named_parameters() if _LORA_PARAM.fullmatch(n))
    total, trainable = _count(model), _count(model, trainable_only=True)
    report = LoraReport(rank=rank, alpha=alpha_f, targeted_modules=names,
                        skipped_modules={f"{prefix}{k}": v for k, v in skipped.items()},
                        trainable_params=trainable, total_params=total,
                        trainable_share=trainable / total, lora_params=lora,
                        encoder_params=encoder_params, encoder_share=lora / encoder_params)
    return model, report


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and remove the wrappers (in place).

    The result has the original module structure and state-dict keys (export / inference),
    computes the same function up to float rounding, and has all parameters trainable again,
    as a freshly built network.

    Args:
        model: a model returned by :func:`apply_lora`.

    Returns:
        The same model, without peft layers.

    Raises:
        ValueError: the model has no LoRA adapters.
    """
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not wrapped:
        raise ValueError("model has no LoRA adapters to merge")
    for name, module in wrapped:
        module.merge(safe_merge=True)  # safe_merge: raise on NaN instead of corrupting weights
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    return model
