"""Hugging Face layout: export (a run, the authors' file), folders and hf:// resolved offline from
a cache laid out as huggingface_hub lays it out, and one-line errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mim3d.cli import main
from mim3d.config import load_config, to_dict
from mim3d.engine.checkpoint import save_checkpoint
from mim3d.factory import build_mim
from mim3d.hub import HubError, resolve_encoder
from mim3d.models.hybrid import HybridEncoder, official_key_to_mim3d
from mim3d.transfer import load_encoder, read_card

pytest.importorskip("huggingface_hub", reason="hf:// needs mim3d[hub]")

_SMALL = ("model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]", "model.num_heads=2",
          "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
          "model.proj_dim=32")
_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = load_config("pretrain", "tiny", overrides=_SMALL)
    root = tmp_path_factory.mktemp("hubrun") / "run"
    save_checkpoint(root, step=5, model=build_mim(cfg), config=to_dict(cfg))
    return root


@pytest.fixture(scope="module")
def hf_folder(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    assert main(["export", str(run), "--out", str(out / "enc.safetensors"), "--hf",
                 str(out / "mim-tiny"), "--license", "apache-2.0"]) == 0
    return out / "mim-tiny"


def test_export_writes_the_three_files_and_they_load(hf_folder: Path) -> None:
    assert sorted(p.name for p in hf_folder.iterdir()) == [
        "README.md", "config.json", "model.safetensors"]
    encoder = hf_folder.parent / "enc.safetensors"
    config = json.loads((hf_folder / "config.json").read_text())
    card = read_card(encoder)
    assert {k: v for k, v in config.items() if k in card and k != "weights_file"} == {
        k: v for k, v in card.items() if k != "weights_file"}
    assert (config["library_name"], config["model_type"]) == ("mim3d", "mim3d-hybrid")
    readme = (hf_folder / "README.md").read_text()
    assert readme.startswith("---\nlicense: apache-2.0\n")
    for fact in ("[-1000.0, 1000.0]", "RAS", "preset tiny", "steps 5", "mim3d nnunet",
                 "--pretrained hf://"):
        assert fact in readme, fact
    n_params = sum(v.numel() for k, v in load_file(str(encoder)).items() if k != "pos_embed")
    assert f"{n_params / 1e6:.2f} M parameters" in readme
    weights = resolve_encoder(hf_folder)
    assert weights == hf_folder / "model.safetensors"
    target = HybridEncoder(**card["encoder_kwargs"])
    load_encoder(target, weights)
    ref = load_file(str(encoder))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in ref.items())


def _to_official(name: str) -> str:
    """Inverse of :func:`official_key_to_mim3d` for the keys of a HybridEncoder."""
    conv = {"dwconv": "attn", "mlp.linear1": "mlp.fc1", "mlp.linear2": "mlp.fc2"}
    block = {"attn.out_proj": "attn.proj", "mlp.linear1": "mlp.fc1", "mlp.linear2": "mlp.fc2"}
    rules = (
        (r"downsamples\.(\d)\.(.+)", lambda m: f"patch_embed{int(m[1]) + 1}.{m[2]}"),
        (r"token_proj\.(.+)", lambda m: f"patch_embed5.{m[1]}"),
        (r"fusion\.(\d)\.(.+)", lambda m: f"stage{int(m[1]) + 1}_output_decode.{m[2]}"),
        (r"conv_stages\.(\d)\.(\d+)\.(.+)\.(weight|bias)",
         lambda m: f"blocks{int(m[1]) + 1}.{m[2]}.{conv.get(m[3], m[3])}.{m[4]}"),
        (r"blocks\.(\d+)\.(.+)\.(weight|bias)",
         lambda m: f"blocks4.{m[1]}.{block.get(m[2], m[2])}.{m[3]}"))
    for pattern, rename in rules:
        match = re.fullmatch(pattern, name)
        if match:
            return rename(match)
    return name


def test_from_official_to_hf_in_one_command(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    theirs = HybridEncoder(input_size=(32, 32, 32), dims=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                           num_heads=2).state_dict()
    model = {_to_official(k): v for k, v in theirs.items()}
    assert all(official_key_to_mim3d(k) == _from for k, _from in zip(model, theirs))
    model["decoder_pred.weight"] = torch.zeros(4, 64)
    ckpt = tmp_path / "mim_official.pth"
    torch.save({"model": model, "args": argparse.Namespace(num_heads=2), "epoch": 3}, ckpt)
    assert main(["export", "--from-official", str(ckpt), "--hf", str(tmp_path / "hf")]) == 0
    assert "Loaded" in capsys.readouterr().out
    weights = resolve_encoder(tmp_path / "hf")
    assert all(torch.equal(load_file(str(weights))[k], v) for k, v in theirs.items())
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "license: other" in readme and "carry no licence" in readme
    assert not list(tmp_path.glob("*.safetensors"))  # only the folder was asked for


def _fill_cache(home: Path, folder: Path, repo: str) -> Path:
    """huggingface_hub's cache layout: blobs by hash, snapshot symlinks, refs/main."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / _SHA
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for file in folder.iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(_SHA)  # no newline, as huggingface_hub writes it
    return snapshot


def test_hf_uri_resolves_offline_from_the_cache(hf_folder: Path, tmp_path: Path) -> None:
    snapshot = _fill_cache(tmp_path / "hf_home", hf_folder, "mim3d-lab/mim-tiny")
    script = ("import sys\nfrom mim3d.hub import resolve_encoder\n"
              "for spec in sys.argv[1:]:\n"
              "    try:\n        print('OK', resolve_encoder(spec))\n"
              "    except ValueError as e:\n        print('ERR', e)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    specs = ["hf://mim3d-lab/mim-tiny", f"hf://mim3d-lab/mim-tiny@{_SHA}",
             "hf://mim3d-lab/other", "hf://no-slash"]
    out = subprocess.run([sys.executable, "-c", script, *specs], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
    assert out[0] == f"OK {snapshot / 'model.safetensors'}"
    assert out[1] == out[0]
    assert out[2].startswith("ERR hf://mim3d-lab/other: not found on the Hub nor in the cache")
    assert "HF_HUB_OFFLINE=1" in out[2] and str(tmp_path / "hf_home") in out[2]
    assert out[3].startswith("ERR hf://no-slash: expected hf://OWNER/NAME")
    assert len(out) == 4  # one line each


def test_folder_missing_a_file_is_one_line(hf_folder: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    with pytest.raises(HubError, match="lacks config.json"):
        resolve_encoder(broken)
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(tmp_path), "--out", str(out), "--pretrained",
                 str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks config.json" in err[0] and "mim3d export" in err[0]
    assert not out.exists()
    (broken / "config.json").write_text(json.dumps({"format": "mim3d-encoder",
                                                    "architecture": "vit"}))
    with pytest.raises(HubError, match="says vit but model.safetensors holds a hybrid"):
        resolve_encoder(broken)
