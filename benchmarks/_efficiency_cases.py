"""The cases that ``efficiency.py`` measures, and the worker that measures one of them.

Each case is a model with its seeded inputs bound in and the FlopCounterMode keys of its parts;
:func:`worker` counts one warm-up step's FLOPs and peak memory, then times N steps, in the fresh
process ``efficiency.py`` starts for it. The cases and the methods are defined in
``efficiency.py``'s docstring.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import resource
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


def busy_s() -> tuple[float, float, float]:
    """(machine busy CPU-s, machine total CPU-s, this process's CPU-s) from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz, ru = os.sysconf("SC_CLK_TCK"), resource.getrusage(resource.RUSAGE_SELF)
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz, ru.ru_utime + ru.ru_stime


def foreign_share(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Share of the machine's CPU capacity used by *other* processes between two busy_s()."""
    return max(0.0, (b[0] - a[0]) - (b[2] - a[2])) / max(b[1] - a[1], 1e-9)


def _timed_steps(case: Case, ctx: Callable[[], Any], dev: torch.device,
                 n: int) -> dict[str, Any]:
    wall, cpu, b0 = [], [], busy_s()
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
    return {"wall_s": wall, "cpu_s": cpu, "foreign_cpu_share": foreign_share(b0, busy_s())}


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
