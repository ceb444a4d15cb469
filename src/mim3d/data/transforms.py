"""MONAI transforms and datasets for downstream fine-tuning (segmentation and classification).

A downstream preset's pipeline (DESIGN.md §4) is split in two :class:`monai.transforms.Compose`:

* **deterministic** (cached once per case): load with mim3d's readers (RAS) -> resample to
  ``data.spacing`` -> intensity normalisation -> crop to the body -> pad to the ROI; reading,
  resampling and the HU window are :mod:`mim3d.data.preprocess` (through the MONAI transforms
  of :mod:`mim3d.data.steps`), the functions that build the pre-training store too, so both
  paths give the same array for the same CT;
* **random** (train only, run on every access): positive/negative label-balanced ROI crops for
  segmentation (a plain random ROI crop for classification), flips, 90-degree rotations and small
  intensity scale/shift; the common SwinUNETR/MiM fine-tuning recipe.

Caching relies on MONAI 1.6's :class:`monai.data.CacheDataset`: it runs the transforms of a
*flat* Compose up to (excluding) the first one that is a ``RandomizableTrait`` or is not a
``monai.transforms.Transform`` at all (``CacheDataset._load_cache_item``), caches that result and
replays the rest on every ``__getitem__`` from a deep copy. Every deterministic step here is
therefore a ``Transform`` and never ``Randomizable``; :func:`make_dataset` checks the split point.
A nested Compose would count as random (Compose is Randomizable), so the two parts are flattened.

Labels (segmentation): the ids listed in ``task.labels`` are kept as they are and every other id
becomes background 0. Listed ids must lie in ``1..num_classes-1``; ``labels=None`` keeps all of
``1..num_classes-1``. An optional ``label_aliases`` map (e.g. the brats21 preset's 4 -> 3)
is applied to the raw ids first. Classification labels are integers in ``0..num_classes-1``, given
as the ``label`` of a datalist entry (``{"image": path, "label": 2}``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, Dataset, MetaTensor
from monai.transforms import Compose, MapTransform, RandomizableTrait, Transform
from monai.utils import convert_to_dst_type

from mim3d.config import DataConfig, TaskConfig
from mim3d.data.datalists import case_name
from mim3d.data.steps import (
    AFFINE_TOL_MM,
    LoadVolumed,
    Reader,
    ResampleToSpacingd,
    WindowHUd,
)
from mim3d.data.volume import ImageReadError

if TYPE_CHECKING:
    from mim3d.data.datalists import CaseSpec

IMAGE, LABEL, NAME = "image", "label", "name"


def remap_labels(label: np.ndarray | torch.Tensor, labels: Mapping[int, str] | Sequence[int], *,
                 aliases: Mapping[int, int] | None = None) -> np.ndarray | torch.Tensor:
    """Keep the listed label ids and set every other id to background 0.

    Args:
        label: label map of any shape (e.g. ``(1, X, Y, Z)``); float values are rounded first.
        labels: the ids to keep (a ``{id: name}`` dict or a list of ids); they are *not*
            renumbered, so they must already be the class indices ``1..num_classes-1``.
        aliases: raw id -> class id, applied before filtering (``{4: 3}`` for BraTS).

    Returns:
        Same type, shape and dtype as ``label`` with values in ``{0} | set(labels)``.
    """
    keep = sorted(int(i) for i in labels)
    src = torch.as_tensor(np.asarray(label)) if isinstance(label, np.ndarray) else label
    src = torch.round(src.as_tensor() if isinstance(src, MetaTensor) else src)
    out = torch.where(torch.isin(src, torch.tensor(keep, dtype=src.dtype)), src,
                      torch.zeros((), dtype=src.dtype))
    for raw, cls in (aliases or {}).items():
        # Read from the raw ids so that a chain like {4: 3, 3: 0} cannot apply twice; an alias
        # onto an id that is not kept still ends as background.
        value = torch.tensor(cls if cls in keep else 0, dtype=src.dtype)
        out = torch.where(src == raw, value, out)
    if isinstance(label, np.ndarray):
        return out.numpy().astype(label.dtype, copy=False)
    return convert_to_dst_type(out, label)[0]


class RemapLabelsd(MapTransform):
    """Dictionary wrapper of :func:`remap_labels` (deterministic, so it is cached)."""

    def __init__(self, keys: Sequence[str] | str, ids: Sequence[int], *,
                 aliases: Mapping[int, int] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ids = tuple(int(i) for i in ids)
        self.aliases = dict(aliases or {})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = remap_labels(d[key], self.ids, aliases=self.aliases)
        return d


class CheckCased(Transform):
    """Fail with the case name on a wrong channel count or a label off its image's voxel grid."""

    def __init__(self, in_channels: int) -> None:
        self.in_channels = in_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        img, name = data[IMAGE], data.get(NAME, "?")
        if img.shape[0] != self.in_channels:
            raise ImageReadError(f"case {name}: image has {img.shape[0]} channel(s), the task "
                                 f"expects in_channels={self.in_channels}")
        lab = data.get(LABEL)
        if not isinstance(lab, MetaTensor):  # no label, or a class index
            return data
        same = img.shape[1:] == lab.shape[1:] and torch.allclose(
            img.affine.double(), lab.affine.double(), atol=AFFINE_TOL_MM)
        if lab.shape[0] != 1 or not same:
            raise ImageReadError(
                f"case {name}: label {tuple(lab.shape)} does not lie on the image grid "
                f"{tuple(img.shape[1:])} (shape or affine differ); fix or resample the label file")
        return data


class ClassLabeld(MapTransform):
    """Turn an integer class label into a 0-d ``torch.long`` tensor, checking its range."""

    def __init__(self, keys: Sequence[str] | str, num_classes: int) -> None:
        super().__init__(keys, allow_missing_keys=True)  # inference items carry no label
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = int(d[key])
            if not 0 <= value < self.num_classes:
                raise ValueError(f"case {d.get(NAME, '?')}: class label {value} is outside "
                                 f"0..{self.num_classes - 1}")
            d[key] = torch.tensor(value, dtype=torch.long)
        return d


def _above_zero(x: torch.Tensor) -> torch.Tensor:
    """Foreground after windowing/min-max: voxels above the window's lower bound (not air)."""
    return _or_everything(x > 0)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """Foreground after z-score with ``nonzero=True``: MRI background stays exactly 0."""
    return _or_everything(x != 0)


def _or_everything(mask: torch.Tensor) -> torch.Tensor:
    # An empty selection would crop the volume to nothing; keep it whole instead.
    return mask if bool(mask.any()) else torch.ones_like(mask)


def seg_label_ids(task: TaskConfig) -> tuple[int, ...]:
    """The label ids a segmentation task keeps, validated against ``num_classes``.

    Raises:
        ValueError: a listed id outside ``1..num_classes-1``.
    """
    ids = tuple(sorted(task.labels)) if task.labels else tuple(range(1, task.num_classes))
    bad = [i for i in ids if not 1 <= i < task.num_classes]
    if bad:
        raise ValueError(f"task.labels ids {bad} are invalid: segmentation ids must be class "
                         f"indices 1..{task.num_classes - 1} (0 is background)")
    return ids


def _intensity(data: DataConfig) -> Transform:
    if data.normalization == "window":
        return WindowHUd(IMAGE, data.hu_window)
    if data.normalization == "zscore":
        return mt.NormalizeIntensityd(IMAGE, nonzero=True, channel_wise=True)
    return mt.ScaleIntensityd(IMAGE, minv=0.0, maxv=1.0)


def _deterministic(data: DataConfig, task: TaskConfig, train: bool, reader: Reader | None,
                   aliases: Mapping[int, int] | None) -> list[Transform]:
    seg = task.task == "seg"
    keys = [IMAGE, LABEL] if seg else [IMAGE]
    # Labels are optional outside training (inference), hence allow_missing_keys on label steps.
    steps: list[Transform] = [
        LoadVolumed(keys, reader=reader, allow_missing_keys=True),
        mt.EnsureTyped(keys, data_type="tensor", track_meta=True, allow_missing_keys=True),
        CheckCased(task.in_channels),
    ]
    if seg:
        steps.append(RemapLabelsd(LABEL, seg_label_ids(task), aliases=aliases,
                                  allow_missing_keys=True))
    else:
        steps.append(ClassLabeld(LABEL, task.num_classes))
    if data.spacing is not None:  # the reader already oriented both to RAS
        modes = ("bilinear", "nearest")[:len(keys)]  # nearest keeps label ids intact
        steps.append(ResampleToSpacingd(keys, data.spacing, modes, allow_missing_keys=True))
    steps.append(_intensity(data))
    select = _nonzero if data.normalization == "zscore" else _above_zero
    steps += [
        mt.CropForegroundd(keys, source_key=IMAGE, select_fn=select, allow_smaller=True,
                           allow_missing_keys=True),
        mt.SpatialPadd(keys, spatial_size=task.roi, mode="constant", allow_missing_keys=True),
    ]
    if not seg and not train:
        steps.append(mt.CenterSpatialCropd(IMAGE, roi_size=task.roi))  # batchable eval volumes
    return steps


def _random(task: TaskConfig) -> list[Transform]:
    if task.task == "seg":
        keys = [IMAGE, LABEL]
        crop: Transform = mt.RandCropByPosNegLabeld(
            keys, label_key=LABEL, spatial_size=task.roi, pos=task.pos, neg=task.neg,
            num_samples=task.num_samples, image_key=IMAGE, image_threshold=0.0)
    else:
        keys = [IMAGE]
        crop = mt.RandSpatialCropd(IMAGE, roi_size=task.roi, random_size=False)
    steps: list[Transform] = [crop]
    steps += [mt.RandFlipd(keys, prob=0.1, spatial_axis=axis) for axis in range(3)]
    if task.roi[0] == task.roi[1]:  # a 90-degree turn in (x, y) must keep the crop shape
        steps.append(mt.RandRotate90d(keys, prob=0.1, max_k=3))
    steps += [mt.RandScaleIntensityd(IMAGE, factors=0.1, prob=0.1),
              mt.RandShiftIntensityd(IMAGE, offsets=0.1, prob=0.1)]
    return steps


def build_transforms(data: DataConfig, task: TaskConfig, *, train: bool, seed: int = 0,
                     reader: Reader | None = None,
                     label_aliases: Mapping[int, int] | None = None) -> tuple[Compose, Compose]:
    """The (deterministic, random) transform pair of a downstream preset.

    Items are dicts ``{"image": path | [paths], "label": path | int, "name": str}``.

    Deterministic output: ``image`` ``(C, X', Y', Z')`` float32 MetaTensor (RAS, ``data.spacing``,
    normalised, cropped to the body, padded to at least ``task.roi``); seg ``label``
    ``(1, X', Y', Z')`` on the same grid; cls ``label`` a 0-d long tensor. For cls evaluation the
    image is centre-cropped to exactly ``task.roi``. Random output (train): seg gives a list of
    ``task.num_samples`` dicts with ``image`` ``(C, *roi)`` and ``label`` ``(1, *roi)``; cls one
    dict with ``image`` ``(C, *roi)``. With ``train=False`` the random part is an empty Compose.

    Args:
        data: preprocessing config (spacing, HU window, normalisation).
        task: downstream task (seg/cls, roi, label ids, crop counts).
        train: add the random crop and augmentations.
        seed: seeds every random transform (``Compose.set_random_state``).
        reader: replaces :func:`mim3d.data.readers.read_volume` (path -> Volume).
        label_aliases: raw label id -> class id before filtering, e.g. ``{4: 3}`` (BraTS);
            default ``task.label_aliases``.

    Raises:
        ValueError: ``task.labels`` ids outside ``1..num_classes-1`` (seg).
    """
    if label_aliases is None:
        label_aliases = task.label_aliases
    det = Compose(_deterministic(data, task, train, reader, label_aliases))
    rand = Compose(_random(task) if train else [])
    rand.set_random_state(seed=seed)
    return det, rand


def _root_read_error(err: BaseException) -> ImageReadError | None:
    """The ImageReadError that MONAI wrapped in ``RuntimeError("applying transform ...")``."""
    while err is not None and not isinstance(err, ImageReadError):
        err = err.__cause__
    return err


class _Dataset(Dataset):
    """MONAI Dataset that lets a bad case's one-line ImageReadError through unwrapped."""

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except RuntimeError as err:
            raise (_root_read_error(err) or err) from None


class _CacheDataset(CacheDataset):
    """MONAI CacheDataset that lets a bad case's one-line ImageReadError through unwrapped."""

    def _load_cache_item(self, idx: int) -> Any:
        try:
            return super()._load_cache_item(idx)
        except RuntimeError as err:
            raise (_root_read_error(err) or err) from None


def _first_random(compose: Compose) -> int | None:
    """The index where MONAI 1.6's CacheDataset stops caching (same predicate as its source)."""
    return compose.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))


def _as_item(case: CaseSpec | Mapping[str, Any], index: int) -> dict[str, Any]:
    """A CaseSpec or a datalist dict as a plain item dict with string paths and a name."""
    get = case.get if isinstance(case, Mapping) else lambda k: getattr(case, k, None)
    image, label, name = get(IMAGE), get(LABEL), get(NAME)
    if image is None:
        raise ValueError(f"case {index} has no image: give an image path (or a list of paths)")
    paths = str(image) if isinstance(image, (str, os.PathLike)) else [str(p) for p in image]
    if name is None:
        first = paths if isinstance(paths, str) else paths[0]
        name = case_name(first)
    item: dict[str, Any] = {IMAGE: paths, NAME: str(name)}
    if label is not None:
        item[LABEL] = label if isinstance(label, (int, np.integer)) else str(label)
    return item


def _check_items(items: Sequence[dict[str, Any]], task: TaskConfig, train: bool) -> None:
    for item in items:
        # A single path may be a 4D file; its channels are checked after loading (CheckCased).
        channels = 1 if isinstance(item[IMAGE], str) else len(item[IMAGE])
        if channels not in (1, task.in_channels):
            raise ValueError(f"case {item[NAME]}: {channels} image file(s) for "
                             f"task.in_channels={task.in_channels}; give one path per channel")
        label = item.get(LABEL)
        if task.task == "cls" and not isinstance(label, (int, np.integer)):
            raise ValueError(f"case {item[NAME]}: a classification case needs an int 'label'")
        if task.task == "cls" and not 0 <= label < task.num_classes:
            raise ValueError(f"case {item[NAME]}: class label {label} is outside "
                             f"0..{task.num_classes - 1}")
        if task.task == "seg" and train and not isinstance(label, str):
            raise ValueError(f"case {item[NAME]}: a segmentation training case needs a label file")


def make_dataset(cases: Sequence[CaseSpec | Mapping[str, Any]], data: DataConfig,
                 task: TaskConfig, *, train: bool, cache: bool = True, workers: int = 0,
                 seed: int = 0, reader: Reader | None = None,
                 label_aliases: Mapping[int, int] | None = None) -> Dataset:
    """A MONAI dataset: deterministic part cached once per case, random part on every access.

    ``cases`` are :class:`~mim3d.data.datalists.CaseSpec` objects or datalist dicts
    ``{"image": path | [paths], "label": path | int, "name": str}`` (an int label means a class
    index, for ``task.task == "cls"``). Each item is a dict ``{"image": (C, *roi), "label":
    (1, *roi) | 0-d long, "name": str}``; a seg training item is a *list* of ``task.num_samples``
    such dicts. Batch with :class:`monai.data.DataLoader` (it uses ``list_data_collate``, which
    flattens those lists into a batch of ``batch_size * num_samples``, and reseeds the random
    transforms per worker from torch's seed); seg evaluation volumes differ in size, so use
    batch size 1 and sliding-window inference.

    Args:
        cases: the cases, in order.
        data: preprocessing config.
        task: downstream task config.
        train: add random crops/augmentation (and require seg labels).
        cache: cache the deterministic part in memory (``CacheDataset``, ``cache_rate=1.0``);
            ``False`` re-reads every case on every access.
        workers: threads that fill the cache (``CacheDataset(num_workers=...)``).
        seed: seed of the random transforms.
        reader: replaces :func:`mim3d.data.readers.read_volume`.
        label_aliases: raw label id -> class id (e.g. ``{4: 3}`` for BraTS).

    Raises:
        ValueError: a case without image, with the wrong number of channels or a missing label.
    """
    items = [_as_item(c, i) for i, c in enumerate(cases)]
    _check_items(items, task, train)
    det, rand = build_transforms(data, task, train=train, seed=seed, reader=reader,
                                 label_aliases=label_aliases)
    full = Compose([*det.transforms, *rand.transforms])
    full.set_random_state(seed=seed)
    split, expected = _first_random(full), len(det.transforms) if rand.transforms else None
    if split != expected:  # caching would stop early, or freeze a random draw for good
        raise RuntimeError(f"CacheDataset would cache up to transform {split}, not {expected}")
    if not cache:
        return _Dataset(items, transform=full)
    return _CacheDataset(items, transform=full, cache_rate=1.0, num_workers=max(workers, 1),
                        progress=False)
