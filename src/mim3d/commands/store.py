"""``mim3d store info|verify|merge``: look into, check and join prepared stores."""

from __future__ import annotations

import argparse
import json
import sys

from mim3d.data.storetools import merge_stores, store_info, verify_store


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def info_lines(info: dict) -> list[str]:
    """Human-readable lines of :func:`mim3d.data.storetools.store_info`'s summary."""
    hist = info["hu_histogram"]
    total = max(sum(hist["counts"]), 1)
    edges = hist["edges"]
    hu = [f"  [{'-inf' if k == 0 else edges[k]}, "
          f"{'+inf' if k == len(edges) - 2 else edges[k + 1]}): {100 * c / total:5.1f} %"
          for k, c in enumerate(hist["counts"]) if c]
    spacing = [f"  {s} mm: {n} case(s)" for s, n in list(info["spacing_mm"].items())[:10]]
    return [
        f"store {info['store']} (format v{info['format_version']}, {info['array_format']})",
        (f"cases: {info['cases']} ({info['labelled']} with labels, "
         f"{info['smaller_than_crop']} smaller than the crop, {info['kept_coarse']} with "
         f"coarse axes kept at source spacing), quarantined: {info['quarantined']}"),
        f"total voxels: {info['total_voxels']:,}",
        (f"bytes on disk: {_human(info['bytes_on_disk'])} "
         f"(compression ratio {info['compression_ratio']:.2f}x vs raw int16)"),
        "spacing:", *spacing, "HU histogram (share of voxels):", *hu,
    ]


def cmd_info(args: argparse.Namespace) -> int:
    info = store_info(args.store)
    print(json.dumps(info, indent=2) if args.json else "\n".join(info_lines(info)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_store(args.store)
    for line in report.problems:
        print(f"damaged: {line}", file=sys.stderr)
    bad = report.damaged_cases
    print(f"checked {report.checked} case(s): "
          + (f"{len(bad)} damaged ({', '.join(bad)})" if bad else "all intact"))
    return 1 if bad else 0


def cmd_merge(args: argparse.Namespace) -> int:
    report = merge_stores(args.parts, args.out)
    print(f"merged {report.merged} case(s), {report.skipped} already there, "
          f"{report.quarantined} quarantine entries; {report.in_store} cases in {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``mim3d store`` (info, verify, merge) to the command line."""
    p = sub.add_parser("store", help="inspect, verify or merge prepared stores")
    tools = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    q = tools.add_parser("info", help="cases, voxels, bytes, compression, spacing and HU "
                         "histograms, quarantine count")
    q.add_argument("store", metavar="STORE", help="store folder or fsspec URL (s3://...)")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.set_defaults(func=cmd_info)
    q = tools.add_parser("verify", help="re-hash every case; exit 1 naming damaged chunks")
    q.add_argument("store", metavar="STORE", help="store folder or fsspec URL (s3://...)")
    q.set_defaults(func=cmd_verify)
    q = tools.add_parser("merge", help="join stores prepared with --shard I/N into one")
    q.add_argument("parts", nargs="+", metavar="PART", help="part store folders")
    q.add_argument("--out", required=True, help="store to merge into (created when missing)")
    q.set_defaults(func=cmd_merge)
