"""``vlad weights list | download | verify``: the known backbones and their local weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlad.cli.common import check_output_folder
from vlad.errors import VladError

NOT_FOUND = "not found locally"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vlad weights`` and its sub-commands."""
    p = sub.add_parser("weights", help="list, download or verify pretrained weights")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="list|download|verify")
    wsub.add_parser("list", help="the known backbones and where their weights are")
    d = wsub.add_parser("download", help="download weights (needs internet)")
    d.add_argument("names", nargs="+")
    d.add_argument("--to", help="target folder (default $VLAD_WEIGHTS_DIR/<name>)")
    v = wsub.add_parser("verify", help="check local weights (files present, sha256 where known)")
    v.add_argument("names", nargs="*")


def _where(name: str) -> str:
    from vlad.weights import _from_hub_cache, get_spec, weights_dir

    spec = get_spec(name)
    if spec.tiny:
        return "built in (random init, tests only)"
    env = weights_dir()
    if env is not None and (env / spec.folder_name).is_dir():
        return str(env / spec.folder_name)
    cached = _from_hub_cache(spec)
    return str(cached) if cached else NOT_FOUND


def run(args: argparse.Namespace) -> int:
    """Run one ``vlad weights`` sub-command; returns the exit code."""
    from vlad.weights import WEIGHTS, download, get_spec, verify

    if args.weights_command == "list":
        rows = [(n, s.library, s.hub_repo or "-", f"{s.preprocess.size}px", _where(n)) for n, s in WEIGHTS.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        return 0
    names = args.names or [n for n, s in WEIGHTS.items() if not s.tiny]
    specs = [get_spec(n) for n in names]  # every name checked before any work (UnknownBackboneError)
    if args.weights_command == "download":
        if args.to:
            if len(names) > 1:
                raise VladError("--to takes one model name; download several models into $VLAD_WEIGHTS_DIR instead")
            check_output_folder(args.to, "--to")
        for name in names:
            target = download(name, args.to)
            print(f"{name}: {target}")
        return 0
    if args.weights_command == "verify":
        failed = 0
        for name, spec in zip(names, specs):
            location = _where(name)
            if location == NOT_FOUND:
                print(f"{name}: {NOT_FOUND}")
                failed += 1
                continue
            problems = verify(spec, Path(location))
            print(f"{name}: {'ok' if not problems else '; '.join(problems)} ({location})")
            failed += bool(problems)
        return 1 if failed else 0
    raise VladError(f"unknown weights command {args.weights_command!r}; use list, download or verify")
