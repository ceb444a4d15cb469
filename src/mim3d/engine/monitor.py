"""What a run shows while it trains: metrics.jsonl, TensorBoard scalars and images, stop signals,
and the timing meter behind samples/s and the data-wait share."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import torch
from typing_extensions import Self

from mim3d.runfolder import METRICS_FILE, TENSORBOARD_DIR

T = TypeVar("T")


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop logged steps after ``last_step`` (a resumed run redoes them), keep the rest."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= last_step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue  # a line cut by a kill mid-write
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


class RunMonitor:
    """Appends one JSON object per logged step and mirrors scalars and pictures to TensorBoard.

    Only the main rank writes; other ranks pass ``enabled=False`` and every call is a no-op.

    Args:
        run_dir: the run folder (``metrics.jsonl`` and ``tensorboard/`` go there).
        enabled: False on ranks other than 0.
        tensorboard: also write TensorBoard events.
        purge_step: the step a resumed run restarts from; TensorBoard then hides the events a
            killed run had logged after it, so the curves show no doubled stretch.
        tag: TensorBoard scalar group (``pretrain``, ``finetune``).
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None, tag: str = "pretrain") -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tag = tag
        self._writer: Any = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR),
                                         purge_step=purge_step)

    def log(self, step: int, scalars: dict[str, float | int]) -> None:
        """Record the scalars of one step (``step`` is the number of optimizer steps done)."""
        if not self.enabled:
            return
        # counts stay integers in the JSON; everything else is a float
        record = {"step": int(step),
                  **{k: v if isinstance(v, int) else float(v) for k, v in scalars.items()},
                  "time": round(time.time(), 3)}
        with open(self.run_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in scalars.items():
                self._writer.add_scalar(f"{self.tag}/{k}", float(v), int(step))

    def image(self, step: int, tag: str, picture: np.ndarray) -> None:
        """Add an (H, W, 3) uint8 picture to TensorBoard."""
        if self.enabled and self._writer is not None:
            self._writer.add_image(tag, picture, int(step), dataformats="HWC")

    def close(self) -> None:
        """Flush and close the TensorBoard writer (safe to call twice)."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag so the loop can checkpoint and exit cleanly.

    Preemptible clusters send SIGTERM some seconds before killing a job; a second signal
    falls back to the default behaviour, so an impatient Ctrl-C still stops the process.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while DataLoader workers are forked, so that they inherit it.

    A Ctrl-C reaches the whole foreground process group, and SLURM sends SIGTERM to every
    process of a job step: a worker killed by it would make the main process fail with
    "DataLoader worker exited unexpectedly" instead of checkpointing. The main process alone
    decides when to stop; workers exit when it shuts the loader down (or dies).
    """
    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class TimedIterator(Iterator[T]):
    """Wraps an iterator and adds the seconds spent blocked in ``next`` to ``wait``."""

    def __init__(self, inner: Iterator[T]) -> None:
        self.inner = inner
        self.wait = 0.0

    def __next__(self) -> T:
        t0 = time.perf_counter()
        try:
            return next(self.inner)
        finally:
            self.wait += time.perf_counter() - t0


class StepMeter:
    """Samples/s and the share of step time spent waiting for data, since the last report.

    Averaging over the logging interval (not the last step) keeps the figures steady, and the
    data-wait share shows at a glance whether the loader keeps up with the model.
    """

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self._reset()

    def _reset(self) -> None:
        self.steps, self.seconds, self.data_wait = 0, 0.0, 0.0

    def add(self, seconds: float, data_wait: float) -> None:
        """Account one optimizer step that took ``seconds``, ``data_wait`` of them in ``next``."""
        self.steps += 1
        self.seconds += seconds
        self.data_wait += data_wait

    def report(self) -> dict[str, float]:
        """``samples_per_s``, ``step_s`` and ``data_wait`` (share) of the interval; resets it."""
        seconds = max(self.seconds, 1e-9)
        out = {"samples_per_s": self.steps * self.samples_per_step / seconds,
               "step_s": self.seconds / max(self.steps, 1),
               "data_wait": self.data_wait / seconds}
        self._reset()
        return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max-allocated on a GPU, else this process's RSS high-water mark.

    The RSS figure covers the main process only (DataLoader workers are separate processes).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB else


@contextlib.contextmanager
def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Iterator[Any]:
    """A tqdm bar with ETA over optimizer steps, closed even on errors (so that an error
    message starts on a line of its own)."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
               dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
