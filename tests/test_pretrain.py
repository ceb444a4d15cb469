"""End-to-end tests of ``mim3d pretrain`` (mim3d.engine.pretrain/train/monitor) on CPU phantoms.

The model is the ``tiny`` preset shrunk further through ``--set`` (about 0.5 M parameters,
well under a second per step on two cores); runs that compare weights are deterministic and
run with the same thread count in every process, so "equal" means bitwise equal.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SHRINK
from safetensors.torch import load_file

from mim3d.cli import main
from mim3d.config import load_config
from mim3d.engine.optim import set_lr
from mim3d.factory import build_mim, geometry_from_config
from mim3d.masking import LevelMasks, sample_levels

REF_STEPS = 8  # runs cut short and resumed are compared with the reference at this step
#: The reference run: 20 steps in which the loss must fall, checkpoints every 4 steps (kept).
REF = ("optim.lr=3e-3", "optim.warmup_steps=3", "train.image_every=10", "train.ckpt_every=4",
       "train.keep_last=10")
THREADS = torch.get_num_threads()  # subprocesses get the same: kernels may split work by it


def _pretrain(data: Path, out: Path, *extra: str, steps: int | None = None,
              resume: bool = False) -> list[str]:
    """CLI arguments of a shrunk tiny run; ``extra`` are more ``--set`` overrides."""
    argv = ["pretrain", "--data", str(data), "--out", str(out), "--preset", "tiny"]
    argv += [arg for item in SHRINK + list(extra) for arg in ("--set", item)]
    argv += ["--max-steps", str(steps)] if steps is not None else []
    return argv + (["--resume"] if resume else [])


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _error_line(err: str) -> str:
    """The one error line, after any progress-bar output (tqdm redraws with carriage returns)."""
    lines = [line for line in err.splitlines() if "\r" not in line and line.strip()]
    errors = [line for line in lines if line.startswith("mim3d pretrain: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def _spawn(argv: list[str], log: Path, **kwargs: object) -> subprocess.Popen:
    """``python -m mim3d ARGV`` with its output in ``log`` (a pipe could fill up and block)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "mim3d", *argv], env=env,
                                stdout=handle, stderr=subprocess.STDOUT, **kwargs)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _metrics(run: Path) -> list[dict]:
    """Logged rows; a line being written right now (no newline yet) is left out."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"ckpt_{step:08d}" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"run ended early (rc {proc.returncode}): "
                        f"{proc.log.read_text()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared store of three 72x72x64 phantoms (tiny preset's data settings)."""
    from mim3d.data.phantom import write_cohort
    from mim3d.data.prepare import prepare

    root = tmp_path_factory.mktemp("pretrain_data")
    datalist = write_cohort(root / "phantoms", 3, seed=0, shape=(72, 72, 64))
    cfg = load_config("pretrain", "tiny")
    report = prepare([datalist], root / "store", data=cfg.data, workers=0, progress=False)
    assert report.in_store == 3, report.messages
    return root / "store"


@pytest.fixture(scope="module")
def reference(store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """An uninterrupted 20-step run (in this process): (run folder, stdout, stderr)."""
    torch.set_num_threads(THREADS)
    run = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as mp:
        out, err = io.StringIO(), io.StringIO()
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        assert main(_pretrain(store, run, *REF, steps=20)) == 0, err.getvalue()[-2000:]
    return run, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def short_run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run with a checkpoint, to copy and damage."""
    run = tmp_path_factory.mktemp("short") / "run"
    assert main(_pretrain(store, run, steps=2)) == 0
    return run


# ------------------------------------------------------------------ training works and reports


def test_loss_falls_and_run_folder_is_complete(reference: tuple[Path, str, str]) -> None:
    run, out, err = reference
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("step", "loss", "recon_1", "recon_2", "recon_3", "align_1_2", "align_2_3",
                "lr", "grad_norm", "samples", "samples_per_s", "data_wait", "peak_mem_mb"):
        assert key in rows[0], key
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.1, (first, last)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "pictures").glob("*.png")) == [
        "recon_00000010.png", "recon_00000020.png"]
    assert (run / "ckpt_00000020" / "model.safetensors").is_file()
    assert "checkpoint" in out
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", err), "progress bar shows no ETA"


def test_learning_rate_schedule_is_logged(reference: tuple[Path, str, str]) -> None:
    rows = _metrics(reference[0])
    lrs = [r["lr"] for r in rows]
    assert lrs[:3] == pytest.approx([3e-3 * k / 3 for k in (1, 2, 3)])  # linear warm-up
    assert all(b < a for a, b in itertools.pairwise(lrs[3:]))  # then cosine decay
    assert [r["samples"] for r in rows] == list(range(1, 21))


# ------------------------------------------------------------------ stopping and resuming


def _assert_equals_reference(run: Path, reference: Path) -> None:
    """Weights at REF_STEPS bitwise equal to the reference's, and the same logged losses."""
    _assert_same_weights(_weights(run, REF_STEPS), _weights(reference, REF_STEPS))
    assert [r["step"] for r in _metrics(run)] == list(range(1, REF_STEPS + 1))
    ref_loss = [r["loss"] for r in _metrics(reference)[:REF_STEPS]]
    assert [r["loss"] for r in _metrics(run)] == ref_loss


@pytest.mark.slow
def test_max_steps_then_resume_equals_uninterrupted(store: Path, reference: tuple[Path, str, str],
                                                    tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(_pretrain(store, run, *REF, steps=REF_STEPS // 2 + 1)) == 0
    assert main(_pretrain(store, run, steps=REF_STEPS, resume=True)) == 0
    _assert_equals_reference(run, reference[0])


@pytest.mark.slow
def test_fp16_grad_scaler_state_survives_resume(store: Path, tmp_path: Path) -> None:
    """fp16 autocast + GradScaler (the CPU has one too): the scaler state is restored.

    CPU fp16 kernels are ~30x slower than fp32, so this run uses a half-size geometry
    (2x2x2 tokens per volume) that is still valid: level-1 resize, level-3 upsampling.
    """
    mini = ("optim.precision=fp16", "geometry.crop_sizes=[[32,32,32],[16,16,16],[8,8,8]]",
            "geometry.input_size=[16,16,16]")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_pretrain(store, whole, *mini, steps=3)) == 0
    assert main(_pretrain(store, split, *mini, steps=2)) == 0
    assert main(_pretrain(store, split, steps=3, resume=True)) == 0
    _assert_same_weights(_weights(split, 3), _weights(whole, 3))
    state = torch.load(split / "ckpt_00000003" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_equals_uninterrupted(
        store: Path, reference: tuple[Path, str, str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    # two loader workers here: the data stream must not depend on them
    proc = _spawn(_pretrain(store, run, *REF, "train.ckpt_every=2", "train.workers=2",
                            steps=REF_STEPS), tmp_path / "log.txt")
    _wait_for(lambda: (run / "ckpt_00000002").is_dir(), proc)
    _wait_for(lambda: any(r["step"] >= 3 for r in _metrics(run)), proc)  # now inside step 4
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert main(_pretrain(store, run, steps=REF_STEPS, resume=True)) == 0
    _assert_equals_reference(run, reference[0])


def test_sigterm_checkpoints_logs_the_last_step_and_exits_143(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A preemption notice between logging intervals: the stopped step is still logged, a
    checkpoint is written, and the exit code says the run did not finish (128 + SIGTERM)."""
    import mim3d.engine.pretrain as pretrain_mod

    original = pretrain_mod._Run.train_step

    def step_then_signal(self: object, step: int, batches: object) -> object:
        out = original(self, step, batches)
        if step == 1:
            signal.raise_signal(signal.SIGTERM)  # as a cluster's preemption notice would arrive
        return out

    monkeypatch.setattr(pretrain_mod._Run, "train_step", step_then_signal)
    run = tmp_path / "run"
    rc, _, err = _cli(_pretrain(store, run, "train.log_every=1000", steps=40), capsys)
    assert rc == 128 + signal.SIGTERM == 143, err[-2000:]
    assert "stopped by a signal at step 2" in err
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [2] and rows[0]["loss"] > 0  # the mean of steps 1-2
    assert (run / "latest").read_text().strip() == "ckpt_00000002"


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(store: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group, loader workers included: they ignore it, the
    main process checkpoints and exits with 128 + SIGINT."""
    run = tmp_path / "run"
    proc = _spawn(_pretrain(store, run, "train.workers=2", steps=40), tmp_path / "log.txt",
                  start_new_session=True)
    try:
        _wait_for(lambda: any(r["step"] >= 2 for r in _metrics(run)), proc)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 128 + signal.SIGINT == 130, output[-2000:]
    assert "stopped by a signal" in output
    last = _metrics(run)[-1]["step"]
    assert 2 <= last < 40
    assert (run / f"ckpt_{last:08d}" / "model.safetensors").is_file()
    assert (run / "latest").read_text().strip() == f"ckpt_{last:08d}"


def test_resume_without_checkpoint_starts_fresh(store: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # a run that died early
    rc, _, err = _cli(_pretrain(store, run, steps=1, resume=True), capsys)
    assert rc == 0, err
    assert "no checkpoint" in err and "starting from step 0" in err
    assert [r["loss"] for r in _metrics(run)] != [9.0]
    assert (run / "ckpt_00000001").is_dir() and (run / "config.yaml").is_file()


def test_resume_uses_the_run_config_even_without_config_yaml(store: Path, short_run: Path,
                                                            tmp_path: Path) -> None:
    """The checkpoint's meta.json has the config: the CLI's preset (here base) is not used."""
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    (run / "config.yaml").unlink()
    argv = ["pretrain", "--data", str(store), "--out", str(run), "--max-steps", "3", "--resume"]
    assert main(argv) == 0
    assert (run / "ckpt_00000003").is_dir()
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["dims"] == [8, 16, 32, 64]


def test_rerun_into_a_run_with_checkpoints_is_refused(store: Path, short_run: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    before = _hashes(short_run)
    rc, _, err = _cli(_pretrain(store, short_run, steps=4), capsys)
    assert rc == 2
    assert "--resume" in _error_line(err) and "already holds checkpoints" in err
    assert _hashes(short_run) == before


def test_raw_inputs_are_prepared_into_the_run(store: Path, tmp_path: Path) -> None:
    datalist = store.parent / "phantoms" / "dataset.json"
    run = tmp_path / "run"
    assert main(_pretrain(datalist, run, steps=1)) == 0
    assert (run / "store" / "store.json").is_file() and (run / "ckpt_00000001").is_dir()


# ------------------------------------------------------------------ bad input


def _damage(run: Path, file: str) -> None:
    path = run / "ckpt_00000002" / file
    data = path.read_bytes()
    # the state is cut short (sizes in meta.json differ); the weights keep their size
    path.write_bytes(data[: len(data) // 2] if file == "state.pt" else b"\xff" * len(data))


@pytest.mark.parametrize("case", ["missing-data", "empty-data", "gamma", "max-steps",
                                  "truncated-state", "corrupt-weights", "garbled-config"])
def test_bad_input_is_one_line_and_leaves_the_run_alone(
        case: str, store: Path, short_run: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    if case in ("truncated-state", "corrupt-weights", "garbled-config"):
        shutil.copytree(short_run, run)
        if case == "garbled-config":
            (run / "config.yaml").write_text("model: [unclosed\n")
        else:
            _damage(run, "state.pt" if case == "truncated-state" else "model.safetensors")
        argv = _pretrain(store, run, steps=4, resume=True)
    else:
        run.mkdir()
        (run / "notes.txt").write_text("an earlier attempt\n")
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
        (tmp_path / "empty").mkdir()
        data = {"missing-data": tmp_path / "nope", "empty-data": tmp_path / "empty"}
        extra = ["geometry.gammas=[6,4]"] if case == "gamma" else []
        argv = _pretrain(data.get(case, store), run, *extra,
                         steps=0 if case == "max-steps" else 2)
    before = _hashes(run)
    rc, _, err = _cli(argv, capsys)
    assert rc == 2
    line = _error_line(err)
    assert _hashes(run) == before
    expected = {"missing-data": "does not exist", "empty-data": "no images",
                "gamma": "gamma", "max-steps": "--max-steps", "truncated-state": "state.pt",
                "corrupt-weights": "model.safetensors", "garbled-config": "config.yaml"}[case]
    assert expected in line


def test_a_bad_config_creates_no_run_folder(store: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _cli(_pretrain(store, tmp_path / "new", "geometry.gammas=[6,4]", steps=1),
                      capsys)
    assert rc == 2 and "gamma" in err
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ divergence


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import mim3d.engine.train as train_mod

    real = train_mod.compute_losses

    def poisoned(output, cfg, step):
        losses = real(output, cfg, step)
        if step >= 2:  # the third step diverges
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train_mod, "compute_losses", poisoned)
    run = tmp_path / "run"
    rc, _, err = _cli(_pretrain(store, run, "train.ckpt_every=2", steps=6), capsys)
    assert rc == 2
    line = _error_line(err)
    assert "loss is nan at step 3" in line and "ckpt_00000002" in line
    assert (run / "latest").read_text().strip() == "ckpt_00000002"
    assert not (run / "ckpt_00000003").exists()
    assert max(r["step"] for r in _metrics(run)) == 2


def test_huge_learning_rate_stops_cleanly(store: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    rc, _, err = _cli(_pretrain(store, run, "optim.lr=1e30", "optim.grad_clip=0", steps=6),
                      capsys)
    assert rc == 2
    line = _error_line(err)
    assert re.search(r"(loss|gradient norm) is (nan|inf)", line) and "last good checkpoint" in line


# ------------------------------------------------------------------ accumulation, switches


def _same_masks(batch: int, geometry, generator, *, source: str = "masked") -> list[LevelMasks]:
    """Every sample gets the masks of ``sample_levels(1, ...)`` with seed 0 (parent-major)."""
    one = sample_levels(1, geometry, torch.Generator().manual_seed(0), source=source)
    out = []
    for m in one:
        cat = {f: torch.cat([getattr(m, f)] * batch) for f in
               ("mask", "ids_keep", "ids_mask", "ids_restore", "unit_mask", "boxes",
                "parent_unit")}
        parent_count = out[-1].mask.shape[0] // batch if out else 0
        parent = torch.cat([m.parent + (i * parent_count if out else 0) for i in range(batch)])
        out.append(LevelMasks(level=m.level, parent=parent, **cat))
    return out


def test_accumulation_matches_a_larger_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import mim3d.engine.train as train_mod

    monkeypatch.setattr(train_mod, "sample_levels", _same_masks)
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64, 64)
    grads, losses = [], []
    for batch, accum, micro in ((2, 1, [x]), (1, 2, [x[:1], x[1:]])):
        cfg = load_config("pretrain", "tiny", overrides=SHRINK + [
            f"optim.batch_size={batch}", f"optim.accum_steps={accum}"])
        torch.manual_seed(1)
        model = build_mim(cfg)
        opt = torch.optim.AdamW(model.parameters())
        set_lr(opt, 0.0)
        res = train_mod.train_step(model, opt, iter(micro), cfg=cfg,
                                   geometry=geometry_from_config(cfg.geometry), step=0, rank=0,
                                   device=torch.device("cpu"))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        losses.append({k: float(v) for k, v in res.losses.items()})  # 0-dim tensors
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_and_checkpointing_run_and_count_samples(store: Path,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(_pretrain(store, run, "optim.accum_steps=2", "optim.grad_checkpointing=true",
                          steps=2)) == 0
    assert [(r["step"], r["samples"]) for r in _metrics(run)] == [(1, 2), (2, 4)]


def test_state_loads_with_weights_only(short_run: Path) -> None:
    state = torch.load(short_run / "ckpt_00000002" / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["extra"]["data_step"] == 2
    assert state["optimizer"]["state"] and len(state["rng"]) == 1
