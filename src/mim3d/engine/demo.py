"""``mim3d demo``: phantoms -> prepared store -> tiny MiM pre-training on the CPU -> pictures.

The demo records what it measured in ``demo.json`` beside the run (steps, wall-clock and CPU
time of each session, the final loss), so a rerun of a finished demo reports the finished run's
real numbers instead of an empty session, and an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mim3d.config import PretrainConfig, load_config
from mim3d.data.phantom import write_cohort
from mim3d.data.prepare import prepare
from mim3d.engine.pretrain import pretrain
from mim3d.fileio import write_text_atomically
from mim3d.runfolder import (
    METRICS_FILE,
    PICTURES_DIR,
    checkpoint_step,
    find_latest,
    read_run_config,
)

logger = logging.getLogger(__name__)

DEMO_SHAPE = (96, 96, 80)
#: The tiny preset's own schedule (400 steps) takes 15+ minutes on a 2-core CPU. 80 steps at the
#: 2.27 s per tiny step measured on 2 idle cores (benchmarks/results/pretrain_throughput.json)
#: keep the whole demo near 3.5 minutes there (README, "Quick start") and already show the loss
#: falling.
DEMO_STEPS = 80
RECORD_FILE = "demo.json"


@dataclass
class DemoRecord:
    """What the demo measured, kept in ``demo.json`` (one entry per session in ``sessions``).

    Attributes:
        run_dir: the run folder.
        steps: optimizer steps of the whole run (its saved config's schedule).
        step: steps done so far.
        final_loss: the loss of the last row of ``metrics.jsonl`` (``None`` before any row).
        loss_step: the step of that row.
        checkpoint: the newest checkpoint folder.
        picture: the newest reconstruction picture, if any.
        sessions: per session ``{"from_step", "to_step", "wall_s", "train_wall_s", "cpu_s",
            "load_average"}``: wall-clock time of the whole session and of its training part,
            CPU time of the process and its data workers, and the 1-minute load average at the
            end (a busy machine explains a slow session).
        stop_signal: the signal that stopped the last session early, if one did.
    """

    run_dir: str
    steps: int
    step: int = 0
    final_loss: float | None = None
    loss_step: int | None = None
    checkpoint: str | None = None
    picture: str | None = None
    sessions: list[dict] = field(default_factory=list)
    stop_signal: int | None = None

    @property
    def pictures(self) -> list[Path]:
        """Every reconstruction picture of the run, oldest first."""
        return sorted((Path(self.run_dir) / PICTURES_DIR).glob("*.png"))

    @property
    def train_minutes(self) -> float:
        """Wall-clock minutes spent training, summed over sessions."""
        return sum(s["train_wall_s"] for s in self.sessions) / 60


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (data workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _read_record(path: Path, run_dir: Path, steps: int) -> DemoRecord:
    """The record of an earlier demo in the same folder (a fresh one when absent or unreadable).

    ``steps`` is the schedule the run folder's own config records, else the one asked for.
    """
    saved = read_run_config(run_dir, "pretrain") if run_dir.is_dir() else None
    steps = saved.optim.total_steps if saved is not None else steps
    try:
        data = json.loads(path.read_text())
        record = DemoRecord(**{**data, "run_dir": str(run_dir), "steps": steps})
    except (OSError, ValueError, TypeError):
        record = DemoRecord(run_dir=str(run_dir), steps=steps)
    _refresh(record, run_dir)
    if record.step == 0:  # no checkpoint (the run folder was removed): its sessions are gone too
        record.sessions = []
    return record


def _write_record(record: DemoRecord, path: Path) -> None:
    write_text_atomically(path, json.dumps(asdict(record), indent=1))


def _last_loss(run_dir: Path) -> tuple[float | None, int | None]:
    """``(loss, step)`` of the last ``metrics.jsonl`` row that has a loss."""
    try:
        lines = (run_dir / METRICS_FILE).read_text().splitlines()
    except OSError:
        return None, None
    for line in reversed(lines):
        row = json.loads(line) if line.strip() else {}
        if "loss" in row:
            return float(row["loss"]), int(row["step"])
    return None, None


def _refresh(record: DemoRecord, run_dir: Path) -> None:
    """Fill the record's step, loss, checkpoint and picture from the run folder itself."""
    latest = find_latest(run_dir) if run_dir.is_dir() else None
    record.step = (checkpoint_step(latest.name) or 0) if latest is not None else 0
    record.checkpoint = str(latest) if latest is not None else None
    record.final_loss, record.loss_step = _last_loss(run_dir)
    pictures = record.pictures
    record.picture = str(pictures[-1]) if pictures else None


def _summary(record: DemoRecord, run_dir: Path, finished_before: bool) -> list[str]:
    """The lines printed at the end of a demo (or of a rerun of a finished one)."""
    cpu = sum(s["cpu_s"] for s in record.sessions) / 60
    how = ("was already complete: nothing trained now, the numbers are the run's own"
           if finished_before else "stopped early" if record.stop_signal else "done")
    took = (f"{record.train_minutes:.1f} min of training ({cpu:.1f} CPU-min, "
            f"{len(record.sessions)} session(s))" if record.sessions
            else "training time not recorded (no demo.json from the run's sessions)")
    lines = [f"[3/3] MiM 'tiny' pre-training {how}: {record.step}/{record.steps} steps, {took}",
             f"  checkpoint: {record.checkpoint}",
             f"  metrics:    {run_dir / METRICS_FILE}  (TensorBoard: {run_dir / 'tensorboard'})"]
    if record.picture:
        lines.append(f"  pictures:   {record.picture}  (input | masked | reconstruction)")
    if record.final_loss is not None:
        lines.append(f"  final loss: {record.final_loss:.4f} (step {record.loss_step})")
    busy = [s["load_average"] for s in record.sessions if s["load_average"] > os.cpu_count()]
    if busy:
        lines.append(f"  note: the machine was busy (load average up to {max(busy):.1f} on "
                     f"{os.cpu_count()} cores), so these times are longer than on idle cores")
    return lines


def _train(record: DemoRecord, cfg: PretrainConfig, store: Path, progress: bool) -> None:
    """Run (or continue) the pre-training and add the session's numbers to ``record``."""
    run_dir = Path(record.run_dir)
    from_step, t0 = record.step, time.perf_counter()
    result = pretrain(cfg, data=store, out=run_dir, resume=(run_dir / "config.yaml").is_file(),
                      progress=progress)
    train_wall = time.perf_counter() - t0
    _refresh(record, run_dir)
    record.stop_signal = result.stop_signal
    record.sessions.append({"from_step": from_step, "to_step": result.step,
                            "train_wall_s": round(train_wall, 2)})


def run_demo(out: str | Path, *, steps: int | None = None, cases: int = 8, seed: int = 0,
             progress: bool = True, echo: Callable[[str], None] = logger.info,
             overrides: Sequence[str] = ()) -> DemoRecord:
    """Make a phantom cohort, prepare it and pre-train the ``tiny`` preset on it.

    A rerun in the same folder continues an unfinished run and, for a finished one, trains
    nothing and reports the run's recorded numbers.

    Args:
        out: demo folder; holds ``phantoms/``, ``store/``, the run folder ``run/`` and
            ``demo.json`` (:class:`DemoRecord`).
        steps: optimizer steps, the whole schedule (default :data:`DEMO_STEPS`); a run that
            already exists keeps its own.
        cases: number of phantom volumes.
        seed: seeds the phantoms and the run.
        progress: show progress bars.
        echo: where the progress lines go (the command line passes ``print``).
        overrides: ``--set`` strings applied after the demo's own (e.g. a smaller model).

    Returns:
        The demo's record (also written to ``out/demo.json``).
    """
    out = Path(out)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    datalist = write_cohort(out / "phantoms", cases, seed=seed, shape=DEMO_SHAPE)
    echo(f"[1/3] wrote {cases} CT phantoms (HU, 13 BTCV organs) and {datalist}")
    steps = DEMO_STEPS if steps is None else steps
    own = [f"train.seed={seed}", f"optim.total_steps={steps}",
           f"optim.warmup_steps={steps // 10}", f"train.image_every={max(1, steps // 4)}"]
    cfg = load_config("pretrain", "tiny", overrides=[*own, *overrides])
    report = prepare([datalist], out / "store", data=cfg.data, workers=cfg.train.workers,
                     progress=progress)
    echo(f"[2/3] prepared {report.prepared + report.skipped} cases into {report.store}")
    record = _read_record(out / RECORD_FILE, out / "run", steps)
    finished_before = record.step >= record.steps
    if finished_before:
        record.stop_signal = None
        if steps != record.steps:
            echo(f"  note: {out / 'run'} holds a finished {record.steps}-step run; --steps "
                 f"{steps} applies to a new --out folder")
    else:
        _train(record, cfg, Path(report.store), progress)
        record.sessions[-1].update(wall_s=round(time.perf_counter() - t0, 2),
                                   cpu_s=round(_cpu_seconds() - cpu0, 2),
                                   load_average=round(os.getloadavg()[0], 2))
        _write_record(record, out / RECORD_FILE)
    for line in _summary(record, out / "run", finished_before):
        echo(line)
    if record.stop_signal:
        echo(f"  stopped by signal {record.stop_signal} at step {record.step}: run `mim3d demo "
             f"--out {out}` again to continue")
    return record
