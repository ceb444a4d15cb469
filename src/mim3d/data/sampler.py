"""Random level-1 crops from a prepared store, reproducible from the sample index alone.

Every sample's randomness comes from ``np.random.default_rng([seed, index])``: which case, where
the crop lies, and the body-aware redraws. So the same global index gives the same crop in any
DataLoader worker, process or rank, and :class:`StepSampler` makes the index a pure function of
(optimizer step, micro-batch, rank, position in batch): resuming at a step replays the exact
remaining data stream with nothing but the step saved.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mim3d.config import DataConfig
from mim3d.data.store import AIR_HU, PreparedStore, config_mismatch, normalize

__all__ = ["PretrainCropDataset", "StepSampler", "make_loader"]

logger = logging.getLogger(__name__)

Triple = tuple[int, int, int]


class PretrainCropDataset(Dataset):
    """Random crops of a prepared store, normalised per ``data``.

    Args:
        store: an open :class:`PreparedStore` or its folder.
        crop_size: level-1 crop size S_1 in store voxels (x, y, z).
        data: preprocessing; ``spacing`` and ``body_hu`` must be those the store was prepared
            with (``spacing=None``, no resampling asked, accepts a store at any spacing), the
            window/normalisation and body-aware thresholds are applied here.
        seed: run seed; with the index it fixes every sample.
        length: nominal length (the sampler decides what is drawn; the stream is unbounded).

    Raises:
        ValueError: the store was prepared with other baked-in settings, or bad arguments.
    """

    def __init__(self, store: PreparedStore | str | Path, *, crop_size: Triple,
                 data: DataConfig, seed: int, length: int = 10**9) -> None:
        self.store = store if isinstance(store, PreparedStore) else PreparedStore.open(store)
        why = config_mismatch(self.store.data_config, data, reading=True)
        if why:
            raise ValueError(f"{self.store.root}: store does not fit the data config ({why}); "
                             "prepare the data with this preset or use the store's settings")
        if len(crop_size) != 3 or any(int(s) < 1 for s in crop_size):
            raise ValueError(f"crop_size must be three positive sizes, got {crop_size!r}")
        if seed < 0 or length < 1:
            raise ValueError(f"need seed >= 0 and length >= 1, got seed={seed}, length={length}")
        self.crop_size: Triple = tuple(int(s) for s in crop_size)
        self.data = data
        self.seed = int(seed)
        self.length = int(length)
        self._log_store_facts()

    def _log_store_facts(self) -> None:
        """Say at which spacing training runs and how many cases get padded crops."""
        if self.data.spacing is None:
            logger.info("%s: no resampling requested; training at the store's spacing %s",
                        self.store.root, self.store.data_config.get("spacing") or "native")
        small = int((self.store.index.shapes < np.asarray(self.crop_size)).any(axis=1).sum())
        if small:
            logger.warning("%s: %d of %d cases are smaller than the crop %s; their crops are "
                           "padded (prepare with --min-size to quarantine them)",
                           self.store.root, small, len(self.store), self.crop_size)

    def __len__(self) -> int:
        return self.length

    def crop_spec(self, index: int) -> tuple[int, Triple, float]:
        """Where sample ``index`` comes from, without reading the image.

        Returns:
            ``(case, start, body_fraction)``: case index, crop start (x, y, z; negative where the
            volume is smaller than the crop and is padded), and the crop's body fraction from the
            store's body grid (computed only when ``data.body_aware``, else NaN).
        """
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        case = int(rng.integers(len(self.store)))
        shape = self.store.shape(case)
        if not self.data.body_aware:
            return case, self._draw_start(rng, shape), float("nan")
        best_start, best_frac = None, -1.0
        for _ in range(self.data.max_crop_tries):
            start = self._draw_start(rng, shape)
            frac = self.store.crop_body_fraction(case, start, self.crop_size)
            if frac > best_frac:
                best_start, best_frac = start, frac
            if frac >= self.data.min_body_fraction:
                break
        return case, best_start, best_frac

    def _draw_start(self, rng: np.random.Generator, shape: tuple[int, ...]) -> Triple:
        """Uniform start so the crop lies inside; centred (padded) on axes shorter than it."""
        start = []
        for n, s in zip(shape, self.crop_size):
            start.append(int(rng.integers(0, n - s + 1)) if n >= s else -((s - n) // 2))
        return tuple(start)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Sample ``index`` as a float32 tensor of shape (1, *crop_size)."""
        case, start, _ = self.crop_spec(index)
        stats = self.store.stats(case)
        # Air for CT windows; for MRI-style normalisations the volume minimum is "background".
        pad = AIR_HU if self.data.normalization == "window" else stats.hu_min
        crop = self.store.read_crop(case, start, self.crop_size, pad_value=pad)
        out = normalize(crop, self.data, record=stats, overwrite=True)  # the crop is ours
        return torch.from_numpy(out)[None]


class StepSampler(Sampler[int]):
    """Global sample indices of one rank, in training order, forever.

    Micro-batch ``m`` of optimizer step ``s`` on rank ``r`` holds the indices
    ``((s * accum_steps + m) * world_size + r) * batch_size + b`` for ``b < batch_size``, so ranks
    never share a sample and resuming at ``start_step`` yields exactly the remaining stream.
    Use it with ``DataLoader(batch_size=batch_size)`` so each batch is one micro-batch.
    """

    def __init__(self, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, accum_steps: int = 1) -> None:
        if batch_size < 1 or accum_steps < 1 or start_step < 0:
            raise ValueError(f"StepSampler: need batch_size >= 1, accum_steps >= 1, "
                             f"start_step >= 0; got {batch_size}, {accum_steps}, {start_step}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"StepSampler: need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.accum_steps = accum_steps

    def index(self, step: int, micro: int, b: int) -> int:
        """Global sample index of position ``b`` of micro-batch ``micro`` of ``step``."""
        micro_global = (step * self.accum_steps + micro) * self.world_size + self.rank
        return micro_global * self.batch_size + b

    def __iter__(self) -> Iterator[int]:
        for step in itertools.count(self.start_step):
            for micro in range(self.accum_steps):
                first = self.index(step, micro, 0)
                yield from range(first, first + self.batch_size)


def _worker_init(worker_id: int) -> None:
    """Keep each loader worker to one thread; nothing is seeded (the index carries the seed)."""
    del worker_id
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, sampler: StepSampler, *, batch_size: int, workers: int,
                seed: int) -> DataLoader:
    """DataLoader for :class:`PretrainCropDataset` + :class:`StepSampler`.

    Args:
        dataset: the crop dataset.
        sampler: the rank's :class:`StepSampler`; its ``batch_size`` must equal ``batch_size``.
        batch_size: micro-batch size.
        workers: loader processes (0 = in the main process); kept alive across iterations.
        seed: fixes the loader's own generator (torch's per-worker base seed), so even code that
            draws from torch's global RNG inside a worker is reproducible.

    Returns:
        An infinite loader of float32 batches (batch_size, 1, *crop_size).
    """
    if sampler.batch_size != batch_size:
        raise ValueError(f"make_loader: batch_size={batch_size} but the sampler yields "
                         f"micro-batches of {sampler.batch_size}")
    extra = {"persistent_workers": True, "prefetch_factor": 2} if workers > 0 else {}
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(int(seed)), drop_last=False, **extra,
    )
