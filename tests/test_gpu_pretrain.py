"""``benchmarks/gpu_pretrain.py --quick``: the GPU benchmark's code runs end to end on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_pretrain.py"


def _load(name: str):
    """A benchmarks/ script as a module (benchmarks/ on sys.path, as when run as a script)."""
    monkey = pytest.MonkeyPatch.context()
    with monkey as mp:
        mp.syspath_prepend(str(SCRIPT.parent))
        spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
    return mod


def _module():
    return _load("gpu_pretrain")


def _profile():
    return _load("_step_profile")


def test_op_family_rules() -> None:
    """Scopes win, autograd nodes name their forward op, kernels alone are named by kernel."""
    classify = _profile().classify
    assert classify(["mim3d::loss", "aten::mean"]) == "loss"
    assert classify(["Optimizer.step#AdamW.step", "aten::_fused_adamw_"]) == "optimizer"
    assert classify(["autograd::engine::evaluate_function: _TritonDepthwiseFnBackward",
                     "aten::sum"]) == "depthwise_conv"
    assert classify(["aten::convolution", "aten::cudnn_convolution"]) == "depthwise_conv"
    assert classify(["aten::scaled_dot_product_attention"]) == "attention"
    assert classify(["aten::linear", "aten::addmm"], "nvjet_hsh_128x256") == "convs_and_linears"
    assert classify(["aten::layer_norm", "aten::native_layer_norm"]) == "norms_elementwise"
    assert classify([], "_dw_wgrad_kernel") == "depthwise_conv"
    assert classify(["aten::to", "aten::copy_"], "Memcpy HtoD (Pinned -> Device)") == \
        "host_to_device_copies"


@pytest.mark.slow
def test_quick_run_writes_every_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same code as on the GPU, on a shrunk tiny preset: rows, profiles, RESULT lines, JSON."""
    out = tmp_path / "gpu_pretrain.json"
    assert _module().main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["mode"] == "quick" and doc["machine"]["torch"]
    res = doc["results"]
    for key in ("mim_base_samples_per_s_before_b1", "mim_base_samples_per_s_after_b2",
                "mim_base_speedup_vs_before", "mim_base_step_share_of_bf16_gemm",
                "hybrid_mae_samples_per_s", "mae3d_samples_per_s", "swin_ssl_samples_per_s",
                "mim_base_after_no_conv_recompute_b1_step_time_vs_after", "depthwise_ms_cudnn_stage1"):
        assert res[key] > 0, key
        assert f"RESULT {key} " in printed
    assert not [r for r in doc["rows"] if "error" in r]
    assert doc["errors"] == {} and doc["skipped"] == []
    assert doc["phases_done"] == [name for name, _ in _module().PHASES]
    for prof in doc["profiles"]:  # the families (and the idle rest) account for the step
        assert sum(prof["seconds"].values()) == pytest.approx(prof["wall_s"], rel=0.05)
        assert prof["seconds"]["convs_and_linears"] > 0 and prof["seconds"]["optimizer"] > 0
    assert {r["variant"] for r in doc["rows"]} == {
        "before", "after", "after_no_conv_recompute", "after_plus_block_checkpointing",
        "after_plus_bf16_saved"}


def test_phases_keep_going_after_a_failure_and_stop_at_the_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A phase that raises is recorded and the next one runs; the data is saved after every
    phase; past the budget only the headline phases run, the rest are listed as skipped."""
    mod = _module()
    calls: list[str] = []

    def phase(name: str, fail: bool = False):
        def run(_run, data) -> None:
            calls.append(name)
            if fail:
                raise RuntimeError(f"{name} broke\nsecond line")
            data["rows"].append({"variant": name})
        return run

    monkeypatch.setattr(mod, "PHASES", (("reference", phase("reference")),
                                        ("before_after", phase("before_after", fail=True)),
                                        ("depthwise", phase("depthwise"))))
    saved: list[list[str]] = []
    data = mod.run_all(mod.QUICK, mod.torch.device("cpu"), False,
                       lambda d: saved.append(list(d["phases_done"])))
    assert calls == ["reference", "before_after", "depthwise"]
    assert data["errors"] == {"before_after": "RuntimeError: before_after broke"}
    assert saved == [["reference"], ["reference", "before_after"],
                     ["reference", "before_after", "depthwise"]]
    calls.clear()
    data = mod.run_all(mod.QUICK, mod.torch.device("cpu"), False, budget_s=-1.0)
    assert calls == ["reference", "before_after"] and data["skipped"] == ["depthwise"]


def test_a_case_that_raises_becomes_an_error_row(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """E.g. a kernel that fails to compile on the GPU's Triton: one row says so, the run goes on."""
    mod = _module()

    def broken(*_args, **_kwargs):
        raise RuntimeError("PassManager::run failed\nfull compiler log")

    monkeypatch.setattr(mod, "_Trainer", broken)
    row = mod.measure("tiny", mod.SHRUNK, mod.AFTER, 2, mod.QUICK, mod.torch.device("cpu"))
    assert row["error"] == "RuntimeError: PassManager::run failed"
    assert "step_s" not in row and "PassManager::run failed" in capsys.readouterr().out
    res = mod.results({"rows": [row], "baselines": {}, "depthwise_ms": {}})
    assert res == {}


def test_activation_memory_tally_counts_each_saved_storage_once() -> None:
    """A bf16 linear keeps its input's and its weight's bf16 copies (the weight itself is not
    counted), and a tensor saved twice counts once: 8x16x2 + 4x16x2 + 8x4x4 bytes."""
    import torch
    import torch.nn.functional as F

    am = _load("activation_memory")
    w = torch.nn.Parameter(torch.randn(4, 16))
    tally = am._Tally({w.untyped_storage()._cdata})
    x = torch.randn(8, 16, requires_grad=True)
    with am._counting(tally), torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(x, w).float()
        _ = (y * y).sum() + (y * y).sum()  # y saved by both products: one storage
    assert tally.by_dtype() == {"bfloat16": (8 * 16 * 2 + 4 * 16 * 2) / 2**30,
                                "float32": 8 * 4 * 4 / 2**30}


def test_base_sample_saves_under_budget_with_cuda_defaults() -> None:
    """MiM base, CUDA's defaults (one pass, conv recompute), bf16: what backward keeps per sample
    stays under 3 GiB (the 4 GiB peak target minus room for backward's transients), and conv
    recompute is what gets it there."""
    am = _load("activation_memory")
    after = am.saved_gib("base", (), am.AFTER)
    no_recompute = am.saved_gib("base", (), am.MEMORY[0])
    assert 1.0 < after["saved_gib"] < 3.0, after
    assert no_recompute["saved_gib"] > 3 * after["saved_gib"], no_recompute


def test_activation_memory_quick_writes_its_results(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "activation_memory.json"
    assert _load("activation_memory").main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert 0 < res["saved_gib_per_sample_after"] < res["saved_gib_per_sample_before"]
    assert f"RESULT saved_after_vs_before {res['saved_after_vs_before']:.4g}" in \
        capsys.readouterr().out


def test_every_full_run_config_loads_and_builds() -> None:
    """What the one GPU run builds, checked here so that no case fails there on a bad override:
    each variant of MiM base and each baseline loads at each batch, and each model builds."""
    mod = _module()
    full = mod.FULL
    cases = [(full["preset"], (*full["overrides"], *v.overrides), b)
             for v in (mod.BEFORE, mod.AFTER, *mod.MEMORY, mod.COMPILED) for b in full["batches"]]
    cases += [(preset, (*full["common"], *overrides), b)
              for preset, overrides, batches in full["baselines"].values() for b in batches]
    built = set()
    for preset, overrides, batch in cases:
        cfg = mod._config(preset, overrides, batch)
        assert cfg.optim.batch_size == batch and cfg.optim.precision == "bf16", (preset, overrides)
        if preset not in built:  # the config checks every switch; one build per model is enough
            built.add(preset)
            model = mod.build_pretrain_model(cfg)
            assert sum(p.numel() for p in model.parameters()) > 1e6, preset
    before = mod._config(full["preset"], (*full["overrides"], *mod.BEFORE.overrides), 1)
    assert (before.model.one_pass, before.model.depthwise_impl) == ("never", "cudnn")
