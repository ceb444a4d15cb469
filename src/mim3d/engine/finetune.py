"""``mim3d finetune``: a downstream segmentation or classification run.

A run folder (:mod:`mim3d.runfolder`) holds ``config.yaml`` (the resolved config; the task's
classes are the datalist's, reconciled with the preset's aliases by
:func:`mim3d.engine.downstream_run.resolve_task`), ``finetune.json`` (network, size, classes,
pretrained encoder and its transfer report, LoRA report: what :mod:`mim3d.engine.predict` needs
to rebuild the network), ``splits.json``, ``transfer_report.json`` (when an encoder was loaded),
``metrics.jsonl``, ``tensorboard/``, ``ckpt_<step>/`` (the last checkpoints, with optimizer
state) and ``best/ckpt_<step>/`` + ``best/best.json`` (the weights of the best validation score:
mean foreground Dice on the preprocessed grid for seg, accuracy for cls).

Recipe (the paper's, DESIGN.md section 5): DiceCE loss (cls: cross-entropy), label-balanced
positive/negative crops and the preset's augmentations (:mod:`mim3d.data.transforms`), AdamW
without decay on norms/biases/tokens, linear warm-up + cosine per step, gradient clipping, bf16
autocast on a GPU, sliding-window validation with Gaussian blending. The loop (schedule,
signals, cadence, metrics) is :mod:`mim3d.engine.loop`; before anything is written, the memory
of one training step is estimated and a run that cannot fit is refused.

Resuming restores weights, optimizer, scaler, step and best score exactly, but the data order
after a resume is drawn anew from ``(seed, step)``: the run continues correctly but is not bitwise
equal to an uninterrupted one (crops come from MONAI's stateful random transforms, whose state is
not checkpointed).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.losses import DiceCELoss
from torch import Tensor, nn

from mim3d.config import ConfigError, FinetuneConfig, save_config
from mim3d.config import to_dict as config_to_dict
from mim3d.engine import dist as D
from mim3d.engine.checkpoint import load_checkpoint, save_checkpoint
from mim3d.engine.downstream_run import (
    Splits,
    add_lora,
    class_names,
    load_pretrained,
    make_datasets,
    new_spec,
    plain_tensor,
    read_cases,
    resolve_task,
    score_case,
    split_cases,
)
from mim3d.engine.inference import resolve_device
from mim3d.engine.loop import LoopSpec, run_loop
from mim3d.engine.monitor import RunMonitor, signals_ignored, truncate_metrics
from mim3d.engine.optim import make_optimizer
from mim3d.engine.runtime import check_step_memory, tune_cpu_allocator
from mim3d.engine.train import (
    NonFiniteLossError,
    autocast_context,
    clip_and_step,  # the pre-training step's clip + update, reused
    make_scaler,
    resolve_precision,
)
from mim3d.fileio import write_text_atomically
from mim3d.runfolder import (
    BEST_DIR,
    BEST_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    SPEC_FILE,
    SPLITS_FILE,
    TRANSFER_REPORT_FILE,
    find_best,
    find_latest,
    saved_finetune_run,
)

__all__ = ["FinetuneResult", "finetune"]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """Where a fine-tuning run left its artefacts (``stop_signal``: a signal stopped it early)."""

    run_dir: Path
    step: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_score: float | None
    best_step: int | None
    metrics: Path
    stop_signal: int | None = None

    @property
    def stopped_by_signal(self) -> bool:
        """Whether SIGTERM/SIGINT stopped the run before its stop step."""
        return self.stop_signal is not None


@dataclass
class _Step:
    """The scalars of one fine-tuning step (0-dim tensors where they were computed)."""

    losses: dict[str, Tensor]
    grad_norm: Tensor | float


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, default=str) + "\n")


class _Run:
    """Live objects of one fine-tuning run and the hooks of :func:`~mim3d.engine.loop.run_loop`."""

    def __init__(self, cfg: FinetuneConfig, spec: dict[str, Any], run_dir: Path,
                 model: nn.Module, train_ds: Any, val_ds: Any, val_every: int) -> None:
        self.cfg, self.spec, self.run_dir, self.val_every = cfg, spec, run_dir, val_every
        self.device = resolve_device("auto")
        self.model = model.to(self.device)
        self.train_ds, self.val_ds = train_ds, val_ds
        o = cfg.optim
        self.optimizer = make_optimizer(self.model, lr=o.lr, weight_decay=o.weight_decay,
                                        betas=o.betas, device=self.device)
        self.scaler = make_scaler(self.device, cfg.optim.precision)
        seg = cfg.task.task == "seg"
        self.loss_fn: nn.Module = (DiceCELoss(to_onehot_y=True, softmax=True) if seg
                                   else nn.CrossEntropyLoss())
        self.metric = "val_dice" if seg else "val_accuracy"
        self.class_ids = list(class_names(cfg.task)) if seg else []
        self.step, self.best_score, self.best_step = 0, None, None
        self.monitor = RunMonitor(run_dir, enabled=False)  # replaced once the folder is ours

    def resume(self) -> Path | None:
        """Load the newest checkpoint, if any, and the best score so far."""
        latest = find_latest(self.run_dir) if self.run_dir.is_dir() else None
        if latest is None:
            return None
        state = load_checkpoint(latest, model=self.model, optimizer=self.optimizer,
                                scaler=self.scaler, map_location=self.device)
        self.step = state["step"]
        extra = state["extra_state"]
        self.best_score, self.best_step = extra.get("best_score"), extra.get("best_step")
        best_file = self.run_dir / BEST_DIR / BEST_FILE
        if best_file.is_file():  # best/ may be newer than the last checkpoint
            best = json.loads(best_file.read_text())
            if best.get("score") is not None and (self.best_score is None
                                                  or best["score"] > self.best_score):
                self.best_score, self.best_step = best["score"], best["step"]
        return latest

    # ---------------------------------------------------------------- loop hooks

    def batches(self, start_step: int, stop_at: int) -> Iterator[dict[str, Any]]:
        """Shuffled training items for the remaining steps, drawn from ``(seed, step)``."""
        o, seed = self.cfg.optim, self.cfg.train.seed
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start_step)
        n = max(1, (stop_at - start_step) * o.batch_size * o.accum_steps)
        sampler = torch.utils.data.RandomSampler(self.train_ds, num_samples=n, generator=gen)
        loader = DataLoader(self.train_ds, batch_size=o.batch_size, sampler=sampler,
                            num_workers=self.cfg.train.workers, generator=gen,
                            pin_memory=self.device.type == "cuda")
        with signals_ignored():  # workers fork here and keep the ignored dispositions
            return iter(loader)

    def train_step(self, step: int, batches: Iterator[dict[str, Any]]) -> _Step:
        """One optimizer step over ``accum_steps`` micro-batches (learning rate already set)."""
        o = self.cfg.optim
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for _ in range(o.accum_steps):
            batch = next(batches)
            x = plain_tensor(batch["image"]).to(self.device, non_blocking=True)
            y = plain_tensor(batch["label"]).to(self.device, non_blocking=True)
            with autocast_context(self.device, o.precision):
                logits = self.model(x)
            loss = self.loss_fn(logits.float(), y)  # the loss in fp32 whatever the autocast
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at step {step + 1}")
            (self.scaler.scale(loss / o.accum_steps) if self.scaler
             else loss / o.accum_steps).backward()
            total += loss.detach() / o.accum_steps
        norm = clip_and_step(self.model, self.optimizer, o.grad_clip, self.scaler, step)
        return _Step(losses={"loss": total}, grad_norm=norm)

    def checkpoint(self, step: int) -> Path:
        self.step = step
        extra = {"best_score": self.best_score, "best_step": self.best_step, "data_step": step}
        path = save_checkpoint(self.run_dir, step=step, model=self.model,
                               optimizer=self.optimizer, scaler=self.scaler, extra_state=extra,
                               config=config_to_dict(self.cfg), keep_last=self.cfg.train.keep_last)
        if self.val_ds is None:  # nothing to select on: "best" is the last checkpoint
            self.save_best(None)
        return path

    def after_step(self, step: int, result: _Step, *, last: bool, stopping: bool) -> None:
        """Validate when due (not when a signal asks to stop: the checkpoint comes first)."""
        self.step = step
        if not stopping and (step % self.val_every == 0 or last):
            self.validate()

    def postfix(self) -> dict[str, str]:
        return {"best": "-" if self.best_score is None else f"{self.best_score:.3f}"}

    def divergence_hint(self) -> str:
        return "lower optim.lr or raise optim.warmup_steps"

    # ---------------------------------------------------------------- validation

    def validate(self) -> None:
        """Score the validation cases, log the score, and keep the best weights."""
        if self.val_ds is None:
            return
        scores = [score_case(self.model, self.val_ds[i], self.cfg, self.class_ids, self.device)
                  for i in range(len(self.val_ds))]
        finite = [s for s in scores if math.isfinite(s)]
        score = float(np.mean(finite)) if finite else math.nan  # NaN: nothing to score
        if math.isfinite(score) and (self.best_score is None or score > self.best_score):
            self.save_best(score)
        best = self.best_score if self.best_score is not None else math.nan
        self.monitor.log(self.step, {self.metric: score, f"best_{self.metric}": best})

    def save_best(self, score: float | None) -> Path:
        path = save_checkpoint(self.run_dir / BEST_DIR, step=self.step, model=self.model,
                               extra_state={"score": score, "metric": self.metric},
                               config=config_to_dict(self.cfg), keep_last=1)
        note = None if score is not None else "no validation cases: best is the last checkpoint"
        _write_json(self.run_dir / BEST_DIR / BEST_FILE,
                    {"step": self.step, "score": score, "metric": self.metric,
                     "checkpoint": path.name, "note": note})
        self.best_score, self.best_step = score, self.step
        return path


# ------------------------------------------------------------------------------ setup


def _prepare(cfg: FinetuneConfig, out: Path, data: str | Path, opts: dict[str, Any],
             resume: bool) -> _Run:
    """Validate everything, build the network, resume, and only then write into ``out``."""
    saved = saved_finetune_run(out, resume)
    if saved is not None:
        cfg, spec = saved
        recorded = json.loads((out / SPLITS_FILE).read_text())
        opts = {**opts, **{k: recorded[k] for k in ("fold", "folds", "label_fraction")
                           if recorded.get(k) is not None}}
    train_items, val_items, labels = read_cases(data, cfg.task.task)
    cfg = replace(cfg, task=resolve_task(cfg.task, labels, train_items + val_items))
    splits = split_cases([c["name"] for c in train_items], seed=cfg.train.seed,
                         folds=opts["folds"], fold=opts["fold"],
                         label_fraction=opts["label_fraction"],
                         validation=[c["name"] for c in val_items])
    if saved is None:
        spec = new_spec(cfg, data=data, network=opts["network"], size=opts["size"],
                         pretrained=opts["pretrained"], lora_rank=opts["lora_rank"],
                         splits=splits)
    elif json.loads((out / SPLITS_FILE).read_text()) != splits.to_dict():
        raise ValueError(f"the data no longer gives the splits recorded in {out / SPLITS_FILE}; "
                         "resume with the --data the run was started with")
    model = _build_model(cfg, spec, fresh=saved is None)
    train_ds, val_ds = make_datasets(cfg, splits, train_items, val_items)
    val_every = opts["val_every"] or max(1, cfg.optim.total_steps // 10)
    run = _Run(cfg, spec, out, model, train_ds, val_ds, val_every)
    latest = run.resume() if resume else None
    if resume and latest:
        logger.info("resumed from %s at step %d", latest, run.step)
    elif resume:
        logger.info("--resume: no checkpoint in %s yet; starting from step 0", out)
    _write_run_files(out, cfg, spec, splits, fresh=saved is None)
    truncate_metrics(out, run.step)  # steps after the checkpoint are redone
    run.monitor = RunMonitor(out, purge_step=run.step, tag="finetune")
    return run


def _build_model(cfg: FinetuneConfig, spec: dict[str, Any], fresh: bool) -> nn.Module:
    """The network: seeded init, a memory check, the pretrained encoder (new runs), LoRA."""
    from mim3d.factory import build_downstream

    torch.manual_seed(cfg.train.seed)
    model = build_downstream(network=spec["network"], size=spec["size"],
                             in_channels=spec["in_channels"], out_channels=spec["num_classes"],
                             roi=spec["roi"], grad_checkpointing=cfg.optim.grad_checkpointing)
    crops = cfg.task.num_samples if cfg.task.task == "seg" else 1  # seg items are crop lists
    device = resolve_device("auto")
    check_step_memory(model, (cfg.optim.batch_size * crops, spec["in_channels"], *spec["roi"]),
                      device=device, precision=resolve_precision(device, cfg.optim.precision),
                      what=f"{spec['network']} --size {spec['size']}")
    if fresh and spec["pretrained"]:
        spec["transfer"] = load_pretrained(model, spec, spec["pretrained"], cfg)
    if spec["lora_rank"]:  # after loading: peft renames the weights it wraps
        model, report = add_lora(model, spec)
        spec["lora"] = asdict(report)
        logger.info("LoRA rank %d: %s of %s parameters trainable (%.1f%%)", report.rank,
                    f"{report.trainable_params:,}", f"{report.total_params:,}",
                    100 * report.trainable_share)
    return model


def _write_run_files(out: Path, cfg: FinetuneConfig, spec: dict[str, Any], splits: Splits,
                     fresh: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not fresh:
        return
    save_config(cfg, out / CONFIG_FILE)
    _write_json(out / SPEC_FILE, spec)
    _write_json(out / SPLITS_FILE, splits.to_dict())
    if spec["transfer"] is not None:
        _write_json(out / TRANSFER_REPORT_FILE, spec["transfer"])


# ------------------------------------------------------------------------------ the run


def finetune(cfg: FinetuneConfig, *, data: str | Path, out: str | Path,
             pretrained: str | Path | None = None, network: str | None = None,
             size: str = "base", label_fraction: float = 1.0, lora_rank: int | None = None,
             max_steps: int | None = None, resume: bool = False, fold: int = 0, folds: int = 5,
             val_every: int | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune a downstream network (module docstring).

    Args:
        cfg: the resolved downstream config (a preset + overrides); ignored in favour of the
            run's own when resuming.
        data: an MSD datalist JSON (``training`` [+ ``validation``] lists, ``labels``) or an
            nnU-Net/MSD folder (other inputs of :func:`~mim3d.data.datalists.resolve_inputs`).
        out: the run folder.
        pretrained: an encoder ``.safetensors`` file (``mim3d export``) loaded into the
            network's encoder; a missing key or another architecture is an error.
        network: ``mim-unetr`` (default for seg), ``unetr``, ``swinunetr``, or ``classifier``
            (the only one, and the default, for cls).
        size: a pretrain preset name giving the encoder size (tiny, small, base).
        label_fraction: share of the training split used, in (0, 1] (nested subsets).
        lora_rank: train LoRA adapters of this rank instead of the whole encoder.
        max_steps: stop after this many optimizer steps in total; the schedule still spans
            ``cfg.optim.total_steps``.
        resume: continue from the newest checkpoint in ``out``.
        fold: held-out fold when the datalist has no validation list.
        folds: number of folds.
        val_every: validate every this many steps (default ``total_steps // 10``) and at the end.
        progress: show a progress bar.

    Returns:
        A :class:`FinetuneResult`; a run stopped by SIGTERM/SIGINT returns after a checkpoint,
        with ``stop_signal`` set (the CLI exits with 128 + signal).

    Raises:
        ConfigError, ValueError (incl. ImageReadError, TransferError, CheckpointError): bad
            input, found before anything in ``out`` is written; ``MemoryEstimateError`` when
            one step would not fit in this machine's memory.
        NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
    """
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
    if val_every is not None and val_every < 1:
        raise ConfigError(f"val_every must be >= 1, got {val_every}")
    network = network or ("classifier" if cfg.task.task == "cls" else "mim-unetr")
    opts = {"network": network, "size": size, "pretrained": pretrained, "lora_rank": lora_rank,
            "label_fraction": label_fraction, "fold": fold, "folds": folds,
            "val_every": val_every}
    if not torch.cuda.is_available():
        tune_cpu_allocator()
    run = _prepare(cfg, Path(out), data, opts, resume)
    o = run.cfg.optim
    crops = run.cfg.task.num_samples if run.cfg.task.task == "seg" else 1
    info = D.DistInfo(rank=0, world_size=1, local_rank=0, device=run.device, is_main=True)
    spec = LoopSpec(name="finetune", optim=o, train=run.cfg.train, run_dir=run.run_dir,
                    stop_at=min(o.total_steps, max_steps or o.total_steps),
                    samples_per_step=o.batch_size * o.accum_steps * crops, info=info,
                    progress=progress)
    try:
        done = run_loop(run, spec, run.step)
    finally:
        run.monitor.close()
    if done.stop_signal is not None:
        logger.warning("stopped by a signal at step %d; checkpoint %s; continue with --resume",
                       done.step, done.checkpoint)
    return FinetuneResult(run.run_dir, done.step, done.checkpoint or find_latest(run.run_dir),
                          find_best(run.run_dir), run.best_score, run.best_step,
                          run.run_dir / METRICS_FILE, done.stop_signal)
