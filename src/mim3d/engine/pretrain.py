"""``mim3d pretrain``: a pre-training run (MiM or a baseline), single process or under torchrun.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``tensorboard/``,
``ckpt_<step>/`` checkpoints, ``pictures/`` and, when raw images were given, ``store/``.
A run stopped at any point (``--max-steps``, SIGTERM, SIGKILL) and resumed with ``--resume``
reaches the same weights as the uninterrupted run: masks and crops are pure functions of
(seed, step, position), and model, optimizer, scaler and RNG states are restored.

Everything that can be checked is checked before the run folder is touched (config, geometry,
data, the checkpoint to resume from), so a bad invocation never damages an existing run.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from mim3d.config import ConfigError, PretrainConfig, config_from_dict, save_config, to_dict
from mim3d.data.prepare import prepare
from mim3d.data.sampler import PretrainCropDataset, StepSampler, make_loader
from mim3d.data.store import PreparedStore
from mim3d.engine import dist as D
from mim3d.engine.checkpoint import find_latest, gather_rng_states, load_checkpoint, save_checkpoint
from mim3d.engine.monitor import (
    RunMonitor,
    StepMeter,
    StopSignal,
    TimedIterator,
    peak_memory_mb,
    progress_bar,
    signals_ignored,
    truncate_metrics,
)
from mim3d.engine.optim import param_groups, set_lr, warmup_cosine
from mim3d.engine.train import (
    NonFiniteLossError,
    StepResult,
    SwinSSLStep,
    make_scaler,
    resolve_precision,
    train_step,
)
from mim3d.factory import build_pretrain_model, geometry_from_config
from mim3d.masking import LevelGeometry

CONFIG_FILE = "config.yaml"


@dataclass
class PretrainResult:
    """Where a run left its artefacts."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    metrics: Path
    pictures: list[Path]
    last_losses: dict[str, float]
    stopped_by_signal: bool = False


def resolve_run_config(cfg: PretrainConfig, run_dir: Path, resume: bool) -> PretrainConfig:
    """The config of a run: a resumed run keeps the one saved in its folder.

    Raises:
        ConfigError: the folder already holds checkpoints but ``--resume`` was not given.
    """
    latest = find_latest(run_dir) if run_dir.is_dir() else None
    if latest is not None and not resume:
        raise ConfigError(f"run folder {run_dir} already holds checkpoints; pass --resume to "
                          "continue it or choose another --out")
    if not resume:
        return cfg
    saved = run_dir / CONFIG_FILE
    if saved.is_file():
        return _read_saved_config(saved, yaml.safe_load)
    if latest is not None:  # config.yaml lost: every checkpoint carries the config too
        return _read_saved_config(latest / "meta.json", lambda text: json.loads(text)["config"])
    return cfg


def _read_saved_config(path: Path, parse: Any) -> PretrainConfig:
    try:
        return config_from_dict("pretrain", parse(path.read_text()))
    except (OSError, UnicodeDecodeError, KeyError, TypeError, AttributeError, yaml.YAMLError,
            json.JSONDecodeError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise ConfigError(f"cannot read the run's config {path} ({detail}); restore it or "
                          "start a new run") from None


def _on_main(fn: Any, info: D.DistInfo) -> Any:
    """Run ``fn`` on rank 0 only; every rank raises rank 0's error instead of waiting forever."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except (ValueError, FileNotFoundError) as exc:
            error = str(exc)
    if info.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ValueError(error)
    return result


def open_training_data(data: str | Path, run_dir: Path, cfg: PretrainConfig,
                       info: D.DistInfo) -> PreparedStore:
    """Open a prepared store, or prepare raw inputs into ``RUN/store`` (rank 0, then all)."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist: pass a prepared store "
                                "(mim3d prepare) or image files/folders/datalists")
    if not (path / "store.json").is_file():
        def _prepare() -> None:
            report = prepare([path], run_dir / "store", data=cfg.data,
                             workers=cfg.train.workers)
            print(f"prepared {report.prepared} cases into {report.store} "
                  f"({report.quarantined} quarantined)")

        _on_main(_prepare, info)
        path = run_dir / "store"
    store = PreparedStore.open(path)
    if len(store) == 0:
        raise ValueError(f"data store {path} holds no usable case; see its quarantine file")
    return store


class _Run:
    """Live objects of one run, so the loop body stays short."""

    def __init__(self, cfg: PretrainConfig, run_dir: Path, info: D.DistInfo,
                 geometry: tuple[LevelGeometry, ...], dataset: PretrainCropDataset) -> None:
        self.cfg, self.run_dir, self.info, self.geometry = cfg, run_dir, info, geometry
        self.dataset = dataset
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_pretrain_model(cfg).to(info.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay),
                                           lr=cfg.optim.lr, betas=cfg.optim.betas)
        self.scaler = make_scaler(info.device, cfg.optim.precision)
        self.step = 0
        self.net: nn.Module = self.model
        self.monitor = RunMonitor(run_dir, enabled=False)  # replaced once the folder is ours
        self.pictures: list[Path] = []
        self.samples_per_step = cfg.optim.batch_size * cfg.optim.accum_steps * info.world_size

    def resume(self) -> Path | None:
        """Load the newest checkpoint, if any (raises ``CheckpointError`` when it is damaged)."""
        latest = find_latest(self.run_dir) if self.run_dir.is_dir() else None
        if latest is None:
            return None
        state = load_checkpoint(latest, model=self.model, optimizer=self.optimizer,
                                scaler=self.scaler, map_location=self.info.device)
        self.step = state["step"]
        saved_world = state["extra_state"].get("world_size", self.info.world_size)
        if saved_world != self.info.world_size and self.info.is_main:
            warnings.warn(f"{latest} was written by {saved_world} process(es), this run has "
                          f"{self.info.world_size}: training continues, but the data stream and "
                          "weights will differ from an uninterrupted run", stacklevel=2)
        return latest

    def open_monitor(self) -> None:
        self.monitor = RunMonitor(self.run_dir, enabled=self.info.is_main,
                                  purge_step=self.step)

    def wrap(self) -> None:
        if self.info.world_size > 1:
            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def checkpoint(self) -> Path | None:
        """Save on rank 0 (all ranks take part: RNG states are gathered)."""
        rng = gather_rng_states()
        path = None
        if self.info.is_main:
            extra = {"data_step": self.step, "world_size": self.info.world_size,
                     "samples_seen": self.step * self.samples_per_step}
            path = save_checkpoint(self.run_dir, step=self.step, model=self.model,
                                   optimizer=self.optimizer, scaler=self.scaler,
                                   extra_state=extra, config=to_dict(self.cfg),
                                   keep_last=self.cfg.train.keep_last, rng_states=rng)
        D.barrier()
        return path

    def picture(self, output: Any) -> None:
        """Input / masked / reconstruction of every level, as PNG and in TensorBoard."""
        from mim3d.viz import save_inpainting_png, save_reconstruction_png

        if not self.info.is_main:
            return
        path = self.run_dir / "pictures" / f"recon_{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(output, SwinSSLStep):
            img = save_inpainting_png(output.views.targets, output.views.inputs,
                                      output.reconstructions, path)
        else:
            img = save_reconstruction_png(output, path, patch_size=self.cfg.geometry.patch_size,
                                          norm_pix=self.cfg.loss.norm_pix)
        self.monitor.image(self.step, "pretrain/reconstruction", img)
        self.pictures.append(path)


def _dataset(store: PreparedStore, cfg: PretrainConfig) -> PretrainCropDataset:
    return PretrainCropDataset(store, crop_size=cfg.geometry.crop_sizes[0], data=cfg.data,
                               seed=cfg.train.seed)


def _batches(dataset: PretrainCropDataset, cfg: PretrainConfig, info: D.DistInfo,
             start_step: int) -> TimedIterator:
    """The rank's micro-batch stream from ``start_step`` on, timed for the data-wait share."""
    sampler = StepSampler(batch_size=cfg.optim.batch_size, rank=info.rank,
                          world_size=info.world_size, start_step=start_step,
                          accum_steps=cfg.optim.accum_steps)
    loader = make_loader(dataset, sampler, batch_size=cfg.optim.batch_size,
                         workers=cfg.train.workers, seed=cfg.train.seed)
    with signals_ignored():  # the workers fork here and keep the ignored dispositions
        return TimedIterator(iter(loader))


def pretrain(cfg: PretrainConfig, *, data: str | Path, out: str | Path,
             max_steps: int | None = None, resume: bool = False,
             progress: bool = True) -> PretrainResult:
    """Pre-train MiM or a baseline (``cfg.method``, ``cfg.model.encoder``, levels).

    Args:
        cfg: the resolved config (ignored in favour of the saved one when resuming).
        data: a prepared store, or raw inputs (prepared into ``out/store`` first).
        out: the run folder.
        max_steps: stop after this many optimizer steps in total (the learning-rate schedule
            still spans ``cfg.optim.total_steps``); ``None`` runs the whole schedule.
        resume: continue from the newest checkpoint in ``out`` (from step 0 if it has none).
        progress: show a progress bar on the main rank.

    Returns:
        A :class:`PretrainResult`. A run stopped by SIGTERM/SIGINT returns normally with
        ``stopped_by_signal=True`` after writing a checkpoint.

    Raises:
        ConfigError, GeometryError, CheckpointError, ValueError, FileNotFoundError: bad input,
            found before anything in ``out`` is changed.
        NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
    """
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = D.init_distributed()
    try:
        run = _setup(cfg, info, data=data, out=Path(out), max_steps=max_steps, resume=resume)
        stop_at = min(run.cfg.optim.total_steps, max_steps or run.cfg.optim.total_steps)
        try:
            return _loop(run, stop_at, progress)
        finally:
            run.monitor.close()
    finally:
        if owns_group:
            D.cleanup()


def _setup(cfg: PretrainConfig, info: D.DistInfo, *, data: str | Path, out: Path,
           max_steps: int | None, resume: bool) -> _Run:
    """Validate everything, load the checkpoint, and only then write into the run folder."""
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
    had_config = (out / CONFIG_FILE).is_file()
    given = cfg
    cfg = resolve_run_config(cfg, out, resume)
    if cfg is not given and info.is_main:
        print(f"--resume: using the run's own config from {out} "
              "(--preset/--config/--set are ignored)")
    geometry = geometry_from_config(cfg.geometry)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    store = open_training_data(data, out, cfg, info)
    dataset = _dataset(store, cfg)  # checks that the store fits the data config
    run = _Run(cfg, out, info, geometry, dataset)
    latest = run.resume() if resume else None
    if info.is_main:
        if resume:
            print(f"resumed from {latest} at step {run.step}" if latest else
                  f"--resume: no checkpoint in {out} yet; starting from step 0")
        out.mkdir(parents=True, exist_ok=True)
        if not (resume and had_config):
            save_config(cfg, out / CONFIG_FILE)
        truncate_metrics(out, run.step)  # steps after the checkpoint are redone
    D.barrier()
    run.open_monitor()
    run.wrap()
    return run


@dataclass
class _LoopState:
    losses: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped: bool = False


def _one_step(run: _Run, batches: TimedIterator) -> tuple[StepResult, float, float]:
    """One optimizer step with the scheduled rate; returns (result, lr, data wait seconds)."""
    cfg = run.cfg
    lr = warmup_cosine(run.step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                       total_steps=cfg.optim.total_steps, min_lr=cfg.optim.min_lr)
    set_lr(run.optimizer, lr)
    waited = batches.wait
    try:
        res = train_step(run.net, run.optimizer, batches, cfg=cfg, geometry=run.geometry,
                         step=run.step, rank=run.info.rank, device=run.info.device,
                         scaler=run.scaler)
    except NonFiniteLossError as exc:
        last = find_latest(run.run_dir) if run.run_dir.is_dir() else None
        low = resolve_precision(run.info.device, cfg.optim.precision) != "fp32"
        hint = "lower optim.lr, raise optim.warmup_steps" + (
            " or use optim.precision=fp32" if low else " or check the data")
        raise NonFiniteLossError(f"{exc}; stopping. The last good checkpoint is "
                                 f"{last or 'none (no checkpoint written yet)'}; {hint}"
                                 ) from None
    return res, lr, batches.wait - waited


def _loop(run: _Run, stop_at: int, progress: bool) -> PretrainResult:
    cfg, info, state = run.cfg, run.info, _LoopState()
    if run.step >= stop_at and info.is_main:
        print(f"nothing to do: the run is at step {run.step}, the stop step is {stop_at}")
    batches = _batches(run.dataset, cfg, info, run.step)
    meter = StepMeter(run.samples_per_step)
    shown = progress and info.is_main
    with StopSignal() as stop, progress_bar(stop_at, run.step, "pretrain", shown) as bar:
        while run.step < stop_at:
            t0 = time.perf_counter()
            res, lr, waited = _one_step(run, batches)
            run.step += 1
            meter.add(time.perf_counter() - t0, waited)
            state.losses = res.losses
            bar.set_postfix({**{k: f"{v:.4f}" for k, v in res.losses.items()},
                             "lr": f"{lr:.2e}"}, refresh=False)
            bar.update(1)  # redraws with the new postfix
            _after_step(run, res, lr, meter, stop_at)
            state.stopped = _stop_requested(stop, info)
            if run.step % cfg.train.ckpt_every == 0 or run.step == stop_at or state.stopped:
                state.checkpoint = run.checkpoint() or state.checkpoint
            if state.stopped:
                break
    return _finish(run, state)


def _after_step(run: _Run, res: StepResult, lr: float, meter: StepMeter, stop_at: int) -> None:
    """Log metrics and draw the reconstruction picture when they are due."""
    cfg = run.cfg
    if run.step % cfg.train.log_every == 0 or run.step == stop_at:
        losses = _mean_over_ranks(res.losses, run.info)
        run.monitor.log(run.step, {**losses, "lr": lr, "grad_norm": res.grad_norm,
                                   "samples": run.step * run.samples_per_step, **meter.report(),
                                   "peak_mem_mb": peak_memory_mb(run.info.device)})
    if run.step % cfg.train.image_every == 0 or run.step == stop_at:
        run.picture(res.output)


def _mean_over_ranks(losses: dict[str, float], info: D.DistInfo) -> dict[str, float]:
    """Loss terms averaged over ranks (each rank saw other samples); a collective."""
    if info.world_size == 1:
        return losses
    keys = sorted(losses)
    values = D.all_reduce_mean(torch.tensor([losses[k] for k in keys], device=info.device))
    return dict(zip(keys, values.tolist()))


def _finish(run: _Run, state: _LoopState) -> PretrainResult:
    ckpt = state.checkpoint
    if ckpt is None and run.info.is_main and run.step > 0:
        ckpt = find_latest(run.run_dir)
    if state.stopped and run.info.is_main:
        print(f"stopped by a signal at step {run.step}; checkpoint {ckpt}; continue with "
              "--resume")
    return PretrainResult(run_dir=run.run_dir, step=run.step, checkpoint=ckpt,
                          metrics=run.run_dir / "metrics.jsonl", pictures=run.pictures,
                          last_losses=state.losses, stopped_by_signal=state.stopped)


def _stop_requested(stop: StopSignal, info: D.DistInfo) -> bool:
    """Whether any rank got a stop signal (all ranks must agree to checkpoint together)."""
    flag = torch.tensor([1.0 if stop.received is not None else 0.0])
    if info.world_size > 1:
        flag = flag.to(info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
