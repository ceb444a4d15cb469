"""Distributed tests on the CPU with gloo: the helpers in a world of two, and
``torchrun --standalone --nproc_per_node 2 -m mim3d pretrain`` end to end (DDP, sharding,
rank-0-only artefacts, resume)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import SHRINK
from safetensors.torch import load_file

from mim3d.engine import dist as mdist

# ----------------------------------------------------------------------------- helpers, world of 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    info = mdist.init_distributed(device="cpu")
    try:
        mean = mdist.all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * rank]))
        mdist.seed_everything(0, info.rank)
        states = mdist.gather_rng_states()
        mdist.barrier()
        torch.save({"rank": info.rank, "world": info.world_size, "main": info.is_main,
                    "mean": mean, "n_states": len(states),
                    "distinct": not torch.equal(states[0]["torch"], states[1]["torch"])},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        mdist.cleanup()


def test_gloo_world_of_two(tmp_path: Path) -> None:
    mp.spawn(_gloo_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert (got["rank"], got["world"], got["main"]) == (rank, 2, rank == 0)
        assert torch.equal(got["mean"], torch.tensor([1.5, 5.0]))
        assert got["n_states"] == 2 and got["distinct"]


# ----------------------------------------------------------------------------- torchrun pretrain


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared store of three 72x72x64 phantoms (tiny preset's data settings)."""
    from mim3d.config import load_config
    from mim3d.data.phantom import write_cohort
    from mim3d.data.prepare import prepare

    root = tmp_path_factory.mktemp("dist_data")
    datalist = write_cohort(root / "phantoms", 3, seed=0, shape=(72, 72, 64))
    cfg = load_config("pretrain", "tiny")
    prepare([datalist], root / "store", data=cfg.data, workers=0, progress=False)
    return root / "store"


def _torchrun(store: Path, run: Path, steps: int, *, resume: bool = False) -> str:
    """Two gloo ranks of ``mim3d pretrain``; returns the combined output (fails on rc != 0)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", "-m", "mim3d", "pretrain", "--data", str(store),
            "--out", str(run), "--preset", "tiny", "--max-steps", str(steps)]
    for item in SHRINK:
        argv += ["--set", item]
    argv += ["--resume"] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, check=False, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    _torchrun(store, run, 4)
    return run


@pytest.mark.slow
def test_torchrun_gloo_trains_and_checkpoints_on_rank_zero(ddp_run: Path) -> None:
    rows = _metrics(ddp_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: no doubled lines
    assert [r["samples"] for r in rows] == [2, 4, 6, 8]  # batch 1 on each of two ranks
    assert len(list((ddp_run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (ddp_run / "latest").read_text().strip() == "ckpt_00000004"
    assert not list(ddp_run.glob("*.tmp-*"))
    state = torch.load(ddp_run / "ckpt_00000004" / "state.pt", weights_only=True)
    assert state["extra"]["world_size"] == 2 and len(state["rng"]) == 2


@pytest.mark.slow
def test_torchrun_resume_equals_uninterrupted(store: Path, ddp_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _torchrun(store, run, 2)
    out = _torchrun(store, run, 4, resume=True)
    assert "resumed from" in out and "at step 2" in out
    a = load_file(str(run / "ckpt_00000004" / "model.safetensors"))
    b = load_file(str(ddp_run / "ckpt_00000004" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(ddp_run)]
