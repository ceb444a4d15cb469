"""Tests of the mim3d.transfer package: export of a run's encoder, loading with adaptation,
and the import of the authors' released checkpoint layout (a fake built from the reference key
list)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mim3d.config import load_config, to_dict
from mim3d.engine.checkpoint import save_checkpoint
from mim3d.factory import build_mim
from mim3d.models.hybrid import official_key_to_mim3d
from mim3d.models.layers import sincos_pos_embed_3d
from mim3d.models.vit import ViTEncoder
from mim3d.transfer import (
    TransferError,
    TransferReport,
    encoder_from_card,
    export_encoder,
    import_official,
    load_encoder,
    load_encoder_into,
    read_card,
    vit_to_monai_key,
)
from mim3d.transfer.official import _pos_embed_note

_KEYS_FILE = (Path(__file__).resolve().parents[2] / "shared" / "reference"
              / "official_mim_checkpoint_keys.txt")
_BLOCKS = {"blocks1": 2, "blocks2": 2, "blocks3": 2, "blocks4": 11, "decoder_blocks": 8}


def _make_run(root: Path, overrides: tuple[str, ...] = ()) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    cfg = load_config("pretrain", "tiny", overrides=overrides)
    model = build_mim(cfg).eval()
    run = root / "run"
    save_checkpoint(run, step=7, model=model, config=to_dict(cfg))
    (run / "store").mkdir()
    lines = [json.dumps({"name": n}) for n in ("case_a", "case_b", "case_a")]
    (run / "store" / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return run, model


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, Path]:
    """A tiny hybrid pre-training run, its MiM model and the exported encoder file."""
    root = tmp_path_factory.mktemp("hybrid")
    run, model = _make_run(root)
    weights, card = export_encoder(run, root / "out" / "encoder.safetensors")
    assert card == weights.with_suffix(".json")
    return run, model, weights


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vit")
    run, _ = _make_run(root, ("model.encoder=vit",))
    return export_encoder(run / "ckpt_00000007", root / "vit.safetensors")[0]


def _volume(channels: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(1, channels, size, size, size, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------- export and loading


def test_export_writes_encoder_keys_and_card(hybrid_run: tuple[Path, nn.Module, Path]) -> None:
    _run, model, path = hybrid_run
    assert set(load_file(str(path))) == set(model.encoder.state_dict())
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["format"] == "mim3d-encoder" and card["architecture"] == "hybrid"
    assert card["encoder_kwargs"] == {"in_channels": 1, "input_size": [32, 32, 32],
                                      "patch_size": 8, "num_heads": 4, "mlp_ratio": 4.0,
                                      "dims": [16, 32, 64, 128], "depths": [1, 1, 1, 2]}
    assert (card["patch_size"], card["roi"], card["spacing"]) == (8, [32, 32, 32], None)
    assert (card["orientation"], card["hu_window"], card["channels"]) == ("RAS", [-1000, 1000], 1)
    assert card["normalization"] == "window"
    assert card["training"]["steps"] == 7 and card["training"]["preset"] == "tiny"
    assert card["training"]["cases"] == 2  # unique names of the run's store manifest
    assert card["source"]["checkpoint"].endswith("ckpt_00000007")
    embedded = read_card(path.rename(path.with_name("moved.safetensors")))
    path.with_name("moved.safetensors").rename(path)
    assert embedded is not None and embedded["encoder_kwargs"] == card["encoder_kwargs"]


def test_export_accepts_ckpt_folder_and_weights_file(hybrid_run, tmp_path: Path) -> None:
    run, _, path = hybrid_run
    a = export_encoder(run / "ckpt_00000007" / "model.safetensors", tmp_path / "a.safetensors")
    assert load_file(str(a[0])).keys() == load_file(str(path)).keys()
    with pytest.raises(TransferError, match="no complete checkpoint"):
        export_encoder(tmp_path, tmp_path / "b.safetensors")
    with pytest.raises(TransferError, match=r"\.safetensors"):
        export_encoder(run, tmp_path / "b.pt")


def test_load_reports_every_key_and_features_match(hybrid_run) -> None:
    _, model, path = hybrid_run
    encoder = encoder_from_card(read_card(path)).eval()
    report = load_encoder(encoder, path)
    assert report.loaded == list(encoder.state_dict())
    assert (report.missing, report.unexpected, report.reshaped) == ([], [], [])
    x = _volume()
    with torch.no_grad():
        before, after = model.encoder.forward_features(x), encoder.forward_features(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert "Loaded" in report.summary() and set(report.to_dict()) == {
        "loaded", "missing", "unexpected", "reshaped", "notes"}


class _SegNet(nn.Module):
    """A MiM-UNETR-like network: the encoder plus a dummy decoder and head."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = nn.Conv3d(16, 8, 3)
        self.head = nn.Conv3d(8, 2, 1)


def test_load_into_network_reports_only_decoder_keys_missing(hybrid_run) -> None:
    _, _, path = hybrid_run
    net = _SegNet(encoder_from_card(read_card(path)))
    report = load_encoder_into(net, path, prefix="encoder")
    assert report.loaded == [k for k in net.state_dict() if k.startswith("encoder.")]
    assert report.missing == ["decoder.weight", "decoder.bias", "head.weight", "head.bias"]
    with pytest.raises(TransferError, match="no submodule 'backbone'"):
        load_encoder_into(net, path, prefix="backbone")


def test_first_conv_adapts_to_four_channels(hybrid_run) -> None:
    _, model, path = hybrid_run
    encoder = encoder_from_card(read_card(path), in_channels=4).eval()
    report = load_encoder(encoder, path)
    assert report.reshaped == ["downsamples.0.proj.weight"] and not report.missing
    x = _volume()
    with torch.no_grad():
        one = model.encoder.forward_features(x)[0]
        four = encoder.forward_features(x.repeat(1, 4, 1, 1, 1))[0]
    torch.testing.assert_close(four, one, atol=1e-5, rtol=0)


def test_position_embedding_for_another_roi(hybrid_run, tmp_path: Path) -> None:
    _, _, path = hybrid_run
    encoder = encoder_from_card(read_card(path), input_size=(48, 48, 48))
    report = load_encoder(encoder, path)
    assert "pos_embed" in report.reshaped and any("recomputed" in n for n in report.notes)
    assert torch.equal(encoder.pos_embed, sincos_pos_embed_3d((6, 6, 6), 128))
    # a learned-looking table (no card: grid 4^3 inferred) is interpolated; constants stay so
    weights = load_file(str(path))
    weights["pos_embed"] = torch.randn(1, 1, 128).expand(1, 64, 128).contiguous()
    save_file(weights, str(tmp_path / "learned.safetensors"))
    report = load_encoder(encoder, tmp_path / "learned.safetensors")
    assert any("interpolated" in n for n in report.notes)
    torch.testing.assert_close(encoder.pos_embed, weights["pos_embed"][:, :1].expand(1, 216, 128))


def test_missing_key_fails_loudly_unless_not_strict(hybrid_run, tmp_path: Path) -> None:
    _, _, path = hybrid_run
    weights = load_file(str(path))
    del weights["norm.weight"]
    save_file(weights, str(tmp_path / "cut.safetensors"))
    encoder = encoder_from_card(read_card(path))
    with pytest.raises(TransferError, match=r"cut\.safetensors.*lacks 1 encoder key.*norm\.weight"):
        load_encoder(encoder, tmp_path / "cut.safetensors")
    assert load_encoder(encoder, tmp_path / "cut.safetensors", strict=False).missing == [
        "norm.weight"]


def test_vit_file_into_hybrid_is_refused(vit_file: Path, hybrid_run, tmp_path: Path) -> None:
    encoder = encoder_from_card(read_card(hybrid_run[2]))
    with pytest.raises(ValueError, match="holds a vit encoder.*HybridEncoder is a hybrid"):
        load_encoder(encoder, vit_file)
    vit = encoder_from_card(read_card(vit_file))
    assert isinstance(vit, ViTEncoder) and not load_encoder(vit, vit_file).missing
    save_file(load_file(str(vit_file)), str(tmp_path / "bare.safetensors"))  # no card at all
    with pytest.raises(ValueError, match="vit encoder"):
        load_encoder(encoder, tmp_path / "bare.safetensors")


def test_other_sizes_are_refused_naming_the_cards_size(hybrid_run, tmp_path: Path) -> None:
    _, _, path = hybrid_run
    encoder = encoder_from_card(read_card(path), dims=(8, 16, 32, 64))
    # issue 10: the message speaks the command line's language (the card records preset tiny)
    with pytest.raises(TransferError, match="has shape .* the model needs .*pre-trained at size "
                       "'tiny'; fine-tune with --size tiny"):
        load_encoder(encoder, path)
    save_file(load_file(str(path)), str(tmp_path / "bare.safetensors"))  # no card: no size
    with pytest.raises(TransferError, match="at the encoder's own size"):
        load_encoder(encoder, tmp_path / "bare.safetensors")


def test_a_pth_file_points_to_export_from_official(hybrid_run, tmp_path: Path) -> None:
    _, _, path = hybrid_run
    pth = tmp_path / "mim_pretrained.pth"
    torch.save({"model": {}}, pth)
    with pytest.raises(TransferError, match=r"mim_pretrained\.pth: is a PyTorch checkpoint.*"
                       r"mim3d export --from-official"):
        load_encoder(encoder_from_card(read_card(path)), pth)
    renamed = pth.rename(tmp_path / "renamed.safetensors")  # recognised by content too
    with pytest.raises(TransferError, match="is a PyTorch checkpoint"):
        load_encoder(encoder_from_card(read_card(path)), renamed)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_names_the_file(hybrid_run, tmp_path: Path, damage: str) -> None:
    _, _, path = hybrid_run
    bad = tmp_path / "bad.safetensors"
    data = path.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_encoder(encoder_from_card(read_card(path)), bad)


def test_vit_file_into_monai_unetr(tmp_path: Path) -> None:
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    vit = ViTEncoder(input_size=(32, 32, 32), patch_size=16, dim=64, depth=12, num_heads=4).eval()
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    net = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=64,
                mlp_dim=256, num_heads=4, qkv_bias=True).eval()
    report = load_encoder_into(net, tmp_path / "vit.safetensors", prefix="vit")
    assert sorted(report.loaded) == sorted(f"vit.{vit_to_monai_key(k)}" for k in vit.state_dict())
    assert not report.unexpected and not any("norm_cross_attn" in k for k in report.loaded)
    assert all(k.startswith("vit.blocks") and "norm_cross_attn" in k or not k.startswith("vit.")
               for k in report.missing)
    x = _volume()
    with torch.no_grad():
        torch.testing.assert_close(net.vit(x)[0], vit(x), atol=1e-5, rtol=1e-5)
    assert vit_to_monai_key("decoder.weight") is None


# ------------------------------------------------------------------------- the authors' file


def _official_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in _KEYS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split(" ", 1)
        dims = tuple(int(s) for s in re.findall(r"\d+", shape))
        n = _BLOCKS.get(name.split(".")[0], 1) if "<i>" in name else 1
        for i in range(n):
            shapes[name.replace("<i>", str(i))] = dims
    return shapes


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    if not _KEYS_FILE.is_file():
        pytest.skip(f"{_KEYS_FILE} not found: the official-layout tests need ../shared")
    gen = torch.Generator().manual_seed(1)
    model = {k: torch.randn(s, generator=gen) for k, s in _official_shapes().items()}
    args = argparse.Namespace(model="convmae_convvit_base_patch16", mask_ratio=0.75, epochs=100,
                              output_dir="/data/out", input_size=96)
    file = tmp_path_factory.mktemp("official") / "mim_base.pth"
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "epoch": 99, "scaler": {"scale": 65536.0}, "args": args}, file)
    return file, model


def test_official_import_carries_every_encoder_tensor(official, tmp_path: Path) -> None:
    file, theirs = official
    weights_path, card_path, report = import_official(file, tmp_path / "mim.safetensors")
    ours = load_file(str(weights_path))
    encoder_keys = [k for k in theirs if official_key_to_mim3d(k) is not None]
    assert len(ours) == len(encoder_keys) == len(report.loaded) == 243
    for key in encoder_keys:
        mine = ours[official_key_to_mim3d(key)]
        assert torch.equal(mine, theirs[key].reshape(mine.shape)), key
    assert len(report.reshaped) == 24 and all(ours[k].ndim == 2 for k in report.reshaped)
    assert set(report.unexpected) == set(theirs) - set(encoder_keys)
    assert all(re.match(r"decoder_|mask_token|aggregate_", k) for k in report.unexpected)
    assert any("pos_embed differs" in n for n in report.notes)
    card = json.loads(card_path.read_text())
    assert card["architecture"] == "hybrid" and card["roi"] == [96, 96, 96]
    assert card["training"]["mask_ratios"] == [0.5, 0.6, 0.5] and card["training"]["epoch"] == 99
    assert card["source"]["args"]["model"] == "convmae_convvit_base_patch16"
    encoder = encoder_from_card(card)
    loaded = load_encoder(encoder, weights_path)
    assert loaded.loaded == list(encoder.state_dict()) and not loaded.missing
    assert torch.equal(encoder.pos_embed, theirs["pos_embed"])  # theirs replaces the buffer


class _Payload:
    """A foreign class: unpickling it would run its __setstate__."""

    ran = False

    def __setstate__(self, state: dict) -> None:
        type(self).ran = True


def test_official_refuses_other_pickled_classes(tmp_path: Path) -> None:
    file = tmp_path / "evil.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1, 216, 384)}, "args": _Payload()}, file)
    refused = r"evil\.pth: holds a pickled .*_Payload.*refusing to unpickle"
    with pytest.raises(TransferError, match=refused):
        import_official(file, tmp_path / "x.safetensors")
    assert not _Payload.ran and not (tmp_path / "x.safetensors").exists()


def test_official_missing_encoder_tensor(official, tmp_path: Path) -> None:
    _file, theirs = official
    cut = {k: v for k, v in theirs.items() if k != "blocks4.3.attn.proj.bias"}
    torch.save({"model": cut, "args": argparse.Namespace()}, tmp_path / "cut.pth")
    with pytest.raises(TransferError, match=r"lacks 1 encoder tensor.*blocks\.3\.attn\.out_proj"):
        import_official(tmp_path / "cut.pth", tmp_path / "x.safetensors")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(TransferError, match="no 'model' weight dict"):
        import_official(tmp_path / "list.pth", tmp_path / "x.safetensors")


def test_pos_embed_note_detects_sincos_layouts() -> None:
    table = sincos_pos_embed_3d((6, 6, 6), 384)
    assert "equals mim3d's sin-cos" in _pos_embed_note(table, (6, 6, 6))
    w = 128  # sin|cos columns per axis: swap the blocks of axes 0 and 1
    swapped = torch.cat([table[..., w:2 * w], table[..., :w], table[..., 2 * w:]], dim=-1)
    assert "order (1, 0, 2)" in _pos_embed_note(swapped, (6, 6, 6))


def test_report_summary_is_one_paragraph() -> None:
    report = TransferReport(loaded=["a", "b"], missing=["c"], notes=["A note."])
    text = report.summary()
    assert "\n" not in text and text.startswith("Loaded 2 tensors") and text.endswith("A note.")
