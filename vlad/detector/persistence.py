"""Saving and loading detectors: JSON and safetensors only, every file's sha256 checked on load.

A saved detector is a folder: ``detector.json`` (spec, options, calibration, reference names, and the
sha256 of ``references.safetensors`` and of each scorer's ``config.json``), ``references.safetensors``
(the reference pixels, so later calibration stays exact) and one sub-folder per fitted scorer, written
by :meth:`BaseScorer.save` (its ``config.json`` records the sha256 of its state). So one changed byte
anywhere is caught on load, as an :class:`~vlad.errors.IntegrityError`. :func:`load_any` (``vlad.load``)
reads a detector or a scorer folder and refuses a folder that holds both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlad.detector.calibration import Calibration
from vlad.detector.detector import DETECTOR_DEFAULTS, Detector, check_options
from vlad.detector.spec import parse_spec
from vlad.errors import IntegrityError, VladError
from vlad.images import LoadedImage
from vlad.registry import create_scorer, get_scorer_class, parameter_names
from vlad.scorers.base import CONFIG_FILE, check_params, load_scorer, loading_device, warn_cpu_fallback
from vlad.serialization import (
    check_digests,
    check_keys,
    check_plain,
    load_safetensors,
    make_folder,
    read_json,
    save_safetensors,
    sha256_file,
    to_jsonable,
    write_json,
)

DETECTOR_FILE = "detector.json"
REFERENCES_FILE = "references.safetensors"
FORMAT = "vlad-detector"
FORMAT_VERSION = 2
_KEYS = {"format", "format_version", "spec", "scorers", "options", "thresholds", "calibration", "references",
         "sha256"}


def save_detector(det: Detector, path: str | Path) -> Path:
    """Write ``det`` to the folder ``path``.

    Raises:
        NotFittedError: the detector is not fitted.
        VladError: the folder cannot be written, or an option is not JSON-able.
    """
    det._check_fitted()
    folder = make_folder(path)
    cal = det._calibrated()
    scorers, digests = {}, {}
    for name, scorer in det.scorers.items():
        entry: dict[str, Any] = {"active": bool(det.active_[name])}
        if det.active_[name]:
            scorer.save(folder / name)
            entry["folder"] = name
            digests[f"{name}/{CONFIG_FILE}"] = sha256_file(folder / name / CONFIG_FILE)
        else:
            entry["params"] = to_jsonable(scorer.get_params(deep=False), f"{name} parameters")
        scorers[name] = entry
    tensors = {f"ref_{i:05d}": torch.from_numpy(np.ascontiguousarray(r.pixels)) for i, r in enumerate(det.references_)}
    save_safetensors(tensors, folder / REFERENCES_FILE)
    digests[REFERENCES_FILE] = sha256_file(folder / REFERENCES_FILE)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": "+".join(det.scorers),
        "scorers": scorers,
        "options": to_jsonable(det.options, "detector options"),
        "thresholds": {"image_override": det._image_override, "pixel_override": det._pixel_override},
        "calibration": to_jsonable(cal.to_dict(), "calibration"),
        "references": [r.name for r in det.references_],
        "sha256": digests,
    }
    write_json(folder / DETECTOR_FILE, doc)
    return folder


def _check_detector_digests(folder: Path, digests: Any, names: list[str], active: dict[str, bool]) -> None:
    expected = {REFERENCES_FILE} | {f"{n}/{CONFIG_FILE}" for n in names if active[n]}
    if not isinstance(digests, dict) or set(digests) != expected:
        raise IntegrityError(f"{folder / DETECTOR_FILE}: 'sha256' must list exactly {sorted(expected)}; the file "
                             "was edited or not written by this version of vlad: save the detector again")
    for rel, digest in digests.items():
        sub = folder / rel
        check_digests(sub.parent, {sub.name: digest}, str(folder / DETECTOR_FILE))


def load_detector(path: str | Path, device: str | None = None, precision: str | None = None) -> Detector:
    """Load a detector saved with :meth:`Detector.save`. Never executes code from the files.

    ``device``: where its scorers run; None: where each was saved when this machine has that device,
    else on the CPU, with one logged warning for the whole detector (a detector fitted on a GPU machine
    loads on a laptop). ``precision`` (None: as saved) replaces the saved value in every scorer that has it.

    Raises:
        VladError: missing files, not JSON, unknown scorer names, unexpected keys or types.
        InvalidParameterError: a saved option or scorer parameter its spec refuses (names the file).
        IntegrityError: a file changed after saving.
    """
    folder = Path(path)
    where = str(folder / DETECTOR_FILE)
    doc = read_json(folder / DETECTOR_FILE, "a detector file written by Detector.save()")
    check_plain(doc, where)
    check_keys(doc, _KEYS, where, required=_KEYS)
    if doc["format"] != FORMAT or doc["format_version"] != FORMAT_VERSION:
        raise VladError(f"{where}: expected format {FORMAT!r} version {FORMAT_VERSION}, got {doc['format']!r} "
                        f"version {doc['format_version']!r}; fit the detector again and save it with this vlad")
    options = doc["options"]
    check_keys(options, set(DETECTOR_DEFAULTS), f"{where}: options")
    check_options(options, where)  # every value against its spec, naming the file, before any state is read
    entries = doc["scorers"]
    if not isinstance(entries, dict) or not entries:
        raise VladError(f"{where}: 'scorers' must be a non-empty object of name -> entry")
    names = parse_spec(list(entries))
    active: dict[str, bool] = {}
    for name in names:
        entry = entries[name]
        check_keys(entry, {"active", "folder", "params"}, f"{where}: scorer entry {name!r}", required={"active"})
        if not isinstance(entry["active"], bool):
            raise VladError(f"{where}: scorer {name!r}: 'active' must be true or false")
        active[name] = entry["active"]
    _check_detector_digests(folder, doc["sha256"], names, active)
    scorers = {}
    fallbacks: list[str] = []
    for name in names:
        entry = entries[name]
        if active[name]:
            if entry.get("folder") != name:
                raise VladError(f"{where}: scorer {name!r} must be saved in the sub-folder {name!r}, "
                                f"got {entry.get('folder')!r}")
            scorers[name] = load_scorer(folder / name, device=device, expected=name, precision=precision,
                                        fallbacks=fallbacks)
        else:
            params = check_params(name, get_scorer_class(name), entry.get("params", {}), where)
            if "device" in params:
                saved = params["device"]
                params["device"], fell_back = loading_device(saved, device)
                if fell_back:
                    fallbacks.append(str(saved))
            if precision is not None and "precision" in parameter_names(get_scorer_class(name)):
                params["precision"] = precision
            scorers[name] = create_scorer(name, **params)
    if fallbacks:
        warn_cpu_fallback(folder, " and ".join(sorted(set(fallbacks))))
    det = Detector(scorers, **options)
    det.active_ = active
    det.fitted_ = any(active.values())
    thresholds = doc["thresholds"]
    check_keys(thresholds, {"image_override", "pixel_override"}, f"{where}: thresholds")
    for key in ("image", "pixel"):
        value = thresholds.get(f"{key}_override")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise VladError(f"{where}: thresholds: {key}_override must be a number or null, got {value!r}")
        setattr(det, f"_{key}_override", None if value is None else float(value))
    det.references_ = _read_references(folder, doc["references"])
    units = {unit for name in names if active[name] for unit in det._unit_scales(name)}
    det._calibration = Calibration.from_dict(doc["calibration"], units, len(det.references_))
    return det


def _read_references(folder: Path, names: Any) -> list[LoadedImage]:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise VladError(f"{DETECTOR_FILE}: 'references' must be a list of names")
    tensors = load_safetensors(folder / REFERENCES_FILE)
    if len(tensors) != len(names):
        raise VladError(f"{folder / REFERENCES_FILE}: holds {len(tensors)} images, the detector lists {len(names)}")
    refs = []
    for i, name in enumerate(names):
        t = tensors.get(f"ref_{i:05d}")
        if t is None or t.ndim != 3 or t.shape[2] != 3 or t.dtype != torch.float32:
            raise VladError(f"{folder / REFERENCES_FILE}: reference {i} ({name}) missing or not a float32 (H, W, 3) image")
        if not torch.isfinite(t).all():
            raise VladError(f"{folder / REFERENCES_FILE}: reference {i} ({name}) holds NaN or infinity")
        refs.append(LoadedImage(t.numpy(), name))
    return refs


def load_any(path: str | Path, device: str | None = None, precision: str | None = None):
    """Load a detector folder (``detector.json``) or a scorer folder (``config.json``): ``vlad.load``.
    ``device`` and ``precision`` (None: as saved) replace the saved ones.

    ``device``: where to run it; None: where it was saved when this machine has that device, else the
    CPU (with one logged warning).

    Raises:
        VladError: the folder holds neither, or both (ambiguous), or its files are not what vlad writes.
        IntegrityError: a file changed after saving.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise VladError(f"{folder}: not a folder; expected a folder written by Detector.save() or Scorer.save()")
    has_detector, has_scorer = (folder / DETECTOR_FILE).exists(), (folder / CONFIG_FILE).exists()
    if has_detector and has_scorer:
        raise VladError(f"{folder}: holds both {DETECTOR_FILE} (a detector) and {CONFIG_FILE} (a scorer), so it is "
                        "ambiguous which one to load; save each to its own folder (or delete the stale file)")
    if has_detector:
        return load_detector(folder, device=device, precision=precision)
    if has_scorer:
        return load_scorer(folder, device=device, precision=precision)
    raise VladError(f"{folder}: contains neither {DETECTOR_FILE} (a detector) nor {CONFIG_FILE} (a scorer)")
