"""Optimizer helpers: AdamW parameter groups, warm-up + cosine schedule, setting the rate.

The schedule is a plain function of the optimizer step (no scheduler object), so resuming only
needs the step number, and the learning rate is set before every optimizer step with
:func:`set_lr` (DESIGN §5).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["NO_DECAY_NAME_PARTS", "make_optimizer", "param_groups", "set_lr", "warmup_cosine"]

#: Parameters whose *own* name (the last dotted component) contains one of these are not
#: decayed: learned tokens (``mask_token``, ``cls_token``) and position embeddings. Only the last
#: component is matched, so a weight matrix such as ``token_proj.weight`` is still decayed;
#: ``pos_embed`` is also matched as a module name (e.g. an ``nn.Embedding`` called ``pos_embed``).
NO_DECAY_NAME_PARTS: tuple[str, ...] = ("token", "pos_embed")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _norm_param_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters owned directly by normalisation layers."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def _no_decay(name: str, param: nn.Parameter, norm_ids: set[int]) -> bool:
    """Whether a parameter is exempt from weight decay."""
    if param.ndim <= 1 or id(param) in norm_ids:  # biases, norm scales, per-channel gains
        return True
    *modules, own = name.split(".")
    if own == "bias" or any("pos_embed" in m for m in modules):
        return True
    return any(part in own for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group.

    No decay on normalisation parameters, biases, any 1-D parameter, learned tokens and position
    embeddings (see :data:`NO_DECAY_NAME_PARTS`).
    Frozen parameters (``requires_grad=False``) are left out; tied parameters appear once.

    Args:
        model: the network (a DDP wrapper works too; names then start with ``module.``).
        weight_decay: decay of the decayed group.

    Returns:
        Up to two groups ``{"params", "weight_decay", "group_name"}``; empty groups are dropped.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
    norm_ids = _norm_param_ids(model)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if _no_decay(name, param, norm_ids) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), "group_name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group_name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                   betas: tuple[float, float], device: torch.device,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused into a few kernels on CUDA.

    The fused update reads every parameter, gradient and moment once per step instead of in
    one pass per elementwise op (and launches a handful of kernels instead of several per
    tensor). Its state dict is the same as the plain one, so checkpoints move between the two.

    Args:
        model: the network.
        lr: initial learning rate (the schedule sets it per step).
        weight_decay: decay of the decayed group.
        betas: Adam's betas.
        device: where the parameters live.
        fused: force the fused kernel on or off; default on for CUDA, off elsewhere (the CPU
            keeps torch's default implementation, and with it the runs it already made).
    """
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas,
                             fused=fused or None)


def warmup_cosine(
    step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> float:
    """Learning rate at an optimizer step: linear warm-up, then cosine decay to ``min_lr``.

    * ``step < warmup_steps``: ``base_lr * (step + 1) / warmup_steps`` (the first step already
      moves, with ``base_lr / warmup_steps``; the last warm-up step reaches ``base_lr``);
    * ``warmup_steps <= step < total_steps``: ``min_lr + (base_lr - min_lr) * (1 + cos(pi t)) / 2``
      with ``t = (step - warmup_steps) / (total_steps - warmup_steps)``;
    * ``step >= total_steps``: ``min_lr``.

    Args:
        step: 0-based optimizer step (not micro-batch).
        base_lr: peak learning rate.
        warmup_steps: number of warm-up steps (0 for none).
        total_steps: step at which the cosine reaches ``min_lr``.
        min_lr: final learning rate.

    Returns:
        The learning rate as a float.
    """
    if step < 0 or warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"need step >= 0, warmup_steps >= 0, total_steps > 0; got "
                         f"{step}, {warmup_steps}, {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    t = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every group, times the group's ``"lr_scale"`` when present.

    ``lr_scale`` lets layer-wise rate decay or a slower pre-trained encoder in fine-tuning share
    one schedule.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * float(group.get("lr_scale", 1.0))
