"""Tests of mim3d.models.downstream and mim3d.models.lora (CPU, tiny sizes, 32^3 inputs).

Full-size networks are only built and shape-checked on the meta device.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNETR
from safetensors.torch import save_file
from torch import Tensor, nn

from mim3d.config import load_config
from mim3d.factory import build_downstream, build_encoder
from mim3d.models.downstream import (
    ENCODER_PREFIX,
    MiMClassifier,
    MiMUNETR,
    build_swinunetr,
    build_unetr,
)
from mim3d.transfer import load_encoder_into

try:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from mim3d.models.lora import LoraReport, apply_lora, merge_lora
except ImportError:  # peft is the optional "lora" extra; the other tests still run
    BaseTunerLayer = None
needs_peft = pytest.mark.skipif(BaseTunerLayer is None, reason="peft (mim3d[lora]) missing")

TINY = {"roi": (32, 32, 32), "patch_size": 8, "dims": (16, 32, 64, 128), "depths": (1, 1, 1, 2),
        "num_heads": 4}
ROI = (32, 32, 32)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_unetr(**overrides: object) -> MiMUNETR:
    torch.manual_seed(0)
    return MiMUNETR(**{"out_channels": 3, "feature_size": 8, **TINY, **overrides}).eval()


def tiny_classifier() -> MiMClassifier:
    torch.manual_seed(0)
    return MiMClassifier(num_classes=3, hidden=32, **TINY).eval()


def image(batch: int = 1, roi: tuple[int, int, int] = ROI, seed: int = 1) -> Tensor:
    return torch.randn(batch, 1, *roi, generator=torch.Generator().manual_seed(seed))


# --- MiM-UNETR ---------------------------------------------------------------------------------


def test_mim_unetr_tiny_forward_backward_reaches_every_parameter() -> None:
    model = tiny_unetr().train()
    logits = model(image())
    assert logits.shape == (1, 3, *ROI)
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _inputs_of(modules: dict[str, nn.Module], run) -> dict[str, Tensor]:
    """The first positional input each module received while ``run()`` ran."""
    seen: dict[str, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(
        name, args[0].detach().clone())) for name, m in modules.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("patch", [8, 16])
def test_mim_unetr_skips_receive_the_encoder_features(patch: int) -> None:
    """Wiring by value: each decoder level gets exactly the image / encoder stage it documents,
    and the logits are the out block of the last up block (nothing else is mixed in)."""
    model = tiny_unetr(patch_size=patch)
    x = image()
    blocks = {f"skip{k}": m for k, m in enumerate(model.skips)}
    blocks |= {"bottleneck": model.bottleneck, "out": model.out}
    with torch.no_grad():
        s1, s2, s3, tokens = model.encoder.forward_features(x)
        seen = _inputs_of(blocks, lambda: model(x))
        logits = model(x)
        expected_out = model.out(seen["out"])
    level0 = x if patch == 16 else torch.cat([x, s1], dim=1)
    expected = [level0] + ([s1] if patch == 16 else []) + [s2, s3]
    assert len(model.skips) == len(expected)
    for k, value in enumerate(expected):
        assert torch.equal(seen[f"skip{k}"], value), f"skip {k}"
    assert torch.equal(seen["bottleneck"], tokens)
    assert torch.equal(logits, expected_out)


def test_mim_unetr_encoder_computes_the_pretrained_encoder() -> None:
    """The encoder inside MiM-UNETR, given the pre-trained state, gives the pre-training
    encoder's features on the same image (all tokens visible), value for value."""
    cfg = load_config("pretrain", "tiny")
    torch.manual_seed(1)
    pre = build_encoder(cfg.model, input_size=cfg.geometry.input_size,
                        patch_size=cfg.geometry.patch_size).eval()
    model = build_downstream(network="mim-unetr", size="tiny", in_channels=1, out_channels=3,
                             roi=cfg.geometry.input_size).eval()
    model.encoder.load_state_dict(pre.state_dict(), strict=True)
    x = image()
    with torch.no_grad():
        for ours, theirs in zip(model.encoder.forward_features(x), pre.forward_features(x),
                                strict=True):
            assert torch.equal(ours, theirs)


def test_mim_unetr_patch16_anisotropic_roi() -> None:
    model = tiny_unetr(patch_size=16, roi=(32, 32, 64))
    with torch.no_grad():
        assert model(image(roi=(32, 32, 64))).shape == (1, 3, 32, 32, 64)
    # patch 16: separate image block (level 0) and stage-1 block (level 1)
    assert len(model.skips) == 4 and len(model.ups) == 4


def test_mim_unetr_base_matches_pretrain_encoder_and_shapes_on_meta() -> None:
    cfg = load_config("pretrain", "base")
    encoder = build_encoder(cfg.model, input_size=cfg.geometry.input_size,
                            patch_size=cfg.geometry.patch_size)
    model = MiMUNETR(out_channels=14)
    assert n_params(model.encoder) == n_params(encoder) == 33_891_600
    assert model.encoder.state_dict().keys() == encoder.state_dict().keys()
    model = model.to("meta")
    x = torch.empty(1, 1, 96, 96, 96, device="meta")
    feats = model.encoder.forward_features(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(48, 48, 48, 48), (96, 24, 24, 24),
                                                   (192, 12, 12, 12), (384, 6, 6, 6)]
    assert model(x).shape == (1, 14, 96, 96, 96)


@pytest.mark.parametrize(("kwargs", "bad"), [
    ({"patch_size": 32, "roi": (64, 64, 64)}, "32"),
    ({"roi": (32, 32, 36)}, "36"),
    ({"roi": (32, 32)}, "(32, 32)"),
    ({"feature_size": 0}, "feature_size"),
    ({"out_channels": 0}, "out_channels"),
])
def test_mim_unetr_rejects_bad_args(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad.replace("(", r"\(").replace(")", r"\)")):
        MiMUNETR(**{"out_channels": 3, "feature_size": 8, **TINY, **kwargs})


# --- build_downstream --------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["mim-unetr", "classifier"])
def test_build_downstream_encoder_is_key_identical_to_pretraining(network: str) -> None:
    cfg = load_config("pretrain", "tiny")
    encoder = build_encoder(cfg.model, input_size=cfg.geometry.input_size,
                            patch_size=cfg.geometry.patch_size)
    model = build_downstream(network=network, size="tiny", in_channels=1, out_channels=3,
                             roi=cfg.geometry.input_size)
    target = model.get_submodule(ENCODER_PREFIX[network])
    ours, theirs = target.state_dict(), encoder.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    target.load_state_dict(theirs, strict=True)  # export -> load round trip


def test_build_downstream_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="mim-unetr, unetr, swinunetr, classifier"):
        build_downstream(network="unet", size="tiny", in_channels=1, out_channels=2, roi=ROI)
    with pytest.raises(ValueError, match="tiny"):
        build_downstream(network="unetr", size="huge", in_channels=1, out_channels=2, roi=ROI)


# --- UNETR -------------------------------------------------------------------------------------


def tiny_vit_and_unetr() -> tuple[nn.Module, UNETR]:
    cfg = load_config("pretrain", "tiny")
    torch.manual_seed(0)
    vit = build_encoder(dataclasses.replace(cfg.model, encoder="vit"),
                        input_size=cfg.geometry.input_size, patch_size=cfg.geometry.patch_size)
    unetr = build_downstream(network="unetr", size="tiny", in_channels=1, out_channels=3,
                             roi=cfg.geometry.input_size)
    return vit.eval(), unetr.eval()


def test_vit_state_loads_into_unetr_and_computes_the_same(tmp_path: Path) -> None:
    vit, unetr = tiny_vit_and_unetr()
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    report = load_encoder_into(unetr, tmp_path / "vit.safetensors", prefix="vit")
    assert not report.unexpected and not report.reshaped
    assert {k for k in report.missing if k.startswith("vit.")} == {
        f"vit.blocks.{i}.norm_cross_attn.{w}" for i in range(4) for w in ("weight", "bias")}
    assert isinstance(unetr.vit.patch_embedding.position_embeddings, nn.Parameter)
    x = image(2)
    with torch.no_grad():
        final, hidden = unetr.vit(x)
        torch.testing.assert_close(final, vit(x), atol=1e-5, rtol=1e-5)
        for i in range(len(hidden) - 1):  # the last one is the final output before LayerNorm
            ours = vit.forward_features(x, layers=[i + 1])[0]
            torch.testing.assert_close(hidden[i].transpose(1, 2).reshape(ours.shape), ours,
                                       atol=1e-5, rtol=1e-5)
        assert unetr(x).shape == (2, 3, *ROI)


def test_unetr_depth12_patch16_computes_monai_forward() -> None:
    torch.manual_seed(0)
    unetr = build_unetr(in_channels=1, out_channels=2, roi=ROI, hidden_size=48, num_heads=4,
                        mlp_dim=96, feature_size=8).eval()
    assert unetr.taps == (3, 6, 9) and unetr.encoder4 is not None
    with torch.no_grad():
        torch.testing.assert_close(unetr(image()), UNETR.forward(unetr, image()))


def test_unetr_patch8_anisotropic_exposes_grid() -> None:
    torch.manual_seed(0)
    unetr = build_unetr(in_channels=1, out_channels=2, roi=(32, 32, 48), patch_size=8,
                        hidden_size=48, num_heads=4, mlp_dim=96, num_layers=4,
                        feature_size=8).eval()
    assert unetr.encoder4 is None and unetr.decoder5 is None
    # mim3d.transfer reads `grid` to fit position tables to a non-cubic roi
    assert unetr.vit.grid == (4, 4, 6)
    with torch.no_grad():
        assert unetr(image(roi=(32, 32, 48))).shape == (1, 2, 32, 32, 48)


@pytest.mark.parametrize(("kwargs", "bad"), [
    ({"patch_size": 32}, "32"), ({"num_layers": 3}, "3"), ({"roi": (32, 32, 40)}, "40"),
    ({"num_heads": 5}, "num_heads 5"),
])
def test_build_unetr_rejects_bad_args(kwargs: dict, bad: str) -> None:
    args = {"in_channels": 1, "out_channels": 2, "roi": ROI, "hidden_size": 48, "num_heads": 4,
            "mlp_dim": 96, "num_layers": 4, **kwargs}
    with pytest.raises(ValueError, match=bad):
        build_unetr(**args)


# --- SwinUNETR and classifier ------------------------------------------------------------------


def test_swinunetr_small_feature_size_is_monais_network() -> None:
    from monai.networks.nets import SwinUNETR

    from mim3d.models.swinssl import SwinSSL

    torch.manual_seed(0)
    model = build_swinunetr(in_channels=1, out_channels=3, feature_size=12).eval()
    torch.manual_seed(0)
    monai = SwinUNETR(in_channels=1, out_channels=3, feature_size=12).eval()
    ssl = SwinSSL(img_size=(32, 32, 64), feature_size=12).eval()
    model.swinViT.load_state_dict(ssl.swinViT.state_dict(), strict=True)  # the swin-ssl path
    monai.swinViT.load_state_dict(ssl.swinViT.state_dict(), strict=True)
    x = image(roi=(32, 32, 64))
    with torch.no_grad():  # 32^3 would leave a single bottleneck voxel (instance norm fails)
        logits = model(x)
    assert logits.shape == (1, 3, 32, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(logits, monai(x), rtol=0, atol=0)  # same weights, same values
    with pytest.raises(ValueError, match="16"):
        build_swinunetr(in_channels=1, out_channels=3, feature_size=16)
    with pytest.raises(ValueError, match="32, 32, 32"):
        build_downstream(network="swinunetr", size="tiny", in_channels=1, out_channels=3,
                         roi=ROI)


def test_classifier_logits_and_grads() -> None:
    model = tiny_classifier().train()
    logits = model(image(2))
    assert logits.shape == (2, 3)
    nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="dropout"):
        MiMClassifier(num_classes=3, dropout=1.0, **TINY)


# --- LoRA --------------------------------------------------------------------------------------


def lora_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@needs_peft
@pytest.mark.parametrize("build", [tiny_unetr, tiny_classifier])
def test_lora_freezes_encoder_but_adapters_and_keeps_output(build) -> None:
    model = build()
    reference = copy.deepcopy(model)
    x = image()
    model, report = apply_lora(model, rank=4)
    assert isinstance(report, LoraReport)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    outside = {n for n, _ in model.named_parameters() if not n.startswith("encoder.")}
    assert trainable == lora_names(model) | outside
    assert report.trainable_params == sum(p.numel() for p in model.parameters()
                                          if p.requires_grad)
    assert 0 < report.trainable_share < 1 and 0 < report.encoder_share < 1
    assert report.total_params == n_params(reference) + report.lora_params
    assert report.encoder_params == n_params(reference.encoder)
    assert any(".dwconv" in k for k in report.skipped_modules)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)  # B = 0 at init


@needs_peft
def test_lora_layers_all_run_in_forward() -> None:
    # guards against an encoder change that applies a targeted weight functionally, which
    # would silently bypass peft's wrapper
    model, report = apply_lora(tiny_unetr(), rank=4)
    seen: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.register_forward_hook(lambda m, i, o, n=name: seen.add(n))
    with torch.no_grad():
        model(image())
    assert seen == set(report.targeted_modules)
    expected = {f"encoder.blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv", "out_proj")}
    assert expected <= seen


@needs_peft
def test_lora_training_step_changes_only_trainable_params_then_merges() -> None:
    model, _ = apply_lora(tiny_unetr().train(), rank=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(image()).square().mean().backward()
    opt.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= {n for n, p in after.items() if p.requires_grad}
    assert any(".lora_B." in n for n in changed) and any(n.startswith("out.") for n in changed)
    model.eval()
    x = image(seed=5)
    with torch.no_grad():
        adapted = model(x)
        merged = merge_lora(model)
        torch.testing.assert_close(merged(x), adapted, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert merged.state_dict().keys() == tiny_unetr().state_dict().keys()
    assert all(p.requires_grad for p in merged.parameters())


@needs_peft
def test_lora_on_unetr_vit() -> None:
    _, unetr = tiny_vit_and_unetr()
    model, report = apply_lora(unetr, rank=8, target="vit")
    assert len(report.targeted_modules) == 2 * 4  # qkv + out_proj in each of 4 blocks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not {n for n in trainable if n.startswith("vit.")} - lora_names(model)


@needs_peft
def test_lora_base_parameter_count() -> None:
    model = build_downstream(network="mim-unetr", size="base", in_channels=1, out_channels=14,
                             roi=(96, 96, 96))
    _, report = apply_lora(model, rank=4)
    d, dims = 384, (48, 96, 192)
    attention = 11 * ((d + 3 * d) + (d + d))  # qkv + out_proj per block, r * (in + out)
    conv_1x1 = 2 * sum(2 * c + 2 * c + 5 * c + 5 * c for c in dims)  # conv1, conv2, mlp (x4)
    assert report.lora_params == 4 * (attention + conv_1x1) == 139_008
    assert report.encoder_params == 33_891_600


@needs_peft
@pytest.mark.parametrize(("kwargs", "bad"), [
    ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"rank": True}, "rank"),
    ({"rank": 4, "alpha": 0}, "alpha"), ({"rank": 4, "dropout": 1.0}, "dropout"),
    ({"rank": 4, "target": "backbone"}, "backbone"),
])
def test_lora_rejects_bad_args(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        apply_lora(tiny_classifier(), **kwargs)


@needs_peft
def test_lora_twice_or_merge_without_adapters_fails() -> None:
    model, _ = apply_lora(tiny_classifier(), rank=4)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, rank=4)
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(tiny_classifier())
