"""``mim3d prepare``: read every case once into a :mod:`mim3d.data.store` folder.

Each case is read (RAS), checked, optionally resampled to ``DataConfig.spacing`` (trilinear
image, nearest label), rounded to int16 HU, and written with a coarse body-fraction grid
(:mod:`mim3d.data.casework`). Bad cases go to ``quarantine.jsonl`` with one reason and never stop
the run.

Resuming and sharding: a case is part of the store once its manifest line exists, and that line
is appended only after its folder was renamed into place, so a run killed at any point (SIGKILL
included) is continued by running the same command again. ``shard=(I, N)`` prepares only the
cases whose name hashes to ``I`` modulo ``N``; N such processes (on one machine or on several
sharing a file system) fill one store concurrently, case names being fixed by the whole input
list, so the result equals a single-process prepare. A per-case claim (an advisory lock) keeps
two processes from preparing the same case; the second one leaves it to the first.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mim3d.config import DataConfig, to_dict
from mim3d.data.body import BODY_CELL
from mim3d.data.casework import CaseJob, now, prepare_case, stale_temporaries
from mim3d.data.datalists import CaseSpec, resolve_inputs
from mim3d.data.formats import array_format
from mim3d.data.manifest import (
    MANIFEST,
    QUARANTINE,
    ManifestWriter,
    locked,
    read_manifest,
    read_quarantine,
)
from mim3d.data.remote import StoreFiles
from mim3d.data.shards import parse_shard, plan_cases
from mim3d.data.store import (
    CASES_DIR,
    COARSE_AXES,
    DEFAULT_COARSE_AXES,
    DEFAULT_FORMAT,
    FORMAT_NAME,
    FORMAT_VERSION,
    STORE_JSON,
    config_mismatch,
    read_store_info,
)
from mim3d.fileio import write_text_atomically

__all__ = ["PrepareReport", "parse_shard", "prepare"]

_CRASH_REASON = ("worker process died while preparing this case (out of memory, or a crash "
                 "inside an image reader)")
_CLAIMS = ".claims"
Finish = Callable[[CaseSpec, dict[str, Any]], None]


@dataclass
class PrepareReport:
    """Outcome of :func:`prepare`.

    Attributes:
        prepared: cases written by this run.
        skipped: cases already in the store with the same image and label source.
        quarantined: cases found unusable by this run (reasons in ``quarantine.jsonl``).
        store: the store folder.
        messages: one line per quarantined or busy case, then a summary line.
        in_store: prepared cases the store holds after the run.
        busy: cases left to another process that was preparing them at the same time.
        smaller_than_crop: prepared cases smaller than the level-1 crop (padded when cropped).
    """

    prepared: int
    skipped: int
    quarantined: int
    store: Path
    messages: list[str] = field(default_factory=list)
    in_store: int = 0
    busy: int = 0
    smaller_than_crop: int = 0


def prepare(inputs: Sequence[str | Path], out: str | Path, *, data: DataConfig,
            workers: int = 2, progress: bool = True, fmt: str | None = None,
            shard: tuple[int, int] | None = None, min_size: Sequence[int] | None = None,
            crop_size: Sequence[int] | None = None,
            coarse_axes: str | None = None) -> PrepareReport:
    """Prepare images into a store folder, resuming whatever an earlier run left.

    Args:
        inputs: files, DICOM folders, datalists, nnU-Net folders, folders or .txt lists
            (see :func:`mim3d.data.datalists.resolve_inputs`).
        out: store folder (created when missing).
        data: preprocessing; ``spacing`` and ``body_hu`` are baked into the arrays and must match
            an existing store's.
        workers: worker processes; 0 or 1 prepares in this process.
        progress: show a tqdm bar.
        fmt: array format of a new store (``blosc2`` or ``npy``; default
            :data:`mim3d.data.store.DEFAULT_FORMAT`); an existing store keeps its own.
        shard: ``(I, N)``: prepare only this process's part of the inputs.
        min_size: quarantine volumes smaller than this (x, y, z) after resampling.
        crop_size: the level-1 crop; smaller volumes are logged and counted.
        coarse_axes: for a new store, ``kept`` (axes much coarser than ``data.spacing`` stay at
            their source spacing and crops interpolate them; default
            :data:`mim3d.data.store.DEFAULT_COARSE_AXES`) or ``resampled``; an existing store
            keeps its own.

    Returns:
        The counts; the store is usable when ``in_store > 0``.

    Raises:
        ValueError: (one line) inputs cannot be resolved, ``out`` is a store prepared with other
            baked-in settings or another format, or a conflicting prepare is writing to it.
    """
    specs = resolve_inputs(inputs)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    with _run_lock(root, shard):
        info = _init_store(root, data, fmt, coarse_axes)
        writer = ManifestWriter(root)
        writer.repair()
        todo, skipped = plan_cases(specs, read_manifest(root / MANIFEST), shard)
        job = CaseJob(str(root), data, info["array_format"], dict(info.get("format_params") or {}),
                      None if min_size is None else tuple(int(v) for v in min_size),
                      None if crop_size is None else tuple(int(v) for v in crop_size),
                      keep_coarse=info["coarse_axes"] == "kept")
        report = PrepareReport(prepared=0, skipped=skipped, quarantined=0, store=root)
        claims = _Claims(root)
        try:
            _run_all(todo, job, workers, progress, writer, claims, report)
        finally:
            claims.release_all()
        if shard is None:  # alone in the store: sweep what killed writers left behind
            for path in [*stale_temporaries(root), root / _CLAIMS]:
                shutil.rmtree(path, ignore_errors=True)
        report.in_store = len(read_manifest(root / MANIFEST))
    report.messages.append(
        f"prepared {report.prepared}, skipped {report.skipped} (already in the store), "
        f"quarantined {report.quarantined}, left to another process {report.busy}; "
        f"{report.in_store} cases in {root}")
    if report.smaller_than_crop:
        report.messages.append(f"{report.smaller_than_crop} prepared case(s) are smaller than "
                               "the level-1 crop and will be padded with air")
    return report


def _run_all(todo: list[CaseSpec], job: CaseJob, workers: int, progress: bool,
             writer: ManifestWriter, claims: _Claims, report: PrepareReport) -> None:
    """Claim, prepare and record every planned case."""
    root = Path(job.root)
    was_quarantined = {e["source"]: e.get("reason") for e in read_quarantine(root / QUARANTINE)}
    bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=not progress)

    def start(spec: CaseSpec) -> bool:
        if not claims.acquire(spec.name):
            report.busy += 1
            report.messages.append(f"{spec.name} ({spec.image}): being prepared by another "
                                   "process right now; left to it")
        elif writer.recorded(spec.name, (spec.image, spec.label)):
            claims.release(spec.name)
            report.skipped += 1  # another shard finished it since this run looked
        else:
            for path in stale_temporaries(root, spec.name):
                shutil.rmtree(path, ignore_errors=True)
            return True
        bar.update(1)
        return False

    def finish(spec: CaseSpec, result: dict[str, Any]) -> None:
        _record_result(spec, result, report, writer, was_quarantined)
        claims.release(spec.name)
        bar.update(1)
        bar.set_postfix(quarantined=report.quarantined, refresh=False)

    try:
        _run_cases(todo, job, workers, start, finish)
    finally:
        bar.close()


@contextlib.contextmanager
def _run_lock(root: Path, shard: tuple[int, int] | None) -> Iterator[None]:
    """A plain prepare has the store to itself; shards share it, each shard running once."""
    with locked(root / ".prepare.lock", exclusive=shard is None, blocking=False) as ok:
        if not ok:
            raise ValueError(f"{root}: another `mim3d prepare` is writing to this store "
                             f"({'an unsharded one' if shard else 'possibly sharded'}); wait "
                             "for it, or run every process with --shard I/N")
        if shard is None:
            yield
            return
        with locked(root / f".shard-{shard[0]}-of-{shard[1]}.lock", blocking=False) as mine:
            if not mine:
                raise ValueError(f"{root}: shard {shard[0]}/{shard[1]} is already being "
                                 "prepared by another process; start each shard once")
            yield


def _init_store(root: Path, data: DataConfig, fmt: str | None,
                coarse_axes: str | None) -> dict[str, Any]:
    """Write store.json for a new store, or check an existing one; returns its store.json."""
    with locked(root / ".init.lock"):
        meta = root / STORE_JSON
        if meta.is_file():
            info = read_store_info(StoreFiles(root))
            why = config_mismatch(info.get("data", {}), data)
            if why:
                raise ValueError(f"{root}: store was prepared with other settings ({why}); "
                                 "prepare into a new --out folder or use the store's preset")
            if fmt is not None and fmt != info["array_format"]:
                raise ValueError(f"{root}: store holds {info['array_format']} arrays, not "
                                 f"{fmt}; drop --format or choose a new --out")
            if coarse_axes is not None and coarse_axes != info["coarse_axes"]:
                raise ValueError(f"{root}: store has coarse axes {info['coarse_axes']}, not "
                                 f"{coarse_axes}; drop --coarse-axes or choose a new --out")
            return info
        if any(not p.name.startswith(".") for p in root.iterdir()):
            raise ValueError(f"{root}: folder is not empty and not a store; choose a new --out")
        fmt_obj = array_format(fmt or DEFAULT_FORMAT)
        fmt_obj.check_available()  # e.g. blosc2 missing: a clear error before anything is written
        coarse = coarse_axes or DEFAULT_COARSE_AXES
        if coarse not in COARSE_AXES:
            raise ValueError(f"coarse_axes must be one of {', '.join(COARSE_AXES)}, got {coarse!r}")
        info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "array_format": fmt_obj.name,
                "format_params": fmt_obj.params(), "coarse_axes": coarse, "data": to_dict(data),
                "body_cell": BODY_CELL, "created": now()}
        (root / CASES_DIR).mkdir(exist_ok=True)
        write_text_atomically(meta, json.dumps(info, indent=2) + "\n")
        return info


def _run_cases(todo: list[CaseSpec], job: CaseJob, workers: int,
               start: Callable[[CaseSpec], bool], finish: Finish) -> None:
    """Prepare ``todo`` in this process or in pools; a dead worker quarantines only its case.

    ``start`` claims a case just before it is handed out (False: leave it). A crash (segfault,
    OOM kill) breaks the whole pool. Only the cases in flight at that moment are suspects: they
    are redone one per fresh single-worker pool, the rest go on in a new pool.
    """
    if workers <= 1:
        for spec in todo:
            if start(spec):
                finish(spec, prepare_case(spec, job))
        return
    pending, suspects, ok = deque(todo), [], [0]

    def finish_ok(spec: CaseSpec, result: dict[str, Any]) -> None:
        ok[0] += 1
        finish(spec, result)

    while pending:
        suspects += _pool_round(pending, job, workers, start, finish_ok)
    results = [(spec, _run_alone(spec, job)) for spec in suspects]
    if ok[0] == 0 and len(todo) > 1 and all(r.get("reason") == _CRASH_REASON for _, r in results):
        # Every case died: the workers cannot run here at all; quarantining would hide that.
        raise RuntimeError("every prepare worker process died; run with workers=0 to see why")
    for spec, result in results:
        finish(spec, result)


def _pool_round(pending: deque[CaseSpec], job: CaseJob, workers: int,
                start: Callable[[CaseSpec], bool], finish: Finish) -> list[CaseSpec]:
    """Feed ``pending`` to one pool, a few cases in flight; returns the in-flight cases of a crash."""
    in_flight: dict[Future, CaseSpec] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as pool:
        try:
            while pending or in_flight:
                while pending and len(in_flight) < 2 * workers:
                    if not start(pending[0]):
                        pending.popleft()
                        continue
                    try:
                        fut = pool.submit(prepare_case, pending[0], job)
                    except BrokenProcessPool:  # broke before we saw why; this case is innocent
                        return list(in_flight.values()) or [pending.popleft()]
                    in_flight[fut] = pending.popleft()
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        return list(in_flight.values())
                    finish(in_flight.pop(fut), result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return []


def _run_alone(spec: CaseSpec, job: CaseJob) -> dict[str, Any]:
    """Prepare one suspect case in its own worker process, so a crash names this case."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_mp_context()) as pool:
        try:
            return pool.submit(prepare_case, spec, job).result()
        except BrokenProcessPool:
            return {"reason": _CRASH_REASON}


def _mp_context() -> multiprocessing.context.BaseContext:
    """fork on Linux (no re-import of the caller's script, instant start), spawn elsewhere."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method)


def _record_result(spec: CaseSpec, result: dict[str, Any], report: PrepareReport,
                   writer: ManifestWriter, was_quarantined: dict[str, str | None]) -> None:
    """Append a manifest line, or a quarantine entry, for a finished case."""
    if "record" in result:
        if writer.commit(result["record"]):
            report.prepared += 1
            report.smaller_than_crop += bool(result["record"].get("smaller_than_crop"))
        else:
            report.skipped += 1
        if spec.image in was_quarantined:  # fixed since an earlier run
            writer.quarantine({"source": spec.image, "resolved": True, "time": now()})
        return
    reason = " ".join(str(result["reason"]).split())
    if was_quarantined.get(spec.image) != reason:  # the same verdict again adds no line
        writer.quarantine({"name": spec.name, "source": spec.image, "label": spec.label,
                           "reason": reason, "time": now()})
    report.quarantined += 1
    report.messages.append(f"quarantined {spec.name} ({spec.image}): {reason}")


class _Claims:
    """Per-case advisory locks (``.claims/<name>``) held while a case is being prepared.

    The lock files stay until a plain (unsharded) prepare sweeps them: removing a lock file
    while another process may be opening it would let two processes hold "the" lock.
    """

    def __init__(self, root: Path) -> None:
        self.folder = root / _CLAIMS
        self.folder.mkdir(exist_ok=True)
        self._held: dict[str, contextlib.ExitStack] = {}

    def release_all(self) -> None:
        for name in list(self._held):
            self.release(name)

    def acquire(self, name: str) -> bool:
        """Claim ``name``; False when another process holds it."""
        if name in self._held:
            return True
        stack = contextlib.ExitStack()
        if not stack.enter_context(locked(self.folder / name, blocking=False)):
            stack.close()
            return False
        self._held[name] = stack
        return True

    def release(self, name: str) -> None:
        stack = self._held.pop(name, None)
        if stack is not None:
            stack.close()
