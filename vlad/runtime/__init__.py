"""Run detectors exported with ``vlad export`` / :meth:`Detector.export` using onnxruntime and numpy only.

>>> from vlad import runtime
>>> det = runtime.load("exported/")                # doctest: +SKIP
>>> res = det.predict(["a.png", "b.png"])          # doctest: +SKIP
>>> res.image_scores, res.anomaly_maps, res.labels, res.masks, res.components

This package never imports torch: images are decoded with Pillow (:mod:`vlad.images`), resized in numpy
exactly as the scorers' torch preprocessing (:mod:`vlad.runtime.imaging`), scored by the ONNX graphs, and
calibrated, fused and thresholded by the detector's own numpy code (:mod:`vlad.detector.fusion`).

On the line PC install the ``vlad-runtime`` distribution, not vlad-inspect (whose requirements include
torch): ``pip install vlad-runtime``, or from a clone of the repository ``pip install ./runtime``. It
ships these very files (this package, :mod:`vlad.detector.fusion`, :mod:`vlad.images`,
:mod:`vlad.types`, :mod:`vlad.serialization`, :mod:`vlad.errors`; see ``runtime/pyproject.toml``) as
the package ``vlad_runtime`` and depends on onnxruntime, numpy, Pillow and PyYAML only::

    import vlad_runtime
    res = vlad_runtime.load("exported/").predict(["a.png", "b.png"])

That is why the modules above import each other with relative imports: the same file runs as
``vlad.runtime.session`` and as ``vlad_runtime.runtime.session``. ``vlad-inspect[runtime]`` adds
onnxruntime to a full vlad install (for testing an export next to the torch detector).
"""

from .session import ExportedDetector, ScorerSession, load

__all__ = ["ExportedDetector", "ScorerSession", "load"]
