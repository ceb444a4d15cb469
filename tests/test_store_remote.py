"""A store on S3 (a moto server on 127.0.0.1, started and killed by the test) gives the local crops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mim3d.cli import main
from mim3d.config import DataConfig
from mim3d.data.sampler import PretrainCropDataset
from mim3d.data.store import PreparedStore

for _pkg in ("s3fs", "moto", "blosc2"):
    pytest.importorskip(_pkg, reason=f"remote-store tests need {_pkg} (pip install 'mim3d[test]')")
pytest.importorskip("flask", reason="moto's server mode needs flask (pip install 'moto[server]')")

BUCKET = "mim3d-test"
CROP = (32, 32, 32)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on the loopback address, in its own process group."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the moto S3 server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture()
def s3_env(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Credentials and endpoint through the usual AWS variables; a fresh mim3d cache."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("MIM3D_CACHE", str(tmp_path / "cache"))
    return s3_endpoint


def _upload(local: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.put(str(local), url.removeprefix("s3://"), recursive=True)


@pytest.mark.parametrize("fmt", ["blosc2", "npy"])
def test_s3_store_gives_the_local_crops(s3_env: str, tmp_path: Path, fmt: str,
                                        synthetic_store: Path) -> None:
    from mim3d.data.prepare import prepare

    src = Path(PreparedStore.open(synthetic_store).cases[0].source).parent
    local = tmp_path / "store"
    prepare([src], local, data=DataConfig(), workers=0, progress=False, fmt=fmt)
    url = f"s3://{BUCKET}/{fmt}/store"
    _upload(local, url)
    data = DataConfig(body_aware=True)
    here = PretrainCropDataset(local, crop_size=CROP, data=data, seed=5)
    there = PretrainCropDataset(url, crop_size=CROP, data=data, seed=5)
    assert str(there.store.root) == url and len(there.store) == len(here.store) == 3
    for i in range(12):
        assert here.crop_spec(i) == there.crop_spec(i)
        np.testing.assert_array_equal(here[i].numpy(), there[i].numpy())
    assert main(["store", "verify", url]) == 0


def test_unreachable_or_missing_remote_store_is_one_clear_line(
        s3_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="not a prepared store"):
        PreparedStore.open(f"s3://{BUCKET}/nothing/here")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nobody there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert main(["store", "info", f"s3://{BUCKET}/blosc2/store"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read store.json" in err[0] and "credentials" in err[0]


def test_pretrain_trains_on_an_s3_store(s3_env: str, tmp_path: Path,
                                        synthetic_store: Path) -> None:
    """`mim3d pretrain --data s3://...` reads the remote store (never prepares it) and its first
    step's loss equals the same run's on the local copy: the same crops reached the model."""
    import json

    from conftest import SHRINK

    from mim3d.data.prepare import prepare

    src = Path(PreparedStore.open(synthetic_store).cases[0].source).parent
    local = tmp_path / "store"
    prepare([src], local, data=DataConfig(), workers=0, progress=False, fmt="blosc2")
    url = f"s3://{BUCKET}/pretrain/store"
    _upload(local, url)
    losses = []
    for data, run in ((url, tmp_path / "remote_run"), (str(local), tmp_path / "local_run")):
        argv = ["pretrain", "--data", data, "--out", str(run), "--preset", "tiny",
                "--max-steps", "1"]
        assert main(argv + [a for item in SHRINK for a in ("--set", item)]) == 0
        assert not (run / "store").exists()  # the store was read where it is, not prepared
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses.append(next(r["loss"] for r in rows if "loss" in r))
    assert losses[0] == losses[1]
