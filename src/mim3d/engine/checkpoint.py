"""Atomic, resumable training checkpoints (DESIGN §5).

A checkpoint is a folder ``<run_dir>/ckpt_<step:08d>/`` holding ``model.safetensors`` (weights;
tied tensors stored twice), ``state.pt`` (optimizer / scheduler / scaler state, per-rank RNG
states, step, the caller's ``extra_state``; plain containers only, so it loads with
``torch.load(..., weights_only=True)``) and ``meta.json`` (format, step, versions, UTC time,
config, and the byte sizes of the other two files to detect truncation).

The folder is written as ``<name>.tmp-<pid>`` and renamed into place, then the text file
``<run_dir>/latest`` is replaced atomically; a crash at any moment leaves the previous or the new
checkpoint, never a half-written one under a final name. File names, lookup (``find_latest``)
and ``meta.json`` reading live in :mod:`mim3d.runfolder`; they are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mim3d import __version__
from mim3d.engine.dist import capture_rng_state, gather_rng_states, get_rank, restore_rng_state
from mim3d.fileio import fsync_path, replace_folder
from mim3d.runfolder import (
    CHECKPOINT_FILES,
    LATEST_FILE,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    damaged,
    find_latest,
    list_checkpoints,
    one_line,
    read_meta,
)

__all__ = [
    "LATEST_FILE", "META_FILE", "MODEL_FILE", "STATE_FILE", "CheckpointError",
    "capture_rng_state", "checkpoint_name", "find_latest", "gather_rng_states",
    "load_checkpoint", "restore_rng_state", "save_checkpoint", "unwrap_model",
]  # fmt: skip

FORMAT_VERSION = 1
_TMP_RE = re.compile(r"(?:ckpt_\d{8,}|latest)\.tmp-(\d+)")  # a save in progress, or left by a kill


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------- saving


def _to_plain(obj: Any, where: str) -> Any:
    """Copy of ``obj`` made of containers that ``torch.load(weights_only=True)`` accepts."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, np.generic):  # numpy scalars are not allowed by weights_only
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True))
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a checkpoint "
        "cannot hold; store dicts, lists, tensors, numbers and strings only (e.g. vars(args))"
    )


def _weights_for_safetensors(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, non-shared tensors (safetensors refuses shared or strided storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model state entry {key!r} is not a tensor; cannot save it")
        t = value.detach()
        if t.device.type != "cpu":
            out[key] = t.cpu().contiguous()  # the copy owns fresh storage
            continue
        storage = t.untyped_storage()
        shared = storage.data_ptr() in seen and t.numel() > 0
        partial = storage.nbytes() != t.numel() * t.element_size()
        seen.add(storage.data_ptr())
        out[key] = t.clone().contiguous() if shared or partial or not t.is_contiguous() else t
    return out


def _json_config(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return config


def _fsync_write(path: Path, data: bytes | None = None) -> None:
    """Write ``data`` to ``path`` (or just flush an existing file) and fsync it."""
    with open(path, "wb" if data is not None else "rb+") as handle:
        if data is not None:
            handle.write(data)
            handle.flush()
        os.fsync(handle.fileno())


def _write_pointer(run_dir: Path, name: str) -> None:
    tmp = run_dir / f"{LATEST_FILE}.tmp-{os.getpid()}"
    _fsync_write(tmp, (name + "\n").encode())
    os.replace(tmp, run_dir / LATEST_FILE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove_stale_temps(run_dir: Path) -> None:
    """Delete ``*.tmp-<pid>`` leftovers of a process killed mid-save (SIGKILL, OOM killer).

    Only folders/files whose writer is no longer running are touched, so a save in flight in
    another process is never disturbed.
    """
    for entry in run_dir.iterdir():
        match = _TMP_RE.fullmatch(entry.name)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _prune(run_dir: Path, keep_last: int, keep: Path) -> None:
    folders = [path for _, path in list_checkpoints(run_dir, complete_only=False)]
    for path in folders[:-keep_last]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
    scheduler: Any | None = None,
    extra_state: dict[str, Any] | None = None,
    config: Any | None = None,
    keep_last: int | None = 3,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``<run_dir>/ckpt_<step:08d>/`` atomically and point ``latest`` at it.

    Call on the main rank only (after :func:`gather_rng_states` on all ranks, if distributed).

    Args:
        run_dir: run folder (created if needed).
        step: optimizer steps done so far.
        model: the network; DDP / compile wrappers are unwrapped.
        optimizer: its ``state_dict`` (e.g. Adam moments) is saved.
        scaler: a ``torch.amp.GradScaler`` (or anything with ``state_dict``).
        scheduler: an LR scheduler object, if one is used (mim3d's schedule is stateless).
        extra_state: plain data of the caller, e.g. ``{"data": sampler position, "ema": ...}``.
            numpy scalars/arrays and paths are converted; other objects raise ``TypeError``.
        config: the resolved run config (JSON-able dict or dataclass), stored in ``meta.json``.
        keep_last: keep this many newest checkpoints (by step); ``None`` keeps all. The one
            just written is never removed.
        rng_states: one RNG state per rank from :func:`gather_rng_states`; default: this
            process's state only.

    Returns:
        The checkpoint folder.

    Raises:
        TypeError: when ``extra_state`` (or ``config``) holds objects that cannot be stored;
            nothing is written then.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None; got {keep_last}")
    state = _to_plain({
        "format_version": FORMAT_VERSION, "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states if rng_states is not None else [capture_rng_state()],
        "extra": dict(extra_state or {}),
    }, "state")
    weights = _weights_for_safetensors(unwrap_model(model).state_dict())
    meta: dict[str, Any] = {
        "format": "mim3d-checkpoint", "format_version": FORMAT_VERSION, "step": int(step),
        "mim3d_version": __version__, "torch_version": torch.__version__,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": _json_config(config),
    }
    json.dumps(meta, default=str)  # fail before touching the disk
    run_dir = Path(run_dir)
    final = _write_atomically(run_dir, checkpoint_name(step), weights, state, meta)
    _remove_stale_temps(run_dir)
    if keep_last is not None:
        _prune(run_dir, keep_last, keep=final)
    return final


def _write_atomically(run_dir: Path, name: str, weights: dict[str, torch.Tensor],
                      state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write the three files into ``<name>.tmp-<pid>``, rename it, then update ``latest``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = run_dir / name, run_dir / f"{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt",
                                                            "step": str(meta["step"])})
        torch.save(state, tmp / STATE_FILE)
        meta["files"] = {f: (tmp / f).stat().st_size for f in (MODEL_FILE, STATE_FILE)}
        _fsync_write(tmp / META_FILE, json.dumps(meta, indent=2, default=str).encode())
        _fsync_write(tmp / MODEL_FILE)
        _fsync_write(tmp / STATE_FILE)
        # the commit point: before it only the .tmp folder exists
        replace_folder(tmp, final, final.with_name(f"{final.name}.old-{os.getpid()}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(run_dir, name)
    fsync_path(run_dir)
    return final


# ---------------------------------------------------------------------------- loading


def _load_model(folder: Path, model: nn.Module, map_location: str, strict: bool) -> Any:
    path = folder / MODEL_FILE
    try:
        weights = load_file(str(path), device=map_location)
    except Exception as error:  # safetensors raises its own error types
        raise damaged(path, f"cannot be read ({one_line(error)})") from error
    target = unwrap_model(model)
    expected = set(target.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}; it was written with another preset or "
                              "--set model.* override: use the run's own preset")
    try:
        return target.load_state_dict(weights, strict=strict)
    except RuntimeError as error:  # e.g. shape mismatches, which strict=False still rejects
        detail = one_line(error).split("state_dict for ", 1)[-1]
        raise CheckpointError(f"{path} does not fit this model ({detail})") from error


def _load_state(path: Path, map_location: str) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of ``state.pt`` with one-line errors."""
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise damaged(path, "not a torch.save archive (truncated or overwritten?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = one_line(error).split(". ")[0]
        raise damaged(path, f"holds objects that weights_only loading refuses ({first})"
                       ) from error
    except Exception as error:  # zip and stream errors of a damaged archive
        raise damaged(path, f"cannot be read ({one_line(error)})") from error
    if not isinstance(state, dict) or "step" not in state:
        raise damaged(path, "not a mim3d training state")
    return state


def _restore_own_rng(states: Any) -> None:
    states = [states] if isinstance(states, dict) else list(states or [])
    rank = get_rank()
    if rank < len(states):
        restore_rng_state(states[rank])
    else:
        warnings.warn(f"checkpoint has RNG states for {len(states)} rank(s); rank {rank} keeps "
                      "its current RNG state", stacklevel=3)


def _load_component(obj: Any, saved: Any, what: str, path: Path) -> None:
    if obj is None:
        return
    if saved is None:
        warnings.warn(f"{path} has no {what} state; the {what} starts fresh", stacklevel=3)
        return
    try:
        obj.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{path}: the saved {what} state does not fit this {what} "
                              f"({one_line(error)})") from error


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
    scheduler: Any | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint folder (or the newest one of a run folder) into live objects.

    Args:
        path: a ``ckpt_*`` folder, or a run folder (then :func:`find_latest` is used).
        model: receives the weights (DDP / compile wrappers are unwrapped).
        optimizer: receives the optimizer state; it is an error if none was saved.
        scaler: receives the grad-scaler state (a warning if none was saved).
        scheduler: receives the scheduler state (a warning if none was saved).
        map_location: device the tensors are loaded to.
        strict: require the weight names to match the model exactly.
        restore_rng: restore this rank's python/numpy/torch/CUDA RNG states.

    Returns:
        ``{"path", "step", "extra_state", "meta", "missing_keys", "unexpected_keys"}``.

    Raises:
        CheckpointError: missing, incomplete, truncated or corrupt files, or state that does
            not fit the given objects; the message is one line naming the file.
    """
    folder: Path | None = Path(path)
    looks_like_checkpoint = checkpoint_step(folder.name) is not None or any(
        (folder / f).exists() for f in CHECKPOINT_FILES)
    if not looks_like_checkpoint:  # a run folder: take its newest complete checkpoint
        folder = find_latest(folder)
    if folder is None:
        raise CheckpointError(f"no complete checkpoint in {path}; check the path")
    meta = read_meta(folder)
    location = str(map_location)
    result = _load_model(folder, model, location, strict)
    state_path = folder / STATE_FILE
    state = _load_state(state_path, location)
    if optimizer is not None and state.get("optimizer") is None:
        raise CheckpointError(f"{state_path} has no optimizer state; load without an optimizer")
    _load_component(optimizer, state.get("optimizer"), "optimizer", state_path)
    _load_component(scaler, state.get("scaler"), "scaler", state_path)
    _load_component(scheduler, state.get("scheduler"), "scheduler", state_path)
    if restore_rng:
        _restore_own_rng(state.get("rng"))
    return {
        "path": folder, "step": int(state["step"]), "extra_state": state.get("extra", {}),
        "meta": meta, "missing_keys": list(result.missing_keys),
        "unexpected_keys": list(result.unexpected_keys),
    }
