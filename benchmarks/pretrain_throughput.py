"""Pre-training throughput on the CPU: samples/s, peak memory and the data-wait share.

For each preset (default ``tiny`` and ``small``, with their own batch sizes and models) one fresh
Python process runs the real engine, ``mim3d.engine.pretrain.pretrain``, on a phantom store
prepared in a temporary folder, with ``train.workers`` loader processes (default 2) and
``train.log_every=1``. The engine logs, per optimizer step, the step's wall time ``step_s``
and ``data_wait``, the share of it spent blocked in ``next(loader)``. After ``warmup`` steps
(worker start-up, allocator and oneDNN warm-up) the steady-state figures are

* ``samples_per_s`` = samples of the timed steps / their summed wall time;
* ``data_wait_share`` = summed time blocked on data / summed step time (target < 0.05);
* ``peak_mem_mb`` = the main process's RSS high-water mark (``getrusage`` ``ru_maxrss``) as
  logged at the last training step, i.e. before the final picture and checkpoint; a fresh
  process per preset keeps one preset's peak out of the other's. Loader workers are separate
  processes and not included (their own peak is reported as ``worker_peak_mem_mb``).

    PYTHONPATH=src .venv/bin/python benchmarks/pretrain_throughput.py           # ~3-5 min
    PYTHONPATH=src .venv/bin/python benchmarks/pretrain_throughput.py --quick   # smoke, ~1 min

Prints ``RESULT <name> <value>`` lines and writes benchmarks/results/pretrain_throughput.json
(``--quick`` writes only when ``--out`` is given, so it never replaces the full result).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
#: (timed steps, warm-up steps) per preset. On 2 cores a tiny step (batch 2) takes seconds and a
#: small one (batch 4, 84 volumes of 64^3) over half a minute, so small gets few steps to keep
#: the whole benchmark near five minutes; its step times vary little (see step_s_min/max).
FULL = {"tiny": (8, 2), "small": (2, 1)}
QUICK = {"tiny": (3, 1), "small": (1, 1)}
COHORT = {"cases": 4, "shape": (128, 128, 96), "spacing": (1.5, 1.5, 2.0), "seed": 0}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (train.workers)")
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep cohort, stores and runs")
    ap.add_argument("--out", type=Path, default=None, help="result JSON path")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one preset
    ap.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _overrides(workers: int, steps: int) -> list[str]:
    """Log every step; no picture or checkpoint before the end; the preset's model and batch."""
    return [f"train.workers={workers}", "train.log_every=1", f"train.image_every={10**6}",
            f"train.ckpt_every={10**6}", f"optim.total_steps={max(steps, 1000)}"]


def _steady_state(rows: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """Steady-state figures from per-step metrics rows (the first ``warmup`` steps dropped)."""
    timed = [r for r in rows if r["step"] > warmup]
    if not timed:
        raise SystemExit(f"no step after the {warmup} warm-up steps was logged")
    seconds = sum(r["step_s"] for r in timed)
    waited = sum(r["data_wait"] * r["step_s"] for r in timed)
    samples = timed[-1]["samples"] - (rows[warmup - 1]["samples"] if warmup else 0)
    return {"samples_per_s": samples / seconds, "data_wait_share": waited / seconds,
            "step_s_mean": seconds / len(timed), "step_s_min": min(r["step_s"] for r in timed),
            "step_s_max": max(r["step_s"] for r in timed), "timed_steps": len(timed),
            "peak_mem_mb": timed[-1]["peak_mem_mb"], "final_loss": timed[-1]["loss"]}


def _child(args: argparse.Namespace) -> None:
    """One preset in this (fresh) process; prints one JSON line with its figures."""
    import torch

    from mim3d.config import load_config
    from mim3d.engine.pretrain import pretrain

    steps = args.steps + args.warmup
    cfg = load_config("pretrain", args.child, overrides=_overrides(args.workers, steps))
    start = time.perf_counter()
    pretrain(cfg, data=args.store, out=args.run, max_steps=steps, progress=False)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
    out = _steady_state(rows, args.warmup)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    params = sum(p.numel() for p in _model(cfg).parameters())
    out.update({"worker_peak_mem_mb": children, "run_wall_s": wall, "params": params,
                "batch_size": cfg.optim.batch_size, "crop_sizes": cfg.geometry.crop_sizes,
                "input_size": cfg.geometry.input_size, "torch_threads": torch.get_num_threads()})
    print("CHILD " + json.dumps(out))


def _model(cfg: Any) -> Any:
    from mim3d.factory import build_mim

    return build_mim(cfg)


def _prepare_stores(work: Path, presets: list[str]) -> tuple[dict[str, Path], dict[str, float]]:
    """Phantom cohort once, then one store per preset (their baked-in spacing may differ)."""
    from mim3d.config import load_config
    from mim3d.data.phantom import write_cohort
    from mim3d.data.prepare import prepare

    t0 = time.perf_counter()
    datalist = write_cohort(work / "phantoms", COHORT["cases"], seed=COHORT["seed"],
                            shape=COHORT["shape"], spacing=COHORT["spacing"])
    timing = {"cohort_write_s": time.perf_counter() - t0}
    stores = {}
    for name in presets:
        t0 = time.perf_counter()
        cfg = load_config("pretrain", name)
        stores[name] = work / f"store_{name}"
        report = prepare([datalist], stores[name], data=cfg.data, workers=2, progress=False)
        if report.in_store == 0:
            raise SystemExit(f"preparing the {name} store failed: {report.messages}")
        timing[f"prepare_{name}_s"] = time.perf_counter() - t0
    return stores, timing


def _run_preset(name: str, store: Path, work: Path, steps: int, warmup: int,
                workers: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--store", str(store),
           "--run", str(work / f"run_{name}"), "--steps", str(steps), "--warmup", str(warmup),
           "--workers", str(workers)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("CHILD ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name}: benchmark process failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("CHILD "):])


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        _child(args)
        return 0
    plan = QUICK if args.quick else FULL
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    unknown = [p for p in args.presets if p not in plan]
    if unknown:
        raise SystemExit(f"no step plan for preset(s) {unknown}; choose from {sorted(plan)}")
    with tempfile.TemporaryDirectory(prefix="mim3d_pt_bench_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        stores, timing = _prepare_stores(work, args.presets)
        timing["loadavg_start"] = load_start
        results = {}
        for name in args.presets:
            steps, warmup = plan[name]
            results[name] = _run_preset(name, stores[name], work, steps, warmup, args.workers)
            for key in ("samples_per_s", "peak_mem_mb", "data_wait_share"):
                print(f"RESULT {name}_{key} {results[name][key]:.4g}", flush=True)
    _write(args, plan, results, timing)
    return 0


def _write(args: argparse.Namespace, plan: dict[str, tuple[int, int]],
           results: dict[str, Any], timing: dict[str, float]) -> None:
    import torch

    if args.quick and args.out is None:
        return
    load_start = timing.pop("loadavg_start", None)
    doc = {
        **{f"{n}_{k}": r[k] for n, r in results.items()
           for k in ("samples_per_s", "peak_mem_mb", "data_wait_share")},
        "presets": results,
        "settings": {"workers": args.workers, "steps_and_warmup": {p: plan[p] for p in results},
                     "cohort": COHORT, **timing, "mode": "quick" if args.quick else "full",
                     "data_wait_target": 0.05},
        "method": __doc__.split("\n\n")[1].strip(),
        "command": "PYTHONPATH=src " + " ".join(
            shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform(),
                    # other work on the machine inflates step times; read figures with this
                    "loadavg_start": load_start,
                    "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }
    path = args.out or RESULTS / "pretrain_throughput.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=list) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
