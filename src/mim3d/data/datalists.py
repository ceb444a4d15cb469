"""Turn user inputs (files, folders, datalists, nnU-Net datasets, path lists) into named cases.

Accepted inputs (see :func:`resolve_inputs`):

* an image file with one of :data:`~mim3d.data.readers.SUPPORTED_EXTENSIONS`;
* a DICOM series folder (a folder directly holding DICOM files): one case, read later by
  :func:`mim3d.data.readers.read_volume`, which picks the series;
* an MSD/decathlon datalist JSON (:func:`load_datalist`, key ``"training"``);
* an nnU-Net raw dataset folder, ``dataset.json`` + ``imagesTr/`` [+ ``labelsTr/``]
  (:func:`load_nnunet_folder`); only channel ``_0000`` is taken, labels from ``labelsTr``.
  An MSD task folder has the same layout and is read the same way, and a ``dataset.json``
  given as a file inside such a folder stands for the folder;
* any other folder, scanned recursively for image files and DICOM series folders. Hidden
  files/folders are skipped, and nnU-Net dataset folders met in the scan are read as such (so
  their ``labelsTr`` is not mistaken for images); no other file is guessed to be a label, and
  JSON/txt files met in a scan are ignored;
* a ``.txt`` file with one path per line (blank lines and lines starting with ``#`` ignored;
  relative paths are relative to the text file's folder); each line may be any input above.

All bad inputs raise ValueError (also for wrong JSON types, where linters prefer TypeError) so
that callers catch one exception type. Order is deterministic: inputs in the order given,
datalist and text-file entries in file order, scanned folders sorted by path. An image listed
twice keeps its first entry. Case names come from the file (or DICOM folder) name without
extension, made filesystem-safe and unique (case-insensitively, as on macOS/Windows) by
appending ``_2``, ``_3``, ...
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mim3d.data.dicom import is_dicom_file, is_dicom_folder
from mim3d.data.readers import SUPPORTED_EXTENSIONS, image_extension

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "CaseSpec",
    "case_name",
    "load_datalist",
    "load_nnunet_folder",
    "parse_label_map",
    "resolve_inputs",
]

_CHANNEL = re.compile(r"^(.*)_(\d{4})$")  # nnU-Net channel suffix: case_0000


@dataclass(frozen=True)
class CaseSpec:
    """One case: a unique name, an image path (file or DICOM folder) and an optional label."""

    name: str
    image: str
    label: str | None = None


def case_name(path: str | Path) -> str:
    """Return a filesystem-safe name from a file name without its image extension."""
    p = Path(path)
    ext = image_extension(p)
    stem = p.name[: -len(ext)] if ext else p.name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip(".")
    return safe or "case"


def _abs(base: str | Path, path: str | Path) -> str:
    """Absolute, normalised path of ``path`` taken relative to ``base``."""
    return os.path.abspath(
        os.path.join(os.path.expanduser(str(base)), os.path.expanduser(str(path)))
    )


def _is_int(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def parse_label_map(raw: object) -> dict[int, str]:
    """Parse a ``labels`` entry into ``{id: name}`` sorted by id.

    Accepts MSD style ``{"0": "background", "1": "spleen"}``, nnU-Net style
    ``{"background": 0, "liver": 1}`` and a plain list of names (index = id). nnU-Net region
    entries (list values such as ``"whole tumor": [1, 2, 3]``) are skipped: they are unions of
    ids, not ids.
    """
    if raw is None:
        return {}
    if isinstance(raw, list):
        return {i: str(name) for i, name in enumerate(raw)}
    if not isinstance(raw, dict):
        got = type(raw).__name__
        raise ValueError(f"labels must be a mapping or a list, got {got}")  # noqa: TRY004
    out: dict[int, str] = {}
    for key, value in raw.items():
        if _is_int(key):
            out[int(key)] = str(value)
        elif _is_int(value):
            out[int(value)] = str(key)
        elif isinstance(value, (list, tuple)):
            continue
        else:
            raise ValueError(f"labels entry {key!r}: {value!r} has no integer id")
    return dict(sorted(out.items()))


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{path}: datalist not found; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); fix the file") from None


def _first(value: object) -> str | None:
    """MONAI lists of channels: keep the first path (mim3d pre-trains on one channel)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or value == "":
        return None
    return str(value)


def load_datalist(path: str | Path, key: str = "training") -> tuple[list[CaseSpec], dict[int, str]]:
    """Read an MSD/decathlon datalist JSON.

    Entries of ``data[key]`` are dicts with ``"image"`` (a path, or a list of channel paths of
    which the first is kept) and optional ``"label"``, or plain path strings. Relative paths are
    taken from ``"base_dir"``/``"basedir"`` when present (itself relative to the JSON's folder),
    otherwise from the JSON's folder. A top-level list is read as the entries themselves.

    Returns:
        ``(cases, labels)``: cases in file order with unique names, and ``{id: name}`` from the
        ``"labels"`` entry (empty when absent).

    Raises:
        ValueError: missing/invalid file, missing key, malformed entry, or none of the images
            exists (usually a wrong ``base_dir``).
    """
    p = Path(path)
    data = _read_json(p)
    if isinstance(data, list):
        data = {key: data}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a datalist must be a JSON object or list")  # noqa: TRY004
    if key not in data:
        raise ValueError(f"{p}: no {key!r} list in the datalist; keys are {sorted(data)}")
    entries = data[key]
    if not isinstance(entries, list):
        raise ValueError(f"{p}: {key!r} must be a list of entries")  # noqa: TRY004
    base = data.get("base_dir", data.get("basedir"))
    base = _abs(p.parent, base) if base else str(p.parent.absolute())
    cases = [_entry_case(entry, base, p, i) for i, entry in enumerate(entries)]
    if cases and not any(os.path.exists(c.image) for c in cases):
        raise ValueError(
            f"{p}: none of the {len(cases)} images exists (first: {cases[0].image}); "
            "check base_dir or the paths"
        )
    try:
        labels = parse_label_map(data.get("labels"))
    except ValueError as err:
        raise ValueError(f"{p}: {err}") from None
    return _unique(cases), labels


def _entry_case(entry: object, base: str, source: Path, index: int) -> CaseSpec:
    """Build the case of one datalist entry."""
    if isinstance(entry, dict):
        image, label = _first(entry.get("image")), _first(entry.get("label"))
    else:
        image, label = _first(entry), None
    if image is None:
        raise ValueError(f"{source}: entry {index} has no image path")
    image = _abs(base, image)
    return CaseSpec(case_name(image), image, _abs(base, label) if label else None)


def load_nnunet_folder(folder: str | Path) -> tuple[list[CaseSpec], dict[int, str]]:
    """Read an nnU-Net raw dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``).

    Images ``imagesTr/<case>_0000<ext>`` give the cases (other channels are ignored; files
    without a channel suffix are taken as they are); ``labelsTr/<case><ext>`` is the label when
    present. ``imagesTs`` is not read.

    Returns:
        ``(cases, labels)`` sorted by case, labels from ``dataset.json``.
    """
    root = Path(folder)
    meta = _read_json(root / "dataset.json")
    if not isinstance(meta, dict):
        raise ValueError(f"{root}/dataset.json: must be a JSON object")  # noqa: TRY004
    ending = meta.get("file_ending")
    cases = []
    for img in sorted((root / "imagesTr").iterdir()):
        ext = image_extension(img)
        if img.name.startswith(".") or ext is None or (ending and ext != ending.lower()):
            continue
        stem = img.name[: -len(ext)]
        match = _CHANNEL.match(stem)
        if match and match.group(2) != "0000":
            continue
        case = match.group(1) if match else stem
        label = root / "labelsTr" / f"{case}{img.name[-len(ext) :]}"
        cases.append(
            CaseSpec(
                case_name(case),
                str(img.absolute()),
                str(label.absolute()) if label.is_file() else None,
            )
        )
    if not cases:
        raise ValueError(
            f"{root}: no images in imagesTr; expected <case>_0000{ending or '.nii.gz'}"
        )
    try:
        labels = parse_label_map(meta.get("labels"))
    except ValueError as err:
        raise ValueError(f"{root / 'dataset.json'}: {err}") from None
    return _unique(cases), labels


def _is_nnunet(folder: Path) -> bool:
    return (folder / "dataset.json").is_file() and (folder / "imagesTr").is_dir()


def resolve_inputs(inputs: Sequence[str | Path]) -> list[CaseSpec]:
    """Expand inputs (files, folders, datalists, nnU-Net folders, path lists) into cases.

    See the module docstring for what each kind of input gives and the ordering rules.

    Raises:
        ValueError: (one line) an input is missing, unsupported, or yields no image.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]  # a lone path is a common slip; a str would iterate by character
    cases: list[CaseSpec] = []
    for item in inputs:
        cases.extend(_resolve_one(Path(item), frozenset()))
    return _unique(cases)


def _resolve_one(path: Path, txt_chain: frozenset[str]) -> list[CaseSpec]:
    """Cases of one input; ``txt_chain`` holds the text files being read, to stop cycles."""
    if not path.exists():
        raise ValueError(f"input not found: {path}; check the path")
    if path.is_dir():
        if _is_nnunet(path):
            return load_nnunet_folder(path)[0]
        if is_dicom_folder(path):
            return [CaseSpec(case_name(path.name), str(path.absolute()))]
        found = _scan_folder(path)
        if not found:
            raise ValueError(
                f"{path}: no images found (looked for {', '.join(SUPPORTED_EXTENSIONS)} files "
                "and DICOM series folders)"
            )
        return found
    suffix = path.suffix.lower()
    if suffix == ".json":
        if path.name == "dataset.json" and _is_nnunet(path.parent):
            # nnU-Net's dataset.json lists no files (v2) or names without the _0000 channel
            # suffix (v1), so its folder is the truth (for MSD folders both agree).
            return load_nnunet_folder(path.parent)[0]
        return load_datalist(path)[0]
    if suffix == ".txt":
        return _read_path_list(path, txt_chain)
    if image_extension(path):
        return [CaseSpec(case_name(path), str(path.absolute()))]
    if is_dicom_file(path):
        raise ValueError(f"{path}: a single DICOM file; pass the folder holding its series")
    raise ValueError(
        f"{path}: unsupported input; give an image ({', '.join(SUPPORTED_EXTENSIONS)}), "
        "a folder, a datalist .json or a .txt list of paths"
    )


def _read_path_list(path: Path, txt_chain: frozenset[str]) -> list[CaseSpec]:
    """Cases of a text file listing one path per line."""
    key = os.path.realpath(path)
    if key in txt_chain:
        raise ValueError(f"{path}: path list includes itself (directly or through another list)")
    chain = txt_chain | {key}
    cases: list[CaseSpec] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        target = Path(_abs(path.parent, entry))
        if not target.exists():
            raise ValueError(f"{path}:{number}: listed path not found: {target}")
        cases.extend(_resolve_one(target, chain))
    return cases


def _scan_folder(root: Path) -> list[CaseSpec]:
    """Recursive scan for image files and DICOM series folders, sorted by path."""
    cases: list[CaseSpec] = []
    for current, dirnames, filenames in os.walk(root):
        here = Path(current)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if here != root and _is_nnunet(here):
            cases.extend(load_nnunet_folder(here)[0])
            dirnames[:] = []  # its labelsTr must not be taken as images
            continue
        files = sorted(f for f in filenames if not f.startswith("."))
        if any(is_dicom_file(here / f) for f in files if not image_extension(f)):
            cases.append(CaseSpec(case_name(here.name), str(here.absolute())))
        cases.extend(
            CaseSpec(case_name(f), str((here / f).absolute())) for f in files if image_extension(f)
        )
    return sorted(cases, key=lambda c: c.image)


def _unique(cases: Iterable[CaseSpec]) -> list[CaseSpec]:
    """Drop repeated images (first kept) and make names unique case-insensitively."""
    seen_images: set[str] = set()
    taken: set[str] = set()
    out: list[CaseSpec] = []
    for case in cases:
        if case.image in seen_images:
            continue
        seen_images.add(case.image)
        name, n = case.name, 1
        while name.lower() in taken:
            n += 1
            name = f"{case.name}_{n}"
        taken.add(name.lower())
        out.append(case if name == case.name else replace(case, name=name))
    return out
