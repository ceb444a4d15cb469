"""Machinery shared by the label-efficiency and ablation studies (issue 6, items 3 and 4).

Both studies use the real engine: ``pretrain`` on one unlabelled store, ``export_encoder``,
``finetune`` on labelled phantoms and ``evaluate_run`` (Dice, NSD on each case's original grid).

* Cohorts are written once per spec under ``WORK/cohorts/<key>/``: an unlabelled pre-training
  cohort (phantoms of their own seed + the real CT in ``../shared/data/ct`` when present) prepared
  into one store at the study spacing, and a labelled cohort whose datalist ``validation`` list is
  the test set of every arm (``study.json``, labelled with the four scored organs).
* A pre-training is cached under ``WORK/pretrain/<preset>-<key>/`` with ``key`` = hash of (the
  resolved config, steps, cohort key); a fine-tuning under ``WORK/finetune/`` likewise, with the
  encoder's key in place of its path. Re-runs and the other study reuse them.
* Splits: the datalist fixes the test set; ``label_fraction`` keeps the first ``ceil(f * n)`` of one
  permutation seeded by ``train.seed``, so for a given (fraction, seed) every arm trains on the
  same cases, and smaller fractions are nested in larger ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SHARED_CT = REPO.parent / "shared" / "data" / "ct"
#: Images only: the other files in that folder (``_seg``, ``_heart``) are label maps.
CT_IMAGES = ("totalseg_example_ct.nii.gz", "totalseg_example_ct_sm.nii.gz",
             "totalseg_aorta_example_ct.nii.gz", "totalseg_example_ct_dicom")
DOWNSTREAM = "study-phantom"
#: The scored organs by their raw phantom ids (the preset's label aliases make liver 6 class 4).
ORGANS = {"0": "background", "1": "spleen", "2": "right_kidney", "3": "left_kidney", "6": "liver"}
#: Logging only (no pictures, no intermediate checkpoints): the loss of every step is kept.
PRETRAIN_FIXED = ("train.log_every=1", "train.image_every=1000000", "train.ckpt_every=1000000")


@dataclass(frozen=True)
class Method:
    """A pre-training method and the downstream network its encoder goes into."""

    name: str
    preset: str
    network: str
    size: str


METHODS: dict[str, Method] = {
    "mim": Method("mim", "study", "mim-unetr", "study"),
    "hybrid-mae": Method("hybrid-mae", "study-hybrid-mae", "mim-unetr", "study-hybrid-mae"),
    "mae3d": Method("mae3d", "study-mae3d", "unetr", "study-mae3d"),
    "swin-ssl": Method("swin-ssl", "study-swin-ssl", "swinunetr", "study-swin-ssl"),
}
#: From-scratch arm per downstream architecture, at the size of the pre-trained arms' network.
SCRATCH: dict[str, str] = {"mim-unetr": "study", "unetr": "study-mae3d",
                           "swinunetr": "study-swin-ssl"}


@dataclass(frozen=True)
class CohortSpec:
    """Sizes and seeds of the study cohorts (the labelled seed differs from the unlabelled)."""

    unlabelled: int = 12
    unlabelled_shape: tuple[int, int, int] = (80, 80, 80)
    unlabelled_seed: int = 1000
    real_ct: bool = True
    train: int = 8
    test: int = 8
    shape: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    labelled_seed: int = 0


@dataclass
class Cohorts:
    """Where the built cohorts are."""

    key: str
    store: Path
    datalist: Path
    train_datalist: Path
    train_cases: list[str]
    test_cases: list[str]
    real_ct: list[str]
    notes: list[str] = field(default_factory=list)


def schedule(steps: int) -> list[str]:
    """Overrides for a schedule of ``steps`` optimizer steps: the presets' 10 warm-up steps,
    fewer when the run is too short for them (quick modes)."""
    return [f"optim.total_steps={steps}", f"optim.warmup_steps={min(10, steps // 5)}"]


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _real_ct() -> tuple[list[Path], list[str]]:
    """The shared real CT images, or none with the reason printed."""
    if not SHARED_CT.is_dir():
        note = f"real CT skipped: {SHARED_CT} not found (pre-training uses phantoms only)"
        print(note)
        return [], [note]
    found = [SHARED_CT / n for n in CT_IMAGES if (SHARED_CT / n).exists()]
    missing = sorted(set(CT_IMAGES) - {p.name for p in found})
    notes = [f"real CT not found and skipped: {', '.join(missing)}"] if missing else []
    for note in notes:
        print(note)
    return found, notes


def build_cohorts(spec: CohortSpec, work: Path) -> Cohorts:
    """Write both cohorts and the pre-training store once (reused when already complete)."""
    from mim3d.config import load_config
    from mim3d.data.phantom import write_cohort
    from mim3d.data.prepare import prepare

    ct, notes = _real_ct() if spec.real_ct else ([], [])
    # File names and sizes stand for the real CT's content in the key (cheap, stable).
    key = digest({"spec": asdict(spec), "ct": [(p.name, _size(p)) for p in ct]})
    root = work / "cohorts" / key
    done = root / "cohorts.json"
    if not done.is_file():
        unl = write_cohort(root / "unlabelled", spec.unlabelled, seed=spec.unlabelled_seed,
                           shape=spec.unlabelled_shape, spacing=spec.spacing, val_fraction=0.0)
        n = spec.train + spec.test
        lab = write_cohort(root / "labelled", n, seed=spec.labelled_seed, shape=spec.shape,
                           spacing=spec.spacing, val_fraction=spec.test / n)
        data_cfgs = {load_config("pretrain", m.preset).data for m in METHODS.values()}
        if len(data_cfgs) != 1:  # one store serves every method only if they agree on it
            raise SystemExit(f"the study presets disagree on their data section: {data_cfgs}")
        report = prepare([unl, *ct], root / "store", data=data_cfgs.pop(), workers=1,
                         progress=False)
        if report.quarantined:
            notes.append(f"{report.quarantined} pre-training case(s) quarantined")
        _write_datalists(lab, root / "labelled")
        done.write_text(json.dumps({"notes": notes, "ct": [str(p) for p in ct]}, indent=2))
    raw = json.loads((root / "labelled" / "study.json").read_text())
    saved = json.loads(done.read_text())
    return Cohorts(key, root / "store", root / "labelled" / "study.json",
                   root / "labelled" / "study_train.json",
                   [Path(c["image"]).name for c in raw["training"]],
                   [Path(c["image"]).name for c in raw["validation"]],
                   [Path(p).name for p in saved["ct"]], saved["notes"])


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*"))
               if p.is_file())


def _write_datalists(source: Path, folder: Path) -> None:
    """``study.json``: the phantom datalist with only the scored organs as its labels (they
    replace the preset's ``task.labels``, so both name the same four classes); its validation
    list is the test set. ``study_train.json``: the same with one test case as validation, because
    fine-tuning always validates at its end and the study scores the last weights anyway (so
    nothing is selected on it; this only saves a second pass over the test set)."""
    raw = json.loads(source.read_text())
    raw["labels"] = dict(ORGANS)
    raw["description"] = "mim3d study cohort: spleen, kidneys and liver (raw id 6 -> class 4)"
    (folder / "study.json").write_text(json.dumps(raw, indent=2) + "\n")
    raw["validation"] = raw["validation"][:1]
    (folder / "study_train.json").write_text(json.dumps(raw, indent=2) + "\n")


# ------------------------------------------------------------------------------ pre-training


def pretrain_arm(preset: str, overrides: list[str], steps: int, seed: int, *,
                 cohorts: Cohorts, work: Path) -> dict[str, Any]:
    """Pre-train ``preset`` for ``steps`` optimizer steps and export its encoder (cached).

    The learning-rate schedule spans exactly ``steps`` (``optim.total_steps`` is overridden).

    Returns:
        ``{"key", "encoder", "wall_s", "final_loss", "final_terms", "steps", "cached", ...}``;
        ``final_loss`` is the mean total loss of the last 10% of steps (at least 1).
    """
    cfg, key = pretrain_key(preset, overrides, steps, seed, cohorts.key)
    folder = work / "pretrain" / f"{preset}-{key}"
    if (folder / "arm.json").is_file():
        return {**json.loads((folder / "arm.json").read_text()), "cached": True}
    shutil.rmtree(folder, ignore_errors=True)  # a half-finished earlier attempt
    arm = _run_pretrain(cfg, folder, steps, cohorts)
    arm.update({"key": key, "preset": preset, "overrides": overrides, "seed": seed})
    (folder / "arm.json").write_text(json.dumps(arm, indent=2) + "\n")
    return {**arm, "cached": False}


def pretrain_key(preset: str, overrides: list[str], steps: int, seed: int,
                 data_key: str) -> tuple[Any, str]:
    """The resolved pre-training config and its cache key (config, steps and data)."""
    from mim3d.config import load_config, to_dict

    sets = [*PRETRAIN_FIXED, *schedule(steps), f"train.seed={seed}", *overrides]
    cfg = load_config("pretrain", preset, overrides=sets)
    return cfg, digest({"config": to_dict(cfg), "steps": steps, "data": data_key})


def _run_pretrain(cfg: Any, folder: Path, steps: int, cohorts: Cohorts) -> dict[str, Any]:
    from mim3d.engine.pretrain import pretrain
    from mim3d.transfer import export_encoder

    t0 = time.perf_counter()
    res = pretrain(cfg, data=cohorts.store, out=folder / "run", max_steps=steps, progress=False)
    wall = time.perf_counter() - t0
    if res.stopped_by_signal or res.step != steps:  # never cache a run cut short
        raise RuntimeError(f"pre-training stopped at step {res.step} of {steps}")
    encoder, _ = export_encoder(folder / "run", folder / "encoder.safetensors")
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").open()]
    rows = [r for r in rows if "loss" in r]
    tail = rows[-max(1, len(rows) // 10):]
    terms = {k: float(np.mean([r[k] for r in tail])) for k in tail[-1]
             if k.startswith("loss") and isinstance(tail[-1][k], (int, float))}
    step_s = [r["step_s"] for r in rows if "step_s" in r]
    return {"encoder": str(encoder), "wall_s": wall, "steps": steps,
            "step_s_median": float(np.median(step_s)) if step_s else None,
            "final_loss": terms.get("loss", math.nan), "final_terms": terms,
            "batch_size": cfg.optim.batch_size, "method": cfg.method}


# ------------------------------------------------------------------------------ fine-tuning


def finetune_arm(network: str, size: str, encoder: dict[str, Any] | None, fraction: float,
                 seed: int, steps: int, *, cohorts: Cohorts, work: Path,
                 overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fine-tune one network (from ``encoder``, a :func:`pretrain_arm` result, or from scratch)
    on ``fraction`` of the training cases and score the test cases on their original grid.

    The recipe is the ``study-phantom`` preset for every arm; the schedule spans ``steps``, and
    the last weights are scored (no model selection on the test cases).

    Returns:
        ``{"dice", "nsd", "per_class": {organ: {"dice", "nsd"}}, "train_cases", "finetune_s",
        "eval_s", "cached", ...}``.
    """
    from mim3d.config import load_config, to_dict

    sets = [f"train.seed={seed}", *schedule(steps), *overrides]
    cfg = load_config("downstream", DOWNSTREAM, overrides=sets)
    key = digest({"config": to_dict(cfg), "network": network, "size": size, "steps": steps,
                  "encoder": encoder["key"] if encoder else None, "fraction": fraction,
                  "data": cohorts.key})
    folder = work / "finetune" / f"{network}-{key}"
    if (folder / "result.json").is_file():
        return {**json.loads((folder / "result.json").read_text()), "cached": True}
    shutil.rmtree(folder, ignore_errors=True)
    result = _run_finetune(cfg, folder, network, size, encoder, fraction, steps, cohorts)
    result.update({"key": key, "network": network, "size": size, "fraction": fraction,
                   "seed": seed, "steps": steps,
                   "encoder": encoder["key"] if encoder else None})
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(folder / "run", ignore_errors=True)  # weights are not needed afterwards
    return {**result, "cached": False}


def _run_finetune(cfg: Any, folder: Path, network: str, size: str,
                  encoder: dict[str, Any] | None, fraction: float, steps: int,
                  cohorts: Cohorts) -> dict[str, Any]:
    from mim3d.engine.finetune import finetune
    from mim3d.engine.predict import evaluate_run

    run = folder / "run"
    t0 = time.perf_counter()
    res = finetune(cfg, data=cohorts.train_datalist, out=run, network=network, size=size,
                   pretrained=encoder["encoder"] if encoder else None, label_fraction=fraction,
                   max_steps=steps, val_every=steps, progress=False)
    t1 = time.perf_counter()
    if res.stopped_by_signal or res.step != steps:  # never cache a run cut short
        raise RuntimeError(f"fine-tuning stopped at step {res.step} of {steps}")
    report, _ = evaluate_run(run, data=cohorts.datalist, out_json=folder / "eval.json",
                             checkpoint="last", progress=False)
    t2 = time.perf_counter()
    summary = json.loads(report.read_text())["summary"]
    splits = json.loads((run / "splits.json").read_text())
    return {"dice": _number(summary["overall"]["dice"]["mean"]),
            "nsd": _number(summary["overall"]["nsd"]["mean"]),
            "per_class": {name: {m: _number(c[m]["mean"]) for m in ("dice", "nsd")}
                          for name, c in summary["classes"].items()},
            "train_cases": sorted(splits["train"]),
            "test_cases": sorted(json.loads(report.read_text())["per_case"]),
            "finetune_s": t1 - t0, "eval_s": t2 - t1}


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


# ------------------------------------------------------------------------------ statistics


def aggregate(values: list[float]) -> dict[str, Any]:
    """Mean ± std over seeds: sample std (ddof 1) for n >= 2, 0 for a single seed."""
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": int(arr.size),
            "values": [float(v) for v in arr]}


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Dice / NSD (overall and per class) mean ± std over the runs of one cell (one per seed)."""
    classes = sorted(runs[0]["per_class"])
    return {"dice": aggregate([r["dice"] for r in runs]),
            "nsd": aggregate([r["nsd"] for r in runs]),
            "per_class": {c: {m: aggregate([r["per_class"][c][m] for r in runs])
                              for m in ("dice", "nsd")} for c in classes},
            "finetune_s": float(sum(r["finetune_s"] + r["eval_s"] for r in runs)),
            "train_cases": {str(r["seed"]): r["train_cases"] for r in runs}}


def pm(stat: dict[str, Any]) -> str:
    """``mean ± std`` in percent, as the paper's tables print Dice and NSD."""
    return f"{100 * stat['mean']:5.1f} ± {100 * stat['std']:4.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def result_line(name: str, value: float) -> None:
    """Print one headline figure as ``RESULT <name> <value>``."""
    print(f"RESULT {name} {value:.4f}", flush=True)


# ------------------------------------------------------------------------------ machine and JSON


class CpuWatch:
    """How much CPU other processes took while the study ran (``/proc/stat`` minus our own)."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.ours0 = time.monotonic(), _busy_s(), _our_cpu_s()
        self.load0 = os.getloadavg()

    def report(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.t0
        cores = os.cpu_count() or 1
        busy, ours = _busy_s() - self.busy0, _our_cpu_s() - self.ours0
        other = max(0.0, busy - ours) / max(elapsed * cores, 1e-9) if busy >= 0 else None
        return {"elapsed_s": elapsed, "other_processes_cpu_share": other,
                "loadavg_start": self.load0, "loadavg_end": os.getloadavg()}


def _busy_s() -> float:
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return -1.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _our_cpu_s() -> float:
    use = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in use)


def machine() -> dict[str, Any]:
    """CPU, threads and library versions of this run."""
    import monai
    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "monai": monai.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.is_available()}


def command() -> str:
    """The command line that produced the result."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def write_result(path: Path, payload: dict[str, Any], watch: CpuWatch, wall_s: float) -> None:
    """Write the study JSON with machine, command, wall time and a note on CPU contention."""
    cpu = watch.report()
    notes = list(payload.pop("notes", []))
    share = cpu["other_processes_cpu_share"]
    if share is not None and share > 0.05:
        notes.append(f"other processes used {100 * share:.0f}% of the CPU while this ran: "
                     "timings are inflated (results are unaffected, the runs are seeded)")
    out = {**payload, "command": command(), "machine": machine(), "cpu": cpu,
           "wall_s": wall_s, "notes": notes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, allow_nan=True) + "\n")
    print(f"wrote {path}")


def finish_line(name: str, quick: bool, out: Path | None, t0: float) -> tuple[float, Path | None]:
    """Print the ``wall_s`` RESULT line; return (wall seconds, the JSON path or None: a quick
    run keeps its JSON only when ``--out`` is given)."""
    wall = time.perf_counter() - t0
    result_line("wall_s", wall)
    if quick and out is None:
        print("--quick: no JSON written (pass --out to keep it)")
        return wall, None
    return wall, out or RESULTS / f"{name}.json"
