"""vlad: zero- and few-shot visual anomaly detection for industrial inspection.

>>> import vlad
>>> det = vlad.create_detector("winclip+maeday", object_name="metal plate")  # doctest: +SKIP
>>> res = det.predict(["a.png", "b.png"])  # res.image_scores (B,), res.anomaly_maps (B, H, W)
"""

from __future__ import annotations

from typing import Any

from vlad.errors import (
    EmptyReferenceSetError,
    IntegrityError,
    InvalidImageError,
    InvalidParameterError,
    NonFiniteScoreError,
    NotFittedError,
    UnknownScorerError,
    VladError,
    WeightsNotAvailableError,
)
from vlad.registry import create_scorer, list_scorers, register_scorer
from vlad.types import AnomalyResult

__version__ = "0.1.0"

__all__ = [
    "AnomalyResult",
    "EmptyReferenceSetError",
    "IntegrityError",
    "InvalidImageError",
    "InvalidParameterError",
    "NonFiniteScoreError",
    "NotFittedError",
    "UnknownScorerError",
    "VladError",
    "WeightsNotAvailableError",
    "create_detector",
    "create_scorer",
    "list_scorers",
    "load",
    "register_scorer",
]


def create_detector(spec: str | None = None, **options: Any):
    """A fused detector from a spec like ``"winclip+maeday+anomalydino"`` (see :mod:`vlad.detector`)."""
    from vlad.detector import create_detector as _create

    return _create(spec, **options)


def load(path: str) -> Any:
    """Load a scorer or detector saved with ``.save(path)``; reads only JSON and safetensors."""
    from vlad.detector import load_any

    return load_any(path)
