"""What to score: folders, glob patterns and list files, expanded into one list of absolute paths.

Every item is one of:

- a folder: its image files (``vlad.images.IMAGE_SUFFIXES``), sorted; with ``recursive=True`` also those
  of its sub-folders;
- a glob pattern (``archive/2026-*/**/*.png``; ``**`` crosses folders): the files it matches, sorted;
- a list file (``.txt``, ``.lst``, ``.list``): one path per line; blank lines and lines starting with
  ``#`` are skipped, relative paths are read from the list file's folder;
- anything else: one image file. A file that is missing or not an image is *not* refused here: it
  becomes a row with an ``error`` in the output, like any other image that cannot be read, so one bad
  entry of an archive does not stop the job.

Paths are made absolute (workers on other machines or in other folders read the same files) and each
path is kept once, at its first place, so the output has every input exactly once.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from vlad.errors import VladError
from vlad.images import list_images

LIST_SUFFIXES = (".txt", ".lst", ".list")
_GLOB_CHARS = frozenset("*?[")


def _is_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text) and not Path(text).exists()


def _read_list(path: Path) -> list[Path]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VladError(f"{path}: cannot read the list file ({exc}); give a UTF-8 text file with one image path "
                        "per line") from None
    base = path.parent
    out = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            p = Path(entry).expanduser()
            out.append(p if p.is_absolute() else base / p)
    return out


def _expand_one(item: str | os.PathLike, recursive: bool) -> list[Path]:
    text = os.fspath(item)
    if _is_glob(text):
        matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
        files: list[Path] = []
        for m in map(Path, matches):
            files.extend(list_images(m, recursive) if m.is_dir() else [m])
        if not files:
            raise VladError(f"the pattern {text!r} matches no file; check it (quote it so the shell does not "
                            "expand it, and use ** to cross folders)")
        return files
    path = Path(text).expanduser()
    if path.is_dir():
        return list_images(path, recursive)
    if path.suffix.lower() in LIST_SUFFIXES and path.is_file():
        return _read_list(path)
    return [path]


def expand_inputs(items: str | os.PathLike | Iterable[str | os.PathLike], recursive: bool = False) -> list[str]:
    """Folders, globs, list files and image files -> absolute image paths, each once, in input order.

    Raises:
        VladError: nothing to score, a glob that matches nothing, an unreadable list file.
        InvalidImageError: a folder without image files.
    """
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    seen: dict[str, None] = {}
    for item in items:
        for path in _expand_one(item, recursive):
            seen.setdefault(str(path.absolute()), None)
    if not seen:
        raise VladError("no images to score: give image files, folders, glob patterns or list files")
    return list(seen)
