"""One pre-training optimizer step (MAE's ``train_one_epoch`` reduced to the step that matters).

The step serves every method of :class:`~mim3d.config.PretrainConfig`: MiM and its single-level
baselines (masks from :func:`~mim3d.masking.sample_levels`) and Swin-UNETR's SSL (two rotated,
cut-out views from :func:`~mim3d.data.views.make_two_views`). Each micro-batch's random draws
come from :func:`step_generator`, so a resumed run redraws exactly what it would have drawn.

The step never waits on the GPU more than once: loss terms are summed on the device, the
masks travel in one pinned, asynchronous copy per dtype, and a single finite check of the loss
and the gradient norm is read right before the update. :class:`StepResult` holds device
tensors; reading one (``float(t)``) is a host sync, so the run loop does it at log intervals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mim3d.config import PretrainConfig
from mim3d.data.views import SwinSSLViews, make_two_views
from mim3d.losses import level_weights, mim_loss, swin_ssl_loss
from mim3d.masking import LevelGeometry, LevelMasks, sample_levels
from mim3d.models.layers import ConvBlock, TransformerBlock
from mim3d.models.mim import MiMOutput
from mim3d.models.swinssl import SwinSSLOutput

#: The axial plane of a RAS crop (B, C, x, y, z): Swin-UNETR's SSL rotates about the z axis.
AXIAL_PLANE = (2, 3)


class NonFiniteLossError(RuntimeError, ValueError):
    """The loss (or gradient) became NaN or infinite; the run stops, keeping its last checkpoint.

    Also a ``ValueError`` so that the command line reports it as one clear line with a non-zero
    exit code, like every other run-stopping problem (lr too high, fp16 overflow, bad data).
    """


@dataclass
class SwinSSLStep:
    """What one Swin-UNETR SSL micro-batch saw and produced (for the pictures).

    Attributes:
        views: the two augmented views and their targets.
        reconstructions: (B, C, D, H, W) inpainting of each view.
    """

    views: SwinSSLViews
    reconstructions: tuple[Tensor, Tensor]


@dataclass
class StepResult:
    """Scalars of one optimizer step and the last model output.

    Attributes:
        losses: every loss term, a 0-dim float32 tensor on the model's device, averaged over
            the micro-batches (``float(v)`` reads it, a host sync).
        grad_norm: 0-dim tensor, the gradient norm before clipping.
        output: the last micro-batch's model output (for the pictures).
    """

    losses: dict[str, Tensor]
    grad_norm: Tensor
    output: MiMOutput | SwinSSLStep


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The mask generator of one micro-batch: a pure function of its position in the run.

    Deriving it from (seed, step, micro, rank) instead of carrying one generator along makes a
    resumed run draw exactly the masks the uninterrupted run would have drawn.
    """
    state = np.random.SeedSequence([int(seed), int(step), int(micro), int(rank)])
    g = torch.Generator()
    g.manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


def resolve_precision(device: torch.device, precision: str) -> str:
    """The precision a run really uses: ``auto`` is bf16 on a GPU that has it, fp16 on an older
    GPU (with a GradScaler) and fp32 on the CPU; explicit choices are kept."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 (see :func:`resolve_precision`); nothing for fp32."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _pack_bf16(t: Tensor) -> tuple[Tensor, torch.dtype | None]:
    # weights stay as they are: they are alive anyway, a bf16 copy would add memory
    if t.dtype != torch.float32 or isinstance(t, nn.Parameter):
        return t, None
    return t.to(torch.bfloat16), torch.float32


def _unpack_bf16(packed: tuple[Tensor, torch.dtype | None]) -> Tensor:
    t, dtype = packed
    return t if dtype is None else t.to(dtype)


def saved_activations_context(mode: str) -> contextlib.AbstractContextManager:
    """Autograd's saved tensors in bfloat16 (``mode="bf16"``), else as computed.

    Under bf16 autocast the inputs of matmuls and convs are already saved in bf16; what this
    halves is the float32 rest (norms, activations, residual sums, the loss's terms). Backward
    reads them back as float32, so its arithmetic is unchanged but sees rounded inputs.
    """
    if mode == "fp32":
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_pack_bf16, _unpack_bf16)


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A GradScaler when the run computes in fp16 (bf16 and fp32 need none)."""
    if resolve_precision(device, precision) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_finite(flag: Tensor) -> bool:
    """Read a device flag (True = finite) once; False if any rank's flag is False (one rank
    stopping alone would hang DDP)."""
    flag = flag.to(torch.float32).reshape(1)
    if _distributed():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


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
        model: the (possibly DDP-wrapped) :class:`~mim3d.models.mim.MiM` or ``SwinSSL``.
        optimizer: its optimizer (learning rate already set for this step).
        micro_batches: yields (B, C, *S1) level-1 crops.
        cfg: the run config.
        geometry: the validated level geometry.
        step: index of this optimizer step (0-based); seeds the masks / views.
        rank: this process's rank; seeds the masks / views.
        device: where the model lives.
        scaler: a GradScaler for fp16, else None.

    Returns:
        A :class:`StepResult`.

    Raises:
        NonFiniteLossError: when the loss is NaN/inf (no update is applied).
    """
    accum = cfg.optim.accum_steps
    totals: dict[str, Tensor] = {}
    optimizer.zero_grad(set_to_none=True)
    output = None
    for micro in range(accum):
        x = next(micro_batches).to(device, non_blocking=True)
        generator = step_generator(cfg.train.seed, step, micro, rank)
        with _no_sync(model, micro == accum - 1):
            if cfg.method == "swinssl":
                losses, output = _swinssl_forward(model, x, generator, cfg, device)
            else:
                losses, output = _mim_forward(model, x, generator, cfg, geometry, step, device)
            loss = losses["loss"]
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        for k, v in losses.items():  # on the device: no host sync per term
            v = v.detach() / accum
            totals[k] = totals[k] + v if k in totals else v
    grad_norm = _clip_check_update(model, optimizer, cfg.optim.grad_clip, scaler, step,
                                   totals["loss"])
    return StepResult(losses=totals, grad_norm=grad_norm, output=output)


def _mim_forward(model: nn.Module, x: Tensor, generator: torch.Generator, cfg: PretrainConfig,
                 geometry: Sequence[LevelGeometry], step: int,
                 device: torch.device) -> tuple[dict[str, Tensor], MiMOutput]:
    """Masks for every level, the MiM forward and its loss terms."""
    masks = masks_to_device(sample_levels(x.shape[0], geometry, generator,
                                          source=cfg.geometry.source), device)
    with autocast_context(device, cfg.optim.precision), \
            saved_activations_context(cfg.optim.saved_activations):
        output = model(x, masks)
        return compute_losses(output, cfg, step), output


def _swinssl_forward(model: nn.Module, x: Tensor, generator: torch.Generator,
                     cfg: PretrainConfig, device: torch.device,
                     ) -> tuple[dict[str, Tensor], SwinSSLStep]:
    """Two views, one forward over both (one graph, so DDP sees each weight used once) and the
    rotation + contrastive + inpainting loss."""
    views = make_two_views(x, generator, plane=AXIAL_PLANE)
    b = x.shape[0]
    with autocast_context(device, cfg.optim.precision), \
            saved_activations_context(cfg.optim.saved_activations):
        out = model(torch.cat(views.inputs))
        first, second = (SwinSSLOutput(out.rotation[s], out.contrastive[s], out.reconstruction[s])
                         for s in (slice(0, b), slice(b, 2 * b)))
        losses = swin_ssl_loss(first, second, *views.rotations, *views.targets,
                               temperature=cfg.loss.temperature)
    return losses, SwinSSLStep(views, (first.reconstruction, second.reconstruction))


def _clip_check_update(model: nn.Module, optimizer: torch.optim.Optimizer, clip: float,
                       scaler: torch.amp.GradScaler | None, step: int,
                       loss: Tensor | None) -> Tensor:
    """Clip, check (loss and, without a scaler, the gradient norm) with ONE host read, update.

    Returns:
        The gradient norm before clipping, a 0-dim device tensor.

    Raises:
        NonFiniteLossError: the loss or (without a GradScaler) the gradient norm is not finite;
            no update is applied. With a scaler, non-finite gradients only skip the update.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    flags = ([] if loss is None else [torch.isfinite(loss)]) + (
        [] if scaler is not None else [torch.isfinite(norm)])  # DDP: gradients agree
    if flags and not _all_finite(torch.stack(flags).all()):
        optimizer.zero_grad(set_to_none=True)
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(f"loss is {float(loss)} at step {step + 1}")
        raise NonFiniteLossError(f"gradient norm is {float(norm)} at step {step + 1}")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return norm.detach()


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, clip: float,
                  scaler: torch.amp.GradScaler | None, step: int) -> float:
    """Clip the gradient norm and apply the update; returns the norm before clipping.

    Raises:
        NonFiniteLossError: without a GradScaler, when the gradient is not finite (the update
            would turn every weight into NaN). With one, the scaler skips such steps itself.
    """
    return float(_clip_check_update(model, optimizer, clip, scaler, step, None))


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every transformer and conv block in place (``train.compile``).

    Blocks, not the whole model: their shapes are static within a run (one graph per level
    group), the level loop and the mask bookkeeping stay eager, and a recompiled block never
    forces the rest to recompile. Returns the number of blocks compiled.
    """
    blocks = [m for m in model.modules() if isinstance(m, (TransformerBlock, ConvBlock))]
    for blk in blocks:
        blk.compile(dynamic=False)
    return len(blocks)


def masks_to_device(masks: list[LevelMasks], device: torch.device) -> list[LevelMasks]:
    """Every level's mask tensors on ``device`` (see :func:`packed_copy`); CPU: unchanged."""
    return masks if device.type == "cpu" else packed_copy(masks, device)


def packed_copy(masks: list[LevelMasks], device: torch.device) -> list[LevelMasks]:
    """Copy all levels' mask tensors to ``device`` in one pinned, asynchronous copy per dtype.

    The masks are drawn on the CPU (a CPU generator keeps runs reproducible on any device);
    packing them into one buffer per dtype makes two transfers of all levels instead of eight
    per level, and pinned memory lets the copy overlap the GPU's work.
    """
    names = [f.name for f in dataclasses.fields(LevelMasks) if f.name != "level"]
    parts: dict[torch.dtype, list[Tensor]] = {}
    for m in masks:
        for name in names:
            parts.setdefault(getattr(m, name).dtype, []).append(getattr(m, name).reshape(-1))
    moved = {}
    for dtype, ts in parts.items():
        buf = torch.cat(ts)
        buf = buf.pin_memory() if device.type == "cuda" else buf
        moved[dtype] = iter(buf.to(device, non_blocking=True).split([t.numel() for t in ts]))
    return [dataclasses.replace(m, **{n: next(moved[getattr(m, n).dtype]).view(
        getattr(m, n).shape) for n in names}) for m in masks]
