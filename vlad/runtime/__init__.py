"""Run detectors exported with ``vlad export`` / :meth:`Detector.export` using onnxruntime and numpy only.

>>> from vlad import runtime
>>> det = runtime.load("exported/")                # doctest: +SKIP
>>> res = det.predict(["a.png", "b.png"])          # doctest: +SKIP
>>> res.image_scores, res.anomaly_maps, res.labels, res.masks, res.components

This package never imports torch (install ``vlad-inspect[runtime]`` on the line PC; see the README's
"Deploy without torch"): images are decoded with Pillow (:mod:`vlad.images`), resized in numpy exactly
as the scorers' torch preprocessing (:mod:`vlad.runtime.imaging`), scored by the ONNX graphs, and
calibrated, fused and thresholded by the detector's own numpy code (:mod:`vlad.detector.fusion`).
"""

from vlad.runtime.session import ExportedDetector, ScorerSession, load

__all__ = ["ExportedDetector", "ScorerSession", "load"]
