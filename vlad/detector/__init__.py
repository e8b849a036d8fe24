"""The fused detector: spec and option routing, calibration and thresholds, fusion, persistence.

``from vlad.detector import create_detector, Detector, load_any`` is the public surface; the modules:
:mod:`~vlad.detector.spec` (parse ``"a+b"``, route options), :mod:`~vlad.detector.detector` (the
:class:`Detector`), :mod:`~vlad.detector.calibration` (what a threshold means),
:mod:`~vlad.detector.fusion` (normalisers and fusion rules), :mod:`~vlad.detector.persistence` (the
checked loader).
"""

from vlad.detector.calibration import ThresholdInfo
from vlad.detector.detector import DETECTOR_DEFAULTS, Detector, create_detector
from vlad.detector.persistence import load_any, load_detector
from vlad.detector.spec import DEFAULT_SPEC, SHARED_OPTIONS, parse_spec

__all__ = [
    "DEFAULT_SPEC",
    "DETECTOR_DEFAULTS",
    "SHARED_OPTIONS",
    "Detector",
    "ThresholdInfo",
    "create_detector",
    "load_any",
    "load_detector",
    "parse_spec",
]
