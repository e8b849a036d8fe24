"""Write a fitted detector as a folder :mod:`vlad.runtime` runs: one ONNX graph per active scorer and
``manifest.json`` (inputs, parts, calibration, fusion, thresholds, sha256 of every file).

The folder is self-contained: ``vlad.runtime.load(folder).predict(images)`` gives what
``det.predict(images)`` gives at export time (scores and maps within 1e-4, same labels), without torch.
It is a snapshot: references added later, or changed thresholds, need a new export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlad.errors import ExportError
from vlad.export.graphs import ExportGraph, build_graph
from vlad.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST_FILE, read_manifest
from vlad.serialization import make_folder, sha256_file, to_jsonable, write_json

logger = logging.getLogger(__name__)

FORMATS = ("onnx",)


def _input_entry(graph: ExportGraph) -> list[dict[str, Any]]:
    return [{"name": inp.name, "size": [int(inp.size[0]), int(inp.size[1])], "interpolation": inp.interpolation,
             "resize": dict(inp.resize)} for inp in graph.inputs]


def export_detector(det: Any, path: str | Path, format: str = "onnx", image_size: tuple[int, int] | None = None) -> Path:
    """Export the fitted detector ``det`` to the folder ``path`` (created; its old export files replaced).

    Args:
        det: a fitted :class:`~vlad.detector.Detector`.
        path: output folder.
        format: ``"onnx"`` (the only one).
        image_size: ``(H, W)`` of the images the export will score, for graphs whose input follows the
            image's aspect ratio (AnomalyDINO); None = the first reference's size.

    Returns:
        The folder.

    Raises:
        ExportError: unknown format, an active scorer that cannot be exported (named, with why), or torch
            could not export a graph.
        NotFittedError: the detector is not fitted.
    """
    from vlad.export.onnx import write_onnx

    if format not in FORMATS:
        raise ExportError(f"export format must be one of {FORMATS}, got {format!r}")
    det._check_fitted()
    if image_size is not None:
        try:
            image_size = (int(image_size[0]), int(image_size[1]))
        except (TypeError, ValueError, IndexError):
            raise ExportError(f"image_size must be (height, width) in pixels, got {image_size!r}") from None
        if min(image_size) < 1:
            raise ExportError(f"image_size must be positive (height, width), got {image_size!r}")
    active = [n for n, a in det.active_.items() if a]
    graphs = {name: build_graph(name, det.scorers[name], image_size) for name in active}  # all checked first
    normalisers = det.normalisers
    folder = make_folder(path)
    for stale in [*folder.glob("*.onnx"), *folder.glob("*.onnx.data"), folder / MANIFEST_FILE]:
        if stale.is_file():
            stale.unlink()
    scorers: dict[str, Any] = {}
    for name, graph in graphs.items():
        file = f"{name}.onnx"
        logger.info("exporting %s to %s", name, folder / file)
        write_onnx(graph, folder / file)
        units = [f"{name}/{p}" for p in graph.parts] if graph.parts else [name]
        missing = [u for u in units if u not in normalisers]
        if missing:
            raise ExportError(f"{name}: the detector has no calibration for {missing}; call det.recalibrate() and "
                              "export again")
        scorers[name] = {
            "file": file,
            "batch_size": int(getattr(det.scorers[name], "batch_size", 8) or 8),
            "parts": list(graph.parts),
            "map_blur": float(graph.map_blur),
            "inputs": _input_entry(graph),
            "normalisers": {u: normalisers[u].to_dict() for u in units},
        }
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE
                   and (p.suffix == ".onnx" or p.name.endswith(".onnx.data")))
    from vlad import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vlad_version": __version__,
        "spec": "+".join(active),
        "fusion": {"rule": det.options["fusion"], "weights": det.fusion_weights},
        "thresholds": {"image": float(det.image_threshold), "pixel": float(det.pixel_threshold),
                       "description": det.threshold_info().describe()},
        "scorers": scorers,
        "sha256": {f: sha256_file(folder / f) for f in files},
    }
    write_json(folder / MANIFEST_FILE, to_jsonable(manifest, "the export manifest"))
    read_manifest(folder)  # what was written must read back
    return folder

