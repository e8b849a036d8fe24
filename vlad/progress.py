"""Progress bars for long loops (tqdm; shown on a terminal, silent in logs unless VLAD_PROGRESS=1)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def track(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar. ``VLAD_PROGRESS=0`` hides it, ``=1`` forces it."""
    flag = os.environ.get("VLAD_PROGRESS", "").strip()
    disable = None if flag == "" else flag == "0"  # None: tqdm shows it only on a terminal
    return iter(tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, dynamic_ncols=True))


def counter(total: int, desc: str, enabled: bool = True):
    """A progress bar counted by hand (``bar.update(n)``; close it after), shown as :func:`track` shows its
    (``enabled=False`` hides it)."""
    flag = os.environ.get("VLAD_PROGRESS", "").strip()
    disable = True if not enabled else None if flag == "" else flag == "0"
    return tqdm(total=total, desc=desc, leave=False, disable=disable, dynamic_ncols=True, unit="img")
