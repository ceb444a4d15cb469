"""``mim3d presets``: the shipped pre-training and downstream presets, one line each."""

from __future__ import annotations

import argparse

from mim3d.config import preset_description, preset_names

#: Which commands take the presets of a kind through ``--preset``.
_USED_BY = {"pretrain": "prepare, pretrain, masks", "downstream": "finetune (and prepare)"}


def preset_listing(kinds: tuple[str, ...] = ("pretrain", "downstream")) -> list[str]:
    """Lines of the listing: a header per kind, then ``  name  description`` per preset."""
    lines: list[str] = []
    for kind in kinds:
        names = preset_names(kind)
        width = max(len(n) for n in names)
        if lines:
            lines.append("")
        lines.append(f"{kind} presets (--preset NAME of {_USED_BY[kind]}):")
        lines += [f"  {name:<{width}}  {preset_description(kind, name)}" for name in names]
    return lines


def cmd_presets(args: argparse.Namespace) -> int:
    kinds = ("pretrain", "downstream") if args.kind == "all" else (args.kind,)
    print("\n".join(preset_listing(kinds)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``mim3d presets`` to the command line."""
    p = sub.add_parser("presets", help="list the pre-training and downstream presets")
    p.add_argument("kind", nargs="?", default="all", choices=("all", "pretrain", "downstream"),
                   help="which presets to list (default all)")
    p.set_defaults(func=cmd_presets)
