"""The one run skeleton of pre-training and fine-tuning.

:func:`run_loop` owns what every run does around its step: the learning rate of each optimizer
step (linear warm-up + cosine, :func:`~mim3d.engine.optim.warmup_cosine`), stop signals, the
checkpoint cadence, the progress bar, ``metrics.jsonl`` and TensorBoard. An engine
(:mod:`mim3d.engine.pretrain`, :mod:`mim3d.engine.finetune`) supplies its :class:`Engine` hooks:
the step, the checkpoint, and what happens after a step (pictures, validation).

The hot loop never waits on the device: the step's losses and gradient norm may be 0-dim device
tensors, which are summed where they live and turned into floats only when a row is logged
(every ``train.log_every`` steps, and always at the last step, also when a signal stops the run).
A logged row holds the mean of the steps since the previous row.

Stopping. SIGTERM/SIGINT finish the current step, write a checkpoint and end the loop with
``stop_signal`` set; the command then exits with ``128 + signal`` (143 for SIGTERM, 130 for
SIGINT), as a job stopped before its last step should. Under torchrun every rank agrees on the
stop (the flag is reduced over the ranks on the CPU), so they checkpoint together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from mim3d.config import OptimConfig, TrainConfig
from mim3d.engine import dist as D
from mim3d.engine.monitor import (
    RunMonitor,
    StepMeter,
    StopSignal,
    TimedIterator,
    peak_memory_mb,
    progress_bar,
)
from mim3d.engine.optim import set_lr, warmup_cosine
from mim3d.engine.train import NonFiniteLossError

__all__ = ["Engine", "LoopResult", "LoopSpec", "run_loop", "stop_exit_code"]

logger = logging.getLogger(__name__)

Scalar = Tensor | float


class StepLike(Protocol):
    """What an engine's step returns (:class:`mim3d.engine.train.StepResult` is one)."""

    losses: dict[str, Scalar]
    grad_norm: Scalar


class Engine(Protocol):
    """The hooks an engine gives the skeleton."""

    optimizer: torch.optim.Optimizer
    monitor: RunMonitor

    def batches(self, start_step: int, stop_at: int) -> Iterator[Any]:
        """The input stream from ``start_step`` on (the loop times the waits in it)."""

    def train_step(self, step: int, batches: Iterator[Any]) -> StepLike:
        """Optimizer step ``step`` (0-based); the learning rate is already set."""

    def checkpoint(self, step: int) -> Path | None:
        """Save after ``step`` steps (a collective under torchrun; None on other ranks)."""

    def after_step(self, step: int, result: StepLike, *, last: bool, stopping: bool) -> None:
        """Pictures, validation: whatever is due after ``step`` steps (before the checkpoint)."""

    def postfix(self) -> dict[str, str]:
        """Extra progress-bar fields (e.g. the best validation score)."""

    def divergence_hint(self) -> str:
        """What to change when the loss diverges."""


@dataclass(frozen=True)
class LoopSpec:
    """The run mechanics the skeleton needs.

    Attributes:
        name: ``pretrain`` or ``finetune`` (progress-bar label).
        optim: schedule (``lr``, ``warmup_steps``, ``total_steps``, ``min_lr``).
        train: cadence (``log_every``, ``ckpt_every``).
        run_dir: the run folder (named in the divergence message).
        stop_at: stop after this many optimizer steps in total.
        samples_per_step: samples per optimizer step over all ranks and micro-batches.
        info: this process's place in the job.
        progress: show a progress bar (on the main rank only).
    """

    name: str
    optim: OptimConfig
    train: TrainConfig
    run_dir: Path
    stop_at: int
    samples_per_step: int
    info: D.DistInfo
    progress: bool = True


@dataclass
class LoopResult:
    """How the loop ended.

    Attributes:
        step: optimizer steps done.
        checkpoint: the last checkpoint written by this loop (main rank), else None.
        losses: the last logged loss terms (mean over their interval and the ranks).
        stop_signal: the signal that stopped the run before ``stop_at``, else None.
    """

    step: int
    checkpoint: Path | None = None
    losses: dict[str, float] = field(default_factory=dict)
    stop_signal: int | None = None


def stop_exit_code(stop_signal: int | None) -> int:
    """The exit code of a run: 0 when it reached its stop step, ``128 + signal`` otherwise."""
    return 0 if stop_signal is None else 128 + int(stop_signal)


class _Running:
    """Sums of the step scalars since the last logged row, kept where they were computed."""

    def __init__(self) -> None:
        self.sums: dict[str, Scalar] = {}
        self.count = 0

    def add(self, result: StepLike) -> None:
        for key, value in {**result.losses, "grad_norm": result.grad_norm}.items():
            value = value.detach() if isinstance(value, Tensor) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def mean(self, info: D.DistInfo) -> dict[str, float]:
        """Interval means, averaged over ranks (one collective and one host sync); resets."""
        keys = sorted(self.sums)
        values = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64,
                                              device=info.device) for k in keys])
        values = D.all_reduce_mean(values / max(self.count, 1)).tolist()
        self.sums, self.count = {}, 0
        return dict(zip(keys, values))


class _StopVote:
    """Whether any rank got a stop signal; all ranks must agree to checkpoint together.

    The flag is reduced on the CPU (a gloo group beside NCCL), so asking costs no device sync.
    """

    def __init__(self, info: D.DistInfo) -> None:
        self.group: Any = None
        self.distributed = info.world_size > 1
        if self.distributed and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # a collective: every rank runs the loop

    def __call__(self, stop: StopSignal) -> int:
        """The signal number any rank received (the highest), else 0; a collective."""
        own = 0 if stop.received is None else int(stop.received)
        if not self.distributed:
            return own
        # not written back into ``stop``: a rank that gets its own copy of the signal later
        # must not take it for a second, impatient one
        flag = torch.tensor([own])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


def _diverged(exc: NonFiniteLossError, spec: LoopSpec, engine: Engine) -> NonFiniteLossError:
    from mim3d.runfolder import find_latest

    last = find_latest(spec.run_dir) if spec.run_dir.is_dir() else None
    return NonFiniteLossError(f"{exc}; stopping. The last good checkpoint is "
                              f"{last or 'none (no checkpoint written yet)'}; "
                              f"{engine.divergence_hint()}")


def run_loop(engine: Engine, spec: LoopSpec, start_step: int) -> LoopResult:
    """Train from ``start_step`` to ``spec.stop_at`` (or a stop signal); see the module docstring.

    Raises:
        NonFiniteLossError: the loss diverged; the message names the last good checkpoint.
    """
    o, t, info = spec.optim, spec.train, spec.info
    result = LoopResult(step=start_step)
    if start_step >= spec.stop_at:
        logger.info("nothing to do: the run is at step %d, the stop step is %d", start_step,
                    spec.stop_at)
    batches = TimedIterator(engine.batches(start_step, spec.stop_at))
    meter, running, vote = StepMeter(spec.samples_per_step), _Running(), _StopVote(info)
    shown = spec.progress and info.is_main
    with StopSignal() as stop, progress_bar(spec.stop_at, start_step, spec.name, shown) as bar:
        while result.step < spec.stop_at:
            t0, waited = time.perf_counter(), batches.wait
            lr = warmup_cosine(result.step, base_lr=o.lr, warmup_steps=o.warmup_steps,
                               total_steps=o.total_steps, min_lr=o.min_lr)
            set_lr(engine.optimizer, lr)
            try:
                out = engine.train_step(result.step, batches)
            except NonFiniteLossError as exc:
                raise _diverged(exc, spec, engine) from None
            result.step += 1
            meter.add(time.perf_counter() - t0, batches.wait - waited)
            running.add(out)
            signum = vote(stop)
            stopping = signum != 0 and result.step < spec.stop_at
            final = result.step == spec.stop_at
            if result.step % t.log_every == 0 or final or stopping:
                result.losses = _log(engine, spec, running, meter, result.step, lr)
                bar.set_postfix({**{k: f"{v:.4f}" for k, v in result.losses.items()
                                    if k != "grad_norm"}, "lr": f"{lr:.2e}",
                                 **engine.postfix()}, refresh=False)
            engine.after_step(result.step, out, last=final, stopping=stopping)
            bar.update(1)
            if result.step % t.ckpt_every == 0 or final or stopping:
                result.checkpoint = engine.checkpoint(result.step) or result.checkpoint
            if stopping:
                result.stop_signal = signum
                break
    return result


def _log(engine: Engine, spec: LoopSpec, running: _Running, meter: StepMeter, step: int,
         lr: float) -> dict[str, float]:
    """Write one metrics row (a collective under torchrun); returns the loss terms."""
    scalars = running.mean(spec.info)
    engine.monitor.log(step, {**scalars, "lr": lr, "samples": step * spec.samples_per_step,
                              **meter.report(), "peak_mem_mb": peak_memory_mb(spec.info.device)})
    return {k: v for k, v in scalars.items() if k != "grad_norm"}
