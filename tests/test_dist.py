"""Distributed tests on the CPU with gloo: the helpers in a world of two (incl. a peer that stops
answering), and ``torchrun --standalone --nproc_per_node 2 -m mim3d pretrain`` end to end (DDP,
sharding, rank-0-only artefacts, resume, SIGTERM).

torchrun starts every worker in a session of its own, so killing torchrun's process group does
not reach them: on a timeout the tests stop torchrun with SIGTERM (it forwards it to its
workers) and then kill torchrun's group and every worker it started, so no test leaks a process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import SHRINK
from safetensors.torch import load_file

from mim3d.engine import dist as mdist

# ----------------------------------------------------------------------------- helpers, world of 2

PEER_TIMEOUT_S = 2.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    info = mdist.init_distributed(device="cpu", timeout_s=PEER_TIMEOUT_S)
    mean = mdist.all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * rank]))
    torch.manual_seed(rank)  # distinct streams: each rank must get its own back
    states = mdist.gather_rng_states()
    mdist.barrier()
    got = {"rank": info.rank, "world": info.world_size, "main": info.is_main, "mean": mean,
           "n_states": len(states), "own": torch.equal(states[rank]["torch"],
                                                       torch.get_rng_state()),
           "distinct": not torch.equal(states[0]["torch"], states[1]["torch"])}
    if rank == 1:  # a peer that stops answering (hung, or its host went away)
        time.sleep(3 * PEER_TIMEOUT_S)
    else:
        t0 = time.monotonic()
        try:
            with mdist.peer_errors(info):
                mdist.barrier()
        except mdist.PeerLostError as exc:
            got.update(error=str(exc), waited=time.monotonic() - t0)
    torch.save(got, Path(out_dir) / f"rank{rank}.pt")


def test_gloo_world_of_two_and_a_peer_that_stops_answering(tmp_path: Path) -> None:
    mp.spawn(_gloo_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert (got["rank"], got["world"], got["main"]) == (rank, 2, rank == 0)
        assert torch.equal(got["mean"], torch.tensor([1.5, 5.0]))
        assert got["n_states"] == 2 and got["own"] and got["distinct"]
    lost = torch.load(tmp_path / "rank0.pt", weights_only=True)
    # rank 0 gives up after train.dist_timeout_s (not PyTorch's 30 minutes), in one line
    assert PEER_TIMEOUT_S * 0.9 <= lost["waited"] < PEER_TIMEOUT_S + 2.5, lost["waited"]
    assert lost["error"].startswith("rank 0 of 2 lost contact with the other ranks (")
    assert "Timed out" in lost["error"] and "--resume" in lost["error"]
    assert "\n" not in lost["error"]


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


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun (it forwards it), then SIGKILL its group and its workers."""
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    for pid in [*workers, *_children(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _launch(store: Path, run: Path, steps: int, log: Path, *extra: str,
            resume: bool = False) -> subprocess.Popen:
    """Two gloo ranks of ``mim3d pretrain`` in a session of their own, output in ``log``."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", "-m", "mim3d", "pretrain", "--data", str(store),
            "--out", str(run), "--preset", "tiny", "--max-steps", str(steps)]
    for item in [*SHRINK, "train.ckpt_every=2", "train.keep_last=5", *extra]:
        argv += ["--set", item]
    argv += ["--resume"] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as handle:
        return subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _torchrun(store: Path, run: Path, steps: int, *, resume: bool = False) -> str:
    """Run to the end (300 s at most); returns the combined output (fails on rc != 0)."""
    log = run.parent / f"torchrun_{steps}{'_resume' if resume else ''}.log"
    proc = _launch(store, run, steps, log, resume=resume)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        _stop(proc)
        pytest.fail(f"torchrun did not exit within 300 s: {log.read_text()[-3000:]}")
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    return output


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
def test_torchrun_resume_equals_uninterrupted(ddp_run: Path, store: Path, tmp_path: Path) -> None:
    """The run as it was at its step-2 checkpoint (as a kill after it would leave it), resumed."""
    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    shutil.rmtree(run / "ckpt_00000004")
    (run / "latest").write_text("ckpt_00000002\n")
    out = _torchrun(store, run, 4, resume=True)
    assert "resumed from" in out and "at step 2" in out
    a = load_file(str(run / "ckpt_00000004" / "model.safetensors"))
    b = load_file(str(ddp_run / "ckpt_00000004" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(ddp_run)]


@pytest.mark.slow
def test_torchrun_sigterm_checkpoints_and_exits_nonzero(store: Path, tmp_path: Path) -> None:
    """A preempted job: torchrun forwards SIGTERM, both ranks checkpoint together and exit 143,
    so torchrun (and a scheduler above it) sees a run that did not finish."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _launch(store, run, 40, log, "train.ckpt_every=1000")
    try:
        end = time.monotonic() + 240
        while not (run / "metrics.jsonl").is_file() and proc.poll() is None:
            assert time.monotonic() < end, log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            _stop(proc)
    output = log.read_text()
    assert proc.returncode != 0, output[-3000:]
    assert "stopped by a signal" in output
    last = _metrics(run)[-1]["step"]
    assert 1 <= last < 40 and (run / "latest").read_text().strip() == f"ckpt_{last:08d}"
