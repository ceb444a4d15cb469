"""Phantom datasets in nnU-Net's raw layout, and nnU-Net's commands as killable subprocesses.

Used by the nnU-Net test and ``benchmarks/nnunet_compare.py``; also a quick way for a user to
try the hand-off without data of their own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mim3d.data.phantom import LABELS, make_phantom
from mim3d.data.readers import write_volume
from mim3d.data.volume import Volume

__all__ = ["PHANTOM_CLASSES", "run_nnunet", "write_phantom_dataset"]

logger = logging.getLogger(__name__)

#: nnU-Net labels of the phantom dataset: large organs only, so they survive small grids.
PHANTOM_CLASSES: dict[str, tuple[str, ...]] = {
    "liver": ("liver",), "spleen": ("spleen",), "kidney": ("right_kidney", "left_kidney")}


def write_phantom_dataset(raw: str | Path, dataset_id: int, n: int, *,
                          shape: tuple[int, int, int] = (48, 48, 48),
                          spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
                          seed: int = 0, name: str = "MiMPhantom") -> Path:
    """Write ``n`` phantom cases as ``raw/Dataset<id>_<name>`` in nnU-Net v2's raw layout.

    ``imagesTr/<case>_0000.nii.gz`` (HU, one CT channel), ``labelsTr/<case>.nii.gz`` with the
    consecutive labels of :data:`PHANTOM_CLASSES` (0 = everything else) and a ``dataset.json``
    with ``channel_names``, ``labels``, ``numTraining`` and ``file_ending``. Case ``i`` uses
    phantom seed ``seed + i``.

    Returns:
        The dataset folder.
    """
    if not 1 <= dataset_id <= 999 or n < 1:
        raise ValueError(f"dataset_id must be in 1..999 and n >= 1, got {dataset_id}, {n}")
    root = Path(raw) / f"Dataset{dataset_id:03d}_{name}"
    ids = {v: k for k, v in LABELS.items()}
    for i in range(n):
        image, label = make_phantom(shape=shape, spacing=spacing, seed=seed + i)
        target = np.zeros(label.array.shape, dtype=np.uint8)
        for value, organs in enumerate(PHANTOM_CLASSES.values(), start=1):
            target[np.isin(label.array, [ids[o] for o in organs])] = value
        write_volume(Volume(image.array, image.affine), root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        write_volume(Volume(target, label.affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    meta = {"channel_names": {"0": "CT"},
            "labels": {"background": 0, **{k: v for v, k in enumerate(PHANTOM_CLASSES, 1)}},
            "numTraining": n, "file_ending": ".nii.gz", "name": name,
            "description": "mim3d.data.phantom cases in nnU-Net's raw layout"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root


def run_nnunet(args: Sequence[str], *, env: Mapping[str, str], timeout: float,
               log: str | Path) -> None:
    """Run one nnU-Net command in its own process group; kill the group on timeout.

    Args:
        args: the command line, e.g. ``["nnUNetv2_train", "501", "3d_fullres", "all"]``.
        env: the complete environment (nnU-Net's folder variables included);
            ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``.
        timeout: seconds before the whole group is killed.
        log: file receiving stdout and stderr (appended).

    Raises:
        RuntimeError: non-zero exit or timeout, naming the command and the log file.
    """
    # nnU-Net sets torch to all cores; OpenMP's default spin-waiting then makes a CPU training
    # step ~50x slower on a busy machine (measured: 4 s vs 0.075 s), so threads sleep instead
    env = {"OMP_WAIT_POLICY": "PASSIVE", **env}
    with open(log, "a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen(list(args), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"{args[0]} ran over {timeout:g} s and was killed; see {log}")
        finally:
            if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt): leave nothing behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if code != 0:
        raise RuntimeError(f"{args[0]} exited with code {code}; see {log}")
    logger.info("%s done", args[0])
