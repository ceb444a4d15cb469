"""``mim3d pretrain``: a pre-training run (MiM or a baseline), single process or under torchrun.

A run folder (:mod:`mim3d.runfolder`) holds ``config.yaml`` (the resolved config),
``metrics.jsonl``, ``tensorboard/``, ``ckpt_<step>/`` checkpoints, ``pictures/`` and, when raw
images were given, ``store/``. A run stopped at any point (``--max-steps``, SIGTERM, SIGKILL) and
resumed with ``--resume`` reaches the same weights as the uninterrupted run: masks and crops are
pure functions of (seed, step, position), and model, optimizer, scaler and RNG states are
restored. The loop itself (schedule, signals, cadence, metrics) is :mod:`mim3d.engine.loop`.

Everything that can be checked is checked before the run folder is touched (config, geometry,
data, the checkpoint to resume from), so a bad invocation never damages an existing run.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mim3d.config import ConfigError, PretrainConfig, save_config, to_dict
from mim3d.data.prepare import prepare
from mim3d.data.sampler import PretrainCropDataset, StepSampler, make_loader
from mim3d.data.store import PreparedStore, is_remote
from mim3d.engine import dist as D
from mim3d.engine.checkpoint import gather_rng_states, load_checkpoint, save_checkpoint
from mim3d.engine.loop import LoopSpec, run_loop
from mim3d.engine.monitor import RunMonitor, signals_ignored, truncate_metrics
from mim3d.engine.optim import make_optimizer
from mim3d.engine.train import (
    StepResult,
    SwinSSLStep,
    compile_blocks,
    make_scaler,
    resolve_precision,
    train_step,
)
from mim3d.factory import build_pretrain_model, geometry_from_config
from mim3d.masking import LevelGeometry
from mim3d.runfolder import (
    CONFIG_FILE,
    METRICS_FILE,
    PICTURES_DIR,
    STORE_DIR,
    find_latest,
    read_run_config,
)

logger = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """Where a run left its artefacts; ``stop_signal`` is set when a signal stopped it early."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    metrics: Path
    pictures: list[Path]
    last_losses: dict[str, float]
    stop_signal: int | None = None

    @property
    def stopped_by_signal(self) -> bool:
        """Whether SIGTERM/SIGINT stopped the run before its stop step."""
        return self.stop_signal is not None


def resolve_run_config(cfg: PretrainConfig, run_dir: Path, resume: bool) -> PretrainConfig:
    """The config of a run: a resumed run keeps the one saved in its folder.

    Raises:
        ConfigError: the folder already holds checkpoints but ``--resume`` was not given, or
            its saved config cannot be read.
    """
    if not resume:
        if run_dir.is_dir() and find_latest(run_dir) is not None:
            raise ConfigError(f"run folder {run_dir} already holds checkpoints; pass --resume "
                              "to continue it or choose another --out")
        return cfg
    saved = read_run_config(run_dir, "pretrain")  # config.yaml, else the checkpoint's copy
    return cfg if saved is None else saved


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
    if is_remote(data):  # a store on object storage (fsspec URL): read, never prepared here
        return PreparedStore.open(str(data))
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist: pass a prepared store "
                                "(mim3d prepare) or image files/folders/datalists")
    if not (path / "store.json").is_file():
        def _prepare() -> None:
            report = prepare([path], run_dir / STORE_DIR, data=cfg.data,
                             workers=cfg.train.workers)
            logger.info("prepared %d cases into %s (%d quarantined)", report.prepared,
                        report.store, report.quarantined)

        _on_main(_prepare, info)
        path = run_dir / STORE_DIR
    store = PreparedStore.open(path)
    if len(store) == 0:
        raise ValueError(f"data store {path} holds no usable case; see its quarantine file")
    return store


class _Run:
    """Live objects of one run and the hooks :func:`~mim3d.engine.loop.run_loop` calls."""

    def __init__(self, cfg: PretrainConfig, run_dir: Path, info: D.DistInfo,
                 geometry: tuple[LevelGeometry, ...], dataset: PretrainCropDataset) -> None:
        self.cfg, self.run_dir, self.info, self.geometry = cfg, run_dir, info, geometry
        self.dataset = dataset
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_pretrain_model(cfg).to(info.device)
        o = cfg.optim
        self.optimizer = make_optimizer(self.model, lr=o.lr, weight_decay=o.weight_decay,
                                        betas=o.betas, device=info.device)
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
        if self.cfg.train.compile:  # in place: the state-dict keys stay the same
            compile_blocks(self.model)
        if self.info.world_size > 1:
            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # ---------------------------------------------------------------- loop hooks

    def batches(self, start_step: int, stop_at: int) -> Iterator[Tensor]:
        """The rank's micro-batch stream from ``start_step`` on."""
        cfg, info = self.cfg, self.info
        sampler = StepSampler(batch_size=cfg.optim.batch_size, rank=info.rank,
                              world_size=info.world_size, start_step=start_step,
                              accum_steps=cfg.optim.accum_steps)
        loader = make_loader(self.dataset, sampler, batch_size=cfg.optim.batch_size,
                             workers=cfg.train.workers, seed=cfg.train.seed)
        with signals_ignored():  # the workers fork here and keep the ignored dispositions
            return iter(loader)

    def train_step(self, step: int, batches: Iterator[Tensor]) -> StepResult:
        return train_step(self.net, self.optimizer, batches, cfg=self.cfg, geometry=self.geometry,
                          step=step, rank=self.info.rank, device=self.info.device,
                          scaler=self.scaler)

    def checkpoint(self, step: int) -> Path | None:
        """Save on rank 0 (all ranks take part: RNG states are gathered)."""
        self.step = step
        rng = gather_rng_states()
        path = None
        if self.info.is_main:
            extra = {"data_step": step, "world_size": self.info.world_size,
                     "samples_seen": step * self.samples_per_step,
                     "effective_mask_ratios": [g.n_masked / g.n_units for g in self.geometry]}
            path = save_checkpoint(self.run_dir, step=step, model=self.model,
                                   optimizer=self.optimizer, scaler=self.scaler,
                                   extra_state=extra, config=to_dict(self.cfg),
                                   keep_last=self.cfg.train.keep_last, rng_states=rng)
        D.barrier()
        return path

    def after_step(self, step: int, result: StepResult, *, last: bool, stopping: bool) -> None:
        """The reconstruction picture, when due."""
        if step % self.cfg.train.image_every == 0 or last:
            self.picture(step, result.output)

    def postfix(self) -> dict[str, str]:
        return {}

    def divergence_hint(self) -> str:
        low = resolve_precision(self.info.device, self.cfg.optim.precision) != "fp32"
        return "lower optim.lr, raise optim.warmup_steps" + (
            " or use optim.precision=fp32" if low else " or check the data")

    def picture(self, step: int, output: Any) -> None:
        """Input / masked / reconstruction of every level, as PNG and in TensorBoard."""
        from mim3d.viz import hu_window_of, save_inpainting_png, save_reconstruction_png

        if not self.info.is_main:
            return
        path = self.run_dir / PICTURES_DIR / f"recon_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(output, SwinSSLStep):
            img = save_inpainting_png(output.views.targets, output.views.inputs,
                                      output.reconstructions, path,
                                      hu_window=hu_window_of(self.cfg.data))
        else:
            img = save_reconstruction_png(output, path, patch_size=self.cfg.geometry.patch_size,
                                          norm_pix=self.cfg.loss.norm_pix,
                                          hu_window=hu_window_of(self.cfg.data))
        self.monitor.image(step, "pretrain/reconstruction", img)
        self.pictures.append(path)


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
        A :class:`PretrainResult`. A run stopped by SIGTERM/SIGINT returns normally after
        writing a checkpoint, with ``stop_signal`` set (the CLI exits with 128 + signal).

    Raises:
        ConfigError, GeometryError, CheckpointError, ValueError, FileNotFoundError: bad input,
            found before anything in ``out`` is changed.
        NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
        PeerLostError: under torchrun, another rank died or stopped answering for
            ``train.dist_timeout_s`` seconds.
    """
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = D.init_distributed(timeout_s=cfg.train.dist_timeout_s)
    with D.peer_errors(info):
        run = _setup(cfg, info, data=data, out=Path(out), max_steps=max_steps, resume=resume)
        stop_at = min(run.cfg.optim.total_steps, max_steps or run.cfg.optim.total_steps)
        spec = LoopSpec(name="pretrain", optim=run.cfg.optim, train=run.cfg.train,
                        run_dir=run.run_dir, stop_at=stop_at,
                        samples_per_step=run.samples_per_step, info=info, progress=progress)
        try:
            done = run_loop(run, spec, run.step)
        finally:
            run.monitor.close()
        if owns_group:  # only after a clean end: a rank that failed must not wait on the others
            D.cleanup()
    return _finish(run, done)


def _setup(cfg: PretrainConfig, info: D.DistInfo, *, data: str | Path, out: Path,
           max_steps: int | None, resume: bool) -> _Run:
    """Validate everything, load the checkpoint, and only then write into the run folder."""
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
    had_config = (out / CONFIG_FILE).is_file()
    given = cfg
    cfg = resolve_run_config(cfg, out, resume)
    if cfg is not given and info.is_main:
        logger.info("--resume: using the run's own config from %s (--preset/--config/--set are "
                    "ignored)", out)
    geometry = geometry_from_config(cfg.geometry)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    store = open_training_data(data, out, cfg, info)
    dataset = PretrainCropDataset(store, crop_size=cfg.geometry.crop_sizes[0], data=cfg.data,
                                  seed=cfg.train.seed)  # checks that the store fits the config
    run = _Run(cfg, out, info, geometry, dataset)
    latest = run.resume() if resume else None
    if info.is_main:
        if resume and latest:
            logger.info("resumed from %s at step %d", latest, run.step)
        elif resume:
            logger.info("--resume: no checkpoint in %s yet; starting from step 0", out)
        out.mkdir(parents=True, exist_ok=True)
        if not (resume and had_config):
            save_config(cfg, out / CONFIG_FILE)
        truncate_metrics(out, run.step)  # steps after the checkpoint are redone
    D.barrier()
    run.open_monitor()
    run.wrap()
    return run


def _finish(run: _Run, done: Any) -> PretrainResult:
    ckpt = done.checkpoint
    if ckpt is None and run.info.is_main and done.step > 0:
        ckpt = find_latest(run.run_dir)
    if done.stop_signal is not None and run.info.is_main:
        logger.warning("stopped by a signal at step %d; checkpoint %s; continue with --resume",
                       done.step, ckpt)
    return PretrainResult(run_dir=run.run_dir, step=done.step, checkpoint=ckpt,
                          metrics=run.run_dir / METRICS_FILE, pictures=run.pictures,
                          last_losses=done.losses, stop_signal=done.stop_signal)
