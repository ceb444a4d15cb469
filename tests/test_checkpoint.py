"""Tests of mim3d.engine.checkpoint and mim3d.runfolder (and of the single-process distributed
helpers they rely on; the gloo world-of-two test lives in tests/test_dist.py)."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mim3d.engine import dist as mdist
from mim3d.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from mim3d.runfolder import (
    LATEST_FILE,
    find_latest,
    locate_checkpoint,
    read_checkpoint_config,
    read_run_config,
)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 4)
        self.out.weight = nn.Parameter(self.embed.weight.t().contiguous())
        self.tied = nn.Linear(6, 4)
        self.tied.weight = self.out.weight  # tied: shared storage in the state dict
        self.register_buffer("table", torch.arange(24.0).reshape(4, 6)[:, ::2])  # strided

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.embed(x))) + self.tied(self.norm(self.embed(x)))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(3, 4, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _fresh(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _Net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_round_trip_weights_optimizer_and_next_step(tmp_path: Path) -> None:
    model, opt = _fresh(0)
    _train(model, opt, 3, seed=1)
    ckpt = save_checkpoint(tmp_path, step=3, model=model, optimizer=opt,
                           extra_state={"data": {"epoch": 1, "index": 17}},
                           config={"preset": "tiny", "out": tmp_path})
    assert ckpt.name == "ckpt_00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.safetensors",
                                                      "state.pt"]
    other, other_opt = _fresh(5)
    info = load_checkpoint(ckpt, model=other, optimizer=other_opt)
    assert info["step"] == 3 and info["extra_state"] == {"data": {"epoch": 1, "index": 17}}
    assert info["meta"]["config"]["preset"] == "tiny"
    assert info["meta"]["mim3d_version"]
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert other.tied.weight is other.out.weight  # tying survives the load
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        sa, sb = opt.state[p], other_opt.state[q]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    _train(model, opt, 2, seed=9)  # the resumed run continues exactly
    _train(other, other_opt, 2, seed=9)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_loads_with_weights_only_and_rejects_objects(tmp_path: Path) -> None:
    model, opt = _fresh()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ckpt = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scaler=scaler,
                           extra_state={"np_int": np.int64(5), "np_arr": np.arange(3),
                                        "path": Path("/a/b")})
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["extra"] == {"np_int": 5, "np_arr": state["extra"]["np_arr"], "path": "/a/b"}
    assert torch.equal(state["extra"]["np_arr"], torch.arange(3))
    assert state["scaler"]["scale"] == 1024.0
    new_scaler = torch.amp.GradScaler("cpu")
    load_checkpoint(ckpt, model=model, scaler=new_scaler)
    assert new_scaler.get_scale() == 1024.0
    json.loads((ckpt / "meta.json").read_text())
    with pytest.raises(TypeError, match=r"state\['extra'\]\['args'\] is a argparse.Namespace"):
        save_checkpoint(tmp_path, step=2, model=model,
                        extra_state={"args": argparse.Namespace(lr=1)})
    assert not any(p.name.startswith("ckpt_00000002") for p in tmp_path.iterdir())


def test_rng_round_trip(tmp_path: Path) -> None:
    model, _ = _fresh()
    save_checkpoint(tmp_path, step=1, model=model)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.random(), np.random.rand(5), torch.rand(7)  # move the streams on
    load_checkpoint(tmp_path, model=model)
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    state = capture_rng_state()
    a = torch.randn(4)
    restore_rng_state(state)
    assert torch.equal(a, torch.randn(4))


def test_keep_last_pruning_and_latest(tmp_path: Path) -> None:
    model, _ = _fresh()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step=step, model=model, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_00000004",
                                                               "ckpt_00000005"]
    assert (tmp_path / LATEST_FILE).read_text().strip() == "ckpt_00000005"
    # re-saving an older step (rewind) keeps the new one even though it is not the newest
    save_checkpoint(tmp_path, step=2, model=model, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_00000002",
                                                               "ckpt_00000005"]
    assert find_latest(tmp_path) == tmp_path / "ckpt_00000002"
    # saving the same step twice replaces the folder
    save_checkpoint(tmp_path, step=2, model=model, keep_last=None)
    assert find_latest(tmp_path) == tmp_path / "ckpt_00000002"


def test_find_latest_ignores_tmp_and_incomplete(tmp_path: Path) -> None:
    assert find_latest(tmp_path / "missing") is None
    assert find_latest(tmp_path) is None
    model, _ = _fresh()
    good = save_checkpoint(tmp_path, step=3, model=model)
    leftover = tmp_path / "ckpt_00000009.tmp-12345"  # a crashed write
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    incomplete = tmp_path / "ckpt_00000007"
    incomplete.mkdir()
    (incomplete / "meta.json").write_text("{}")
    (tmp_path / LATEST_FILE).write_text("ckpt_00000011\n")  # stale pointer
    assert find_latest(tmp_path) == good
    (tmp_path / LATEST_FILE).unlink()
    assert find_latest(tmp_path) == good
    assert find_latest(good) == good
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors, state\.pt"):
        load_checkpoint(incomplete, model=model)


def test_crash_during_save_leaves_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, _ = _fresh()
    good = save_checkpoint(tmp_path, step=1, model=model)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, step=2, model=model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001", "latest"]
    assert find_latest(tmp_path) == good


@pytest.mark.parametrize("file", ["model.safetensors", "state.pt"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_files_raise_one_clear_line(tmp_path: Path, file: str, damage: str) -> None:
    model, opt = _fresh()
    _train(model, opt, 1, seed=0)
    ckpt = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)
    path = ckpt / file
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, so only the parser can notice
        path.write_bytes(b"\x07" * len(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt, model=model, optimizer=opt)
    message = str(err.value)
    assert "\n" not in message and file in message and "delete" in message
    # also without the size record in meta.json: the parsers themselves must fail cleanly
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=file.replace(".", r"\.")):
        load_checkpoint(ckpt, model=model, optimizer=opt)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    """A state.pt holding an argparse.Namespace (the authors' habit) fails weights_only."""
    model, _ = _fresh()
    ckpt = save_checkpoint(tmp_path, step=1, model=model)
    torch.save({"step": 1, "args": argparse.Namespace(lr=1)}, ckpt / "state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["state.pt"] = (ckpt / "state.pt").stat().st_size
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights_only loading refuses"):
        load_checkpoint(ckpt, model=model)


def test_load_mismatches(tmp_path: Path) -> None:
    model, _ = _fresh()
    ckpt = save_checkpoint(tmp_path, step=1, model=model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(ckpt, model=model, optimizer=torch.optim.SGD(model.parameters(), 0.1))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(ckpt, model=nn.Linear(4, 4))
    info = load_checkpoint(ckpt, model=nn.Linear(4, 6), strict=False)
    assert "weight" in info["missing_keys"] and "norm.weight" in info["unexpected_keys"]
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "nothing", model=model)


def test_ddp_wrapped_model_is_unwrapped(tmp_path: Path) -> None:
    model, _ = _fresh()
    wrapped = nn.DataParallel(model)  # same .module layout as DDP, without a process group
    ckpt = save_checkpoint(tmp_path, step=1, model=wrapped)
    other, _ = _fresh(3)
    load_checkpoint(ckpt, model=nn.DataParallel(other))
    assert torch.equal(other.embed.weight, model.embed.weight)


# ----------------------------------------------------------------------------- distributed helpers


def test_single_process_defaults(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = mdist.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert info.device == torch.device("cpu")
    assert mdist.get_rank() == 0 and mdist.get_world_size() == 1
    mdist.barrier()
    x = torch.tensor([1, 2])
    assert torch.equal(mdist.all_reduce_mean(x), torch.tensor([1.0, 2.0]))
    mdist.cleanup()
    # one process: a backend error is not about peers and passes through unchanged
    with pytest.raises(RuntimeError, match="^gloo"), mdist.peer_errors(info):
        raise RuntimeError("gloo: Connection reset by peer")



def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: its half-written save is garbage
    (tmp_path / f"ckpt_00000001.tmp-{dead.pid}").mkdir()
    (tmp_path / f"latest.tmp-{dead.pid}").write_text("ckpt_00000001\n")
    live = tmp_path / f"ckpt_00000002.tmp-{os.getppid()}"  # a running writer: left alone
    live.mkdir()
    save_checkpoint(tmp_path, step=3, model=nn.Linear(2, 2))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["ckpt_00000003", live.name, "latest"])


def test_locate_checkpoint_and_run_config(tmp_path: Path) -> None:
    from mim3d.config import ConfigError, load_config, save_config, to_dict

    run = tmp_path / "run"
    cfg = load_config("pretrain", "tiny", overrides=["optim.lr=0.25"])
    for step in (2, 4):
        save_checkpoint(run, step=step, model=nn.Linear(2, 2), config=to_dict(cfg))
    latest = run / "ckpt_00000004"
    assert locate_checkpoint(run) == (latest, latest / "model.safetensors", run)
    assert locate_checkpoint(run / "ckpt_00000002").folder == run / "ckpt_00000002"
    weights = latest / "model.safetensors"
    assert locate_checkpoint(weights) == (latest, weights, run)
    with pytest.raises(FileNotFoundError, match="no such run"):
        locate_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        locate_checkpoint(tmp_path)
    # config.yaml wins; without it the newest checkpoint's meta.json is read
    assert read_run_config(run, "pretrain").optim.lr == 0.25
    save_config(load_config("pretrain", "tiny"), run / "config.yaml")
    assert read_run_config(run, "pretrain").optim.lr == load_config("pretrain", "tiny").optim.lr
    assert read_checkpoint_config(latest, "pretrain").optim.lr == 0.25
    assert read_run_config(tmp_path, "pretrain") is None
    (run / "config.yaml").write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml"):
        read_run_config(run, "pretrain")
