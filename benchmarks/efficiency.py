"""Pre-training cost per 96^3 volume and per level-1 sample: MiM vs full-token and baseline SSL.

Cases, all at batch 1 on the same seeded 96^3 input (one training step = forward + loss +
backward, gradients reset; no optimizer update):

* ``mim_base``  the real MiM module of the ``base`` preset (``build_mim``) on one level-2-style
  volume: 60% of the tokens masked per token (86 of 216 visible, the level-2 mask of
  ``sample_levels``), encoder on visible tokens, decoder, both projection heads.
* ``hybrid_all`` the same encoder on all 216 tokens (``ids_keep=None``) + the same decoder/heads.
* ``mae3d``     ViTEncoder ViT-B/16 (768, 12 blocks, 12 heads) on the 25% visible tokens (MAE3D's
  75% masking) + an MAE decoder (512 wide, 8 blocks, 16 heads, MAE's default), norm-pix MSE.
* ``swinssl``   Swin-UNETR's SSL model (:class:`mim3d.models.swinssl.SwinSSL`) on TWO augmented
  views per sample, all tokens, rotation + contrastive + inpainting loss.

Per level-1 training sample: MiM runs 21 volumes (1 + 4 + 16; its forward FLOPs are counted on
the real ``MiM.forward`` of one 192^3 crop, its time is 21 x the per-volume step, because a full
sample's graph, ~1 GB per volume, does not fit a small CPU box), SwinSSL 2 views, MAE3D 1.
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

    PYTHONPATH=src .venv/bin/python benchmarks/efficiency.py                 # CPU, ~5 min idle
    PYTHONPATH=src .venv/bin/python benchmarks/efficiency.py --quick         # CI smoke, ~1 min
    PYTHONPATH=src .venv/bin/python benchmarks/efficiency.py --device cuda   # GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from mim3d.config import load_config
from mim3d.losses import reconstruction_loss
from mim3d.masking import mask_indices, patchify, sample_levels, unit_mask
from mim3d.models.decoder import MaskedDecoder
from mim3d.models.mim import unit_means
from mim3d.models.registry import build_mim, geometry_from_config
from mim3d.models.swinssl import SwinSSL, make_two_views, swin_ssl_loss
from mim3d.models.vit import ViTEncoder

RESULTS = Path(__file__).resolve().parent / "results"
# per mode: MiM preset, ViT/MAE-decoder sizes, SwinSSL input and width, timed steps per case
FULL = {"preset": "base", "vit": (768, 12, 12), "mae_dec": (512, 8, 16), "swin": ((96,) * 3, 48),
        "iters": {"mim_base": 4, "hybrid_all": 3, "mae3d": 4, "swinssl": 2, "variant": 3}}
QUICK = {"preset": "tiny", "vit": (128, 2, 4), "mae_dec": (64, 1, 4), "swin": ((64, 32, 32), 12),
         "iters": {"mim_base": 1, "hybrid_all": 1, "mae3d": 1, "swinssl": 1, "variant": 1}}
CASES = ("mim_base", "hybrid_all", "mae3d", "swinssl")
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


def _hybrid_groups() -> tuple[dict[str, list[str]], dict[str, tuple[str, list[str]]]]:
    e = "HybridEncoder"
    groups = {"conv_stages_1_3": [f"{e}.downsamples.{i}" for i in range(3)] + [f"{e}.conv_stages"],
              "token_embed": [f"{e}.downsamples.3", f"{e}.token_proj"],
              "transformer": [f"{e}.blocks"], "decoder": ["MaskedDecoder"],
              "heads": ["ProjectionHead"]}
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


def _mae_case(mode: dict, batch: int, dev: torch.device) -> Case:
    cfg = load_config("pretrain", mode["preset"])
    size, p = cfg.geometry.input_size, cfg.geometry.patch_size
    dim, depth, heads = mode["vit"]
    ddim, ddepth, dheads = mode["mae_dec"]
    enc = ViTEncoder(input_size=size, patch_size=p, dim=dim, depth=depth, num_heads=heads)
    dec = MaskedDecoder(encoder_dim=dim, dim=ddim, depth=ddepth, num_heads=dheads,
                        grid=enc.grid, out_dim=p**3)
    model = nn.ModuleDict({"encoder": enc, "decoder": dec}).to(dev)
    n = enc.num_tokens
    mask = unit_mask(batch, n, round(0.75 * n), torch.Generator().manual_seed(0))
    keep, _, restore = (t.to(dev) for t in mask_indices(mask))
    mask = mask.to(dev)
    x = torch.rand(batch, 1, *size, generator=torch.Generator().manual_seed(1)).to(dev)

    def step_loss() -> Tensor:
        return reconstruction_loss(dec(enc(x, keep), restore).pred, patchify(x, p), mask)

    groups = {"patch_embed": ["ViTEncoder.patch_embedding"], "transformer": ["ViTEncoder.blocks"],
              "decoder": ["MaskedDecoder"]}
    note = (f"ViT dim {dim} depth {depth} heads {heads}, {keep.shape[1]}/{n} visible (75% "
            f"masked); MAE decoder dim {ddim} depth {ddepth} heads {dheads}")
    return Case(model, step_loss, 1, groups, {}, sum(q.numel() for q in enc.parameters()), note)


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
    return _mae_case(mode, batch, dev) if name == "mae3d" else _swin_case(mode, batch, dev)


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


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def gemm_peak(dev: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
              reps: int = 6) -> float:
    """Best FLOP/s (2 n^3 per product) of an n x n @ n x n ``torch.mm`` over ``reps`` runs."""
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(reps + 1):  # the first run is a warm-up
        _sync(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


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
    _sync(dev)
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
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        with ctx():
            loss = case.step_loss()
        loss.backward()
        _sync(dev)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        case.model.zero_grad(set_to_none=True)
    return {"wall_s": wall, "cpu_s": cpu, "foreign_cpu_share": foreign_share(b0, _busy_s())}


def _sample_flops(mode: dict) -> dict[str, Any]:
    """Forward FLOPs of the real MiM.forward + loss for one level-1 crop (all 21 volumes)."""
    from mim3d.engine.train import compute_losses  # the loss exactly as training computes it

    cfg = load_config("pretrain", mode["preset"])
    mim = build_mim(cfg)
    geo = geometry_from_config(cfg.geometry)
    masks = sample_levels(1, geo, torch.Generator().manual_seed(0))
    x1 = torch.rand(1, 1, *cfg.geometry.crop_sizes[0])
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        compute_losses(mim(x1, masks), cfg, 0)
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
    out.update(_timed_steps(case, ctx, dev, spec["iters"]))
    out["loadavg_after"] = os.getloadavg()
    if spec.get("sample_flops"):
        out.update(_sample_flops(mode))
    return out


def _variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs of one invocation: every case at batch 1, then MiM variants for the GEMM share."""
    mode = QUICK if args.quick else FULL
    cuda = args.device == "cuda"
    prec = "bf16" if cuda else "fp32"  # GPU runs as training does there: bf16 autocast
    base = {"device": args.device, "threads": args.threads, "quick": args.quick, "batch": 1,
            "precision": prec, "compile": False, "malloc": "tuned"}
    runs = [{**base, "case": c, "iters": 20 if cuda else mode["iters"][c],
             "sample_flops": c == "mim_base"} for c in CASES]
    mim = {**base, "case": "mim_base", "iters": 20 if cuda else mode["iters"]["variant"]}
    runs.append({**mim, "batch": 8 if cuda else 2})
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


def _run_worker(spec: dict[str, Any], timeout: float, wait: float) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter (clean peak-RSS baseline) and parse its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    env.update(TUNED_MALLOC if spec["malloc"] == "tuned" else {})
    idle = _wait_idle(wait) if wait > 0 else {}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER_JSON ")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1:] or ["no output"]}
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
            "share_of_worker_gemm": total / t / r["gemm_fp32_flops_per_s"]}


def _shares(runs: list[dict[str, Any]], gemm: float) -> dict[str, Any]:
    """step_share of every MiM run against the best fp32 GEMM rate seen in the whole run."""
    mim = [r for r in runs if r["case"] == "mim_base" and "error" not in r]
    by = {r["label"]: r["achieved_flops_per_s"] / gemm for r in mim}
    fp32 = {k: v for k, v in by.items() if ",fp32" in k} or by
    best32, best = max(fp32, key=fp32.get), max(by, key=by.get)
    return {"gemm_fp32_peak_flops_per_s": gemm, "step_share_by_config": by,
            "step_share_of_gemm_peak": fp32[best32], "step_share_config": best32,
            "step_share_any_precision": by[best], "step_share_any_precision_config": best}


def _summary(runs: list[dict[str, Any]], target: float, gemm: float) -> dict[str, Any]:
    """The headline ratios (see the module docstring for their definitions)."""
    mim, _, mae, swin = runs[:len(CASES)]  # the batch-1 runs, in CASES order
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
        **_shares(runs, gemm)}


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
    runs = [_derive(_run_worker(s, args.timeout, args.wait_idle)) for s in _variants(args)]
    gemm_end = gemm_peak(torch.device(args.device))
    if any("error" in r for r in runs[:len(CASES)]):
        print("\n".join(f"{r['case']} ERROR {r['error']}" for r in runs if "error" in r))
        return 1
    gemm = max([gemm_start, gemm_end] + [r["gemm_fp32_flops_per_s"] for r in runs
                                          if "error" not in r])
    summary = _summary(runs, args.target_gflops, gemm)
    _print(summary, runs)
    result = {"command": "PYTHONPATH=src " + " ".join([sys.executable, *sys.argv]),
              "cwd": os.getcwd(), "mode": "quick" if args.quick else "full",
              "machine": _machine(args), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "gemm_fp32_flops_per_s_parent": [gemm_start, gemm_end],
              "wall_s": time.perf_counter() - t0, "summary": summary, "runs": runs}
    out = args.out or (None if args.quick else RESULTS / "efficiency.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
