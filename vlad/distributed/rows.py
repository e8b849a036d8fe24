"""One output row per image: scoring a batch of paths with a loaded detector, errors included.

This is what each worker runs (no Ray here, so it is tested and reused without it). Images are read
with vlad's own decoder (:func:`vlad.images.load_image`: 16-bit, palette, EXIF rotation), exactly as
``vlad score`` reads them. An image that cannot be read or scored becomes a row whose ``error`` says why
and whose numbers are null; the other images of its batch are scored as usual.

Columns (:func:`output_schema`): ``path``, ``score`` (fused, calibrated ``[0, 1]``), ``label``
(``"anomalous"``/``"normal"``), ``score_<scorer>`` per active scorer (calibrated), the fused map's
statistics ``map_max``, ``map_mean``, ``map_p99`` and ``anomalous_pixel_fraction`` (share of pixels over
the pixel threshold), ``height``, ``width``, ``error``; with ``overlays``/``maps`` also ``overlay`` /
``map`` (PNG paths relative to the output folder: the fused map over the image, colour range ``[0, 1]``;
the fused map as 16-bit grey, ``value / 65535`` = calibrated score).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

OVERLAY_DIR = "overlays"
MAP_DIR = "maps"
_STATS = ("map_max", "map_mean", "map_p99", "anomalous_pixel_fraction")


def output_schema(scorer_names: Sequence[str], overlays: bool = False, maps: bool = False):
    """The pyarrow schema of the output rows for a detector with these active scorers."""
    import pyarrow as pa

    fields = [pa.field("path", pa.string(), nullable=False), pa.field("score", pa.float64()),
              pa.field("label", pa.string())]
    fields += [pa.field(f"score_{n}", pa.float64()) for n in scorer_names]
    fields += [pa.field(s, pa.float64()) for s in _STATS]
    fields += [pa.field("height", pa.int32()), pa.field("width", pa.int32()), pa.field("error", pa.string())]
    if overlays:
        fields.append(pa.field("overlay", pa.string()))
    if maps:
        fields.append(pa.field("map", pa.string()))
    return pa.schema(fields)


def active_scorers(det) -> list[str]:
    """Names of the detector's active scorers, in spec order: the ``score_<name>`` columns."""
    return [n for n, a in det.active_.items() if a]


def picture_name(path: str) -> str:
    """A file name for an image's overlay or map: its stem plus a hash of its full path (two images
    called ``001.png`` in different folders do not collide; a retried batch rewrites the same file)."""
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]
    return f"{Path(path).stem}-{digest}.png"


def _save_png(array: np.ndarray, target: Path) -> None:
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, target)  # atomic: a reader never sees half a picture


def _error_row(path: str, names: Sequence[str], message: str) -> dict[str, Any]:
    """The row of an image that could not be read or scored; ``message`` as in :class:`vlad.ImageFailure`."""
    logger.warning("%s: not scored (%s)", path, message)
    return {"path": path, "score": None, "label": None, **{f"score_{n}": None for n in names},
            **dict.fromkeys(_STATS), "height": None, "width": None, "error": message}


def _good_row(path: str, names, res, j: int, amap: np.ndarray, mask) -> dict[str, Any]:
    row = {"path": path, "score": float(res.image_scores[j]),
           "label": None if res.labels is None else ("anomalous" if bool(res.labels[j]) else "normal")}
    for n in names:
        comp = res.components.get(n)
        row[f"score_{n}"] = None if comp is None else float(comp.image_scores[j])
    row.update(map_max=float(amap.max()), map_mean=float(amap.mean()), map_p99=float(np.quantile(amap, 0.99)),
               anomalous_pixel_fraction=None if mask is None else float(np.mean(mask)),
               height=int(amap.shape[0]), width=int(amap.shape[1]), error=None)
    return row


def _pictures(row: dict[str, Any], image, amap: np.ndarray, out_dir: Path, overlays: bool, maps: bool) -> None:
    from vlad.visualize import overlay

    name = picture_name(row["path"])
    if overlays:
        _save_png(overlay(image.pixels, amap, vmin=0.0, vmax=1.0), out_dir / OVERLAY_DIR / name)
        row["overlay"] = f"{OVERLAY_DIR}/{name}"
    if maps:
        _save_png((np.clip(amap, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16), out_dir / MAP_DIR / name)
        row["map"] = f"{MAP_DIR}/{name}"


def _predict_rows(det, names, items, out_dir, overlays, maps) -> list[dict[str, Any]]:
    res = det.predict([img for _, img in items])
    amaps = res.map_list()
    masks = None if res.masks is None else list(res.masks)
    rows = []
    for j, (path, img) in enumerate(items):
        row = _good_row(path, names, res, j, amaps[j], None if masks is None else masks[j])
        if overlays or maps:
            _pictures(row, img, amaps[j], out_dir, overlays, maps)
        rows.append(row)
    return rows


def score_paths(det, paths: Sequence[str], out_dir: str | os.PathLike | None = None, overlays: bool = False,
                maps: bool = False) -> list[dict[str, Any]]:
    """Score image files with a fitted detector: one row per path, in order (see the module docstring).

    A file that cannot be read becomes an error row. When the batch fails as a whole (a scorer refuses
    one image, e.g. a non-finite score), each image is scored on its own so only the culprit becomes an
    error row.

    Args:
        det: a fitted :class:`vlad.detector.Detector`.
        paths: image files.
        out_dir: where the ``overlays``/``maps`` PNGs go (needed when either is asked for).
        overlays: write the fused map over each image.
        maps: write each fused map as a 16-bit PNG.
    """
    from vlad.errors import VladError
    from vlad.images import load_readable
    from vlad.types import ImageFailure

    if (overlays or maps) and out_dir is None:
        raise VladError("overlays or maps were asked for without an output folder; pass out_dir")
    if not paths:
        return []
    out = Path(out_dir) if out_dir is not None else Path(".")
    names = active_scorers(det)
    rows: list[dict[str, Any] | None] = [None] * len(paths)
    loaded, failures = load_readable(list(paths))  # what Detector.predict(on_error="skip") reads, and says
    for f in failures:
        rows[f.index] = _error_row(paths[f.index], names, f.error)
    readable = [i for i, row in enumerate(rows) if row is None]
    items = [(paths[i], img) for i, img in zip(readable, loaded)]
    try:
        scored = _predict_rows(det, names, items, out, overlays, maps) if items else []
    except Exception as exc:  # noqa: BLE001 - isolate the image(s) that broke the batch, below
        logger.info("a batch of %d images failed (%s); scoring them one at a time", len(items), exc)
        scored = []
        for path, img in items:
            try:
                scored.extend(_predict_rows(det, names, [(path, img)], out, overlays, maps))
            except Exception as one_exc:  # noqa: BLE001 - one bad image must not stop an archive job
                scored.append(_error_row(path, names, ImageFailure.from_error(0, path, one_exc).error))
    for i, row in zip(readable, scored):
        rows[i] = row
    for row in rows:
        if overlays:
            row.setdefault("overlay", None)
        if maps:
            row.setdefault("map", None)
    return rows  # type: ignore[return-value]
