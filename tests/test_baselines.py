"""Baselines behind the pre-training engine: MAE3D, the single-level hybrid MAE, Swin-UNETR SSL.

Checks that each baseline preset builds the model it names, that Swin-UNETR's SSL step through
``train_step`` computes exactly its published loss on the two views, that a Swin SSL run resumes
bitwise, and that its exported encoder loads into MONAI's SwinUNETR with every Swin weight.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mim3d.config import ConfigError, load_config
from mim3d.data.views import make_two_views
from mim3d.engine.pretrain import pretrain
from mim3d.engine.train import AXIAL_PLANE, step_generator, train_step
from mim3d.factory import build_downstream, build_pretrain_model, geometry_from_config
from mim3d.losses import swin_ssl_loss
from mim3d.models.hybrid import HybridEncoder
from mim3d.models.swinssl import SwinSSL, swin_feature_size
from mim3d.models.vit import ViTEncoder
from mim3d.transfer import export_encoder, load_encoder_into, read_card

SWIN_SMALL = ["geometry.crop_sizes=[[32,32,64]]", "geometry.input_size=[32,32,64]",
              "optim.batch_size=1", "optim.total_steps=20", "optim.warmup_steps=2",
              "train.workers=0", "train.deterministic=true", "train.image_every=1000"]


def test_baseline_presets_build_the_named_models() -> None:
    mae = build_pretrain_model(load_config("pretrain", "mae3d"))
    assert isinstance(mae.encoder, ViTEncoder) and mae.child_head is None
    assert load_config("pretrain", "mae3d").geometry.levels == 1
    hmae = build_pretrain_model(load_config("pretrain", "hybrid-mae"))
    assert isinstance(hmae.encoder, HybridEncoder) and hmae.parent_head is None
    base = build_pretrain_model(load_config("pretrain", "base"))
    count = sum(p.numel() for p in hmae.encoder.parameters())
    assert count == sum(p.numel() for p in base.encoder.parameters())  # same encoder as MiM
    swin = build_pretrain_model(load_config("pretrain", "swin-ssl"))
    assert isinstance(swin, SwinSSL) and swin.img_size == (96, 96, 96)
    ref = build_downstream(network="swinunetr", size="swin-ssl", in_channels=1, out_channels=2,
                           roi=(96, 96, 96))
    assert swin.swinViT.state_dict().keys() == ref.swinViT.state_dict().keys()
    assert all(v.shape == ref.swinViT.state_dict()[k].shape
               for k, v in swin.swinViT.state_dict().items())


@pytest.mark.parametrize(("width", "size"), [(1, 12), (12, 12), (16, 24), (48, 48), (50, 60)])
def test_swin_feature_size(width: int, size: int) -> None:
    assert swin_feature_size(width) == size


@pytest.mark.parametrize(("overrides", "key"), [
    (["method=simclr"], "method"),
    (["geometry.crop_sizes=[[64,64,64]]"], "geometry.input_size"),
    (["geometry.crop_sizes=[[32,32,64],[16,16,32]]", "geometry.mask_ratios=[0.6,0.6]",
      "geometry.gammas=[2]"], "geometry.crop_sizes"),
    (["geometry.crop_sizes=[[32,64,32]]", "geometry.input_size=[32,64,32]"],
     "geometry.input_size"),
])
def test_swinssl_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"value {key}="):
        load_config("pretrain", "study-swin-ssl", overrides=overrides)


def test_swinssl_step_is_the_published_loss_on_two_views() -> None:
    cfg = load_config("pretrain", "study-swin-ssl", overrides=SWIN_SMALL)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    x = torch.rand(2, 1, 32, 32, 64, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay as they are
    res = train_step(model, opt, itertools.repeat(x), cfg=cfg,
                     geometry=geometry_from_config(cfg.geometry), step=5, rank=0,
                     device=torch.device("cpu"))
    views = make_two_views(x, step_generator(cfg.train.seed, 5, 0, 0), plane=AXIAL_PLANE)
    with torch.no_grad():  # one view at a time, as the authors' code runs them
        direct = swin_ssl_loss(model(views.inputs[0]), model(views.inputs[1]), *views.rotations,
                               *views.targets, temperature=cfg.loss.temperature)
    for key in ("loss", "rotation", "contrastive", "reconstruction"):
        assert float(res.losses[key]) == pytest.approx(float(direct[key]), rel=1e-5, abs=1e-6)
    assert torch.equal(res.output.views.targets[0], views.targets[0])
    # the axial (x, y) plane is rotated; z, the last axis, is left alone
    k = int(views.rotations[0][0])
    assert torch.equal(views.targets[0][0], torch.rot90(x[0], k, dims=(1, 2)))


@pytest.fixture(scope="module")
def swin_runs(tmp_path_factory: pytest.TempPathFactory, synthetic_store: Path) -> dict[str, Path]:
    """Swin SSL runs on the synthetic store: 2 steps straight, and 1 + resume to 2 (the fewest
    that put a resume between two optimizer steps)."""
    root = tmp_path_factory.mktemp("swinssl")
    cfg = load_config("pretrain", "study-swin-ssl",
                      overrides=SWIN_SMALL + ["data.spacing=null", "data.body_aware=false"])
    pretrain(cfg, data=synthetic_store, out=root / "straight", max_steps=2, progress=False)
    pretrain(cfg, data=synthetic_store, out=root / "resumed", max_steps=1, progress=False)
    pretrain(cfg, data=synthetic_store, out=root / "resumed", max_steps=2, resume=True,
             progress=False)
    return {"straight": root / "straight", "resumed": root / "resumed", "root": root}


def test_swinssl_run_resumes_bitwise(swin_runs: dict[str, Path]) -> None:
    a = load_file(str(swin_runs["straight"] / "ckpt_00000002" / "model.safetensors"))
    b = load_file(str(swin_runs["resumed"] / "ckpt_00000002" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (swin_runs["straight"] / "pictures" / "recon_00000002.png").is_file()


def test_swinssl_encoder_exports_into_swinunetr(swin_runs: dict[str, Path]) -> None:
    weights, _ = export_encoder(swin_runs["straight"], swin_runs["root"] / "swin.safetensors")
    card = read_card(weights)
    assert card["architecture"] == "swin" and card["encoder_kwargs"]["feature_size"] == 12
    net = build_downstream(network="swinunetr", size="study-swin-ssl", in_channels=1,
                           out_channels=3, roi=(32, 32, 64))
    report = load_encoder_into(net, weights, prefix="swinViT")
    swin_keys = [k for k in net.state_dict() if k.startswith("swinViT.")]
    assert sorted(report.loaded) == sorted(swin_keys) and not report.unexpected
    state = load_file(str(swin_runs["straight"] / "ckpt_00000002" / "model.safetensors"))
    for key, value in net.state_dict().items():
        if key.startswith("swinViT."):
            assert torch.equal(value, state[key])  # same names in SwinSSL and SwinUNETR


def test_swin_file_into_mim_unetr_is_refused(swin_runs: dict[str, Path]) -> None:
    weights = swin_runs["root"] / "swin2.safetensors"
    export_encoder(swin_runs["straight"], weights)
    net = build_downstream(network="mim-unetr", size="study", in_channels=1, out_channels=3,
                           roi=(32, 32, 32))
    with pytest.raises(ValueError, match="swin encoder"):
        load_encoder_into(net, weights, prefix="encoder")
