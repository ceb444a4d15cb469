"""What a run shows while it trains: metrics.jsonl, TensorBoard scalars and images, stop signals."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from typing_extensions import Self

METRICS_FILE = "metrics.jsonl"


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

    Only the main rank creates one; other ranks pass ``enabled=False`` and every call is a no-op.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer: Any = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record the scalars of one step (``step`` is the number of optimizer steps done)."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()},
                  "time": round(time.time(), 3)}
        with open(self.run_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in scalars.items():
                self._writer.add_scalar(f"pretrain/{k}", float(v), int(step))

    def image(self, step: int, tag: str, picture: np.ndarray) -> None:
        """Add an (H, W, 3) uint8 picture to TensorBoard."""
        if self.enabled and self._writer is not None:
            self._writer.add_image(tag, picture, int(step), dataformats="HWC")

    def close(self) -> None:
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
