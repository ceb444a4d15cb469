"""One MiM optimizer step (MAE's ``train_one_epoch`` reduced to the step that matters)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mim3d.config import PretrainConfig
from mim3d.losses import level_weights, mim_loss
from mim3d.masking import LevelGeometry, LevelMasks, sample_levels
from mim3d.models.mim import MiMOutput


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class StepResult:
    """Scalars of one optimizer step (averaged over micro-batches) and the last model output."""

    losses: dict[str, float]
    grad_norm: float
    output: MiMOutput


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The mask generator of one micro-batch: a pure function of its position in the run.

    Deriving it from (seed, step, micro, rank) instead of carrying one generator along makes a
    resumed run draw exactly the masks the uninterrupted run would have drawn.
    """
    state = np.random.SeedSequence([int(seed), int(step), int(micro), int(rank)])
    g = torch.Generator()
    g.manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on GPU as configured; full fp32 on CPU (``auto``)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def compute_losses(output: MiMOutput, cfg: PretrainConfig, step: int) -> dict[str, Tensor]:
    """All named loss terms of one model output at a point of the schedule."""
    progress = min(1.0, step / max(1, cfg.optim.total_steps - 1))
    weights = level_weights(cfg.loss.schedule, levels=cfg.geometry.levels, progress=progress)
    return mim_loss(output, norm_pix=cfg.loss.norm_pix, alpha=cfg.loss.alpha,
                    alignment=cfg.loss.alignment, temperature=cfg.loss.temperature,
                    recon_levels=cfg.loss.recon_levels, align_pairs=cfg.loss.align_pairs,
                    weights=weights)


def _no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last accumulation micro-batch."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Iterator[Tensor], *, cfg: PretrainConfig,
               geometry: Sequence[LevelGeometry], step: int, rank: int, device: torch.device,
               scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """Forward, backward and update for one optimizer step over ``accum_steps`` micro-batches.

    Args:
        model: the (possibly DDP-wrapped) :class:`~mim3d.models.mim.MiM`.
        optimizer: its optimizer (learning rate already set for this step).
        micro_batches: yields (B, C, *S1) level-1 crops.
        cfg: the run config.
        geometry: the validated level geometry.
        step: index of this optimizer step (0-based); seeds the masks.
        rank: this process's rank; seeds the masks.
        device: where the model lives.
        scaler: a GradScaler for fp16, else None.

    Returns:
        A :class:`StepResult`.

    Raises:
        NonFiniteLossError: when the loss is NaN/inf (no update is applied).
    """
    accum = cfg.optim.accum_steps
    totals: dict[str, float] = {}
    optimizer.zero_grad(set_to_none=True)
    output = None
    for micro in range(accum):
        x = next(micro_batches).to(device, non_blocking=True)
        masks = _to_device(sample_levels(x.shape[0], geometry,
                                         step_generator(cfg.train.seed, step, micro, rank),
                                         source=cfg.geometry.source), device)
        with _no_sync(model, micro == accum - 1):
            with autocast_context(device, cfg.optim.precision):
                output = model(x, masks)
                losses = compute_losses(output, cfg, step)
            loss = losses["loss"]
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(f"loss is {loss.item()} at step {step + 1}")
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach()) / accum
    grad_norm = _clip_and_step(model, optimizer, cfg.optim.grad_clip, scaler)
    return StepResult(losses=totals, grad_norm=grad_norm, output=output)


def _clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, clip: float,
                   scaler: torch.amp.GradScaler | None) -> float:
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(norm)


def _to_device(masks: list[LevelMasks], device: torch.device) -> list[LevelMasks]:
    if device.type == "cpu":
        return masks
    fields = ("mask", "ids_keep", "ids_mask", "ids_restore", "unit_mask", "boxes", "parent",
              "parent_unit")
    for m in masks:
        for name in fields:
            setattr(m, name, getattr(m, name).to(device, non_blocking=True))
    return masks
