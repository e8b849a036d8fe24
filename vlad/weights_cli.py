"""``vlad weights list | download | verify``."""

from __future__ import annotations

import argparse

from vlad.errors import VladError, WeightsNotAvailableError
from vlad.weights import WEIGHTS, _from_hub_cache, download, get_spec, verify, weights_dir


def _where(name: str) -> str:
    spec = get_spec(name)
    if spec.tiny:
        return "built in (random init, tests only)"
    env = weights_dir()
    if env is not None and (env / spec.folder_name).is_dir():
        return str(env / spec.folder_name)
    cached = _from_hub_cache(spec)
    return str(cached) if cached else "not found locally"


def main_weights(args: argparse.Namespace) -> int:
    """Run one ``vlad weights`` sub-command; returns the exit code."""
    if args.weights_command == "list":
        rows = [(n, s.library, s.hub_repo or "-", f"{s.preprocess.size}px", _where(n)) for n, s in WEIGHTS.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        return 0
    if args.weights_command == "download":
        for name in args.names:
            target = download(name, args.to if len(args.names) == 1 else None)
            print(f"{name}: {target}")
        return 0
    if args.weights_command == "verify":
        names = args.names or [n for n, s in WEIGHTS.items() if not s.tiny]
        failed = 0
        for name in names:
            spec = get_spec(name)
            location = _where(name)
            if location == "not found locally":
                print(f"{name}: not found locally")
                failed += 1
                continue
            from pathlib import Path

            problems = verify(spec, Path(location))
            print(f"{name}: {'ok' if not problems else '; '.join(problems)} ({location})")
            failed += bool(problems)
        return 1 if failed else 0
    raise VladError(f"unknown weights command {args.weights_command}")


__all__ = ["main_weights", "WeightsNotAvailableError"]
