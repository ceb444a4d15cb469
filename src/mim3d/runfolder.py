"""The run folder: one definition of its file names and of how a run's pieces are found and read.

A pre-training or fine-tuning run folder holds::

    config.yaml          the resolved config (CONFIG_FILE)
    metrics.jsonl        one JSON object per logged step (METRICS_FILE)
    tensorboard/         TensorBoard events (TENSORBOARD_DIR)
    pictures/            reconstruction PNGs of pre-training (PICTURES_DIR)
    store/               the prepared store, when raw images were given (STORE_DIR)
    latest               text file naming the newest checkpoint folder (LATEST_FILE)
    ckpt_<step:08d>/     model.safetensors + state.pt + meta.json (CHECKPOINT_FILES)

and a fine-tuning run also ``finetune.json`` (SPEC_FILE, format SPEC_FORMAT), ``splits.json``
(SPLITS_FILE), ``transfer_report.json`` and ``best/ckpt_<step>/`` + ``best/best.json``
(BEST_DIR, BEST_FILE).

Checkpoints are written by :mod:`mim3d.engine.checkpoint`; this module only names and reads, so
that the engine, :mod:`mim3d.transfer` and the inspection commands agree on one layout. It
imports no engine and no network code.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from mim3d.config import ConfigError, config_from_dict
from mim3d.fileio import one_line, read_json_object

logger = logging.getLogger(__name__)

__all__ = [
    "BEST_DIR", "BEST_FILE", "CHECKPOINT_FILES", "CONFIG_FILE", "LATEST_FILE", "META_FILE",
    "METRICS_FILE", "MODEL_FILE", "PICTURES_DIR", "SPEC_FILE", "SPEC_FORMAT", "SPLITS_FILE",
    "STATE_FILE", "STORE_DIR", "TENSORBOARD_DIR", "TRANSFER_REPORT_FILE", "CheckpointError",
    "Located", "checkpoint_name", "checkpoint_step", "find_best", "find_latest", "is_complete",
    "list_checkpoints", "locate_checkpoint", "read_checkpoint_config", "read_meta",
    "read_run_config", "saved_finetune_run",
]  # fmt: skip

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PICTURES_DIR = "pictures"
STORE_DIR = "store"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, META_FILE)
SPEC_FILE = "finetune.json"
SPEC_FORMAT = "mim3d-finetune"
SPLITS_FILE = "splits.json"
TRANSFER_REPORT_FILE = "transfer_report.json"
BEST_DIR = "best"
BEST_FILE = "best.json"

_NAME_RE = re.compile(r"ckpt_(\d{8,})")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model/optimizer."""


class Located(NamedTuple):
    """Where a run, checkpoint folder or weights file given by a user points."""

    folder: Path  #: the checkpoint folder
    weights: Path  #: its weights file
    run_dir: Path  #: the run folder the checkpoint belongs to


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken at ``step``."""
    return f"ckpt_{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name (``ckpt_00000012`` -> 12), else ``None``."""
    match = _NAME_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds all three checkpoint files."""
    return all((folder / f).is_file() for f in CHECKPOINT_FILES)


def list_checkpoints(run_dir: Path, complete_only: bool) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the final-named checkpoint folders of a run, oldest first."""
    found = []
    for entry in run_dir.iterdir():
        step = checkpoint_step(entry.name)
        if step is not None and entry.is_dir() and (not complete_only or is_complete(entry)):
            found.append((step, entry))
    return sorted(found)


def find_latest(run_dir: str | os.PathLike[str]) -> Path | None:
    """Newest complete checkpoint of a run, or ``None``.

    Follows the ``latest`` pointer when it names a complete checkpoint; otherwise (pointer
    missing or stale) takes the highest-step folder that has all three files. Temporary
    ``*.tmp-*`` folders are never considered. A checkpoint folder itself is returned as is.
    """
    run_dir = Path(run_dir)
    if is_complete(run_dir):
        return run_dir
    if not run_dir.is_dir():
        return None
    try:
        name = (run_dir / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if checkpoint_step(name) is not None and is_complete(run_dir / name):
        return run_dir / name
    found = list_checkpoints(run_dir, complete_only=True)
    return found[-1][1] if found else None


def find_best(run_dir: str | os.PathLike[str]) -> Path | None:
    """The best-validation checkpoint of a fine-tuning run (``best/ckpt_*``), or ``None``."""
    return find_latest(Path(run_dir) / BEST_DIR) if (Path(run_dir) / BEST_DIR).is_dir() else None


def locate_checkpoint(path: str | os.PathLike[str]) -> Located:
    """Resolve a run folder, a checkpoint folder or a checkpoint's weights file.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: a folder without a complete checkpoint.
    """
    path = Path(path)
    if path.is_file():
        folder = path.parent
        return Located(folder, path, folder.parent if checkpoint_step(folder.name) else folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run, checkpoint folder or file; check the path")
    # a folder holding weights is taken as is (a best/ checkpoint, a copied folder)
    folder = path if (path / MODEL_FILE).is_file() else find_latest(path)
    if folder is None:
        raise CheckpointError(f"{path}: holds no complete checkpoint; pass a run or a ckpt_* "
                              "folder")
    run_dir = folder.parent if checkpoint_step(folder.name) is not None else folder
    return Located(folder, folder / MODEL_FILE, run_dir)


# ------------------------------------------------------------------------------ reading


def damaged(file: Path, problem: str) -> CheckpointError:
    """The error for a damaged checkpoint file (one line naming it and what to do)."""
    return CheckpointError(
        f"{file}: {problem}; the checkpoint is damaged: delete {file.parent} and resume from "
        "an older checkpoint (find_latest picks the newest complete one)"
    )


def read_meta(folder: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder, after checking that no file is missing or cut.

    Raises:
        CheckpointError: a missing file, unreadable JSON, or a file of another size than
            ``meta.json`` records (truncated by a kill mid-copy).
    """
    missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a complete checkpoint (missing "
                              f"{', '.join(missing)}); pick another one or use find_latest")
    meta = read_json_object(folder / META_FILE, lambda problem: damaged(folder / META_FILE,
                                                                        problem))
    for file, size in (meta.get("files") or {}).items():
        actual = (folder / file).stat().st_size
        if actual != size:
            raise damaged(folder / file, f"{actual} bytes instead of {size} (truncated?)")
    return meta


def _config_error(path: Path, error: BaseException) -> ConfigError:
    return ConfigError(f"cannot read the run's config {path} ({one_line(error, 160)}); restore "
                       "it or start a new run")


def read_checkpoint_config(folder: Path, kind: str) -> Any:
    """The run config a checkpoint's ``meta.json`` carries (``kind``: pretrain or downstream).

    Raises:
        ConfigError: no readable config of that kind in ``meta.json``.
    """
    path = folder / META_FILE
    try:
        return config_from_dict(kind, json.loads(path.read_text())["config"])
    except (OSError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise _config_error(path, exc) from None


def read_run_config(run_dir: Path, kind: str) -> Any | None:
    """The config a run folder records: ``config.yaml``, else its newest checkpoint's.

    Returns:
        The config dataclass, or ``None`` when the folder records none (a new run).

    Raises:
        ConfigError: a config file that cannot be read or does not make a valid config.
    """
    path = run_dir / CONFIG_FILE
    if path.is_file():
        try:
            return config_from_dict(kind, yaml.safe_load(path.read_text()))
        except (OSError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError,
                yaml.YAMLError) as exc:
            raise _config_error(path, exc) from None
    latest = find_latest(run_dir) if run_dir.is_dir() else None
    return read_checkpoint_config(latest, kind) if latest is not None else None


def saved_finetune_run(out: Path, resume: bool) -> tuple[Any, dict[str, Any]] | None:
    """The config and spec of a fine-tuning run being resumed (None: a new run).

    Raises:
        ConfigError: ``out`` holds checkpoints but ``resume`` is False (refuses to overwrite).
    """
    if not resume:
        if out.is_dir() and find_latest(out) is not None:
            raise ConfigError(f"run folder {out} already holds checkpoints; pass --resume to "
                              "continue it or choose another --out")
        return None
    if not ((out / SPEC_FILE).is_file() and (out / CONFIG_FILE).is_file()):
        return None
    cfg = read_run_config(out, "downstream")
    logger.info("--resume: using the run's own %s, %s and %s (--preset, --network, --size, "
                "--pretrained, --lora-rank, --label-fraction and --fold are ignored)",
                CONFIG_FILE, SPEC_FILE, SPLITS_FILE)
    return cfg, json.loads((out / SPEC_FILE).read_text())
