"""``mim3d pretrain``: a MiM pre-training run, single process or under torchrun (DDP).

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``tensorboard/``,
``ckpt_<step>/`` checkpoints, ``pictures/`` and, when raw images were given, ``store/``.
A run stopped at any point (``--max-steps``, SIGTERM, SIGKILL) and resumed with ``--resume``
reaches the same weights as the uninterrupted run: masks and crops are pure functions of
(seed, step, position), and model, optimizer, scaler and RNG states are restored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

from mim3d.config import ConfigError, PretrainConfig, config_from_dict, save_config, to_dict
from mim3d.data.prepare import prepare
from mim3d.data.sampler import PretrainCropDataset, StepSampler, make_loader
from mim3d.data.store import PreparedStore
from mim3d.engine import dist as D
from mim3d.engine.checkpoint import find_latest, gather_rng_states, load_checkpoint, save_checkpoint
from mim3d.engine.monitor import RunMonitor, StopSignal, truncate_metrics
from mim3d.engine.optim import param_groups, set_lr, warmup_cosine
from mim3d.engine.train import NonFiniteLossError, train_step
from mim3d.models.registry import build_mim, geometry_from_config

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
    saved = run_dir / CONFIG_FILE
    has_ckpt = find_latest(run_dir) is not None if run_dir.is_dir() else False
    if has_ckpt and not resume:
        raise ConfigError(f"run folder {run_dir} already holds checkpoints; pass --resume to "
                          "continue it or choose another --out")
    if resume and saved.is_file():
        return config_from_dict("pretrain", yaml.safe_load(saved.read_text()))
    return cfg


def open_training_data(data: str | Path, run_dir: Path, cfg: PretrainConfig,
                       info: D.DistInfo) -> PreparedStore:
    """Open a prepared store, or prepare raw inputs into ``RUN/store`` (rank 0, then all)."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist: pass a prepared store "
                                "(mim3d prepare) or image files/folders/datalists")
    if not (path / "store.json").is_file():
        if info.is_main:
            report = prepare([path], run_dir / "store", data=cfg.data, workers=cfg.train.workers)
            print(f"prepared {report.prepared} cases into {report.store} "
                  f"({report.quarantined} quarantined)")
        D.barrier()
        path = run_dir / "store"
    store = PreparedStore.open(path)
    if len(store) == 0:
        raise ValueError(f"data store {path} holds no usable case; see its quarantine file")
    return store


def _build_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                             betas=cfg.optim.betas)


def _scaler(cfg: PretrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    if cfg.optim.precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


class _Run:
    """Live objects of one run, so the loop body stays short."""

    def __init__(self, cfg: PretrainConfig, run_dir: Path, info: D.DistInfo) -> None:
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        self.geometry = geometry_from_config(cfg.geometry)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_mim(cfg).to(info.device)
        self.optimizer = _build_optimizer(self.model, cfg)
        self.scaler = _scaler(cfg, info.device)
        self.step = 0
        self.net: nn.Module = self.model
        self.monitor = RunMonitor(run_dir, enabled=info.is_main)
        self.pictures: list[Path] = []

    def resume(self) -> None:
        latest = find_latest(self.run_dir)
        if latest is None:
            if self.info.is_main:
                print(f"--resume: no checkpoint in {self.run_dir} yet; starting from step 0")
            return
        state = load_checkpoint(latest, model=self.model, optimizer=self.optimizer,
                                scaler=self.scaler, map_location=self.info.device)
        self.step = state["step"]
        if self.info.is_main:
            truncate_metrics(self.run_dir, self.step)
            print(f"resumed from {latest} at step {self.step}")

    def wrap(self) -> None:
        if self.info.world_size > 1:
            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def checkpoint(self) -> Path | None:
        rng = gather_rng_states()
        path = None
        if self.info.is_main:
            path = save_checkpoint(self.run_dir, step=self.step, model=self.model,
                                   optimizer=self.optimizer, scaler=self.scaler,
                                   extra_state={"data_step": self.step}, config=to_dict(self.cfg),
                                   keep_last=self.cfg.train.keep_last, rng_states=rng)
        D.barrier()
        return path

    def picture(self, output) -> None:
        from mim3d.viz import save_reconstruction_png

        if not self.info.is_main:
            return
        path = self.run_dir / "pictures" / f"recon_{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = save_reconstruction_png(output, path, patch_size=self.cfg.geometry.patch_size,
                                      norm_pix=self.cfg.loss.norm_pix)
        self.monitor.image(self.step, "pretrain/reconstruction", img)
        self.pictures.append(path)


def _loader(store: PreparedStore, cfg: PretrainConfig, info: D.DistInfo, start_step: int):
    dataset = PretrainCropDataset(store, crop_size=cfg.geometry.crop_sizes[0], data=cfg.data,
                                  seed=cfg.train.seed)
    sampler = StepSampler(batch_size=cfg.optim.batch_size, rank=info.rank,
                          world_size=info.world_size, start_step=start_step,
                          accum_steps=cfg.optim.accum_steps)
    return make_loader(dataset, sampler, batch_size=cfg.optim.batch_size,
                       workers=cfg.train.workers, seed=cfg.train.seed)


def _postfix(losses: dict[str, float], lr: float, rate: float) -> dict[str, str]:
    shown = {k: f"{v:.4f}" for k, v in losses.items()}
    return {**shown, "lr": f"{lr:.2e}", "smp/s": f"{rate:.2f}"}


def pretrain(cfg: PretrainConfig, *, data: str | Path, out: str | Path,
             max_steps: int | None = None, resume: bool = False,
             progress: bool = True) -> PretrainResult:
    """Pre-train MiM.

    Args:
        cfg: the resolved config (ignored in favour of the saved one when resuming).
        data: a prepared store, or raw inputs (prepared into ``out/store`` first).
        out: the run folder.
        max_steps: stop after this many optimizer steps in total (the learning-rate schedule
            still spans ``cfg.optim.total_steps``); ``None`` runs the whole schedule.
        resume: continue from the newest checkpoint in ``out``.
        progress: show a progress bar on the main rank.

    Returns:
        A :class:`PretrainResult`.
    """
    info = D.init_distributed()
    run_dir = Path(out)
    cfg = resolve_run_config(cfg, run_dir, resume)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
    D.barrier()
    store = open_training_data(data, run_dir, cfg, info)
    run = _Run(cfg, run_dir, info)
    if resume:
        run.resume()
    run.wrap()
    stop_at = min(cfg.optim.total_steps, max_steps if max_steps is not None else 10**18)
    try:
        result = _loop(run, store, stop_at, progress)
    finally:
        run.monitor.close()
    return result


def _loop(run: _Run, store: PreparedStore, stop_at: int, progress: bool) -> PretrainResult:
    cfg, info = run.cfg, run.info
    batches = iter(_loader(store, cfg, info, run.step))
    bar = tqdm(total=stop_at, initial=run.step, disable=not (progress and info.is_main),
               desc="pretrain", dynamic_ncols=True)
    losses: dict[str, float] = {}
    ckpt, stopped = None, False
    samples = cfg.optim.batch_size * cfg.optim.accum_steps * info.world_size
    with StopSignal() as stop:
        while run.step < stop_at:
            lr = warmup_cosine(run.step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                               total_steps=cfg.optim.total_steps, min_lr=cfg.optim.min_lr)
            set_lr(run.optimizer, lr)
            t0 = time.perf_counter()
            try:
                res = train_step(run.net, run.optimizer, batches, cfg=cfg, geometry=run.geometry,
                                 step=run.step, rank=info.rank, device=info.device,
                                 scaler=run.scaler)
            except NonFiniteLossError as exc:
                last = find_latest(run.run_dir)
                raise NonFiniteLossError(f"{exc}; stopping. The last good checkpoint is "
                                         f"{last or 'none'}; lower optim.lr or use "
                                         "optim.precision=fp32") from None
            run.step += 1
            losses = res.losses
            rate = samples / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(_postfix(losses, lr, rate))
            if run.step % cfg.train.log_every == 0 or run.step == stop_at:
                run.monitor.log(run.step, {**losses, "lr": lr, "samples_per_s": rate,
                                           "grad_norm": res.grad_norm})
            if run.step % cfg.train.image_every == 0 or run.step == stop_at:
                run.picture(res.output)
            stopped = _stop_requested(stop, info)
            if run.step % cfg.train.ckpt_every == 0 or run.step == stop_at or stopped:
                ckpt = run.checkpoint() or ckpt
            if stopped:
                break
    bar.close()
    if ckpt is None and info.is_main and run.step > 0:
        ckpt = find_latest(run.run_dir)
    return PretrainResult(run_dir=run.run_dir, step=run.step, checkpoint=ckpt,
                          metrics=run.run_dir / "metrics.jsonl", pictures=run.pictures,
                          last_losses=losses, stopped_by_signal=stopped)


def _stop_requested(stop: StopSignal, info: D.DistInfo) -> bool:
    """Whether any rank got a stop signal (all ranks must agree to checkpoint together)."""
    flag = torch.tensor([1.0 if stop.received is not None else 0.0])
    if info.world_size > 1:
        flag = flag.to(info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)

