"""Reading and writing vlad's saved files: plain JSON plus safetensors, each file's sha256 recorded.

Every saved folder (a scorer's or a detector's) is described by one JSON file that lists the sha256 of
every other file in the folder it depends on. Loading checks those digests before reading a tensor, so
a file changed after saving (a flipped bit, a truncated copy, a hand edit) is refused with an
:class:`~vlad.errors.IntegrityError` instead of giving silently different scores. Nothing here executes
code from a file: JSON is parsed as data and checked to hold only plain values, tensors come from
safetensors (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IntegrityError, VladError

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_digests(folder: Path, digests: Any, where: str) -> None:
    """Compare the files of ``folder`` with the ``{file name: sha256}`` recorded in ``where``.

    Raises:
        IntegrityError: a digest is missing, malformed, or does not match its file.
        VladError: a listed file is missing.
    """
    if not isinstance(digests, dict) or not digests:
        raise IntegrityError(f"{where}: no 'sha256' checksums recorded; this folder was not written by this "
                             "version of vlad (or was edited): fit and save it again")
    for name, expected in digests.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise IntegrityError(f"{where}: refusing checksum entry for {name!r} (plain file names only)")
        if not isinstance(expected, str) or len(expected) != 64:
            raise IntegrityError(f"{where}: checksum of {name!r} is not a sha256 hex digest: {expected!r}")
        path = folder / name
        if not path.is_file():
            raise VladError(f"{path}: missing; {where} lists it. Copy the whole saved folder, or save again")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"{path}: its contents changed after it was saved (sha256 {actual[:12]}... but {where} "
                f"recorded {expected[:12]}...); the file is corrupted or was modified. Restore the folder "
                "from a good copy, or fit and save again"
            )


def json_default(obj: Any) -> Any:
    """``json.dumps`` hook for the values vlad saves: numpy scalars and arrays, tuples, sets, paths."""
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, Path) or type(obj).__name__ == "device":  # torch.device, without importing torch
        return str(obj)
    raise TypeError(f"type {type(obj).__name__} is not JSON")


def nan_to_none(obj: Any) -> Any:
    """``obj`` with NaN as None (strict JSON has no NaN; a missing metric reads as null), numpy scalars
    as Python numbers, tuples as lists and paths as strings."""
    if isinstance(obj, dict):
        return {str(k): nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON data (round-tripped through ``json``).

    Raises:
        VladError: something in ``value`` cannot be saved as JSON (names ``where``).
    """
    try:
        return json.loads(json.dumps(value, default=json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise VladError(f"{where}: cannot be saved as JSON ({exc}); pass plain values (str, finite numbers, "
                        "lists, dicts)") from exc


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as indented JSON (no NaN or infinity: those are not JSON).

    Raises:
        VladError: the folder is not writable (the message names it).
    """
    text = json.dumps(doc, indent=2, default=json_default, allow_nan=False)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise VladError(f"{path}: cannot write ({exc.strerror or exc}); choose a writable folder") from exc


def make_folder(path: str | Path) -> Path:
    """Create the folder ``path`` (and parents) for saving.

    Raises:
        VladError: it exists as a file, or it cannot be created (permissions, read-only disk).
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise VladError(f"{folder}: exists and is not a folder; save to a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VladError(f"{folder}: cannot create the folder ({exc.strerror or exc}); choose a writable place") from exc
    return folder


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object from ``path``.

    Raises:
        VladError: missing, unreadable, not JSON, or not an object.
    """
    if not path.is_file():
        raise VladError(f"{path}: not found; expected {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise VladError(f"{path}: not valid JSON (expected {what}); refusing to read it ({type(exc).__name__})") from exc
    except OSError as exc:
        raise VladError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not isinstance(data, dict):
        raise VladError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def check_keys(data: Any, allowed: set[str], where: str, required: set[str] = frozenset()) -> None:
    """``data`` must be a dict whose keys are among ``allowed`` and include ``required``.

    Raises:
        VladError: otherwise.
    """
    if not isinstance(data, dict):
        raise VladError(f"{where}: expected a JSON object, got {type(data).__name__}")
    extra = set(data) - allowed
    if extra:
        raise VladError(f"{where}: unexpected key(s) {sorted(extra)}; allowed: {sorted(allowed)}")
    missing = set(required) - set(data)
    if missing:
        raise VladError(f"{where}: missing key(s) {sorted(missing)}")


def check_plain(value: Any, where: str, _depth: int = 0) -> None:
    """Refuse anything but plain JSON data, and dict keys that look like object-construction payloads.

    Raises:
        VladError: a non-JSON value, an object-protocol key (``__reduce__``, ``py/object``, ...), or
            nesting deeper than 64 levels.
    """
    if _depth > 64:
        raise VladError(f"{where}: nested deeper than 64 levels; not a file vlad wrote")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for v in value:
            check_plain(v, where, _depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or k.startswith("__") or k.startswith("py/") or k.startswith("!!python"):
                raise VladError(f"{where}: refusing key {k!r} (object payloads are not loaded)")
            check_plain(v, where, _depth + 1)
        return
    raise VladError(f"{where}: value of type {type(value).__name__} is not plain JSON")


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Tensors from a safetensors file.

    Raises:
        VladError: the file is missing or not a readable safetensors file.
    """
    from safetensors.torch import load_file

    if not path.is_file():
        raise VladError(f"{path}: missing; copy the whole saved folder, or save again")
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise VladError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def save_safetensors(tensors: dict[str, Any], path: Path) -> None:
    """Write tensors to a safetensors file.

    Raises:
        VladError: the folder is not writable.
    """
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except OSError as exc:
        raise VladError(f"{path}: cannot write ({exc.strerror or exc}); choose a writable folder") from exc
