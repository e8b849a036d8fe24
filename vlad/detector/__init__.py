"""The fused detector: spec and option routing, calibration and thresholds, fusion, persistence.

``from vlad.detector import create_detector, Detector, load_any`` is the public surface; the modules:
:mod:`~vlad.detector.spec` (parse ``"a+b"``, route options), :mod:`~vlad.detector.detector` (the
:class:`Detector`), :mod:`~vlad.detector.calibration` (what a threshold means),
:mod:`~vlad.detector.fusion` (normalisers and fusion rules), :mod:`~vlad.detector.persistence` (the
checked loader).

The names are resolved on first access: :mod:`~vlad.detector.fusion` and
:mod:`~vlad.detector.calibration` are plain numpy, and :mod:`vlad.runtime` imports them where torch is
not installed, which an eager import of the detector (torch) here would prevent.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ThresholdInfo": "vlad.detector.calibration",
    "DETECTOR_DEFAULTS": "vlad.detector.detector",
    "Detector": "vlad.detector.detector",
    "create_detector": "vlad.detector.detector",
    "load_any": "vlad.detector.persistence",
    "load_detector": "vlad.detector.persistence",
    "DEFAULT_SPEC": "vlad.detector.spec",
    "SHARED_OPTIONS": "vlad.detector.spec",
    "parse_spec": "vlad.detector.spec",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlad.detector' has no attribute {name!r}")
