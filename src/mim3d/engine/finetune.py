"""``mim3d finetune``: a downstream segmentation or classification run.

A run folder holds ``config.yaml`` (the resolved config; the task's classes are the datalist's,
see :mod:`mim3d.engine.downstream_data`), ``finetune.json`` (network, size, classes, pretrained
encoder and its transfer report, LoRA report: what :mod:`mim3d.engine.predict` needs to rebuild
the network), ``splits.json``, ``transfer_report.json`` (when an encoder was loaded),
``metrics.jsonl``, ``tensorboard/``, ``ckpt_<step>/`` (the last checkpoints, with optimizer
state) and ``best/ckpt_<step>/`` + ``best/best.json`` (the weights of the best validation score:
mean foreground Dice on the preprocessed grid for seg, accuracy for cls).

Recipe (the paper's, DESIGN.md section 5): DiceCE loss (cls: cross-entropy), label-balanced
positive/negative crops and the preset's augmentations (:mod:`mim3d.data.transforms`), AdamW
without decay on norms/biases/tokens, linear warm-up + cosine per step, gradient clipping, bf16
autocast on a GPU, sliding-window validation with Gaussian blending.

Resuming restores weights, optimizer, scaler, step and best score exactly, but the data order
after a resume is drawn anew from ``(seed, step)``: the run continues correctly but is not bitwise
equal to an uninterrupted one (crops come from MONAI's stateful random transforms, whose state is
not checkpointed).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.data import DataLoader, MetaTensor
from monai.losses import DiceCELoss
from torch import Tensor, nn
from tqdm import tqdm

from mim3d import __version__
from mim3d.config import ConfigError, FinetuneConfig, config_from_dict, save_config
from mim3d.config import to_dict as config_to_dict
from mim3d.data.transforms import make_dataset
from mim3d.engine.checkpoint import find_latest, load_checkpoint, save_checkpoint
from mim3d.engine.downstream_run import (
    Item,
    Splits,
    add_lora,
    class_names,
    load_pretrained,
    predict_logits,
    read_cases,
    resolve_task,
    split_cases,
)
from mim3d.engine.monitor import (
    RunMonitor,
    StepMeter,
    StopSignal,
    signals_ignored,
    truncate_metrics,
)
from mim3d.engine.optim import param_groups, set_lr, warmup_cosine
from mim3d.engine.runtime import tune_cpu_allocator
from mim3d.engine.train import (
    NonFiniteLossError,
    autocast_context,
    clip_and_step,  # the pre-training step's clip + update, reused
    make_scaler,
)
from mim3d.evaluation import dice

__all__ = ["BEST_DIR", "CONFIG_FILE", "SPEC_FILE", "SPLITS_FILE", "FinetuneResult", "finetune"]

CONFIG_FILE, SPEC_FILE, SPLITS_FILE, BEST_DIR = "config.yaml", "finetune.json", "splits.json", "best"
SPEC_FORMAT = "mim3d-finetune"


@dataclass
class FinetuneResult:
    """Where a fine-tuning run left its artefacts."""

    run_dir: Path
    step: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_score: float | None
    best_step: int | None
    metrics: Path
    stopped_by_signal: bool = False


# ------------------------------------------------------------------------------ the run


def _plain(t: Tensor) -> Tensor:
    """A MetaTensor's plain tensor: the network needs no meta data, and it costs time."""
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


class _Run:
    """Live objects of one fine-tuning run, so the loop body stays short."""

    def __init__(self, cfg: FinetuneConfig, spec: dict[str, Any], run_dir: Path,
                 model: nn.Module, train_ds: Any, val_ds: Any) -> None:
        self.cfg, self.spec, self.run_dir = cfg, spec, run_dir
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.train_ds, self.val_ds = train_ds, val_ds
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay),
                                           lr=cfg.optim.lr, betas=cfg.optim.betas)
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
        best_file = self.run_dir / BEST_DIR / "best.json"
        if best_file.is_file():  # best/ may be newer than the last checkpoint
            best = json.loads(best_file.read_text())
            if best.get("score") is not None and (self.best_score is None
                                                  or best["score"] > self.best_score):
                self.best_score, self.best_step = best["score"], best["step"]
        return latest

    def batches(self, stop_at: int) -> Iterator[dict[str, Any]]:
        """Shuffled training items for the remaining steps, drawn from ``(seed, step)``."""
        o, seed = self.cfg.optim, self.cfg.train.seed
        gen = torch.Generator().manual_seed(seed * 1_000_003 + self.step)
        n = max(1, (stop_at - self.step) * o.batch_size * o.accum_steps)
        sampler = torch.utils.data.RandomSampler(self.train_ds, num_samples=n, generator=gen)
        loader = DataLoader(self.train_ds, batch_size=o.batch_size, sampler=sampler,
                            num_workers=self.cfg.train.workers, generator=gen,
                            pin_memory=self.device.type == "cuda")
        with signals_ignored():  # workers fork here and keep the ignored dispositions
            return iter(loader)

    def train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[float, float, float, float]:
        """One optimizer step; returns (loss, grad norm, lr, seconds waited for data)."""
        o = self.cfg.optim
        lr = warmup_cosine(self.step, base_lr=o.lr, warmup_steps=o.warmup_steps,
                           total_steps=o.total_steps, min_lr=o.min_lr)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        total, waited = 0.0, 0.0
        for _ in range(o.accum_steps):
            t0 = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t0
            x = _plain(batch["image"]).to(self.device, non_blocking=True)
            y = _plain(batch["label"]).to(self.device, non_blocking=True)
            with autocast_context(self.device, o.precision):
                logits = self.model(x)
            loss = self.loss_fn(logits.float(), y)  # the loss in fp32 whatever the autocast
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at step {self.step + 1}; lower "
                                         "optim.lr or raise optim.warmup_steps")
            (self.scaler.scale(loss / o.accum_steps) if self.scaler
             else loss / o.accum_steps).backward()
            total += float(loss.detach()) / o.accum_steps
        norm = clip_and_step(self.model, self.optimizer, o.grad_clip, self.scaler, self.step)
        return total, norm, lr, waited

    def validate(self) -> float | None:
        """Mean foreground Dice (seg, on the preprocessed grid) or accuracy (cls); None without
        validation cases, NaN when no case has anything to score."""
        if self.val_ds is None:
            return None
        scores = [self._score(self.val_ds[i]) for i in range(len(self.val_ds))]
        finite = [s for s in scores if math.isfinite(s)]
        return float(np.mean(finite)) if finite else math.nan

    def _score(self, item: dict[str, Any]) -> float:
        image, task = _plain(item["image"])[None], self.cfg.task
        with autocast_context(self.device, self.cfg.optim.precision):
            logits = predict_logits(self.model, image, task, self.device)
        if task.task == "cls":
            return float(int(logits.argmax(1)) == int(item["label"]))
        pred, gt = logits.argmax(1)[0].numpy(), _plain(item["label"])[0].numpy()
        values = [dice(pred, gt, c) for c in self.class_ids]
        finite = [v for v in values if math.isfinite(v)]  # absent classes are not scored
        return float(np.mean(finite)) if finite else math.nan

    def checkpoint(self) -> Path:
        extra = {"best_score": self.best_score, "best_step": self.best_step,
                 "data_step": self.step}
        path = save_checkpoint(self.run_dir, step=self.step, model=self.model,
                               optimizer=self.optimizer, scaler=self.scaler, extra_state=extra,
                               config=config_to_dict(self.cfg), keep_last=self.cfg.train.keep_last)
        if self.val_ds is None:  # nothing to select on: "best" is the last checkpoint
            self.save_best(None)
        return path

    def save_best(self, score: float | None) -> Path:
        path = save_checkpoint(self.run_dir / BEST_DIR, step=self.step, model=self.model,
                               extra_state={"score": score, "metric": self.metric},
                               config=config_to_dict(self.cfg), keep_last=1)
        note = None if score is not None else "no validation cases: best is the last checkpoint"
        _write_json(self.run_dir / BEST_DIR / "best.json",
                    {"step": self.step, "score": score, "metric": self.metric,
                     "checkpoint": path.name, "note": note})
        self.best_score, self.best_step = score, self.step
        return path


# ------------------------------------------------------------------------------ setup


def _saved_run(out: Path, resume: bool) -> tuple[FinetuneConfig, dict[str, Any]] | None:
    """The config and spec of a run being resumed; refuses to overwrite a run without --resume."""
    has_ckpt = out.is_dir() and find_latest(out) is not None
    if has_ckpt and not resume:
        raise ConfigError(f"run folder {out} already holds checkpoints; pass --resume to "
                          "continue it or choose another --out")
    if not (resume and (out / SPEC_FILE).is_file() and (out / CONFIG_FILE).is_file()):
        return None
    cfg = config_from_dict("downstream", yaml.safe_load((out / CONFIG_FILE).read_text()))
    print(f"--resume: using the run's own {CONFIG_FILE}, {SPEC_FILE} and {SPLITS_FILE} "
          "(--preset, --network, --size, --pretrained, --lora-rank, --label-fraction and --fold "
          "are ignored)")
    return cfg, json.loads((out / SPEC_FILE).read_text())


def _new_spec(cfg: FinetuneConfig, *, data: str | Path, network: str, size: str,
              pretrained: str | Path | None, lora_rank: int | None, splits: Splits) -> dict:
    task = cfg.task
    if lora_rank is not None and (isinstance(lora_rank, bool) or lora_rank < 1):
        raise ConfigError(f"--lora-rank must be an int >= 1 (paper: 4, 8, 16), got {lora_rank}")
    if (task.task == "cls") != (network == "classifier"):
        raise ConfigError(f"--network {network} does not fit task {task.task!r}: use classifier "
                          "for cls, mim-unetr, unetr or swinunetr for seg")
    if network == "swinunetr" and any(r % 32 for r in task.roi):
        raise ConfigError(f"task.roi={list(task.roi)}: swinunetr needs sides divisible by 32")
    return {"format": SPEC_FORMAT, "format_version": 1, "mim3d_version": __version__,
            "task": task.task, "network": network, "size": size, "preset": cfg.name,
            "in_channels": task.in_channels, "num_classes": task.num_classes,
            "roi": list(task.roi), "classes": {str(k): v for k, v in class_names(task).items()},
            "label_aliases": task.label_aliases, "data": str(Path(data).resolve()),
            "pretrained": str(Path(pretrained).resolve()) if pretrained else None,
            "transfer": None, "lora_rank": lora_rank, "lora": None,
            "label_fraction": splits.label_fraction, "fold": splits.fold, "folds": splits.folds,
            "config": config_to_dict(cfg)}


def _datasets(cfg: FinetuneConfig, splits: Splits, train_items: list[Item],
              val_items: list[Item]) -> tuple[Any, Any]:
    """Cached train/validation datasets; reading every case here finds bad ones before the run
    folder is touched (a label off its image's grid, wrong channels, unreadable files)."""
    by_name = {item["name"]: item for item in train_items}
    val = val_items or [by_name[n] for n in splits.validation]
    common = {"workers": cfg.train.workers, "seed": cfg.train.seed}
    train_ds = make_dataset([by_name[n] for n in splits.train], cfg.data, cfg.task, train=True,
                            **common)
    val_ds = make_dataset(val, cfg.data, cfg.task, train=False, **common) if val else None
    return train_ds, val_ds


def _prepare(cfg: FinetuneConfig, out: Path, data: str | Path, opts: dict[str, Any],
             resume: bool) -> _Run:
    """Validate everything, build the network, resume, and only then write into ``out``."""
    saved = _saved_run(out, resume)
    if saved is not None:
        cfg, spec = saved
        recorded = json.loads((out / SPLITS_FILE).read_text())
        opts = {**opts, **{k: recorded[k] for k in ("fold", "folds", "label_fraction")
                           if recorded.get(k) is not None}}
    train_items, val_items, labels = read_cases(data, cfg.task.task)
    task = resolve_task(cfg.task, labels, train_items + val_items)
    cfg = replace(cfg, task=task)
    splits = split_cases([c["name"] for c in train_items], seed=cfg.train.seed,
                         folds=opts["folds"], fold=opts["fold"],
                         label_fraction=opts["label_fraction"],
                         validation=[c["name"] for c in val_items])
    if saved is None:
        spec = _new_spec(cfg, data=data, network=opts["network"], size=opts["size"],
                         pretrained=opts["pretrained"], lora_rank=opts["lora_rank"],
                         splits=splits)
    elif json.loads((out / SPLITS_FILE).read_text()) != splits.to_dict():
        raise ValueError(f"the data no longer gives the splits recorded in {out / SPLITS_FILE}; "
                         "resume with the --data the run was started with")
    train_ds, val_ds = _datasets(cfg, splits, train_items, val_items)
    model = _build_model(cfg, spec, fresh=saved is None)
    run = _Run(cfg, spec, out, model, train_ds, val_ds)
    latest = run.resume() if resume else None
    if resume:
        print(f"resumed from {latest} at step {run.step}" if latest else
              f"--resume: no checkpoint in {out} yet; starting from step 0")
    _write_run_files(out, cfg, spec, splits, fresh=saved is None)
    truncate_metrics(out, run.step)  # steps after the checkpoint are redone
    run.monitor = RunMonitor(out, purge_step=run.step, tag="finetune")
    return run


def _build_model(cfg: FinetuneConfig, spec: dict[str, Any], fresh: bool) -> nn.Module:
    """The network: seeded init, pretrained encoder (new runs), then LoRA adapters."""
    from mim3d.factory import build_downstream

    torch.manual_seed(cfg.train.seed)
    model = build_downstream(network=spec["network"], size=spec["size"],
                             in_channels=spec["in_channels"], out_channels=spec["num_classes"],
                             roi=spec["roi"])
    if fresh and spec["pretrained"]:
        spec["transfer"] = load_pretrained(model, spec, spec["pretrained"], cfg)
    if spec["lora_rank"]:  # after loading: peft renames the weights it wraps
        model, report = add_lora(model, spec)
        spec["lora"] = asdict(report)
        print(f"LoRA rank {report.rank}: {report.trainable_params:,} of {report.total_params:,} "
              f"parameters trainable ({100 * report.trainable_share:.1f}%)")
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
        _write_json(out / "transfer_report.json", spec["transfer"])


# ------------------------------------------------------------------------------ the loop


def finetune(cfg: FinetuneConfig, *, data: str | Path, out: str | Path,
             pretrained: str | Path | None = None, network: str | None = None,
             size: str = "base", label_fraction: float = 1.0, lora_rank: int | None = None,
             max_steps: int | None = None, resume: bool = False, fold: int = 0, folds: int = 5,
             val_every: int | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune a downstream network (module docstring).

    Args:
        cfg: the resolved downstream config (a preset + overrides); ignored in favour of the
            run's own when resuming.
        data: an MSD datalist JSON (``training`` [+ ``validation``] lists, ``labels``), an
            nnU-Net/MSD folder, or other inputs :func:`~mim3d.data.datalists.resolve_inputs`
            takes (segmentation needs labels, so in practice a datalist or nnU-Net folder).
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
        A :class:`FinetuneResult`; a run stopped by SIGTERM/SIGINT returns after a checkpoint.

    Raises:
        ConfigError, ValueError (incl. ImageReadError, TransferError, CheckpointError): bad
            input, found before anything in ``out`` is written.
        NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
    """
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
    if val_every is not None and val_every < 1:
        raise ConfigError(f"val_every must be >= 1, got {val_every}")
    network = network or ("classifier" if cfg.task.task == "cls" else "mim-unetr")
    opts = {"network": network, "size": size, "pretrained": pretrained, "lora_rank": lora_rank,
            "label_fraction": label_fraction, "fold": fold, "folds": folds}
    if not torch.cuda.is_available():
        tune_cpu_allocator()
    run = _prepare(cfg, Path(out), data, opts, resume)
    total = run.cfg.optim.total_steps
    stop_at = min(total, max_steps or total)
    try:
        return _loop(run, stop_at, val_every or max(1, total // 10), progress)
    finally:
        run.monitor.close()


def _loop(run: _Run, stop_at: int, val_every: int, progress: bool) -> FinetuneResult:
    cfg, last, stopped = run.cfg, None, False
    if run.step >= stop_at:
        print(f"nothing to do: the run is at step {run.step}, the stop step is {stop_at}")
    batches = run.batches(stop_at)
    crops = cfg.task.num_samples if cfg.task.task == "seg" else 1  # seg items are crop lists
    meter = StepMeter(cfg.optim.batch_size * cfg.optim.accum_steps * crops)
    with StopSignal() as stop, tqdm(total=stop_at, initial=run.step, disable=not progress,
                                    desc="finetune", unit="step", dynamic_ncols=True) as bar:
        while run.step < stop_at:
            t0 = time.perf_counter()
            loss, norm, lr, waited = run.train_step(batches)
            run.step += 1
            meter.add(time.perf_counter() - t0, waited)
            if run.step % cfg.train.log_every == 0 or run.step == stop_at:
                run.monitor.log(run.step, {"loss": loss, "lr": lr, "grad_norm": norm,
                                           **meter.report()})
            stopped = stop.received is not None
            if not stopped and (run.step % val_every == 0 or run.step == stop_at):
                _validate(run)
            bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{lr:.2e}",
                             "best": "-" if run.best_score is None else f"{run.best_score:.3f}"},
                            refresh=False)
            bar.update(1)
            if run.step % cfg.train.ckpt_every == 0 or run.step == stop_at or stopped:
                last = run.checkpoint()
            if stopped:
                print(f"stopped by a signal at step {run.step}; checkpoint {last}; continue "
                      "with --resume")
                break
    best = find_latest(run.run_dir / BEST_DIR) if (run.run_dir / BEST_DIR).is_dir() else None
    return FinetuneResult(run.run_dir, run.step, last or find_latest(run.run_dir), best,
                          run.best_score, run.best_step, run.run_dir / "metrics.jsonl", stopped)


def _validate(run: _Run) -> None:
    """Score the validation cases, log the score, and keep the best weights."""
    score = run.validate()
    if score is None:
        return
    if math.isfinite(score) and (run.best_score is None or score > run.best_score):
        run.save_best(score)
    run.monitor.log(run.step, {run.metric: score,
                               f"best_{run.metric}": run.best_score if run.best_score is not None
                               else math.nan})
