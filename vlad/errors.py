"""Exceptions raised by vlad. Every message says what was expected, what was got, and the fix."""

from __future__ import annotations

from sklearn.exceptions import NotFittedError as _SklearnNotFittedError


class VladError(Exception):
    """Base class of every error vlad raises on purpose."""


class InvalidImageError(VladError, ValueError):
    """An input could not be read as an image (corrupt, truncated, empty, wrong shape or type)."""


class UnknownScorerError(VladError, KeyError):
    """A scorer name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsNotAvailableError(VladError, FileNotFoundError):
    """Pretrained weights could not be found locally and could not be downloaded."""


class NotFittedError(VladError, _SklearnNotFittedError):
    """``predict`` (or another fitted-state method) called before ``fit``."""


class EmptyReferenceSetError(VladError, ValueError):
    """A few-shot scorer was given no reference images."""


class InvalidParameterError(VladError, ValueError):
    """A parameter or option has a value outside what it accepts (the message lists what it does accept)."""


class NonFiniteScoreError(VladError, ArithmeticError):
    """A scorer produced NaN or infinite scores or maps: its result cannot be trusted, so it is refused
    rather than labelled (a NaN compared with a threshold would otherwise read as "normal")."""


class IntegrityError(VladError):
    """A saved detector or scorer does not match the checksums recorded when it was saved (the file was
    changed, truncated or corrupted after saving), or the folder is ambiguous."""
