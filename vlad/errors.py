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


class ImageTooLargeError(InvalidImageError):
    """An image file has more pixels than the limit in force (:func:`vlad.images.max_image_pixels`), found
    from its header before it is decoded; an :class:`InvalidImageError` too (``vlad serve`` answers 413)."""


class UnknownScorerError(VladError, KeyError):
    """A scorer name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownBackboneError(VladError, KeyError):
    """A backbone (weights) name that is not in :data:`vlad.weights.WEIGHTS`."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidParameterError(VladError, ValueError, TypeError):
    """A scorer or detector was given a parameter it does not have, or a value of the wrong kind or
    outside what it accepts (the message lists what it does accept)."""


class InvalidArgumentError(VladError, ValueError):
    """A function was given an argument it cannot use: the wrong shape, count, type or range (a metric's
    scores and labels, a map to draw, an :class:`~vlad.types.AnomalyResult`'s arrays); the message says
    what it expects."""


class UnsupportedOperationError(VladError, NotImplementedError):
    """A scorer was asked for something it does not offer, or not in its configuration (e.g. checking
    references of a scorer that scores tiles); the message says why and what to do instead."""


class InvalidDeviceError(VladError, ValueError):
    """A device string torch does not understand, or a device that is not available on this machine."""


class WeightsNotAvailableError(VladError, FileNotFoundError):
    """Pretrained weights could not be found locally and could not be downloaded."""


class EmptyReferenceSetError(VladError, ValueError):
    """A few-shot scorer was given no reference images."""


class NonFiniteScoreError(VladError, ArithmeticError):
    """A scorer produced NaN or infinite scores or maps: its result cannot be trusted, so it is refused
    rather than labelled (a NaN compared with a threshold would otherwise read as "normal")."""


class SelectionUnavailableError(VladError, LookupError):
    """A scorer was asked what it chose on synthetic defects, but chose nothing that way (the message says
    why: too few references to hold any out, or ``selection="loss"``)."""


class IntegrityError(VladError):
    """A saved detector or scorer does not match the checksums recorded when it was saved (the file was
    changed, truncated or corrupted after saving), or the folder is ambiguous."""


class DistributedError(VladError, RuntimeError):
    """The distributed engine (:mod:`vlad.distributed`) cannot run: Ray is not installed, the cluster at
    ``address`` cannot be reached, or the output folder holds the results of another job."""


def _make_not_fitted_error() -> type:
    from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

    class NotFittedError(VladError, _SklearnNotFittedError):
        """``predict`` (or another fitted-state method) called before ``fit``."""

    NotFittedError.__module__ = __name__
    NotFittedError.__qualname__ = "NotFittedError"
    return NotFittedError


def __getattr__(name: str) -> Any:
    if name == "NotFittedError":
        with _LAZY_LOCK:  # created once, even when two threads ask at the same time
            if name not in globals():
                globals()[name] = _make_not_fitted_error()  # later lookups find it directly
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ExportError(VladError):
    """A detector or scorer cannot be exported (a scorer whose computation is not a fixed graph, an
    unknown format, an unfitted detector), or an exported folder cannot be used by :mod:`vlad.runtime`."""
