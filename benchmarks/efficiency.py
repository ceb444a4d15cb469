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
    PYTHONPATH=src .venv/bin/python benchmarks/efficiency.py --quick         # smoke run, ~2.5 min
    PYTHONPATH=src .venv/bin/python benchmarks/efficiency.py --device cuda   # GPU, bf16, b1 + b8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _efficiency_cases import FULL, QUICK, busy_s, foreign_share, worker
from _step_profile import gemm_peak

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASES = ("mim_base", "hybrid_all", "mae3d", "swinssl", "hybrid_mae")  # each run first at batch 1
# Table XI: method -> (case measured per 96^3 volume, case measured per level-1 sample)
METHODS = {"mim": ("mim_base", "mim_sample"), "hybrid_mae": ("hybrid_mae", "hybrid_mae"),
           "mae3d": ("mae3d", "mae3d"), "swinssl": ("swinssl", "swinssl")}
# glibc malloc returns every large block (mmap) to the OS on free, so each step page-faults its
# activations in again (high sys time). Never mmap, never trim: freed memory is reused instead.
# The glibc-malloc runs measure what it is worth (mostly SwinSSL's big attention buffers).
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


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
        a = busy_s()
        time.sleep(2.0)
        share = foreign_share(a, busy_s())
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
    ap.add_argument("--quick", action="store_true",
                    help="tiny models (smoke run, ~2.5 min on 2 cores)")
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
