"""vlad-runtime: run detectors exported with ``vlad export`` using onnxruntime, numpy and Pillow; no torch.

>>> import vlad_runtime
>>> det = vlad_runtime.load("exported/")                # doctest: +SKIP
>>> res = det.predict(["a.png", "b.png"])               # doctest: +SKIP
>>> res.image_scores, res.anomaly_maps, res.labels, res.masks, res.components

The API is :mod:`vlad.runtime`'s, because the code is: this wheel ships vlad's own modules
(``vlad/runtime``, ``vlad/detector/fusion.py``, ``vlad/images.py``, ``vlad/types.py``,
``vlad/serialization.py``, ``vlad/errors.py``) under this package, in the same layout. Only this file
and ``detector/__init__.py`` are its own.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .errors import ExportError, ImageTooLargeError, IntegrityError, InvalidImageError, NonFiniteScoreError, VladError
from .runtime import ExportedDetector, ScorerSession, load
from .types import AnomalyResult, ImageFailure

try:
    __version__ = _version("vlad-runtime")  # equal to vlad-inspect's: both read its pyproject.toml
except PackageNotFoundError:  # pragma: no cover - the package only exists installed
    __version__ = "unknown"

__all__ = [
    "AnomalyResult",
    "ExportError",
    "ExportedDetector",
    "ImageFailure",
    "ImageTooLargeError",
    "IntegrityError",
    "InvalidImageError",
    "NonFiniteScoreError",
    "ScorerSession",
    "VladError",
    "__version__",
    "load",
]
