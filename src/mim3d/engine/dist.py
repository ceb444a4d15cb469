"""Distributed helpers for ``torchrun`` launches (DDP, NCCL on GPU, gloo on CPU).

Without ``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment) everything degrades to a
single process: :func:`init_distributed` returns rank 0 of 1, and the collectives are no-ops.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "PeerLostError",
    "all_reduce_mean",
    "barrier",
    "capture_rng_state",
    "cleanup",
    "gather_rng_states",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "peer_errors",
    "restore_rng_state",
]


#: Seconds a collective may wait for the other ranks (``train.dist_timeout_s``): long enough for
#: rank 0 to write a checkpoint or prepare a store while the others wait, short enough that a
#: rank whose peers died does not hang for PyTorch's default 30 minutes.
DEFAULT_TIMEOUT_S = 600.0


class PeerLostError(ValueError):
    """Another rank died or stopped answering: this rank stops with one clear line."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _pick_device(local_rank: int, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(
    *, backend: str | None = None, device: str | torch.device | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> DistInfo:
    """Join the process group described by torchrun's environment, or run single-process.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (``MASTER_ADDR``/``MASTER_PORT`` are read
    by ``init_process_group``). Safe to call twice: an existing group is reused.

    Args:
        backend: process-group backend; default NCCL when the device is CUDA, gloo otherwise.
        device: force a device (e.g. ``"cpu"`` to run gloo on a GPU machine); default
            ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        timeout_s: how long a collective waits for the other ranks before it fails.

    Returns:
        A :class:`DistInfo`. On CUDA, the current device is set to ``info.device``.
    """
    if not _launched_by_torchrun() and not dist.is_initialized():
        dev = _pick_device(0, device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev, is_main=True)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(local_rank, device)
    if dev.type == "cuda":
        # before init: NCCL binds each rank to the current device
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=chosen, init_method="env://", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=float(timeout_s)))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                    is_main=rank == 0)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 when not distributed)."""
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if _active() else 1


def barrier() -> None:
    """Wait for every rank; no-op when not distributed."""
    if not _active() or get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        # naming the device avoids NCCL guessing it (and warning) from the rank
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks, for logging (no gradient).

    Args:
        tensor: any shape; integer tensors are averaged as float32. Must live on the device
            of the backend (CUDA for NCCL).

    Returns:
        A new detached tensor; the input is left unchanged.
    """
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    if _active() and get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= get_world_size()
    return out


def cleanup() -> None:
    """Leave the process group (no-op when none).

    Call it only after a clean end on every rank: destroying the group while a peer is still
    in a collective makes that peer wait for its timeout.
    """
    if _active():
        # Every rank reaches the end before any tears down: a rank whose peer has already
        # exited can block in gloo's teardown (its transport threads wait on a closed pair).
        dist.barrier()
        dist.destroy_process_group()


#: How gloo words a peer that died (its connection reset or closed) or did not answer in time;
#: NCCL and the store raise ``torch.distributed.DistError`` subclasses.
_COMM_FAILURE = re.compile(r"connection (reset|closed|refused)|closed by peer|timed out",
                           re.IGNORECASE)


def _comm_detail(error: BaseException) -> str:
    """The informative part of a backend error, e.g. ``Connection reset by peer``."""
    text = " ".join(str(error).split())
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[.../pair.cc:537] " source location
    return text.split(". ")[0][:160]


@contextlib.contextmanager
def peer_errors(info: DistInfo) -> Iterator[None]:
    """Turn a collective that failed because a peer is gone into one :class:`PeerLostError`.

    Under torchrun a rank whose peer died gets a gloo/NCCL error (at once when the peer's
    connection is reset, after ``train.dist_timeout_s`` when it just stops answering); the
    traceback of it says little. Other errors pass through unchanged.
    """
    try:
        yield
    except RuntimeError as exc:
        comm = isinstance(exc, dist.DistError) or _COMM_FAILURE.search(str(exc))
        if info.world_size == 1 or not comm:
            raise
        raise PeerLostError(
            f"rank {info.rank} of {info.world_size} lost contact with the other ranks "
            f"({_comm_detail(exc)}): a peer died or did not answer within train.dist_timeout_s; "
            "stopping. Check the other ranks' logs, then continue with --resume") from None


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy (legacy global), torch CPU and, if in use, CUDA.

    Returns:
        Plain containers only (numpy's state becomes a dict with an int64 tensor of keys), so it
        survives ``torch.load(weights_only=True)``.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    # only when CUDA is already in use: capturing must not initialise CUDA in CPU runs
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are skipped without CUDA)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = np.asarray(torch.as_tensor(npy["keys"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state((npy["bit_generator"], keys, int(npy["pos"]), int(npy["has_gauss"]),
                         float(npy["cached_gaussian"])))
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        for index in range(min(len(cuda_states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda_states[index].cpu().to(torch.uint8), index)


def gather_rng_states() -> list[dict[str, Any]]:
    """RNG states of every rank, in rank order (a collective: call it on all ranks).

    Pass the result to ``checkpoint.save_checkpoint`` on rank 0 so that each rank gets its own
    stream back on resume.
    """
    own = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return gathered
