"""Atomic file writes and checked JSON reads: one definition for every index and report.

A written file or folder appears whole under its final name, or not at all: a kill mid-write
(SIGKILL, power loss, a full disk) leaves at most a hidden temporary ``.<name>.partial-<pid>``
beside the target, which the next write replaces, so readers never see half a checkpoint,
store index, report or picture. Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = ["fsync_path", "one_line", "read_json_object", "replace_folder", "write_atomically",
           "write_text_atomically"]


def write_atomically(path: str | PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(temp_path)`` and rename the result into place as ``path``.

    ``write`` may create a file or a folder at ``temp_path`` (a sibling of ``path``, so the
    rename stays on one file system). Parent folders are created; whatever ``write`` left
    behind is removed if it raises.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | PathLike, text: str) -> Path:
    """:func:`write_atomically` for a UTF-8 text file (JSON indexes, reports)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def one_line(error: BaseException, limit: int = 200) -> str:
    """An error's text on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json_object(path: Path, error: Callable[[str], Exception]) -> dict[str, Any]:
    """The JSON object in ``path``; ``error(problem)`` is raised when it cannot be read.

    Args:
        path: the file.
        error: makes the caller's exception from a short problem text ("unreadable (...)",
            "not a JSON object"), so each caller names the file and what to do its own way.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"unreadable ({one_line(exc)})") from exc
    if not isinstance(data, dict):
        raise error("not a JSON object")
    return data


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries: renames into it) to disk.

    Best effort for folders, which some platforms and file systems cannot open or fsync.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def replace_folder(tmp: Path, final: Path, aside: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``final``; an existing ``final`` is first renamed
    to ``aside`` and removed after, so ``final`` is always a whole folder, old or new."""
    if not final.exists():
        os.replace(tmp, final)
        return
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
