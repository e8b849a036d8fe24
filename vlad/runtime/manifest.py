"""``manifest.json`` of an exported detector folder: what each graph takes and how outputs are fused.

Written by :func:`vlad.export.export_detector`, read (checked) by :func:`read_manifest`::

    {"format": "vlad-onnx", "format_version": 1, "vlad_version": "0.2.0", "spec": "patchcore+winclip",
     "fusion": {"rule": "mean", "weights": {"patchcore": 0.6, "winclip": 0.4}},
     "thresholds": {"image": 0.71, "pixel": 0.83, "description": "20 references: ..."},
     "scorers": {"patchcore": {
         "file": "patchcore.onnx", "batch_size": 8, "parts": [], "map_blur": 0.0,
         "inputs": [{"name": "pixels", "size": [224, 224], "interpolation": "bicubic",
                     "resize": {"kind": "fixed"}}],
         "normalisers": {"patchcore": {"kind": "reference", "image_loc": ...}}}},
     "sha256": {"patchcore.onnx": "..."}}

``resize.kind`` is ``"fixed"`` (every image is resized to ``size``) or ``"shorter_edge"`` (AnomalyDINO:
the shorter edge to ``shorter_edge``, both sides rounded to a multiple of ``multiple``; the graph was
exported for one such shape and refuses images whose shape differs). ``normalisers`` holds one
:class:`~vlad.detector.fusion.Normaliser` per calibration unit: the scorer's name, or ``name/part`` per
part when ``parts`` is not empty (WinCLIP+).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..serialization import check_digests, check_keys, check_plain, read_json

MANIFEST_FILE = "manifest.json"
FORMAT = "vlad-onnx"
FORMAT_VERSION = 1
INTERPOLATIONS = ("bicubic", "bilinear")
_TOP_KEYS = {"format", "format_version", "vlad_version", "spec", "fusion", "thresholds", "scorers", "sha256"}
_SCORER_KEYS = {"file", "batch_size", "parts", "map_blur", "inputs", "normalisers"}
_INPUT_KEYS = {"name", "size", "interpolation", "resize"}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The checked manifest of an exported folder (every listed file's sha256 verified).

    Raises:
        VladError: missing or malformed manifest, unknown keys, a listed file missing.
        IntegrityError: a file changed after export.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if folder.is_dir() and not path.is_file():
        raise ExportError(f"{folder}: no {MANIFEST_FILE}; expected a folder written by `vlad export` / "
                          "Detector.export()")
    data = read_json(path, "the manifest of an exported detector (vlad export)")
    check_plain(data, str(path))
    check_keys(data, _TOP_KEYS, str(path), required=_TOP_KEYS - {"vlad_version"})
    if data["format"] != FORMAT or data["format_version"] != FORMAT_VERSION:
        raise ExportError(f"{path}: format {data['format']!r} version {data['format_version']!r}; this vlad reads "
                          f"{FORMAT!r} version {FORMAT_VERSION}: export the detector again with this version")
    scorers = data["scorers"]
    if not isinstance(scorers, dict) or not scorers:
        raise ExportError(f"{path}: 'scorers' must name at least one exported scorer")
    for name, entry in scorers.items():
        where = f"{path} scorer {name!r}"
        check_keys(entry, _SCORER_KEYS, where, required=_SCORER_KEYS)
        if entry["file"] not in data["sha256"]:
            raise ExportError(f"{where}: its file {entry['file']!r} has no recorded sha256")
        for spec in entry["inputs"]:
            check_keys(spec, _INPUT_KEYS, f"{where} input", required=_INPUT_KEYS)
            if spec["interpolation"] not in INTERPOLATIONS:
                raise ExportError(f"{where}: interpolation {spec['interpolation']!r} is not one of {INTERPOLATIONS}")
    check_keys(data["fusion"], {"rule", "weights"}, f"{path} fusion", required={"rule", "weights"})
    check_keys(data["thresholds"], {"image", "pixel", "description"}, f"{path} thresholds", required={"image", "pixel"})
    check_digests(folder, data["sha256"], str(path))
    return data
