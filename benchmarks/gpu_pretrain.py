"""MiM base pre-training at the GPU's pace: ``before`` and ``after`` issue 12, side by side.

Every number comes from the real engine step (:func:`mim3d.engine.train.train_step`: real masks
from ``sample_levels``, the real loss, AdamW, bf16 autocast on CUDA) on random 192^3 crops, in
one process:

* ``before``  the library's paths as of the issue's start, kept selectable by switches:
  ``model.one_pass=never`` (level by level), ``model.depthwise_impl=cudnn``,
  ``optim.conv_recompute=never``, plain (unfused) AdamW, pageable input batches, and every loss
  term and the gradient norm read on the host after each step (the old loop's syncs).
* ``after``   the defaults: one pass over the levels, the Triton depthwise conv, conv blocks
  recomputed in backward (CUDA), fused AdamW, pinned batches, no per-step reads.
* memory options (at batch 1 and the largest batch): ``after`` without conv recompute, with
  transformer-block checkpointing on top, and with bf16 saved activations on top, so the speed
  cost of each is measured.
* baselines at their best batch: hybrid MAE, MAE3D, Swin-SSL (Table XI re-measured).
* the 5^3 depthwise conv alone (forward + both gradients) on one sample's stage-1 and stage-2
  maps: cuDNN, the Triton kernels, and the Triton kernels with one tap per weight-gradient
  program (the first split), so the split is chosen by a measurement.

Phases, headline figures first (:data:`PHASES`): the GEMM peak and the FLOPs, ``before`` and
``after``, the depthwise conv alone, the profiles, the memory options, the baselines. The JSON is
rewritten after every phase, so a run cut short keeps what it measured; a failed case is an
``error`` row and a failed phase an entry of ``errors``, and the run goes on; after
``--budget-s`` no optional phase starts (``skipped``).

Timing: warm-up steps, then the wall time of N consecutive steps between two device syncs
(queued work overlaps as in training), per step. Memory: ``max_memory_allocated`` over the timed
steps minus what was allocated between steps (weights, optimizer state), per sample. FLOPs:
forward FLOPs of one sample (``FlopCounterMode``, cuDNN path so the depthwise convs count) x 3
for forward + backward; the share is that rate over the best bf16 8192^3 GEMM measured here.
Profile: one step of ``before`` (batch 1) and ``after`` (its best batch) under
``torch.profiler``; device kernel time by op family (library calls are wrapped in
``mim3d::<family>`` scopes, autograd nodes name their forward op), idle GPU = wall - kernels.

    PYTHONPATH=src python3 benchmarks/gpu_pretrain.py                # one GPU, < 8 min
    PYTHONPATH=src .venv/bin/python benchmarks/gpu_pretrain.py --quick --out /tmp/q.json  # CPU

On a GPU box whose Python has torch (with triton) but not monai, bring monai's wheel (pure
Python, no dependencies beyond numpy and torch): ``pip download --no-deps monai==1.6.1 -d whl``
where an index is reachable, then ``pip install --no-index --no-deps --target /tmp/site
whl/*.whl`` and run with ``PYTHONPATH=/tmp/site:src``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _step_profile import depthwise_ms, family_times, gemm_peak, library_scopes, machine, sync
from torch.utils.flop_counter import FlopCounterMode

import mim3d.engine.train as train_mod
from mim3d.config import PretrainConfig, load_config
from mim3d.engine.optim import make_optimizer, set_lr, warmup_cosine
from mim3d.factory import build_pretrain_model, geometry_from_config
from mim3d.masking import sample_levels

RESULT_FILE = Path(__file__).resolve().parent / "results" / "gpu_pretrain.json"
GIB = 2.0**30


@dataclass(frozen=True)
class Variant:
    """A set of switches: config overrides plus how the loop around the step behaves."""

    name: str
    overrides: tuple[str, ...] = ()
    fused: bool = True  # fused AdamW (CUDA only)
    host_sync: bool = False  # read every loss term and the grad norm after each step
    pinned: bool = True  # the input batch in pinned host memory (a pin_memory loader)


BEFORE = Variant("before", ("model.one_pass=never", "model.depthwise_impl=cudnn",
                            "optim.conv_recompute=never"), fused=False, host_sync=True,
                 pinned=False)
AFTER = Variant("after")
MEMORY = (Variant("after_no_conv_recompute", ("optim.conv_recompute=never",)),
          Variant("after_plus_block_checkpointing", ("optim.grad_checkpointing=true",)),
          Variant("after_plus_bf16_saved", ("optim.saved_activations=bf16",)))
COMPILED = Variant("after_compiled", ("train.compile=true",))
ONE_LEVEL = ("geometry.mask_ratios=[0.6]", "geometry.gammas=[]", "loss.alignment=none")
SHRUNK = ("model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]", "model.num_heads=2",
          "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
          "model.proj_dim=32", "model.vit_dim=32", "model.vit_depth=1",
          "geometry.crop_sizes=[[32,32,32],[16,16,16],[8,8,8]]",
          "geometry.input_size=[16,16,16]")
FULL = {"preset": "base", "overrides": ("optim.precision=bf16",), "batches": (1, 4, 8),
        "common": ("optim.precision=bf16",),
        "warmup": 2, "steps": 5, "gemm": (torch.bfloat16, 8192),
        # one base sample's stage 1 and stage 2 in one pass: 21 volumes
        "depthwise": {"stage1": (21, 48, 48, 48, 48), "stage2": (21, 96, 24, 24, 24)},
        "baselines": {"hybrid_mae": ("hybrid-mae", (), (8, 32)),
                      "mae3d": ("mae3d", (), (8, 32)),
                      "swin_ssl": ("swin-ssl", (), (4, 16))}}
QUICK = {"preset": "tiny", "overrides": SHRUNK, "batches": (1, 2), "warmup": 1, "steps": 1,
         "common": (),
         "gemm": (torch.float32, 512), "depthwise": {"stage1": (2, 8, 8, 8, 8)},
         "baselines": {"hybrid_mae": ("tiny", (*SHRUNK, "geometry.crop_sizes=[[16,16,16]]",
                                               *ONE_LEVEL), (2,)),
                       "mae3d": ("tiny", (*SHRUNK, "geometry.crop_sizes=[[16,16,16]]",
                                          *ONE_LEVEL, "model.encoder=vit"), (2,)),
                       "swin_ssl": ("tiny", ("method=swinssl", "geometry.crop_sizes=[[32,32,64]]",
                                             "geometry.input_size=[32,32,64]", *ONE_LEVEL,
                                             "model.dims=[12,24,48,96]"), (1,))}}
def _memory(dev: torch.device, reset: bool = False) -> float:
    """Bytes allocated now (resetting the peak), or the peak since the reset."""
    if dev.type != "cuda":  # the CPU has no allocator statistics to speak of
        return float("nan")
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return float(torch.cuda.memory_allocated())
    return float(torch.cuda.max_memory_allocated())


def _config(preset: str, overrides: tuple[str, ...], batch: int) -> PretrainConfig:
    return load_config("pretrain", preset, overrides=[*overrides, f"optim.batch_size={batch}"])


class _Trainer:
    """A model, its optimizer and an input batch, stepped by the real ``train_step``."""

    def __init__(self, cfg: PretrainConfig, variant: Variant, dev: torch.device) -> None:
        self.cfg, self.variant, self.dev, self.step = cfg, variant, dev, 0
        torch.manual_seed(0)
        self.model = build_pretrain_model(cfg).to(dev)
        if cfg.train.compile:
            train_mod.compile_blocks(self.model)
        o = cfg.optim
        self.opt = make_optimizer(self.model, lr=o.lr, weight_decay=o.weight_decay,
                                  betas=o.betas, device=dev, fused=variant.fused and dev.type
                                  == "cuda")
        x = torch.rand(o.batch_size, 1, *cfg.geometry.crop_sizes[0],
                       generator=torch.Generator().manual_seed(1))
        self.x = x.pin_memory() if variant.pinned and dev.type == "cuda" else x
        self.geometry = geometry_from_config(cfg.geometry)

    def __call__(self) -> train_mod.StepResult:
        o = self.cfg.optim
        set_lr(self.opt, warmup_cosine(self.step, base_lr=o.lr, warmup_steps=o.warmup_steps,
                                       total_steps=o.total_steps, min_lr=o.min_lr))
        res = train_mod.train_step(self.model, self.opt, itertools.repeat(self.x), cfg=self.cfg,
                                   geometry=self.geometry, step=self.step, rank=0,
                                   device=self.dev)
        if self.variant.host_sync:
            _ = [float(v) for v in res.losses.values()], float(res.grad_norm)
        self.step += 1
        return res


def measure(preset: str, overrides: tuple[str, ...], variant: Variant, batch: int,
            mode: dict[str, Any], dev: torch.device, method: str | None = None) -> dict[str, Any]:
    """Samples/s and peak memory of ``steps`` timed steps after ``warmup`` steps."""
    row: dict[str, Any] = {"variant": variant.name, "preset": preset, "batch": batch}
    row |= {"method": method} if method else {}
    try:
        run = _Trainer(_config(preset, (*overrides, *variant.overrides), batch), variant, dev)
        for _ in range(mode["warmup"]):
            run()
        sync(dev)
        static = _memory(dev, reset=True)
        t0 = time.perf_counter()
        for _ in range(mode["steps"]):
            res = run()
        sync(dev)
        step_s = (time.perf_counter() - t0) / mode["steps"]
        peak = _memory(dev)
        row |= {"step_s": step_s, "samples_per_s": batch / step_s, "static_gib": static / GIB,
                "peak_gib": peak / GIB, "peak_gib_per_sample": (peak - static) / GIB / batch,
                "loss": float(res.losses["loss"])}
    except Exception as err:  # noqa: BLE001 - one failed case is recorded, the run goes on
        row["error"] = _error(err)
    finally:
        run = None  # free the model before the next case
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    _print_row(row)
    return row


def profile_step(preset: str, overrides: tuple[str, ...], variant: Variant, batch: int,
                 mode: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    """Per-family time of one step, plus the idle GPU (wall minus kernel time)."""
    run = _Trainer(_config(preset, (*overrides, *variant.overrides), batch), variant, dev)
    for _ in range(mode["warmup"]):
        run()
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    with library_scopes(), torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        run()
        sync(dev)
        wall = time.perf_counter() - t0
    times = family_times(prof, dev.type == "cuda")
    times["idle_gpu_or_host"] = max(0.0, wall - sum(times.values()))
    return {"variant": variant.name, "batch": batch, "wall_s": wall,
            "seconds": dict(sorted(times.items(), key=lambda kv: -kv[1])),
            "share": {k: v / wall for k, v in times.items()}}


def forward_flops(preset: str, overrides: tuple[str, ...], dev: torch.device) -> float:
    """Forward FLOPs of one level-1 sample: the real MiM.forward + loss (cuDNN depthwise)."""
    cfg = _config(preset, (*overrides, *BEFORE.overrides), 1)
    model = build_pretrain_model(cfg).to(dev)
    masks = train_mod.masks_to_device(sample_levels(1, geometry_from_config(cfg.geometry),
                                                    torch.Generator().manual_seed(0)), dev)
    x = torch.rand(1, 1, *cfg.geometry.crop_sizes[0], device=dev)
    with torch.no_grad(), FlopCounterMode(display=False) as fc, \
            train_mod.autocast_context(dev, cfg.optim.precision):
        train_mod.compute_losses(model(x, masks), cfg, 0)
    return float(fc.get_total_flops())


def _best(rows: list[dict[str, Any]], variant: str) -> dict[str, Any] | None:
    ok = [r for r in rows if r["variant"] == variant and "error" not in r]
    return max(ok, key=lambda r: r["samples_per_s"]) if ok else None


@dataclass(frozen=True)
class _Run:
    """What every phase of one invocation shares."""

    mode: dict[str, Any]
    dev: torch.device
    compiled: bool

    def measure(self, variant: Variant, batch: int) -> dict[str, Any]:
        return measure(self.mode["preset"], self.mode["overrides"], variant, batch, self.mode,
                       self.dev)

    def profile(self, variant: Variant, batch: int) -> dict[str, Any]:
        prof = profile_step(self.mode["preset"], self.mode["overrides"], variant, batch,
                            self.mode, self.dev)
        _print_profile(prof)
        return prof


def _reference(run: _Run, data: dict[str, Any]) -> None:
    data["gemm_flops_per_s"] = gemm_peak(run.dev, *run.mode["gemm"], reps=10)
    flops = forward_flops(run.mode["preset"], run.mode["overrides"], run.dev)
    data["forward_gflops_per_sample"] = flops / 1e9


def _before_after(run: _Run, data: dict[str, Any]) -> None:
    data["rows"] += [run.measure(v, b) for v in (BEFORE, AFTER) for b in run.mode["batches"]]


def _depthwise(run: _Run, data: dict[str, Any]) -> None:
    data["depthwise_ms"] = depthwise_ms(run.dev, run.mode["depthwise"])


def _profiles(run: _Run, data: dict[str, Any]) -> None:
    after = _best(data["rows"], "after") or {"batch": run.mode["batches"][0]}
    data["profiles"] = [run.profile(BEFORE, run.mode["batches"][0]),
                        run.profile(AFTER, after["batch"])]


def _memory_options(run: _Run, data: dict[str, Any]) -> None:
    batches = run.mode["batches"]
    extra = [*MEMORY, *((COMPILED,) if run.compiled else ())]
    data["rows"] += [run.measure(v, b) for v in extra for b in (batches[0], batches[-1])]


def _baselines(run: _Run, data: dict[str, Any]) -> None:
    for m, (preset, overrides, batches) in run.mode["baselines"].items():
        data["baselines"][m] = [measure(preset, (*run.mode["common"], *overrides), AFTER, b,
                                        run.mode, run.dev, method=m) for b in batches]


# in order of need: the headline figures first, so a run cut short still has them
PHASES = (("reference", _reference), ("before_after", _before_after),
          ("depthwise", _depthwise), ("profiles", _profiles),
          ("memory_options", _memory_options), ("baselines", _baselines))
ALWAYS = ("reference", "before_after")


def run_all(mode: dict[str, Any], dev: torch.device, compiled: bool,
            save: Callable[[dict[str, Any]], None] = lambda data: None,
            budget_s: float = math.inf) -> dict[str, Any]:
    """Every measurement of one invocation, phase by phase; ``save`` sees the data after each.

    A phase that raises is recorded under ``errors`` and the next one runs; once ``budget_s``
    has passed, the phases left (except :data:`ALWAYS`) are listed under ``skipped``.
    """
    run, t0 = _Run(mode, dev, compiled), time.perf_counter()
    data: dict[str, Any] = {"rows": [], "profiles": [], "baselines": {}, "depthwise_ms": {},
                            "phases_done": [], "skipped": [], "errors": {}}
    for name, phase in PHASES:
        if name not in ALWAYS and time.perf_counter() - t0 > budget_s:
            data["skipped"].append(name)
            continue
        try:
            phase(run, data)
        except Exception as err:  # noqa: BLE001 - a failed phase must not lose the others
            data["errors"][name] = _error(err)
        data["phases_done"].append(name)
        save(data)
    return data


def results(data: dict[str, Any]) -> dict[str, float]:
    """The RESULT lines (see the issue) from :func:`run_all`'s measurements."""
    rows, out = data["rows"], {}
    for r in rows:
        if r["variant"] in ("before", "after") and "error" not in r:
            out[f"mim_base_samples_per_s_{r['variant']}_b{r['batch']}"] = r["samples_per_s"]
    before, after = _best(rows, "before"), _best(rows, "after")
    if before and after:
        out["mim_base_speedup_vs_before"] = after["samples_per_s"] / before["samples_per_s"]
    if after and {"forward_gflops_per_sample", "gemm_flops_per_s"} <= data.keys():
        flops = 3 * data["forward_gflops_per_sample"] * 1e9 * after["samples_per_s"]
        out["mim_base_step_share_of_bf16_gemm"] = flops / data["gemm_flops_per_s"]
    if after:
        per = [r["peak_gib_per_sample"] for r in rows if r["variant"] == "after" and "error"
               not in r]
        out["mim_base_peak_gib_per_sample"] = max(per)
    for r in rows:
        ref = next((a for a in rows if a["variant"] == "after" and a["batch"] == r["batch"]
                    and "error" not in a), None)
        if r["variant"] not in ("before", "after") and "error" not in r and ref:
            key = f"mim_base_{r['variant']}_b{r['batch']}"
            out[f"{key}_step_time_vs_after"] = r["step_s"] / ref["step_s"]
            out[f"{key}_peak_gib_per_sample"] = r["peak_gib_per_sample"]
    for method, runs in data["baselines"].items():
        best = _best(runs, "after")
        if best:
            out[f"{method}_samples_per_s"] = best["samples_per_s"]
    for impl, stages in data["depthwise_ms"].items():
        for stage, ms in stages.items():
            out[f"depthwise_ms_{impl}_{stage}"] = ms
    return out


def _error(err: BaseException) -> str:
    """One line for the JSON (the traceback goes to stderr, i.e. the run's log)."""
    traceback.print_exc(file=sys.stderr)
    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory"
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0] if first else ''}"


def _print_row(r: dict[str, Any]) -> None:
    tail = r.get("error") or (f"{r['samples_per_s']:8.3f} samples/s  step {r['step_s']:.4f}"
                              f" s  peak {r['peak_gib']:.2f} GiB")
    name = r.get("method", f"mim_{r['variant']}")
    print(f"# {name:36s} {r['preset']:10s} b{r['batch']:<3d} {tail}", flush=True)


def _print_profile(prof: dict[str, Any]) -> None:
    print(f"# profile {prof['variant']} b{prof['batch']}: wall {prof['wall_s']:.4f} s")
    for family, seconds in prof["seconds"].items():
        print(f"#   {family:24s} {seconds * 1e3:10.2f} ms  {prof['share'][family]:6.1%}")
    sys.stdout.flush()


def _print(data: dict[str, Any], res: dict[str, float]) -> None:
    for name, err in data["errors"].items():
        print(f"# phase {name} failed: {err}")
    if data["skipped"]:
        print(f"# skipped (time budget): {', '.join(data['skipped'])}")
    for key, value in res.items():
        if not math.isnan(value):  # NaN: not measured (no allocator statistics on the CPU)
            print(f"RESULT {key} {value:.4g}")


def main(argv: list[str] | None = None) -> int:
    """Measure, print RESULT lines and the profile, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="the same code on the CPU with a shrunk tiny preset (seconds; CI)")
    ap.add_argument("--compile", action="store_true",
                    help="also time train.compile=true (torch.compile of the blocks)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"result JSON (default {RESULT_FILE}; --quick writes none by default)")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="start no optional phase (depthwise, profiles, memory options, "
                         "baselines) after this many seconds (default 400)")
    args = ap.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print("gpu_pretrain.py needs a CUDA GPU (or --quick for the CPU smoke run)",
              file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.quick else "cuda")
    out, t0 = args.out or (None if args.quick else RESULT_FILE), time.perf_counter()

    def save(data: dict[str, Any]) -> None:  # after every phase: a run cut short keeps its part
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "mode": "quick" if args.quick else "full", "machine": machine(dev),
               "wall_s": time.perf_counter() - t0, "results": results(data), **data}
        out.write_text(json.dumps(doc, indent=1) + "\n")

    data = run_all(QUICK if args.quick else FULL, dev, args.compile, save, args.budget_s)
    _print(data, results(data))
    if out is not None:
        print(f"wrote {out}")
    return 1 if data["errors"] else 0  # a failed case is a row; a failed phase fails the run


if __name__ == "__main__":
    sys.exit(main())
