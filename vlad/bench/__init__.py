"""Benchmarks that print figures (not timed tests): ``python -m vlad.bench TARGET [options]``.

Each target is a module ``vlad.bench.<target>`` with a ``main(argv) -> int``. They run at the real
architecture sizes with random weights (cost does not depend on the weights) and report the ratio to one
plain forward pass of the same backbone measured in the same run, so figures compare across machines.
Every target takes ``--device`` (default ``cpu``; see :mod:`vlad.bench._util`), times on a GPU after
synchronising it, and names the device in its header line.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Sequence


def targets() -> list[str]:
    """Benchmark targets available."""
    import vlad.bench as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m vlad.bench TARGET [options]\ntargets: " + ", ".join(targets()))
        return 0
    target, rest = argv[0], argv[1:]
    if target not in targets():
        print(f"unknown benchmark {target!r}; available: {', '.join(targets())}", file=sys.stderr)
        return 2
    from vlad.errors import VladError

    try:
        return int(importlib.import_module(f"vlad.bench.{target}").main(rest) or 0)
    except VladError as exc:  # a mistake in the options (e.g. --device cuda without a GPU): one line
        print(f"vlad.bench {target}: error: {exc}", file=sys.stderr)
        return 2
