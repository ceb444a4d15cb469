"""What a downstream run is made of: its cases, classes, splits and network.

Shared by fine-tuning (:mod:`mim3d.engine.finetune`) and by evaluation and prediction
(:mod:`mim3d.engine.predict`), so that all three read data and rebuild the network alike.

Classes. A datalist's ``labels`` (``{"0": "background", "1": "spleen", ...}``) name the classes;
ids are kept as they are (no renumbering, so predictions use the datalist's ids), a segmentation
network gets ``max id + 1`` outputs, and label values that are not listed become background.
Without ``labels`` the preset's ``task.labels`` / ``task.num_classes`` apply.

Splits. A datalist's non-empty ``validation`` list is the validation set; otherwise the training
cases are cut into ``folds`` folds by one permutation seeded with ``train.seed`` and fold ``fold``
is held out. The label fraction ``f`` keeps the first ``ceil(f * n)`` cases of one (other) seeded
permutation of the training split, so smaller fractions are nested in larger ones.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import Tensor, nn

from mim3d import __version__
from mim3d.config import ConfigError, FinetuneConfig, TaskConfig, to_dict
from mim3d.data.datalists import (
    case_name,
    load_datalist,
    load_nnunet_folder,
    parse_label_map,
    resolve_inputs,
)
from mim3d.data.transforms import make_dataset, seg_label_ids
from mim3d.engine.train import autocast_context
from mim3d.evaluation import sliding_window_predict
from mim3d.metrics import dice
from mim3d.runfolder import SPEC_FORMAT

__all__ = ["Item", "Splits", "add_lora", "build_network", "class_names", "datalist_items",
           "load_pretrained", "make_datasets", "new_spec", "plain_tensor", "predict_logits",
           "read_cases", "resolve_task", "score_case", "split_cases"]

Item = dict[str, Any]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ cases and classes


def datalist_items(path: Path, key: str, task: str) -> list[Item]:
    """Entries of ``data[key]``; seg labels are files, cls labels class indices (ints)."""
    if task == "seg":
        return [{"image": c.image, "label": c.label, "name": c.name}
                for c in load_datalist(path, key)[0]]
    raw = json.loads(path.read_text())
    base = raw.get("base_dir", raw.get("basedir")) or "."
    items: list[Item] = []
    taken: set[str] = set()
    for i, entry in enumerate(raw[key]):
        entry = entry if isinstance(entry, dict) else {}
        label, image = entry.get("label"), entry.get("image")
        if isinstance(label, bool) or not isinstance(label, int) or not isinstance(image, str):
            msg = (f"{path}: {key} entry {i} needs an 'image' path and an integer class "
                   f"'label' for a classification task, got {entry or 'no mapping'}")
            raise ValueError(msg)  # noqa: TRY004 - callers catch ValueError for all bad input
        image = str((path.parent / base / image).resolve())
        name = case_name(image)
        while name.lower() in taken:  # unique names, as load_datalist gives for seg
            name += "_2"
        taken.add(name.lower())
        items.append({"image": image, "label": label, "name": name})
    return items


def read_cases(data: str | Path, task: str) -> tuple[list[Item], list[Item], dict[int, str]]:
    """Cases of a datalist JSON, an nnU-Net/MSD folder, or other inputs (folders, files, .txt).

    Returns:
        ``(training, validation, labels)``: item dicts ``{"image", "label", "name"}``, the
        datalist's validation list (empty when it has none) and its ``{id: name}`` labels.

    Raises:
        ValueError: a missing or malformed input (one line).
    """
    path = Path(data)
    nnunet = (path if path.is_dir() else path.parent) / "imagesTr"
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or "training" not in raw:
                raise ValueError(f"{path}: no 'training' list in the datalist")
            train = datalist_items(path, "training", task)
        except ValueError:
            if not nnunet.is_dir():  # an nnU-Net v1 dataset.json names files that do not exist
                raise
        else:
            val = datalist_items(path, "validation", task) if raw.get("validation") else []
            return train, val, parse_label_map(raw.get("labels"))
    if nnunet.is_dir() and (nnunet.parent / "dataset.json").is_file() and task == "seg":
        cases, labels = load_nnunet_folder(nnunet.parent)
        return [{"image": c.image, "label": c.label, "name": c.name} for c in cases], [], labels
    cases = resolve_inputs([path])
    return [{"image": c.image, "label": c.label, "name": c.name} for c in cases], [], {}


def resolve_task(task: TaskConfig, labels: dict[int, str],
                 cases: list[Item] | None = None) -> TaskConfig:
    """The task with the datalist's classes (seg: ids >= 1; cls: ids 0..K-1).

    This is the one place where a datalist's label map, the preset's ``task.labels`` and its
    ``task.label_aliases`` meet (see :func:`_seg_classes`).

    Raises:
        ValueError: an unknown class id (a negative id, a ``task.label_aliases`` target that is
            not a class, a classification case label outside the classes), or a clash between
            the datalist's labels, the preset's labels and its aliases (the message names both).
    """
    bad = [i for i in labels if i < 0]
    if bad:
        raise ValueError(f"unknown class id {bad[0]} in the datalist labels: ids must be >= 0")
    if task.task == "seg":
        names = _seg_classes(task, labels)
        if names:
            task = replace(task, labels=names, num_classes=max(2, max(names) + 1))
        known = set(seg_label_ids(task))
        for raw, cls in (task.label_aliases or {}).items():
            if cls != 0 and cls not in known:
                raise ValueError(f"unknown class id {cls} in task.label_aliases {{{raw}: {cls}}}: "
                                 f"the classes are {sorted(known)}; list it in the labels")
        return task
    if labels:
        task = replace(task, labels=dict(labels), num_classes=max(2, max(labels) + 1))
    known = set(task.labels) if task.labels else set(range(task.num_classes))
    for item in cases or []:
        if item.get("label") not in known:
            raise ValueError(f"case {item['name']}: unknown class id {item.get('label')}; the "
                             f"classes are {sorted(known)}")
    return task


def _seg_classes(task: TaskConfig, labels: dict[int, str]) -> dict[int, str]:
    """Segmentation classes ``{class id: name}`` from a datalist's label map (empty: none given).

    A datalist's ``labels`` name the ids in its label files; ``task.label_aliases`` (raw id ->
    class id, 0 = background) apply to those raw ids, so a raw id aliased onto class ``c``
    lends ``c`` its name, and an aliased-away raw id drops out. The datalist's map then
    replaces the preset's ``task.labels``, which must agree on every alias target it names.
    """
    aliases = dict(task.label_aliases or {})
    raw = {i: n for i, n in labels.items() if i != 0}
    classes: dict[int, tuple[int, str]] = {}  # class id -> (raw id, name)
    for rid, name in sorted(raw.items()):
        cls = aliases.get(rid, rid)
        if cls == 0:
            continue
        if cls in classes and classes[cls][1] != name:
            other, was = classes[cls]
            raise ValueError(f"label clash: the datalist's raw ids {other} ({was!r}) and {rid} "
                             f"({name!r}) both become class {cls} under task.label_aliases "
                             f"{aliases}; drop one in the aliases (map it to 0)")
        classes[cls] = (rid, name)
    preset = task.labels or {}
    for cls in sorted({c for c in aliases.values() if c != 0 and c in preset}):
        got = classes.get(cls)
        if raw and (got is None or got[1] != preset[cls]):
            sources = ", ".join(str(r) for r, c in sorted(aliases.items()) if c == cls)
            theirs = (f"{got[1]!r} (raw id {got[0]})" if got else
                      f"no name (raw id {sources} is not in the datalist's labels)")
            raise ValueError(f"label clash: the preset's task.labels name class {cls} "
                             f"{preset[cls]!r}, but the datalist's labels with task.label_aliases "
                             f"{aliases} give class {cls} {theirs}; the datalist's labels must "
                             "name the raw ids of its label files (or override task.labels / "
                             "task.label_aliases)")
    return {cls: name for cls, (_, name) in sorted(classes.items())}


def class_names(task: TaskConfig) -> dict[int, str]:
    """``{id: name}`` of the scored classes (seg: foreground only; unnamed ids get ``class_<id>``)."""
    if task.task == "seg":
        return {i: (task.labels or {}).get(i, f"class_{i}") for i in seg_label_ids(task)}
    return {i: (task.labels or {}).get(i, f"class_{i}") for i in range(task.num_classes)}


# ------------------------------------------------------------------------------ splits


@dataclass(frozen=True)
class Splits:
    """Case names of a run's splits; ``order`` is the seeded permutation fractions are cut from."""

    source: str
    seed: int
    fold: int | None
    folds: int | None
    label_fraction: float
    train: list[str]
    validation: list[str]
    train_all: list[str]
    order: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _permutation(names: list[str], seed: int, stream: int) -> list[str]:
    # One stream per purpose, so the fold cut and the fraction order do not share draws.
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), stream]))
    return [names[i] for i in rng.permutation(len(names))]


def split_cases(names: list[str], *, seed: int, folds: int = 5, fold: int = 0,
                label_fraction: float = 1.0, validation: list[str] | None = None) -> Splits:
    """Training/validation split and the label-fraction subset (module docstring).

    Args:
        names: training case names in datalist order.
        seed: ``train.seed``; the same seed gives the same folds and fraction order.
        folds: k for k-fold splitting (used when ``validation`` is empty; capped at ``n``).
        fold: the held-out fold, ``0 <= fold < folds``.
        label_fraction: share of the training split kept, in (0, 1].
        validation: a given validation list (the datalist's); no folds are cut then.

    Raises:
        ValueError: bad fraction, fold or fold count.
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"--label-fraction must lie in (0, 1], got {label_fraction}")
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got fold {fold} of {folds}")
    if not names:
        raise ValueError("no training cases: the data lists none")
    if validation:
        source, k, train_all, val = "datalist-validation", None, list(names), list(validation)
    elif len(names) < 2:
        source, k, train_all, val = "no-validation (one case)", None, list(names), []
    else:
        k = min(folds, len(names))
        if fold >= k:
            raise ValueError(f"fold {fold} does not exist: {len(names)} cases give {k} folds")
        perm = _permutation(names, seed, 0)
        held = set(perm[fold::k])  # fold f = every k-th case of the permutation from f
        train_all = [n for n in names if n not in held]
        val, source = [n for n in names if n in held], f"{k}-fold"
    order = _permutation(train_all, seed, 1)
    train = order[:math.ceil(label_fraction * len(order))]
    return Splits(source, int(seed), fold if k else None, k, float(label_fraction), train, val,
                  train_all, order)


# ------------------------------------------------------------------------------ spec and data


def new_spec(cfg: FinetuneConfig, *, data: str | Path, network: str, size: str,
              pretrained: str | Path | None, lora_rank: int | None, splits: Splits) -> dict:
    """A new run's ``finetune.json``: what prediction needs to rebuild its network.

    Raises:
        ConfigError: a LoRA rank, network or roi that does not fit the task.
    """
    task = cfg.task
    if lora_rank is not None and (isinstance(lora_rank, bool) or lora_rank < 1):
        raise ConfigError(f"--lora-rank must be an int >= 1 (paper: 4, 8, 16), got {lora_rank}")
    if (task.task == "cls") != (network == "classifier"):
        raise ConfigError(f"--network {network} does not fit task {task.task!r}: use classifier "
                          "for cls, mim-unetr, unetr or swinunetr for seg")
    if network == "swinunetr" and any(r % 32 for r in task.roi):
        raise ConfigError(f"task.roi={list(task.roi)}: swinunetr needs sides divisible by 32")
    return {"format": SPEC_FORMAT, "format_version": 1, "mim3d_version": __version__,
            "task": task.task, "network": network, "size": size, "preset": cfg.name,
            "in_channels": task.in_channels, "num_classes": task.num_classes,
            "roi": list(task.roi), "classes": {str(k): v for k, v in class_names(task).items()},
            "label_aliases": task.label_aliases, "data": str(Path(data).resolve()),
            "pretrained": str(Path(pretrained).resolve()) if pretrained else None,
            "transfer": None, "lora_rank": lora_rank, "lora": None,
            "label_fraction": splits.label_fraction, "fold": splits.fold, "folds": splits.folds,
            "config": to_dict(cfg)}


def make_datasets(cfg: FinetuneConfig, splits: Splits, train_items: list[Item],
              val_items: list[Item]) -> tuple[Any, Any]:
    """Cached train/validation datasets; reading every case here finds bad ones before the run
    folder is touched (a label off its image's grid, wrong channels, unreadable files)."""
    by_name = {item["name"]: item for item in train_items}
    val = val_items or [by_name[n] for n in splits.validation]
    common = {"workers": cfg.train.workers, "seed": cfg.train.seed}
    train_ds = make_dataset([by_name[n] for n in splits.train], cfg.data, cfg.task, train=True,
                            **common)
    val_ds = make_dataset(val, cfg.data, cfg.task, train=False, **common) if val else None
    return train_ds, val_ds


# ------------------------------------------------------------------------------ network


def build_network(spec: dict[str, Any]) -> nn.Module:
    """The run's network (``finetune.json``), with LoRA adapters when it was trained with them."""
    from mim3d.factory import build_downstream

    model = build_downstream(network=spec["network"], size=spec["size"],
                             in_channels=spec["in_channels"], out_channels=spec["num_classes"],
                             roi=spec["roi"])
    if spec.get("lora_rank"):
        model = add_lora(model, spec)[0]
    return model


def add_lora(model: nn.Module, spec: dict[str, Any]) -> tuple[nn.Module, Any]:
    """LoRA adapters of rank ``spec["lora_rank"]`` on the network's encoder (peft)."""
    from mim3d.models.downstream import ENCODER_PREFIX
    from mim3d.models.lora import apply_lora

    prefix = ENCODER_PREFIX.get(spec["network"])
    if prefix is None:
        raise ValueError(f"--lora-rank needs a pre-trainable encoder; {spec['network']} has "
                         f"none (choose one of {', '.join(ENCODER_PREFIX)})")
    return apply_lora(model, rank=int(spec["lora_rank"]), target=prefix)


def load_pretrained(model: nn.Module, spec: dict[str, Any], path: str | Path,
                     cfg: FinetuneConfig) -> dict[str, Any]:
    """Load the encoder file into the network; a missing key or another architecture raises."""
    from mim3d.models.downstream import ENCODER_PREFIX
    from mim3d.transfer import load_encoder_into, read_card

    prefix = ENCODER_PREFIX.get(spec["network"])
    if prefix is None:
        raise ValueError(f"--pretrained: {spec['network']} is trained from scratch; choose one "
                         f"of {', '.join(ENCODER_PREFIX)}")
    report = load_encoder_into(model, path, prefix=prefix)
    card = read_card(path) or {}
    # Not errors (fine-tuning adapts), but a user comparing results should know.
    for key, ours in (("hu_window", cfg.data.hu_window), ("spacing", cfg.data.spacing),
                      ("normalization", cfg.data.normalization)):
        theirs = card.get(key)
        mine = list(ours) if isinstance(ours, tuple) else ours
        if theirs is not None and theirs != mine:
            report.notes.append(f"The encoder was pre-trained with {key} {theirs}; this run "
                                f"uses {mine}.")
    logger.info("pretrained encoder %s: %s", path, report.summary())
    return report.to_dict()


def predict_logits(model: nn.Module, image: Tensor, task: TaskConfig,
                   device: torch.device) -> Tensor:
    """Logits of one preprocessed volume ``(1, C, X, Y, Z)`` on the CPU: sliding window with
    Gaussian blending for seg ``(1, K, X, Y, Z)``, one pass for cls ``(1, K)``."""
    if task.task == "seg":
        return sliding_window_predict(model, image, roi=task.roi, overlap=task.sw_overlap,
                                      mode="gaussian", device=device).float().cpu()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(image.to(device)).float().cpu()
    finally:
        model.train(was_training)


def score_case(model: nn.Module, item: Item, cfg: FinetuneConfig, class_ids: list[int],
               device: torch.device) -> float:
    """Validation score of one preprocessed case: mean Dice over the foreground classes present
    (seg, on the preprocessed grid; NaN when none is) or 1/0 for a right/wrong class (cls)."""
    image, task = plain_tensor(item["image"])[None], cfg.task
    with autocast_context(device, cfg.optim.precision):
        logits = predict_logits(model, image, task, device)
    if task.task == "cls":
        return float(int(logits.argmax(1)) == int(item["label"]))
    pred, gt = logits.argmax(1)[0].numpy(), plain_tensor(item["label"])[0].numpy()
    values = [dice(pred, gt, c) for c in class_ids]
    finite = [v for v in values if math.isfinite(v)]  # absent classes are not scored
    return float(np.mean(finite)) if finite else math.nan


def plain_tensor(t: Tensor) -> Tensor:
    """A MetaTensor's plain tensor: the network needs no meta data, and it costs time."""
    return t.as_tensor() if isinstance(t, MetaTensor) else t
