"""vlad: zero- and few-shot visual anomaly detection for industrial inspection.

>>> import vlad
>>> det = vlad.create_detector("winclip+maeday", object_name="metal plate")  # doctest: +SKIP
>>> res = det.predict(["a.png", "b.png"])  # res.image_scores (B,), res.anomaly_maps (B, H, W)

``import vlad`` is light (no torch, scikit-learn or model libraries): they load when a scorer is built.
"""

from __future__ import annotations

from typing import Any

from vlad.errors import (
    EmptyReferenceSetError,
    IntegrityError,
    InvalidArgumentError,
    SelectionUnavailableError,
    InvalidDeviceError,
    InvalidImageError,
    InvalidParameterError,
    NonFiniteScoreError,
    UnknownBackboneError,
    UnknownScorerError,
    UnsupportedOperationError,
    VladError,
    WeightsNotAvailableError,
)
from vlad.registry import create_scorer, list_scorers, register_scorer


def installed_version() -> str:
    """The version of the installed ``vlad-inspect`` distribution (pyproject.toml's), or ``"unknown"``
    when vlad runs from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlad-inspect")
    except PackageNotFoundError:
        return "unknown"

__all__ = [
    "AnomalyResult",
    "EmptyReferenceSetError",
    "ImageFailure",
    "IntegrityError",
    "InvalidArgumentError",
    "SelectionUnavailableError",
    "InvalidDeviceError",
    "InvalidImageError",
    "InvalidParameterError",
    "NonFiniteScoreError",
    "NotFittedError",
    "UnknownBackboneError",
    "UnknownScorerError",
    "UnsupportedOperationError",
    "VladError",
    "WeightsNotAvailableError",
    "create_detector",
    "create_scorer",
    "list_scorers",
    "load",
    "register_scorer",
]

# Names resolved on first access, so that `import vlad` does not import numpy or scikit-learn.
_LAZY = {"AnomalyResult": "vlad.types", "ImageFailure": "vlad.types", "NotFittedError": "vlad.errors"}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # from the distribution's metadata, read on first use
        return installed_version()
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlad' has no attribute {name!r}")


def create_detector(spec: str | None = None, **options: Any):
    """A fused detector from a spec like ``"winclip+maeday+anomalydino"`` (see :mod:`vlad.detector`)."""
    from vlad.detector import create_detector as _create

    return _create(spec, **options)


def load(path: str, *, device: str | None = None, precision: str | None = None) -> Any:
    """Load a scorer or detector saved with ``.save(path)``; reads only JSON and safetensors.

    ``device`` (``"cpu"``, ``"cuda"``, ...): where it runs. None (default): the device it was saved on
    when this machine has it, else the CPU, with a logged warning (a detector fitted on a GPU machine
    loads on a machine without one). ``precision`` (None: as saved) replaces the saved one
    (``precision="bf16"``: see the README).
    """
    from vlad.detector import load_any

    return load_any(path, device=device, precision=precision)
