"""Which cases a ``prepare --shard I/N`` process owns, and the case names every shard agrees on.

Names are fixed by the whole input list (and the store's earlier cases), never by what one
shard has seen, and a case belongs to shard ``hash(name) mod N``: N processes given the same
inputs therefore split them into disjoint parts that together equal a single-process prepare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from mim3d.data.datalists import CaseSpec

__all__ = ["case_names", "parse_shard", "plan_cases", "shard_of"]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``.

    Raises:
        ValueError: (one line) anything else.
    """
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: write it as I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def case_names(specs: list[CaseSpec], done: Sequence[Any] = ()) -> list[str]:
    """Unique case names for ``specs``, fixed by the input list (and the store's earlier cases).

    An image already in the store keeps its name; a new image takes its own name or, when an
    earlier image of the list (or of the store) holds it, ``name_2``, ``name_3``...
    """
    name_of_image = {rec.source: rec.name for rec in done}
    taken = {rec.name.lower(): rec.source for rec in done}
    names = []
    for spec in specs:
        name = name_of_image.get(spec.image)
        if name is None:
            name, n = spec.name, 1
            while taken.get(name.lower(), spec.image) != spec.image:
                n += 1
                name = f"{spec.name}_{n}"
        taken[name.lower()] = spec.image
        names.append(name)
    return names


def shard_of(name: str, n: int) -> int:
    """The shard (of ``n``) that prepares case ``name``: a stable hash, not Python's."""
    return int.from_bytes(hashlib.sha1(name.lower().encode("utf-8")).digest()[:8], "big") % n


def plan_cases(specs: list[CaseSpec], done: list[Any],
               shard: tuple[int, int] | None) -> tuple[list[CaseSpec], int]:
    """Cases still to prepare (this shard's), with names that never overwrite another image's."""
    done_keys = {rec.source_key for rec in done}
    todo, skipped = [], 0
    for spec, name in zip(specs, case_names(specs, done)):
        if shard is not None and shard_of(name, shard[1]) != shard[0]:
            continue
        if (spec.image, spec.label) in done_keys:
            skipped += 1
            continue
        todo.append(CaseSpec(name, spec.image, spec.label))
    return todo, skipped
