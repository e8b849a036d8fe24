"""Exceptions raised by vlad. Every message says what was expected, what was got, and the fix.

This module imports nothing heavy: ``import vlad`` must stay light. :class:`NotFittedError` also derives
from scikit-learn's ``NotFittedError`` (scorers follow scikit-learn's estimator rules), but importing
scikit-learn costs about a second and pulls SciPy, so that class is created on first access (module
``__getattr__``), by which time a scorer has usually imported scikit-learn anyway.
"""

from __future__ import annotations

import threading
from typing import Any

_LAZY_LOCK = threading.Lock()


class VladError(Exception):
    """Base class of every error vlad raises on purpose."""


class InvalidImageError(VladError, ValueError):
    """An input could not be read as an image (corrupt, truncated, empty, too large, wrong shape or type)."""


class UnknownScorerError(VladError, KeyError):
    """A scorer name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownBackboneError(VladError, KeyError):
    """A backbone (weights) name that is not in :data:`vlad.weights.WEIGHTS`."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidParameterError(VladError, TypeError):
    """A scorer or detector was given a parameter it does not have, or a value of the wrong kind."""


class InvalidDeviceError(VladError, ValueError):
    """A device string torch does not understand, or a device that is not available on this machine."""


class WeightsNotAvailableError(VladError, FileNotFoundError):
    """Pretrained weights could not be found locally and could not be downloaded."""


class EmptyReferenceSetError(VladError, ValueError):
    """A few-shot scorer was given no reference images."""


def _make_not_fitted_error() -> type:
    from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

    class NotFittedError(VladError, _SklearnNotFittedError):
        """``predict`` (or another fitted-state method) called before ``fit``."""

    NotFittedError.__module__ = __name__
    return NotFittedError


def __getattr__(name: str) -> Any:
    if name == "NotFittedError":
        with _LAZY_LOCK:  # created once, even when two threads ask at the same time
            if name not in globals():
                globals()[name] = _make_not_fitted_error()  # later lookups find it directly
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
