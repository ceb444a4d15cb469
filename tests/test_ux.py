"""What a user sees: help on every flag, ``mim3d presets``, the demo (and its rerun)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from mim3d.cli import _parser, main
from mim3d.config import load_config, preset_description, preset_names


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags_without_help(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    """Every option or positional of ``parser`` and its sub-commands (recursively) lacking help."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _flags_without_help(sub, f"{prog} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            text = (action.help or "").strip()
            if not text or text == argparse.SUPPRESS:
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_flag_of_every_command_has_help() -> None:
    missing = _flags_without_help(_parser(), "mim3d")
    assert not missing, "flags without help text: " + ", ".join(missing)
    assert _flags_without_help(_bad_parser(), "demo") == ["demo x y --fold"]


def _bad_parser() -> argparse.ArgumentParser:
    """A parser with one flag lacking help, nested one sub-command deep (the walker's check)."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers().add_parser("x").add_subparsers().add_parser("y")
    sub.add_argument("--fold", type=int)
    sub.add_argument("--seed", help="seeds it")
    return parser


def test_presets_lists_every_preset_with_its_description(capsys) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out.splitlines()
    for kind in ("pretrain", "downstream"):
        for name in preset_names(kind):
            desc = preset_description(kind, name)
            assert desc and len(desc) <= 100, (kind, name)
            assert sum(line.split()[:1] == [name] and line.endswith(desc) for line in out) == 1
            # The key is for the listing only: the preset still builds a config.
            assert load_config(kind, name).name == name
    assert main(["presets", "downstream"]) == 0
    only = capsys.readouterr().out
    assert "btcv" in only and "tiny " not in only


# ------------------------------------------------------------------------- demo and rerun ----

DEMO_OWN = ("optim.total_steps", "optim.warmup_steps", "train.image_every")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """A 2-step demo on 2 small cases with the engine tests' small model, and its lines."""
    from conftest import SHRINK

    from mim3d.engine.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    # the demo sets the schedule and the pictures itself
    small = [s for s in SHRINK if s.split("=")[0] not in DEMO_OWN]
    record = run_demo(out, steps=2, cases=2, progress=False, echo=lines.append, overrides=small)
    return out, record, lines


@pytest.mark.slow
def test_demo_rerun_reports_the_finished_run(demo_run) -> None:
    from mim3d.engine.demo import run_demo

    out, first, lines = demo_run
    assert first.step == first.steps == 2 and first.checkpoint and first.pictures
    assert first.final_loss is not None and np.isfinite(first.final_loss)
    assert first.loss_step == 2  # the last step is in metrics.jsonl
    (session,) = first.sessions
    assert session["from_step"] == 0 and session["to_step"] == 2
    assert 0 < session["train_wall_s"] <= session["wall_s"] and session["cpu_s"] > 0
    assert json.loads((out / "demo.json").read_text())["sessions"] == first.sessions
    assert any(f"final loss: {first.final_loss:.4f} (step 2)" in x for x in lines)
    metrics = (out / "run" / "metrics.jsonl").read_text()

    again: list[str] = []
    second = run_demo(out, steps=5, cases=2, progress=False, echo=again.append)
    text = "\n".join(again)
    # the finished run's own numbers, not a fresh session's (before: "in 0.0 min", "loss: nan")
    assert "already complete" in text and "final loss: nan" not in text
    assert "--steps 5 applies to a new --out folder" in text
    assert f"final loss: {first.final_loss:.4f} (step 2)" in text
    minutes = f"{first.sessions[0]['train_wall_s'] / 60:.1f} min of training"
    assert minutes in text
    assert second.sessions == first.sessions and second.step == 2
    assert (out / "run" / "metrics.jsonl").read_text() == metrics  # nothing trained again

    from mim3d.engine.demo import DEMO_STEPS  # the --help of `mim3d demo` states the default

    demo = _subcommands(_parser())["demo"]
    assert f"default {DEMO_STEPS};" in next(a for a in demo._actions if a.dest == "steps").help


@pytest.mark.slow
def test_visualize_chooses_sample_and_volume(demo_run, tmp_path: Path, capsys) -> None:
    out, _, _ = demo_run
    cts = sorted(str(p) for p in (out / "phantoms" / "imagesTr").glob("*.nii.gz"))
    png = tmp_path / "recon.png"
    assert main(["visualize", str(out / "run"), "--input", *cts, "--sample", "1",
                 "--volume", "L3.2.1", "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
    for argv, words in ((["--sample", "2"], "--sample 2 is out of range: 2 CT(s)"),
                        (["--volume", "L3.4.0"], "children 0..3"),
                        (["--volume", "L2.1.1"], "levels.json")):
        capsys.readouterr()
        assert main(["visualize", str(out / "run"), "--input", *cts, "--out",
                     str(tmp_path / "x.png"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mim3d visualize: error:") and words in err[0]
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------- README figures = committed results ----

_ROOT = Path(__file__).resolve().parent.parent


def _result(name: str) -> dict:
    return json.loads((_ROOT / "benchmarks" / "results" / f"{name}.json").read_text())


def _readme_row(start: str) -> str:
    rows = [x for x in (_ROOT / "README.md").read_text().splitlines() if x.startswith(start)]
    assert len(rows) == 1, f"README.md has {len(rows)} rows starting {start!r}"
    return rows[0]


def _row_quotes(start: str, figures: tuple[str, ...]) -> None:
    """The README's one table row starting ``start`` contains every figure."""
    row = _readme_row(start)
    for figure in figures:
        assert figure in row, (figure, row)


def test_readme_benchmark_figures_quote_the_committed_json() -> None:
    dt = _result("data_throughput")
    _row_quotes("| data throughput |", (
        (f"blosc2 bytes {dt['store_bytes_ratio_vs_nii_gz']:.2f}x / "
         f"{dt['store_bytes_ratio_vs_nii_gz_1p5mm']:.2f}x the .nii.gz"),
        (f"crops {dt['crop_speed_ratio_vs_npy_store_warm']:.2f}x npy warm "
         f"({dt['crop_speed_ratio_vs_npy_store_warm_long_volumes']:.2f}x on 448-slice "
         f"volumes), {dt['crop_speed_ratio_vs_npy_store_cold']:.2f}x cold"),
        f"blosc2 (default) store **{dt['crop_speedup_vs_monai']:.1f}x** MONAI's",
        f"npy {dt['npy_crop_speedup_vs_monai']:.1f}x",
        f"data wait {100 * dt['data_wait_share_blosc2']:.2f} %",
        f"{dt['store_bytes_ratio_vs_nii_gz_1p5mm_resampled']:.2f}x resampled",
        (f"3 mm-slice crops at 1.5 mm "
         f"{dt['thick_1p5mm_kept_vs_resampled_crop_speed_npy']:.2f}x (npy) / "
         f"{dt['thick_1p5mm_kept_vs_resampled_crop_speed_blosc2']:.2f}x (blosc2)")))
    readme = (_ROOT / "README.md").read_text()
    from mim3d.data.store import DEFAULT_FORMAT

    # the default format is the one the committed benchmark chose by the targets
    assert dt["default_format_by_targets"] == dt["default_format_now"] == DEFAULT_FORMAT
    speed = dt["crops_per_s"]
    for figure in (f"| 1 ({speed['warm']['npy']:.1f}/s) |", f"| 1 ({speed['cold']['npy']:.1f}/s) |",
                   f"on-the-fly pipeline ({dt['monai_crops_per_s']:.2f}/s)"):
        assert figure in readme, figure
    lim = _result("store_limits")
    ms, parts = lim["warm"]["ms_per_crop"], lim["bytes_1p5mm"]["ratio_vs_nii_gz"]
    now, bound = lim["warm_crop_ratio_now"], lim["warm_crop_ratio_decode_bound"]
    _row_quotes("| store limits |", (
        (f"npy {ms['npy']:.1f} + window {ms['window']:.1f} ms vs blosc2 "
         f"{ms['blosc2']:.1f} + {ms['window']:.1f} ms ({now:.2f}x)"),
        f"{bound:.2f}x if the touched blocks",
        (f"1.5 mm bytes {parts['resampled']:.2f}x the .nii.gz resampled, "
         f"{parts['resampled_zstd9_bytedelta']:.2f}x with ZSTD-9"),
        f"{parts['kept']:.2f}x with coarse axes kept"))
    pt = _result("pretrain_throughput")
    row = _readme_row("| pre-training throughput |")
    for size in ("tiny", "small"):
        assert (f"{size} {pt[f'{size}_samples_per_s']:.2f} samples/s "
                f"({pt[f'{size}_peak_mem_mb'] / 1000:.1f} GB)") in row, row
    shares = [f"{pt[f'{size}_data_wait_share']:.2%}" for size in ("tiny", "small")]
    assert f"data wait {shares[0]} / {shares[1]}" in row, row
    eff = _result("efficiency")["summary"]
    _row_quotes("| efficiency (Table XI) |", (
        f"**{eff['gflops_per_volume_mim_base']:.1f} GFLOPs per 96^3 volume**",
        f"MiM is {eff['flops_ratio_mim_vs_swinssl']:.2f}x",
        f"**{eff['flops_ratio_per_sample_mim_vs_swinssl']:.1f}x**",
        f"{eff['step_share_of_gemm_peak']:.2f} of the fp32 GEMM peak",
        f"time per volume {eff['time_ratio_mim_vs_swinssl']:.2f}x",
        f"per sample {eff['time_ratio_per_sample_mim_vs_swinssl']:.1f}x"))
    am = _result("activation_memory")["results"]
    _row_quotes("| activation memory (issue 12) |", (
        f"**{am['saved_gib_per_sample_before']:.2f} GiB** per MiM base sample",
        f"**{am['saved_gib_per_sample_after']:.2f} GiB** with the CUDA defaults",
        f"{am['saved_gib_per_sample_after_no_conv_recompute']:.2f} without conv",
        f"checkpointing (encoder and decoder) {am['saved_gib_per_sample_after_plus_block_checkpointing']:.2f}",
        f"activations {am['saved_gib_per_sample_after_plus_bf16_saved']:.2f}"))
    bf16_gain = am["saved_gib_per_sample_after"] - am["saved_gib_per_sample_after_plus_bf16_saved"]
    assert (f"it saves {bf16_gain:.2f} of the {am['saved_gib_per_sample_after']:.2f} GiB"
            in " ".join(readme.split())), "README's bf16 saved-activations sentence"
    cr = _result("cpu_regression")["results"]
    _row_quotes("| CPU step vs an earlier commit (issue 12) |", (
        f"**{cr['head_vs_ref']:.2f}x** the time",
        f"shares {cr['step_share_head']:.2f} (this tree) and {cr['step_share_ref']:.2f} (7be2dbc)"))
    dw = _result("depthwise_cuda")
    lib = dw["variants"]["library"]
    _row_quotes("| efficiency on a GPU |", (
        f"**{lib['mim_sample_step_s']:.2f} s** per step",
        f"peak {lib['peak_mib'] / 1024:.1f} GiB",
        f"{dw['mim_step_speedup_channels_first']:.1f}x faster"))
