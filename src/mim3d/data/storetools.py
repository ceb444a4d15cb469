"""Store tools behind ``mim3d store``: summary (info), integrity check (verify), merge of parts.

``verify`` re-reads every array: each chunk against the digest written at prepare time (so a
damaged chunk is named with its voxel range), then the whole image against the manifest's
SHA-256. ``merge`` joins stores prepared separately (``prepare --shard I/N --out PART_I`` on
nodes without a shared file system) into one, case for case as a single prepare would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mim3d.data.casework import RECORD_JSON, now
from mim3d.data.formats import DamagedArrayError
from mim3d.data.manifest import (
    HU_EDGES,
    MANIFEST,
    QUARANTINE,
    CaseRecord,
    ManifestWriter,
    locked,
    read_manifest,
    read_quarantine,
)
from mim3d.data.remote import StoreFiles
from mim3d.data.store import CASES_DIR, STORE_JSON, PreparedStore, read_store_info
from mim3d.fileio import write_text_atomically

__all__ = ["MergeReport", "VerifyReport", "merge_stores", "store_info", "verify_store"]


def store_info(location: str | Path) -> dict[str, Any]:
    """Summary of a store: cases, voxels, bytes on disk, compression, spacing and HU histograms.

    ``compression_ratio`` is the raw int16 (image) + label bytes of the cases' grids over the
    bytes the case files take on disk (1.0 means no compression; the body grid counts on disk;
    axes kept at a coarser spacing count as savings). ``kept_coarse`` counts those cases.
    """
    store = PreparedStore.open(location)
    records = list(store.cases)
    voxels = [int(np.prod(r.shape)) for r in records]
    raw = sum(v * (2 + (1 if r.has_label else 0)) for v, r in zip(voxels, records))
    on_disk = sum(r.stored_bytes or _local_bytes(store, i) for i, r in enumerate(records))
    spacing = Counter("x".join(f"{s:.3g}" for s in r.spacing) for r in records)
    hist = np.zeros(len(HU_EDGES) - 1, dtype=np.int64)
    for r in records:
        if len(r.hu_hist) == len(hist):
            hist += np.asarray(r.hu_hist, dtype=np.int64)
    try:
        quarantine = read_quarantine(store.files.path(QUARANTINE, refresh=True))
    except FileNotFoundError:
        quarantine = []
    return {
        "store": str(store.root), "format_version": store.info["version"],
        "array_format": store.info["array_format"], "coarse_axes": store.info["coarse_axes"],
        "kept_coarse": sum(r.stored_shape is not None for r in records), "cases": len(records),
        "total_voxels": int(sum(voxels)), "bytes_on_disk": int(on_disk),
        "compression_ratio": raw / on_disk if on_disk else float("nan"),
        "labelled": sum(r.has_label for r in records),
        "smaller_than_crop": sum(r.smaller_than_crop for r in records),
        "spacing_mm": dict(spacing.most_common()),
        "hu_histogram": {"edges": list(HU_EDGES), "counts": hist.tolist()},
        "quarantined": len(quarantine), "data": store.data_config,
    }


def _local_bytes(store: PreparedStore, i: int) -> int:
    """Bytes of a case's files (stores written before stored_bytes was recorded)."""
    folder = store.case_dir(i)
    return sum(p.stat().st_size for p in folder.iterdir() if p.name != RECORD_JSON) \
        if folder.is_dir() else 0


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`: cases checked and one line per problem found."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def damaged_cases(self) -> list[str]:
        return sorted({line.split(":", 1)[0].removeprefix("case ") for line in self.problems})


def verify_store(location: str | Path) -> VerifyReport:
    """Re-read and re-hash every case; never raises for a damaged case (it is reported)."""
    store = PreparedStore.open(location)
    report = VerifyReport()
    for i in range(len(store)):
        report.checked += 1
        rec = store.record(i)
        try:
            report.problems += [f"case {rec.name}: {p}" for p in _verify_case(store, i, rec)]
        except (DamagedArrayError, OSError, RuntimeError, ValueError) as err:
            report.problems.append(f"case {rec.name}: {' '.join(str(err).split())}")
    return report


def _verify_case(store: PreparedStore, i: int, rec: CaseRecord) -> list[str]:
    """Problems of one case: chunks not matching their digests, then the image hash."""
    problems = []
    digests = _saved_digests(store, i)
    kinds = ["image", "label"] if rec.has_label else ["image"]
    for kind in kinds:
        handle = store.format.open(store.array_path(i, kind))
        for k, (have, want) in enumerate(zip(store.format.chunk_digests(handle),
                                             digests.get(kind, []))):
            if have != want:
                box = store.format.chunk_region(handle.shape, k)  # in the file's voxels
                where = ", ".join(f"{a}={lo}:{hi}" for a, (lo, hi) in zip("xyz", box))
                problems.append(f"{kind} chunk {k} ({where}) is damaged (digest differs)")
    try:
        image = store.format.read_all(store.image(i))
    except (RuntimeError, ValueError) as err:
        return [*problems, f"image cannot be decompressed ({err})"]
    if tuple(image.shape) != rec.image_shape or image.dtype != np.int16:
        problems.append(f"image is {image.dtype}{tuple(image.shape)}, the manifest says "
                        f"int16{rec.image_shape}")
    elif hashlib.sha256(np.ascontiguousarray(image).data).hexdigest() != rec.sha256:
        problems.append("image content differs from the manifest's SHA-256")
    store.body(i)  # an unreadable body grid raises DamagedArrayError
    return problems


def _saved_digests(store: PreparedStore, i: int) -> dict[str, list[str]]:
    """Chunk digests from the case's record.json (absent in format version 1 stores)."""
    rel = f"{CASES_DIR}/{store.index.name(i)}/{RECORD_JSON}"
    try:
        path = store.files.path(rel, version=store.index.tag(i))
    except FileNotFoundError:
        return {}
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")).get("chunks", {}))


@dataclass
class MergeReport:
    """Outcome of :func:`merge_stores`."""

    merged: int = 0
    skipped: int = 0
    quarantined: int = 0
    in_store: int = 0


def merge_stores(parts: Sequence[str | Path], out: str | Path) -> MergeReport:
    """Join local part stores into ``out`` (new, or a store with the same settings).

    Every conflict is found before anything is copied: parts with other baked-in settings or
    array formats, or one case name standing for two different sources.

    Raises:
        ValueError: (one line) a conflict, or a part that is not a store.
    """
    root = Path(out)
    infos = [read_store_info(StoreFiles(p)) for p in parts]
    first = infos[0]
    for part, info in zip(parts, infos):
        for key in ("array_format", "format_params", "coarse_axes", "data"):
            if info.get(key) != first.get(key):
                raise ValueError(f"{part}: {key} differs from {parts[0]}'s; only parts of one "
                                 "prepare (same preset and --format) can be merged")
    _init_like(root, first)
    with locked(root / ".prepare.lock", blocking=False) as ok:
        if not ok:
            raise ValueError(f"{root}: a `mim3d prepare` is writing to this store; wait for it")
        plan = _merge_plan(parts, root)
        writer, report = ManifestWriter(root), MergeReport()
        writer.repair()
        for part, rec in plan:
            if rec is None:
                report.skipped += 1
                continue
            _copy_case(Path(part) / CASES_DIR / rec.name, root / CASES_DIR / rec.name)
            report.merged += writer.commit(rec.to_json())
        done = {r.source for r in read_manifest(root / MANIFEST)}
        for part in parts:
            for entry in read_quarantine(Path(part) / QUARANTINE):
                if entry["source"] not in done:
                    writer.quarantine({**entry, "time": now()})
                    report.quarantined += 1
        report.in_store = len(done)
    return report


def _init_like(root: Path, info: dict[str, Any]) -> None:
    """Create ``root`` as an empty store with the parts' settings, or check it has them."""
    root.mkdir(parents=True, exist_ok=True)
    if (root / "store.json").is_file():
        have = read_store_info(StoreFiles(root))
        if any(have.get(k) != info.get(k)
               for k in ("array_format", "format_params", "coarse_axes", "data")):
            raise ValueError(f"{root}: the store's settings differ from the parts'; merge into "
                             "a new --out")
        return
    if any(not p.name.startswith(".") for p in root.iterdir()):
        raise ValueError(f"{root}: folder is not empty and not a store; choose a new --out")
    (root / CASES_DIR).mkdir(exist_ok=True)
    text = json.dumps({**info, "created": now()}, indent=2) + "\n"
    write_text_atomically(root / STORE_JSON, text)


def _merge_plan(parts: Sequence[str | Path], root: Path) -> list[tuple[str | Path, Any]]:
    """(part, record to copy, or None when already in ``out``) for every part case."""
    owner = {r.name: r.source_key for r in read_manifest(root / MANIFEST)}
    present = set(owner)
    plan: list[tuple[str | Path, Any]] = []
    for part in parts:
        for rec in read_manifest(Path(part) / MANIFEST):
            if owner.setdefault(rec.name, rec.source_key) != rec.source_key:
                raise ValueError(f"{part}: case {rec.name!r} comes from {rec.source}, but that "
                                 "name already stands for another source; nothing was merged")
            plan.append((part, None if rec.name in present else rec))
            present.add(rec.name)
    return plan


def _copy_case(src: Path, dst: Path) -> None:
    """Copy a case folder atomically (temporary name, then rename)."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
