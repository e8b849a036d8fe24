"""Run an exported detector with onnxruntime and numpy: same inputs and :class:`~vlad.types.AnomalyResult`
as :meth:`vlad.detector.Detector.predict`, without torch.

Per scorer (:class:`ScorerSession`): each image is resized in numpy exactly as the scorer's torch
preprocessing does (:mod:`vlad.runtime.imaging`), the batch goes through the scorer's ONNX graph, and the
maps are resized to each image's own size (and smoothed there, for AnomalyDINO). Then the detector's own
numpy code calibrates (:class:`~vlad.detector.fusion.Normaliser`), fuses
(:func:`~vlad.detector.fusion.fuse_results`) and thresholds (:meth:`AnomalyResult.with_thresholds`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..detector.fusion import Normaliser, calibrate_units, fuse_results
from ..errors import ExportError, VladError
from ..images import LoadedImage, load_images
from ..types import AnomalyResult, ImagesLike, check_finite
from .imaging import gaussian_blur, resize_image, resize_map
from .manifest import read_manifest

logger = logging.getLogger(__name__)


def target_shape(image_size: tuple[int, int], spec: dict[str, Any]) -> tuple[int, int]:
    """The backbone input shape an image of ``image_size`` ``(H, W)`` is resized to under ``spec``
    (a manifest input entry); for ``"shorter_edge"`` as :func:`vlad.scorers.anomalydino.resized_shape`."""
    resize = spec["resize"]
    if resize.get("kind") == "shorter_edge":
        h, w = image_size
        edge, patch = int(resize["shorter_edge"]), int(resize["multiple"])
        scale = edge / min(h, w)
        return (max(patch, int(round(h * scale / patch)) * patch), max(patch, int(round(w * scale / patch)) * patch))
    return int(spec["size"][0]), int(spec["size"][1])


class ScorerSession:
    """One exported scorer: its ONNX session and the pre/post-processing around it."""

    def __init__(self, name: str, entry: dict[str, Any], folder: Path, providers: Sequence[str] | None = None,
                 session_options: Any = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ExportError("running an exported detector needs onnxruntime: pip install onnxruntime "
                              "(it comes with vlad-runtime and with 'vlad-inspect[runtime]')") from exc
        self.name = name
        self.entry = entry
        self.inputs = entry["inputs"]
        self.parts = list(entry["parts"])
        self.batch_size = max(1, int(entry["batch_size"]))
        self.map_blur = float(entry["map_blur"])
        self.normalisers = {unit: Normaliser.from_dict(d) for unit, d in entry["normalisers"].items()}
        self.session = ort.InferenceSession(str(folder / entry["file"]), sess_options=session_options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _inputs(self, images: list[LoadedImage]) -> dict[str, np.ndarray]:
        feeds = {}
        for spec in self.inputs:
            size = (int(spec["size"][0]), int(spec["size"][1]))
            for img in images:
                shape = target_shape(img.size, spec)
                if shape != size:
                    raise ExportError(
                        f"{img.name}: the exported {self.name!r} graph takes images resized to {size[0]}x{size[1]} "
                        f"(the aspect ratio it was exported for), this {img.size[0]}x{img.size[1]} image resizes to "
                        f"{shape[0]}x{shape[1]}; export again for this image size "
                        f"(vlad export ... --image-size {img.size[0]} {img.size[1]})"
                    )
            feeds[spec["name"]] = np.stack([resize_image(img.pixels, size, spec["interpolation"]) for img in images])
        return feeds

    def _maps(self, maps: np.ndarray, images: list[LoadedImage]) -> list[np.ndarray]:
        out = []
        for m, img in zip(maps, images, strict=True):
            m = resize_map(m, img.size)
            out.append(gaussian_blur(m, self.map_blur) if self.map_blur > 0 else m)
        return out

    def predict(self, images: list[LoadedImage]) -> AnomalyResult:
        """Raw (uncalibrated) result of this scorer, parts in ``components``, as the scorer's ``predict``.

        Raises:
            NonFiniteScoreError: NaN or infinity in the output (named), never labelled normal.
        """
        scores, maps = [], []
        parts: dict[str, tuple[list, list]] = {p: ([], []) for p in self.parts}
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            out = dict(zip(self.output_names, self.session.run(None, self._inputs(batch))))
            scores.append(out["scores"].reshape(-1))
            maps.extend(self._maps(out["maps"], batch))
            for p in self.parts:
                parts[p][0].append(out[f"{p}_scores"].reshape(-1))
                parts[p][1].extend(self._maps(out[f"{p}_maps"], batch))
        names = tuple(img.name for img in images)
        components = {p: AnomalyResult(np.concatenate(s), m, names=names) for p, (s, m) in parts.items()}
        result = AnomalyResult(np.concatenate(scores), maps, components=components, names=names)
        check_finite(result, self.name)
        return result

    def calibrated(self, raw: AnomalyResult) -> AnomalyResult:
        """``raw`` on the detector's calibrated scale (per part when the scorer has parts)."""
        if self.parts:
            units = {f"{self.name}/{p}": raw.components[p] for p in self.parts}
        else:
            units = {self.name: raw}
        return calibrate_units(units, self.normalisers, raw.names)


class ExportedDetector:
    """A detector exported with :meth:`vlad.detector.Detector.export`, run with onnxruntime.

    Args:
        folder: the exported folder (``manifest.json`` + one ``.onnx`` per scorer); checked on load.
        providers: onnxruntime execution providers (default: CPU).
        session_options: an ``onnxruntime.SessionOptions`` (threads, optimisation level), or None.

    Attributes:
        image_threshold, pixel_threshold: the detector's thresholds at export (calibrated scale).
        fusion_weights: scorer name -> fusion weight; ``fusion``: the rule.
    """

    def __init__(self, folder: str | Path, providers: Sequence[str] | None = None, session_options: Any = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.fusion = self.manifest["fusion"]["rule"]
        self.fusion_weights = {k: float(v) for k, v in self.manifest["fusion"]["weights"].items()}
        self.image_threshold = float(self.manifest["thresholds"]["image"])
        self.pixel_threshold = float(self.manifest["thresholds"]["pixel"])
        self.scorers = {name: ScorerSession(name, entry, self.folder, providers, session_options)
                        for name, entry in self.manifest["scorers"].items()}

    def __repr__(self) -> str:
        return f"ExportedDetector({self.manifest['spec']!r}, scorers={list(self.scorers)}, folder={str(self.folder)!r})"

    def describe_thresholds(self) -> str:
        """The detector's :meth:`~vlad.detector.calibration.ThresholdInfo.describe` at export."""
        return str(self.manifest["thresholds"].get("description", ""))

    def predict(self, images: ImagesLike) -> AnomalyResult:
        """Fused scores ``(B,)``, maps at each image's size, labels, masks and per-scorer ``components``,
        as :meth:`vlad.detector.Detector.predict` gives them.

        Raises:
            InvalidImageError: an input is unreadable (named).
            NonFiniteScoreError: a graph produced NaN or infinity (named); never labelled normal.
            ExportError: an image whose shape the graph was not exported for (AnomalyDINO).
        """
        loaded = load_images(images)
        comps = {name: s.calibrated(s.predict(loaded)) for name, s in self.scorers.items()}
        fused = fuse_results(comps, self.fusion_weights, self.fusion)
        check_finite(fused, "the fused detector")
        return fused.with_thresholds(self.image_threshold, self.pixel_threshold)

    def predict_raw(self, images: ImagesLike) -> dict[str, AnomalyResult]:
        """Each scorer's raw (uncalibrated) result, as the scorers' own ``predict`` gives them."""
        loaded = load_images(images)
        return {name: s.predict(loaded) for name, s in self.scorers.items()}


def load(folder: str | Path, providers: Sequence[str] | None = None, session_options: Any = None) -> ExportedDetector:
    """Load an exported detector folder (checked: manifest keys and every file's sha256).

    Raises:
        VladError: not an exported folder, or a malformed manifest.
        IntegrityError: a file changed after export.
    """
    try:
        return ExportedDetector(folder, providers, session_options)
    except VladError:
        raise
    except Exception as exc:  # onnxruntime refuses a graph (its errors are plain RuntimeError subclasses)
        raise ExportError(f"{folder}: onnxruntime could not load the exported graphs ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); export the detector again") from exc
