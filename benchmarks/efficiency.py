"""Pre-training cost per 96^3 volume and per level-1 sample: MiM vs full-token and baseline SSL.

Cases, all at batch 1 on the same seeded 96^3 input (CUDA: also at ``--batch``, 8), one training
step = forward + loss + backward, gradients reset; no optimizer update:

* ``mim_base``  the real MiM module of the ``base`` preset (``build_mim``) on one level-2-style
  volume: 60% of the tokens masked per token (86 of 216 visible, the level-2 mask of
  ``sample_levels``), encoder on visible tokens, decoder, both projection heads.
* ``hybrid_all`` the same encoder on all 216 tokens (``ids_keep=None``) + the same decoder/heads.
* ``mae3d``, ``hybrid_mae``  the project's single-level baselines as trained (presets ``mae3d``:
  ViT-B/16 encoder, ``hybrid-mae``: MiM's hybrid encoder, both 60% masked, MiM's decoder, no
  heads): the real ``MiM.forward`` + training loss (``compute_losses``) of one 96^3 crop.
  (``results/efficiency.json`` predates these presets: its ``mae3d`` is ViT-B at 75% masking
  with a 512-wide MAE decoder, and it has no ``hybrid_mae``.)
* ``swinssl``   Swin-UNETR's SSL model (:class:`mim3d.models.swinssl.SwinSSL`, sizes of the
  ``swin-ssl`` preset) on TWO augmented views per sample, all tokens, rotation + contrastive +
  inpainting loss.
* ``mim_sample`` (``--quick`` and CUDA only) the real ``MiM.forward`` + loss of the ``base``
  preset on one level-1 crop: all 21 volumes in one graph.

Per level-1 training sample: MiM runs 21 volumes (1 + 4 + 16; its forward FLOPs are counted on
the real ``MiM.forward`` of one 192^3 crop, its time and memory come from ``mim_sample`` where it
ran, else its time is 21 x the per-volume step, because a full sample's graph, ~1 GB per volume,
does not fit a small CPU box), SwinSSL 2 views, the MAEs 1. ``summary.table_xi`` (and the
``RESULT table_xi_*`` lines) holds per method (mim, hybrid_mae, mae3d, swinssl) GFLOPs per 96^3
volume/view and per sample, step time and peak memory per sample at each batch measured.
Ratios: ``flops_ratio_mim_vs_swinssl`` = MiM forward GFLOPs per 96^3 volume / SwinSSL forward
GFLOPs per 96^3 view; ``*_per_sample`` use the per-sample figures; ``time_ratio_mim_vs_swinssl``
= MiM step time per volume / SwinSSL step time per view (half its two-view step).

Methods: FLOPs by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add: matmuls,
convolutions, attention). Time: one warm-up step (whose FLOPs and memory are counted), then the
median wall time (and process CPU time) of N steps. Memory: each case runs in a fresh process;
the peak-RSS counter is reset (``/proc/self/clear_refs``) right before its first step and the
figure is VmHWM after it minus VmRSS before it (activations, gradients, autograd and allocator;
parameters reported apart); CUDA: ``max_memory_allocated`` minus the allocation before.
Workers run with glibc malloc told never to mmap or trim (``TUNED_MALLOC``, the CPU-training
equivalent of preloading jemalloc/tcmalloc); ``glibc-malloc`` runs show what that is worth.
``step_share_of_gemm_peak`` = (fwd+bwd FLOPs / median step time) / the best fp32 2048^3
``torch.mm`` FLOP/s seen in the run at the same thread count (best of 6 in the parent before and
after, and in each worker before its timed steps), best over the fp32 MiM variants. Each run also
records ``foreign_cpu_share``: the share of the CPUs *other* processes used while it was timed.
CUDA (bf16 autocast; results/efficiency_cuda.json): the share is of the best bf16 8192^3 GEMM.

    PYTHONPATH=src .venv/bin/python benchmarks/efficiency.py                 # CPU, ~5 min idle
    PYTHONPATH=src .venv/bin/python benchmarks/efficiency.py --quick         # CI smoke, ~1 min
    PYTHONPATH=src .venv/bin/python benchmarks/efficiency.py --device cuda   # GPU, bf16, b1 + b8
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _step_profile import gemm_peak, sync
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from mim3d.config import load_config
from mim3d.data.views import make_two_views
from mim3d.factory import build_mim, geometry_from_config
from mim3d.losses import reconstruction_loss, swin_ssl_loss
from mim3d.masking import LevelMasks, patchify, sample_levels
from mim3d.models.mim import unit_means
from mim3d.models.swinssl import SwinSSL

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# per mode: MiM preset, (preset, overrides) of the cases built from a config, SwinSSL input and
# width, timed steps per case
ONE_LEVEL = ("geometry.crop_sizes=[[32,32,32]]", "geometry.mask_ratios=[0.6]",
             "geometry.gammas=[]", "loss.alignment=none")  # tiny's single-level baselines
FULL = {"preset": "base", "swin": ((96,) * 3, 48),
        "configs": {"hybrid_mae": ("hybrid-mae", ()), "mae3d": ("mae3d", ()),
                    "mim_sample": ("base", ())},
        "iters": {"mim_base": 4, "hybrid_all": 3, "mae3d": 4, "swinssl": 2, "hybrid_mae": 4,
                  "mim_sample": 2, "variant": 3}}
QUICK = {"preset": "tiny", "swin": ((64, 32, 32), 12),
         "configs": {"hybrid_mae": ("tiny", ONE_LEVEL),
                     "mae3d": ("tiny", (*ONE_LEVEL, "model.encoder=vit")),
                     "mim_sample": ("tiny", ())},
         "iters": dict.fromkeys(("mim_base", "hybrid_all", "mae3d", "swinssl", "hybrid_mae",
                                 "mim_sample", "variant"), 1)}
CASES = ("mim_base", "hybrid_all", "mae3d", "swinssl", "hybrid_mae")  # each run first at batch 1
# Table XI: method -> (case measured per 96^3 volume, case measured per level-1 sample)
METHODS = {"mim": ("mim_base", "mim_sample"), "hybrid_mae": ("hybrid_mae", "hybrid_mae"),
           "mae3d": ("mae3d", "mae3d"), "swinssl": ("swinssl", "swinssl")}
# glibc malloc returns every large block (mmap) to the OS on free, so each step page-faults its
# activations in again (high sys time). Never mmap, never trim: freed memory is reused instead.
# The glibc-malloc runs measure what it is worth (mostly SwinSSL's big attention buffers).
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


@dataclasses.dataclass
class Case:
    """A model, its inputs bound in, and its breakdown of forward FLOPs into named groups."""

    model: nn.Module
    step_loss: Callable[[], Tensor]  # forward + loss of one training step
    volumes: int  # 96^3 volumes processed per call (SwinSSL: 2 views)
    groups: dict[str, list[str]]  # group -> FlopCounterMode module keys summed into it
    remainders: dict[str, tuple[str, list[str]]]  # group -> (parent key, groups it excludes)
    encoder_params: int
    note: str


def _hybrid_groups(e: str = "HybridEncoder", dec: str = "MaskedDecoder",
                   heads: tuple[str, ...] = ("ProjectionHead",),
                   ) -> tuple[dict[str, list[str]], dict[str, tuple[str, list[str]]]]:
    """FlopCounterMode keys of the hybrid encoder's parts (module keys as called: ``e``...)."""
    groups = {"conv_stages_1_3": [f"{e}.downsamples.{i}" for i in range(3)] + [f"{e}.conv_stages"],
              "token_embed": [f"{e}.downsamples.3", f"{e}.token_proj"],
              "transformer": [f"{e}.blocks"], "decoder": [dec], "heads": list(heads)}
    # fusion runs patch_linear on the fusion convs' weights inside HybridEncoder._encode
    return groups, {"fusion_and_norm": (e, ["conv_stages_1_3", "token_embed", "transformer"])}


def _mim_case(mode: dict, batch: int, dev: torch.device, all_tokens: bool) -> Case:
    cfg = load_config("pretrain", mode["preset"])
    mim = build_mim(cfg).to(dev)
    geo = geometry_from_config(cfg.geometry)
    lm = sample_levels(1, geo, torch.Generator().manual_seed(0))[1]  # level 2: 4 volumes
    rows = torch.arange(batch) % lm.mask.shape[0]
    keep, restore, mask = lm.ids_keep[rows], lm.ids_restore[rows], lm.mask[rows]
    if all_tokens:  # nothing hidden; the loss then covers every token (SimMIM-style cost)
        keep, mask = None, torch.ones_like(mask)
        restore = torch.arange(mask.shape[1]).expand(batch, -1).contiguous()
    keep = keep.to(dev) if keep is not None else None
    restore, mask = restore.to(dev), mask.to(dev)
    x = torch.rand(batch, 1, *cfg.geometry.input_size, generator=torch.Generator().manual_seed(1))
    x, p, unit = x.to(dev), cfg.geometry.patch_size, geo[1].unit_tokens

    def step_loss() -> Tensor:  # the body of MiM.forward for one middle-level volume
        dec = mim.decoder(mim.encoder(x, keep), restore)
        ctx = mim.child_head(dec.features.mean(dim=1))
        units = mim.parent_head(unit_means(dec.features, mim.grid, unit).detach())
        # the alignment term needs a parent/child pair; a same-graph stand-in keeps its cost
        return (reconstruction_loss(dec.pred, patchify(x, p), mask)
                + ctx.float().pow(2).mean() + units.float().pow(2).mean())

    groups, rest = _hybrid_groups()
    vis = mask.shape[1] if keep is None else keep.shape[1]
    note = f"{mode['preset']} preset, {vis}/{mask.shape[1]} tokens through the encoder"
    return Case(mim, step_loss, 1, groups, rest,
                sum(q.numel() for q in mim.encoder.parameters()), note)


def _masks_to(m: LevelMasks, dev: torch.device) -> LevelMasks:
    return dataclasses.replace(m, **{f.name: getattr(m, f.name).to(dev)
                                     for f in dataclasses.fields(m) if f.name != "level"})


def _preset_case(mode: dict, name: str, batch: int, dev: torch.device) -> Case:
    """The real ``MiM.forward`` + training loss of a config on ``batch`` level-1 crops."""
    from mim3d.engine.train import compute_losses  # the loss exactly as training computes it

    preset, overrides = mode["configs"][name]
    cfg = load_config("pretrain", preset, overrides=list(overrides))
    mim = build_mim(cfg).to(dev)
    levels = sample_levels(batch, geometry_from_config(cfg.geometry),
                           torch.Generator().manual_seed(0))
    masks = [_masks_to(m, dev) for m in levels]
    x1 = torch.rand(batch, 1, *cfg.geometry.crop_sizes[0],
                    generator=torch.Generator().manual_seed(1)).to(dev)

    def step_loss() -> Tensor:
        return compute_losses(mim(x1, masks), cfg, 0)["loss"]

    if cfg.model.encoder == "vit":
        groups, rest = {"patch_embed": ["MiM.encoder.patch_embedding"],
                        "transformer": ["MiM.encoder.blocks"], "decoder": ["MiM.decoder"]}, {}
    else:
        groups, rest = _hybrid_groups("MiM.encoder", "MiM.decoder",
                                      ("MiM.child_head", "MiM.parent_head"))
    vis = [f"{int((~m.mask[0]).sum())}/{m.mask.shape[1]}" for m in levels]
    note = (f"preset {preset} {' '.join(overrides)}: real MiM.forward + loss, volumes per crop "
            f"{[m.mask.shape[0] // batch for m in levels]}, visible tokens per level {vis}")
    return Case(mim, step_loss, sum(m.mask.shape[0] for m in levels) // batch, groups, rest,
                sum(q.numel() for q in mim.encoder.parameters()), note)


def _swin_case(mode: dict, batch: int, dev: torch.device) -> Case:
    size, feat = mode["swin"]
    model = SwinSSL(img_size=size, feature_size=feat).to(dev)
    x = torch.rand(batch, 1, *size, generator=torch.Generator().manual_seed(1))
    v = make_two_views(x, torch.Generator().manual_seed(2))  # data pipeline work: not timed
    inputs, targets = [t.to(dev) for t in v.inputs], [t.to(dev) for t in v.targets]
    rots = [t.to(dev) for t in v.rotations]

    def step_loss() -> Tensor:
        out1, out2 = model(inputs[0]), model(inputs[1])
        return swin_ssl_loss(out1, out2, *rots, *targets)["loss"]

    s = "SwinSSL.swinViT"
    groups = {"patch_embed": [f"{s}.patch_embed"], **{f"swin_stage{i}": [f"{s}.layers{i}"]
                                                      for i in range(1, 5)},
              "decoder": ["SwinSSL.decoder"],
              "heads": ["SwinSSL.rotation_head", "SwinSSL.contrastive_head"]}
    note = f"feature {feat}, input {size}, two views per step, all tokens"
    return Case(model, step_loss, 2, groups, {},
                sum(q.numel() for q in model.swinViT.parameters()), note)


def _build(name: str, mode: dict, batch: int, dev: torch.device) -> Case:
    if name in ("mim_base", "hybrid_all"):
        return _mim_case(mode, batch, dev, all_tokens=name == "hybrid_all")
    return _swin_case(mode, batch, dev) if name == "swinssl" else _preset_case(mode, name, batch,
                                                                                dev)


def _under(flat: dict[str, int], prefix: str) -> int:
    """FLOPs of module ``prefix`` and everything inside it, each op counted once.

    FlopCounterMode keys only modules whose forward ran, so containers (``nn.ModuleList``) have
    no key of their own; their children are summed, skipping keys nested in another match.
    """
    hits = [k for k in flat if k == prefix or k.startswith(prefix + ".")]
    return sum(flat[k] for k in hits if not any(k.startswith(h + ".") for h in hits))


def _breakdown(counter: FlopCounterMode, case: Case) -> dict[str, float]:
    """Forward GFLOPs per group; ``other`` is what no group claims (losses, glue)."""
    flat = {k: sum(v.values()) for k, v in counter.get_flop_counts().items() if k != "Global"}
    out = {g: sum(_under(flat, k) for k in keys) for g, keys in case.groups.items()}
    for g, (parent, minus) in case.remainders.items():
        out[g] = _under(flat, parent) - sum(out[m] for m in minus)
    out["other"] = counter.get_total_flops() - sum(out.values())
    return {g: v / 1e9 for g, v in out.items()}


def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last clear_refs reset) of this process, MiB."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _memory_base(dev: torch.device) -> float:
    """MiB in use before the step; resets the peak counter (VmHWM via clear_refs, or CUDA's)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
    return _rss_mib("VmRSS")


def _counted_step(case: Case, ctx: Callable[[], Any], dev: torch.device) -> dict[str, Any]:
    """The warm-up step: FLOPs of forward and backward, per-group forward FLOPs, peak memory."""
    gc.collect()
    base = _memory_base(dev)
    with FlopCounterMode(display=False) as fwd, ctx():
        loss = case.step_loss()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    sync(dev)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else _rss_mib("VmHWM"))
    case.model.zero_grad(set_to_none=True)
    return {"flops_fwd": fwd.get_total_flops(), "flops_bwd": bwd.get_total_flops(),
            "breakdown_fwd_gflops": _breakdown(fwd, case), "mem_base_mib": base,
            "mem_step_peak_delta_mib": peak - base}


def _busy_s() -> tuple[float, float, float]:
    """(machine busy CPU-s, machine total CPU-s, this process's CPU-s) from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz, ru = os.sysconf("SC_CLK_TCK"), resource.getrusage(resource.RUSAGE_SELF)
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz, ru.ru_utime + ru.ru_stime


def foreign_share(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Share of the machine's CPU capacity used by *other* processes between two _busy_s()."""
    return max(0.0, (b[0] - a[0]) - (b[2] - a[2])) / max(b[1] - a[1], 1e-9)


def _timed_steps(case: Case, ctx: Callable[[], Any], dev: torch.device,
                 n: int) -> dict[str, Any]:
    wall, cpu, b0 = [], [], _busy_s()
    for _ in range(n):
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        with ctx():
            loss = case.step_loss()
        loss.backward()
        sync(dev)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        case.model.zero_grad(set_to_none=True)
    return {"wall_s": wall, "cpu_s": cpu, "foreign_cpu_share": foreign_share(b0, _busy_s())}


def _sample_flops(mode: dict, dev: torch.device) -> dict[str, Any]:
    """Forward FLOPs of the real MiM.forward + loss for one level-1 crop (all 21 volumes)."""
    from mim3d.engine.train import compute_losses  # the loss exactly as training computes it

    cfg = load_config("pretrain", mode["preset"])
    mim = build_mim(cfg).to(dev)
    geo = geometry_from_config(cfg.geometry)
    masks = sample_levels(1, geo, torch.Generator().manual_seed(0))
    x1 = torch.rand(1, 1, *cfg.geometry.crop_sizes[0]).to(dev)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        compute_losses(mim(x1, [_masks_to(m, dev) for m in masks]), cfg, 0)
    return {"sample_flops_fwd": fc.get_total_flops(),
            "sample_volumes": [int(m.mask.shape[0]) for m in masks],
            "sample_visible_tokens": [int((~m.mask[0]).sum()) for m in masks]}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one case/variant in this (fresh) process; see the module docstring."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    mode, dev = (QUICK if spec["quick"] else FULL), torch.device(spec["device"])
    case = _build(spec["case"], mode, spec["batch"], dev)
    bf16 = spec["precision"] == "bf16"

    def ctx() -> Any:
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    out = {**spec, "note": case.note, "volumes_per_step": case.volumes * spec["batch"],
           "params": sum(q.numel() for q in case.model.parameters()),
           "encoder_params": case.encoder_params, "loadavg_before": os.getloadavg()}
    out.update(_counted_step(case, ctx, dev))  # eager: compiled code does the same FLOPs
    if spec["compile"]:
        case.step_loss = torch.compile(case.step_loss)
        t0 = time.perf_counter()
        _timed_steps(case, ctx, dev, 1)
        out["compile_and_first_step_s"] = time.perf_counter() - t0
    out["gemm_fp32_flops_per_s"] = gemm_peak(dev)
    if dev.type == "cuda":  # the GPU's bf16 tensor-core rate needs big products to show
        out["gemm_bf16_flops_per_s"] = gemm_peak(dev, torch.bfloat16, n=8192)
    out.update(_timed_steps(case, ctx, dev, spec["iters"]))
    out["loadavg_after"] = os.getloadavg()
    if spec.get("sample_flops"):
        out.update(_sample_flops(mode, dev))
    return out


def _variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs of one invocation: every case at batch 1, then larger batches and variants.

    CUDA: every case again at ``--batch`` (8), ``mim_sample`` at 1 and 2 (42 volumes); CPU:
    ``mim_sample`` only with ``--quick``, MiM at batch 2, bf16, glibc malloc, compile.
    """
    mode = QUICK if args.quick else FULL
    cuda = args.device == "cuda"
    prec = "bf16" if cuda else "fp32"  # GPU runs as training does there: bf16 autocast
    base = {"device": args.device, "threads": args.threads, "quick": args.quick, "batch": 1,
            "precision": prec, "compile": False, "malloc": "tuned"}
    runs = [{**base, "case": c, "iters": 20 if cuda else mode["iters"][c],
             "sample_flops": c == "mim_base"} for c in CASES]
    sample = {**base, "case": "mim_sample", "iters": 20 if cuda else mode["iters"]["mim_sample"]}
    runs += [sample] if cuda or args.quick else []
    mim = {**base, "case": "mim_base", "iters": 20 if cuda else mode["iters"]["variant"]}
    if cuda:
        runs += [{**r, "batch": args.batch or 8, "sample_flops": False} for r in runs[:len(CASES)]]
        runs.append({**sample, "batch": 2})
    else:
        runs.append({**mim, "batch": args.batch or 2})
    if not cuda and torch.ops.mkldnn._is_mkldnn_bf16_supported():  # AVX512-BF16 / AMX
        runs.append({**mim, "precision": "bf16"})
    if not cuda:  # what the allocator setting is worth
        runs += [{**r, "malloc": "glibc-default", "sample_flops": False}
                 for r in runs[:len(CASES)] if r["case"] in ("mim_base", "swinssl")]
    if args.try_compile:
        runs.append({**mim, "compile": True})
    return runs


def _wait_idle(max_wait: float, threshold: float = 0.15) -> dict[str, float]:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` of the CPUs.

    On a shared box other jobs inflate every timing (2 OpenMP threads stall whenever one is
    descheduled); FLOPs are unaffected. The share seen last is recorded with the run.
    """
    t0, share = time.perf_counter(), 1.0
    while True:
        a = _busy_s()
        time.sleep(2.0)
        share = foreign_share(a, _busy_s())
        if share < threshold or time.perf_counter() - t0 >= max_wait:
            return {"waited_s": time.perf_counter() - t0, "foreign_cpu_share_before": share}


def _run_worker(spec: dict[str, Any], timeout: float, wait: float,
                tree: Path = ROOT) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter (clean peak-RSS baseline) and parse its JSON.

    ``tree`` is the checkout whose ``benchmarks/efficiency.py`` and ``src`` run (another commit's
    worktree for ``cpu_regression.py``). The worker gets its own process group, killed whole on
    timeout, so no worker outlives the run.
    """
    cmd = [sys.executable, str(tree / "benchmarks" / "efficiency.py"), "--worker",
           json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    env.update(TUNED_MALLOC if spec["malloc"] == "tuned" else {})
    # tree's src first; the rest of the caller's path stays (e.g. a carried site-packages)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(tree / "src"), env.get("PYTHONPATH"))))
    idle = _wait_idle(wait) if wait > 0 else {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("WORKER_JSON ")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": stderr.strip().splitlines()[-1:] or ["no output"]}
    return {**json.loads(lines[-1][len("WORKER_JSON "):]), **idle,
            "process_s": time.perf_counter() - t0}


def _derive(r: dict[str, Any]) -> dict[str, Any]:
    """Per-volume figures of one run (a SwinSSL 'volume' is one of its two views)."""
    if "error" in r:
        return r
    v, t = r["volumes_per_step"], statistics.median(r["wall_s"])
    total = r["flops_fwd"] + r["flops_bwd"]
    extra = (",compile" if r["compile"] else "") + (",glibc-malloc" if r["malloc"] != "tuned"
                                                     else "")
    return {**r, "label": f"{r['case']}[b{r['batch']},{r['precision']}{extra}]",
            "gflops_fwd_per_volume": r["flops_fwd"] / v / 1e9,
            "gflops_fwd_bwd_per_volume": total / v / 1e9, "median_step_s": t,
            "min_step_s": min(r["wall_s"]), "median_step_cpu_s": statistics.median(r["cpu_s"]),
            "step_s_per_volume": t / v, "achieved_flops_per_s": total / t,
            "share_of_worker_gemm": total / t / r.get("gemm_bf16_flops_per_s",
                                                      r["gemm_fp32_flops_per_s"])}


def _shares(runs: list[dict[str, Any]], gemm: float, dtype: str) -> dict[str, Any]:
    """step_share of every MiM run against the best ``dtype`` GEMM rate seen in the whole run."""
    mim = [r for r in runs if r["case"] == "mim_base" and "error" not in r]
    by = {r["label"]: r["achieved_flops_per_s"] / gemm for r in mim}
    fp32 = {k: v for k, v in by.items() if ",fp32" in k} or by
    best32, best = max(fp32, key=fp32.get), max(by, key=by.get)
    return {f"gemm_{dtype}_peak_flops_per_s": gemm, "step_share_by_config": by,
            "step_share_of_gemm_peak": fp32[best32], "step_share_config": best32,
            "step_share_any_precision": by[best], "step_share_any_precision_config": best}


def _by_batch(runs: list[dict[str, Any]], case: str) -> dict[int, dict[str, Any]]:
    """The good runs of ``case`` as first set up (its precision, tuned malloc, eager), by batch."""
    ok = [r for r in runs if r["case"] == case and "error" not in r and not r["compile"]
          and r["malloc"] == "tuned"]
    return {r["batch"]: r for r in ok if r["precision"] == ok[0]["precision"]}


def _method_row(runs: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """One Table-XI row: per 96^3 volume (SwinSSL: per view) and per level-1 training sample."""
    vol_case, sample_case = METHODS[method]
    v = _by_batch(runs, vol_case)[1]
    per_sample = {f"b{b}": {"gflops_fwd_per_sample": r["flops_fwd"] / b / 1e9,
                            "step_s_per_sample": r["median_step_s"] / b,
                            "samples_per_s": b / r["median_step_s"],
                            "mem_step_peak_mib": r["mem_step_peak_delta_mib"]}
                  for b, r in sorted(_by_batch(runs, sample_case).items())}
    n = sum(v.get("sample_volumes", [])) or v["volumes_per_step"] // v["batch"]
    source = "measured"
    if "b1" not in per_sample:  # MiM on a CPU box: one sample's graph does not fit
        t = n * v["step_s_per_volume"]
        per_sample["b1"] = {"gflops_fwd_per_sample": v["sample_flops_fwd"] / 1e9,
                            "step_s_per_sample": t, "samples_per_s": 1 / t,
                            "mem_step_peak_mib": None}
        source = f"estimate: {n} x the per-volume step; memory not measured"
    return {"volume_case": vol_case, "sample_case": sample_case, "volumes_per_sample": n,
            "gflops_fwd_per_volume": v["gflops_fwd_per_volume"],
            "gflops_fwd_bwd_per_volume": v["gflops_fwd_bwd_per_volume"],
            "step_s_per_volume": v["step_s_per_volume"],
            "volume_case_mem_step_peak_mib": v["mem_step_peak_delta_mib"],
            "params": v["params"], "encoder_params": v["encoder_params"],
            "per_sample": per_sample, "per_sample_source": source}


def _table(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Table XI for every method; hybrid_mae's volume is also derived from MiM's as a check."""
    rows = {m: _method_row(runs, m) for m in METHODS}
    mim = _by_batch(runs, "mim_base")[1]
    rows["hybrid_mae"]["gflops_fwd_per_volume_derived"] = (
        mim["gflops_fwd_per_volume"] - mim["breakdown_fwd_gflops"]["heads"])
    rows["hybrid_mae"]["derived_as"] = "mim_base per volume minus its projection heads"
    return rows


def _summary(runs: list[dict[str, Any]], target: float, gemm: float,
             dtype: str) -> dict[str, Any]:
    """The headline ratios (see the module docstring for their definitions)."""
    mim, mae, swin = (_by_batch(runs, c)[1] for c in ("mim_base", "mae3d", "swinssl"))
    n_vol = sum(mim["sample_volumes"])
    flops = {"mim_base": mim["sample_flops_fwd"] / 1e9, "swinssl": swin["flops_fwd"] / 1e9,
             "mae3d": mae["flops_fwd"] / 1e9}
    secs = {"mim_base": n_vol * mim["step_s_per_volume"], "swinssl": swin["median_step_s"],
            "mae3d": mae["median_step_s"]}
    return {
        "gflops_per_volume_mim_base": mim["gflops_fwd_per_volume"], "gflops_target": target,
        "gflops_rel_error_vs_target": mim["gflops_fwd_per_volume"] / target - 1,
        "flops_ratio_mim_vs_swinssl": mim["gflops_fwd_per_volume"] / swin["gflops_fwd_per_volume"],
        "flops_ratio_per_sample_mim_vs_swinssl": flops["mim_base"] / flops["swinssl"],
        "time_ratio_mim_vs_swinssl": mim["step_s_per_volume"] / swin["step_s_per_volume"],
        "time_ratio_per_sample_mim_vs_swinssl": secs["mim_base"] / secs["swinssl"],
        "volumes_per_sample": {"mim_base": n_vol, "swinssl": 2, "mae3d": 1},
        "gflops_fwd_per_sample": flops, "step_s_per_sample": secs,
        "mim_sample_time_method": f"{n_vol} x median per-volume step (estimate)",
        **_shares(runs, gemm, dtype), "table_xi": _table(runs)}


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines()
             if ln.startswith("model name")]
    return {"cpu_model": names[0] if names else "unknown", "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}


def _table_results(table: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``table_xi_<method>_<figure>``: batch 1 per volume and per sample, larger batches."""
    out = {}
    for m, row in table.items():
        one, pre = row["per_sample"]["b1"], f"table_xi_{m}_"
        out |= {pre + "gflops_per_volume": row["gflops_fwd_per_volume"],
                pre + "gflops_per_sample": one["gflops_fwd_per_sample"],
                pre + "step_s_per_volume": row["step_s_per_volume"],
                pre + "step_s_per_sample": one["step_s_per_sample"],
                pre + "mem_mib_per_sample": one["mem_step_peak_mib"]}
        for b, r in row["per_sample"].items():
            if b != "b1":
                out |= {f"{pre}samples_per_s_{b}": r["samples_per_s"],
                        f"{pre}mem_mib_{b}": r["mem_step_peak_mib"]}
    return {k: v for k, v in out.items() if v is not None}


def _print(summary: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    for r in runs:
        if "error" in r:
            print(f"{r['case']} ERROR {r['error']}")
            continue
        b = ", ".join(f"{k} {v:.2f}" for k, v in r["breakdown_fwd_gflops"].items())
        print(f"{r['label']:30s} fwd {r['gflops_fwd_per_volume']:6.2f} GF/vol  step "
              f"{r['median_step_s']:6.2f} s  mem {r['mem_step_peak_delta_mib']:6.0f} MiB  "
              f"params {r['params'] / 1e6:6.2f} M  others' CPU {r['foreign_cpu_share']:.2f}  [{b}]")
    for key in ("gflops_per_volume_mim_base", "flops_ratio_mim_vs_swinssl",
                "flops_ratio_per_sample_mim_vs_swinssl", "time_ratio_mim_vs_swinssl",
                "time_ratio_per_sample_mim_vs_swinssl", "step_share_of_gemm_peak",
                "step_share_any_precision"):
        print(f"RESULT {key} {summary[key]:.4g}")
    for key, val in _table_results(summary["table_xi"]).items():
        print(f"RESULT {key} {val:.4g}")
    print(f"# step share: {summary['step_share_config']}; any precision: "
          f"{summary['step_share_any_precision_config']}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models (CI smoke, ~1 min)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads in every worker (default: torch's default)")
    ap.add_argument("--try-compile", action="store_true",
                    help="also time torch.compile on MiM (minutes of compilation on 2 cores)")
    ap.add_argument("--batch", type=int, default=None,
                    help="the larger batch: every case on CUDA (default 8), MiM on CPU (2)")
    ap.add_argument("--target-gflops", type=float, default=47.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each case wait up to S s for other jobs to leave the CPUs")
    ap.add_argument("--out", type=Path, default=None, help="result JSON path")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every case in its own process, print RESULT lines, write the JSON."""
    args = _parse(argv)
    if args.worker is not None:
        print("WORKER_JSON " + json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    t0, load0 = time.perf_counter(), os.getloadavg()
    torch.set_num_threads(args.threads)
    gemm_start = gemm_peak(torch.device(args.device))
    runs = []
    for spec in _variants(args):
        runs.append(_derive(_run_worker(spec, args.timeout, args.wait_idle)))
        print(f"# {runs[-1].get('label', spec['case'])}: {runs[-1].get('error', 'ok')}, "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    gemm_end = gemm_peak(torch.device(args.device))
    if any("error" in r for r in runs[:len(CASES)]):
        print("\n".join(f"{r['case']} ERROR {r['error']}" for r in runs if "error" in r))
        return 1
    dtype = "bf16" if args.device == "cuda" else "fp32"  # the precision the steps ran in
    gemm = max(([] if dtype == "bf16" else [gemm_start, gemm_end])
               + [r[f"gemm_{dtype}_flops_per_s"] for r in runs if "error" not in r])
    summary = _summary(runs, args.target_gflops, gemm, dtype)
    _print(summary, runs)
    result = {"command": "PYTHONPATH=src " + " ".join([sys.executable, *sys.argv]),
              "cwd": os.getcwd(), "mode": "quick" if args.quick else "full",
              "machine": _machine(args), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "gemm_fp32_flops_per_s_parent": [gemm_start, gemm_end],
              "wall_s": time.perf_counter() - t0, "summary": summary, "runs": runs}
    name = "efficiency_cuda.json" if args.device == "cuda" else "efficiency.json"
    out = args.out or (None if args.quick else RESULTS / name)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
