"""The ``vlad`` command line: ``score``, ``eval``, ``weights``, ``list``, ``demo``, ``bench``.

Entry point :func:`main` (``vlad = "vlad.cli:main"``). One module per sub-command; :mod:`vlad.cli.common`
holds the argument helpers and the checks every command runs before any work starts. Nothing in the
library imports this package.
"""

from __future__ import annotations

from vlad.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
