"""Presets, YAML files and --set overrides resolve to validated frozen configs."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from mim3d.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    config_from_dict,
    load_config,
    preset_names,
    save_config,
    to_dict,
)

PRETRAIN = ["base", "hybrid-mae", "mae3d", "official", "small", "study", "study-hybrid-mae",
            "study-mae3d", "study-swin-ssl", "swin-ssl", "tiny"]
DOWNSTREAM = ["amos22", "brats21", "btcv", "cc-ccii", "flare22", "mmwhs", "msd-colon",
              "msd-hepatic-vessel", "msd-liver", "msd-lung", "msd-pancreas", "msd-spleen",
              "study-phantom"]


def test_every_preset_is_shipped_and_loads():
    assert preset_names("pretrain") == PRETRAIN
    assert preset_names("downstream") == DOWNSTREAM
    for name in PRETRAIN:
        assert isinstance(load_config("pretrain", name), PretrainConfig)
    for name in DOWNSTREAM:
        assert isinstance(load_config("downstream", name), FinetuneConfig)


def test_base_matches_design_sizes():
    cfg = load_config("pretrain", "base")
    assert cfg.geometry.crop_sizes == ((192, 192, 192), (96, 96, 96), (16, 16, 16))
    assert cfg.geometry.input_size == (96, 96, 96) and cfg.geometry.patch_size == 16
    assert cfg.geometry.mask_ratios == (0.6, 0.6, 0.6) and cfg.geometry.gammas == (4, 4)
    assert cfg.model.dims == (48, 96, 192, 384) and cfg.model.depths == (2, 2, 2, 11)
    assert (cfg.model.decoder_dim, cfg.model.decoder_depth, cfg.model.decoder_heads) == (576, 8, 16)
    assert cfg.loss.alpha == 0.1 and cfg.model.proj_dim == 2048
    assert cfg.data.body_aware and cfg.data.spacing == (1.5, 1.5, 1.5)


def test_official_is_the_authors_script():
    cfg = load_config("pretrain", "official")
    assert cfg.geometry.mask_ratios == (0.5, 0.6, 0.5)
    assert cfg.data.spacing is None and not cfg.data.body_aware


@pytest.mark.parametrize(
    "name, spacing, window",
    [("btcv", (1.5, 1.5, 2.0), (-175, 250)), ("mmwhs", (1.5, 1.5, 1.5), (0, 1700)),
     ("msd-spleen", (1.0, 1.0, 1.0), (-57, 175)), ("amos22", (1.5, 1.5, 2.0), (-175, 250)),
     ("flare22", (1.5, 1.5, 2.0), (-175, 250)), ("msd-liver", (1.0, 1.0, 1.0), (-21, 189)),
     ("msd-lung", (1.0, 1.0, 1.0), (-1000, 1000)), ("msd-pancreas", (1.5, 1.5, 1.5), (-87, 199)),
     ("msd-hepatic-vessel", (1.5, 1.5, 1.5), (0, 230)), ("msd-colon", (1.5, 1.5, 1.5), (-57, 175))],
)
def test_downstream_presets_carry_the_published_preprocessing(name, spacing, window):
    cfg = load_config("downstream", name)
    assert cfg.data.spacing == spacing and cfg.data.hu_window == window
    assert cfg.data.normalization == "window" and cfg.task.roi == (96, 96, 96)


def test_brats_and_ccii():
    brats = load_config("downstream", "brats21")
    assert brats.task.in_channels == 4 and brats.data.normalization == "zscore"
    ccii = load_config("downstream", "cc-ccii")
    assert ccii.task.task == "cls" and ccii.task.roi == (384, 384, 32)
    assert ccii.data.normalization == "minmax"


def test_overrides_and_file_apply_in_order(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text(yaml.safe_dump({"optim": {"lr": 0.002, "total_steps": 50}}))
    cfg = load_config("pretrain", "tiny", config_file=f,
                      overrides=["optim.lr=0.003", "geometry.gammas=[2, 3]", "data.spacing=null"])
    assert cfg.optim.lr == 0.003 and cfg.optim.total_steps == 50
    assert cfg.geometry.gammas == (2, 3) and cfg.data.spacing is None
    assert dataclasses.is_dataclass(cfg) and cfg.name == "tiny"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, fragment",
    [("optim.lrr=1", "optim.lrr"), ("optim.lr=-1", "optim.lr"), ("nosuch.key=1", "nosuch"),
     ("geometry.mask_ratios=[0.5]", "geometry.mask_ratios"), ("model.encoder=foo", "model.encoder"),
     ("data.spacing=[1, 2]", "data.spacing"), ("loss.alpha=abc", "loss.alpha"),
     ("optim.warmup_steps=500", "optim.warmup_steps"), ("train.seed=1.5", "train.seed"),
     ("optim.lr", "section.key=value")],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("pretrain", "tiny", overrides=[override])
    message = str(info.value)
    assert "\n" not in message and fragment in message


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown pretrain preset 'huge'"):
        load_config("pretrain", "huge")
    with pytest.raises(ConfigError, match="not found"):
        load_config("pretrain", "tiny", config_file=tmp_path / "absent.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("pretrain", "small", overrides=["loss.alignment=byol"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict("pretrain", yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert to_dict(again)["geometry"]["crop_sizes"][0] == [128, 128, 128]
    ds = load_config("downstream", "btcv")
    save_config(ds, tmp_path / "ds.yaml")
    assert config_from_dict("downstream", yaml.safe_load((tmp_path / "ds.yaml").read_text())) == ds


@pytest.mark.parametrize(("flags", "level", "shown"), [
    ([], "INFO", {"info", "warning"}),
    (["--quiet"], "WARNING", {"warning"}),
    (["-v"], "DEBUG", {"debug", "info", "warning"}),
])
def test_cli_sets_the_library_log_level(flags, level, shown, capsys):
    """``mim3d [-q|-v] COMMAND``: library loggers (under ``mim3d``) write to stderr at INFO, or
    WARNING / DEBUG; the command's own result line stays on stdout."""
    import logging

    from mim3d import cli

    root = logging.getLogger("mim3d")
    try:
        assert cli.main([*flags, "presets"]) == 0
        out = capsys.readouterr()
        assert "tiny" in out.out  # the result (preset list) is printed as before
        assert root.level == getattr(logging, level)
        log = logging.getLogger("mim3d.data.example")
        for name in ("debug", "info", "warning"):
            getattr(log, name)(f"a {name} message")
        err = capsys.readouterr().err
        assert {n for n in ("debug", "info", "warning") if f"a {n} message" in err} == shown
        assert ("mim3d.data.example" in err) == ("-v" in flags)  # -v names the module
        assert len(root.handlers) == 1  # repeated main() adds no second handler
    finally:  # the handler writes to this test's captured stderr: leave no trace
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.NOTSET)
