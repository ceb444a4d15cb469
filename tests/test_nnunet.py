"""nnU-Net v2 hand-off: the network nnU-Net builds, the plans variant, the weights file, bad
input, and (slow) nnU-Net's own plan / preprocess / train / predict chain on phantoms."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mim3d.cli import main
from mim3d.config import load_config, to_dict
from mim3d.data.readers import write_volume
from mim3d.data.volume import Volume
from mim3d.engine.checkpoint import save_checkpoint
from mim3d.factory import build_mim
from mim3d.integrations.nnunet import NETWORK_CLASS, NnUNetError, write_handoff
from mim3d.integrations.nnunet_data import run_nnunet, write_phantom_dataset
from mim3d.models.downstream import MiMUNETR
from mim3d.models.nnunet_net import MiMnnUNet, decoder_strides
from mim3d.transfer import export_encoder

nnunetv2 = pytest.importorskip("nnunetv2", reason="the nnU-Net tests need mim3d[nnunet]")

#: the tiny preset shrunk (as tests/conftest.py SHRINK) so nnU-Net's 250 iterations fit the CPU
_SMALL = ("model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]", "model.num_heads=2",
          "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
          "model.proj_dim=32")


def _encoder(root: Path, overrides: tuple[str, ...] = _SMALL) -> Path:
    torch.manual_seed(1234)  # differs from the decoder seed, so a test can tell them apart
    cfg = load_config("pretrain", "tiny", overrides=overrides)
    save_checkpoint(root / "run", step=1, model=build_mim(cfg), config=to_dict(cfg))
    return export_encoder(root / "run", root / "encoder.safetensors")[0]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _encoder(tmp_path_factory.mktemp("mim"))


def _plans(spacing: list[float], transpose: list[int]) -> dict:
    """nnU-Net 2.x plans as nnUNetv2_plan_experiment writes them (values of a small dataset)."""
    cfg = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
           "batch_size": 2, "patch_size": [40, 56, 48], "spacing": spacing,
           "normalization_schemes": ["CTNormalization", "ZScoreNormalization"],
           "use_mask_for_norm": [False, False], "architecture": {
               "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
               "arch_kwargs": {"strides": [[1, 1, 1], [2, 2, 2]]}, "_kw_requires_import": []},
           "batch_dice": False}
    props = {"mean": 61.6, "std": 37.0, "percentile_00_5": -100.0, "percentile_99_5": 176.0}
    return {"dataset_name": "Dataset777_Toy", "plans_name": "nnUNetPlans",
            "transpose_forward": transpose, "transpose_backward": transpose,
            "image_reader_writer": "SimpleITKIO",
            "configurations": {"3d_fullres": cfg, "3d_lowres": {"inherits_from": "3d_fullres",
                                                                "spacing": [9.0, 9.0, 9.0]},
                               "3d_cascade_fullres": {"inherits_from": "3d_fullres",
                                                      "previous_stage": "3d_lowres"}},
            "foreground_intensity_properties_per_channel": {"0": dict(props), "1": dict(props)}}


@pytest.fixture()
def planned(tmp_path: Path) -> dict[str, str]:
    """nnU-Net folders of a 2-channel dataset 777, planned; the image has axes (+A, +S, +R)."""
    raw, pre = tmp_path / "raw" / "Dataset777_Toy", tmp_path / "pre" / "Dataset777_Toy"
    meta = {"channel_names": {"0": "CT", "1": "MR"}, "labels": {"background": 0, "organ": 1},
            "numTraining": 1, "file_ending": ".nii.gz"}
    for folder in (raw, pre):
        folder.mkdir(parents=True)
        (folder / "dataset.json").write_text(json.dumps(meta))
    affine = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    write_volume(Volume(np.zeros((4, 5, 6), np.int16), affine), raw / "imagesTr" / "a_0000.nii.gz")
    (pre / "nnUNetPlans.json").write_text(json.dumps(_plans([3.0, 2.0, 1.0], [0, 1, 2])))
    return {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
            "nnUNet_results": str(tmp_path / "res")}


def _card_spacing(encoder: Path, spacing: list[float], out: Path) -> Path:
    """A copy of ``encoder`` whose card states ``spacing`` (x, y, z mm)."""
    card = json.loads(encoder.with_suffix(".json").read_text())
    shutil.copyfile(encoder, out)
    out.with_suffix(".json").write_text(json.dumps({**card, "spacing": spacing}))
    return out


# ------------------------------------------------------------------------- the network


@pytest.mark.parametrize("patch", [8, 16])
def test_network_equals_mimunetr_and_supervises_at_nnunets_scales(patch: int) -> None:
    kw = {"patch_size": patch, "dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "num_heads": 2,
          "feature_size": 8}
    torch.manual_seed(0)
    ref = MiMUNETR(in_channels=2, out_channels=3, roi=(16, 16, 32), **kw).eval()
    net = MiMnnUNet(input_channels=2, num_classes=3, input_size=(16, 16, 32),
                    strides=decoder_strides(patch), **kw).eval()
    state = {("decoder.seg_layers.0." + k[4:]) if k.startswith("out.") else
             k if k.startswith("encoder.") else f"decoder.{k}": v
             for k, v in ref.state_dict().items()}
    assert net.load_state_dict(state, strict=False).unexpected_keys == []
    x = torch.randn(1, 2, 16, 16, 32)
    assert torch.equal(net(x), ref(x))
    net.decoder.deep_supervision = True  # what nnU-Net's trainer sets
    outs = net(x)
    # nnU-Net's target scales: 1 / cumprod(strides), all but the coarsest
    scales = 1 / np.cumprod(np.vstack(decoder_strides(patch)), axis=0)[:-1]
    assert [tuple(o.shape[2:]) for o in outs] == [
        tuple(int(s * d) for s, d in zip(sc, (16, 16, 32))) for sc in scales]
    assert torch.equal(outs[0], ref(x))


def test_nnunet_builds_the_network_from_plain_kwargs_and_loads_the_file(
        encoder_file: Path, planned: dict[str, str]) -> None:
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    handoff = write_handoff(encoder_file, 777, patch_size=(16, 16, 16), environ=planned)
    plans = json.loads(handoff.plans.read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == NETWORK_CLASS
    json.dumps(arch["arch_kwargs"])  # plain JSON values only
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                 arch["_kw_requires_import"], 2, 5, deep_supervision=True)
    load_pretrained_weights(net, str(handoff.weights))  # asserts every non-head key and shape
    mim = load_file(str(encoder_file))
    stem = "downsamples.0.proj.weight"  # 1 -> 2 channels: w / 2 on each (mim3d.transfer)
    mim[stem] = mim[stem].repeat(1, 2, 1, 1, 1) / 2
    for key, value in mim.items():
        if key != "pos_embed":  # a fixed sin-cos buffer, recomputed for the patch's grid
            assert torch.equal(net.state_dict()[f"encoder.{key}"], value), key
    assert len(net(torch.randn(1, 2, 16, 16, 16))) == 3


# ------------------------------------------------------------------------- plans and weights


def test_plans_reconcile_spacing_axes_and_hu_window(encoder_file: Path, planned: dict[str, str],
                                                    tmp_path: Path) -> None:
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
    )

    enc = _card_spacing(encoder_file, [1.5, 2.5, 3.5], tmp_path / "spaced.safetensors")
    handoff = write_handoff(enc, "777", patch_size=(16, 24, 32), batch_size=1, environ=planned)
    plans = json.loads(handoff.plans.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    # the image's index axes i, j, k point along A, S, R; nnU-Net's array is (k, j, i): R, S, A
    assert cfg["spacing"] == [1.5, 3.5, 2.5]
    assert cfg["data_identifier"] == "nnUNetPlans_mim3d_3d_fullres"
    assert (cfg["patch_size"], cfg["batch_size"], list(plans["configurations"])) == (
        [16, 24, 32], 1, ["3d_fullres"])
    props = plans["foreground_intensity_properties_per_channel"]
    hu = np.array([-2000.0, -1000.0, 0.0, 500.0, 3000.0], dtype=np.float32)
    out = CTNormalization(intensityproperties=props["0"]).run(hu.copy())
    np.testing.assert_allclose(out, np.clip((hu + 1000) / 2000, 0, 1), atol=1e-6)
    assert props["1"]["percentile_00_5"] == -100.0  # the MR channel keeps nnU-Net's values
    assert plans["mim3d"]["nnunet_planned"]["spacing"] == [3.0, 2.0, 1.0]
    assert any("MR" not in d and "not CT" in d for d in handoff.decisions)


def test_weights_file_holds_every_key_but_the_heads_seeded(encoder_file: Path,
                                                           planned: dict[str, str]) -> None:
    a = write_handoff(encoder_file, 777, patch_size=(16, 16, 16), seed=3, environ=planned)
    first = torch.load(a.weights, weights_only=True)["network_weights"]
    b = write_handoff(encoder_file, 777, patch_size=(16, 16, 16), seed=4, environ=planned)
    second = torch.load(b.weights, weights_only=True)["network_weights"]
    net = MiMnnUNet(input_channels=2, num_classes=2, **json.loads(a.plans.read_text())[
        "configurations"]["3d_fullres"]["architecture"]["arch_kwargs"])
    assert set(first) == {k for k in net.state_dict() if ".seg_layers." not in k}
    assert all(k.startswith("encoder.") for k in a.loaded) and len(a.loaded) == len(
        load_file(str(encoder_file)))
    assert all(k.startswith("decoder.") for k in a.initialised)
    assert all(".seg_layers." in k for k in a.skipped)
    assert all(torch.equal(first[k], second[k]) for k in a.loaded)
    assert not all(torch.equal(first[k], second[k]) for k in a.initialised)


def test_lowres_inherits_and_cascade_or_2d_is_refused(encoder_file: Path,
                                                       planned: dict[str, str]) -> None:
    low = write_handoff(encoder_file, 777, configuration="3d_lowres", spacing="nnunet",
                        patch_size=(16, 16, 16), environ=planned)
    cfg = json.loads(low.plans.read_text())["configurations"]["3d_lowres"]
    assert cfg["spacing"] == [9.0, 9.0, 9.0] and "inherits_from" not in cfg
    with pytest.raises(NnUNetError, match="cascade"):
        write_handoff(encoder_file, 777, configuration="3d_cascade_fullres", environ=planned)


def test_phantom_dataset_passes_nnunets_integrity_check(tmp_path: Path) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = write_phantom_dataset(tmp_path, 9, 2, shape=(32, 32, 32))
    verify_dataset_integrity(str(folder), 1)  # raises on any layout or geometry problem
    labels = [np.unique(np.asarray(nib.load(p).dataobj)) for p in
              sorted((folder / "labelsTr").glob("*.nii.gz"))]
    assert all(set(v) == {0, 1, 2, 3} for v in labels)


# ------------------------------------------------------------------------- bad input


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mim3d nnunet: error: "), err
    return err[0]


def test_bad_inputs_are_one_line_and_write_nothing(encoder_file: Path, planned: dict[str, str],
                                                   tmp_path: Path, monkeypatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    vit = _encoder(tmp_path / "vit", ("model.encoder=vit", *_SMALL))
    before = _contents(tmp_path)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(key, raising=False)
    assert "nnUNet_preprocessed" in _cli_error(["nnunet", str(encoder_file), "--dataset", "777"],
                                               capsys)
    for key, value in planned.items():
        monkeypatch.setenv(key, value)
    base = ["nnunet", str(encoder_file), "--dataset"]
    assert "nnUNetv2_plan_and_preprocess -d 778" in _cli_error([*base, "778"], capsys)
    message = _cli_error([*base, "777", "--configuration", "3d_midres"], capsys)
    assert "no configuration '3d_midres'" in message and "3d_fullres" in message
    assert "holds a vit encoder" in _cli_error(["nnunet", str(vit), "--dataset", "777"], capsys)
    assert "Hugging Face folder" in _cli_error(["nnunet", str(tmp_path), "--dataset", "777"],
                                               capsys)
    assert "multiples" in _cli_error([*base, "777", "--patch-size", "12", "16", "16"], capsys)
    assert _contents(tmp_path) == before


# ------------------------------------------------------------------------- nnU-Net's own chain


def _bin(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.is_file():
        pytest.skip(f"{name} is not installed beside {sys.executable}")
    return str(path)


@pytest.mark.slow
def test_nnunet_chain_trains_from_the_mim_encoder(encoder_file: Path, tmp_path: Path) -> None:
    """plan -> mim3d nnunet -> preprocess -> train 1 epoch (pretrained) -> predict, on CPU."""
    start = time.perf_counter()
    raw = tmp_path / "raw"
    write_phantom_dataset(raw, 501, 2, shape=(32, 32, 32), spacing=(4.0, 4.0, 4.0))
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res"), "nnUNet_compile": "false",
           "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"}
    log = tmp_path / "nnunet.log"
    run_nnunet([_bin("nnUNetv2_plan_and_preprocess"), "-d", "501", "-c", "3d_fullres", "-np",
                "1", "-npfp", "1", "--no_pp"], env=env, timeout=240, log=log)
    handoff = write_handoff(encoder_file, 501, patch_size=(16, 16, 16), batch_size=1, environ=env)
    run_nnunet([_bin("nnUNetv2_preprocess"), "-d", "501", "-plans_name", "nnUNetPlans_mim3d",
                "-c", "3d_fullres", "-np", "1"], env=env, timeout=240, log=log)
    env["nnUNet_n_proc_DA"] = "0"  # augment in the main process: no worker processes
    run_nnunet([_bin("nnUNetv2_train"), "501", "3d_fullres", "all", "-p", "nnUNetPlans_mim3d",
                "-tr", "nnUNetTrainer_1epoch", "-device", "cpu", "-pretrained_weights",
                str(handoff.weights)], env=env, timeout=600, log=log)
    out = tmp_path / "pred"
    run_nnunet([_bin("nnUNetv2_predict"), "-i", str(raw / "Dataset501_MiMPhantom" / "imagesTr"),
                "-o", str(out), "-d", "501", "-c", "3d_fullres", "-p", "nnUNetPlans_mim3d",
                "-tr", "nnUNetTrainer_1epoch", "-f", "all", "-device", "cpu", "--disable_tta"],
               env=env, timeout=240, log=log)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_000.nii.gz", "case_001.nii.gz"]
    model = tmp_path / "res" / handoff.dataset / "nnUNetTrainer_1epoch__nnUNetPlans_mim3d__3d_fullres"
    trained = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    assert "Loading pretrained weights" in log.read_text()
    mim = load_file(str(encoder_file))
    fresh = MiMnnUNet(input_channels=1, num_classes=4, **json.loads(handoff.plans.read_text())[
        "configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]).state_dict()
    # after an epoch of SGD (momentum 0.99) small tensors may move far (stage 1's depthwise conv
    # by 2x its norm), but every weight matrix must still point the MiM file's way, not a fresh
    # init's (cosine ~ 0 for independent draws; biases start at zero and are left out)
    keys = [k for k, v in mim.items() if v.ndim >= 2 and v.numel() >= 256 and k != "pos_embed"]
    cos = {k: (float(torch.cosine_similarity(trained[f"encoder.{k}"].flatten(),
                                             mim[k].flatten(), dim=0)),
               float(torch.cosine_similarity(trained[f"encoder.{k}"].flatten(),
                                             fresh[f"encoder.{k}"].flatten(), dim=0)))
           for k in keys}
    bad = {k: c for k, c in cos.items() if not (c[0] > 0.2 and c[0] > c[1] + 0.15)}
    assert not bad, bad
    flat = [torch.cat([w[f"encoder.{k}"].flatten() for k in keys]) for w in (trained, fresh)]
    ref = torch.cat([mim[k].flatten() for k in keys])
    to_mim, to_fresh = (flat[0] - ref).norm(), (flat[0] - flat[1]).norm()
    assert to_mim < 0.5 * to_fresh, (to_mim, to_fresh)
    low = min(c[0] for c in cos.values())
    print(f"nnU-Net chain: {time.perf_counter() - start:.0f} s; encoder cosine to the MiM file "
          f">= {low:.3f} per tensor; distance to it {to_mim / to_fresh:.3f} of that to a fresh init")
