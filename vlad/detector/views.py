"""Views of one good image that stand in for other good parts, when the detector holds only one.

With a single reference there is nothing to compare a good part with: the conformal rule
(:mod:`vlad.detector.calibration`) needs at least two known-good images scored as new images would be.
The one-reference rule makes its own: ``n`` *views* of the reference, each the reference moved a little
the way parts move on a line (a small rotation, shift and change of scale, with the borders reflected
so no black corner appears) and lit a little differently (brightness and contrast). Each view is scored
as a new image against everything the detector learnt from the reference, and the views' scores set the
normalisers and thresholds as references' would.

The assumption, stated in :meth:`vlad.detector.calibration.ThresholdInfo.describe`: how a view of this
part differs from the part is how another good part differs from it. It is an approximation (other
parts also differ in texture, finish and small tolerances), never a guarantee.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from vlad.images import LoadedImage

#: how far a view departs from the reference: rotation (degrees), shift (share of the side), scale
#: (share), brightness and contrast (share); each drawn uniformly in [-x, x]
JITTER = {"rotate": 6.0, "shift": 0.03, "scale": 0.04, "brightness": 0.06, "contrast": 0.08}
#: how many views the detector makes of a single reference by default
DEFAULT_VIEWS = 8


def reference_views(image: LoadedImage, n: int, seed: int = 0) -> list[LoadedImage]:
    """``n`` jittered views of ``image`` (see the module docstring), reproducible for a ``seed``.

    Returns:
        ``n`` images of the same size and dtype, named ``"<name>#view<i>"``.
    """
    rng = np.random.default_rng(seed)
    return [_view(image, rng, i) for i in range(n)]


def _view(image: LoadedImage, rng: np.random.Generator, i: int) -> LoadedImage:
    src = image.pixels
    h, w = src.shape[:2]
    j = {k: float(rng.uniform(-v, v)) for k, v in JITTER.items()}
    a = math.radians(j["rotate"])
    s = 1.0 + j["scale"]
    # output (y, x) -> input (y, x): rotate and scale about the centre, then shift
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / s
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    offset = centre - rot @ centre + np.array([j["shift"] * h, j["shift"] * w]) * rng.choice([-1.0, 1.0], 2)
    out = np.empty_like(src)
    for c in range(src.shape[2]):
        out[..., c] = ndimage.affine_transform(src[..., c], rot, offset=offset, order=1, mode="reflect")
    mean = float(out.mean())
    out = (out - mean) * (1.0 + j["contrast"]) + mean * (1.0 + j["brightness"])
    out = np.clip(out, 0.0, 1.0)
    if image.data.dtype == np.uint8:
        out = np.round(out * 255.0).astype(np.uint8)
    else:
        out = out.astype(np.float32)
    return LoadedImage(out, f"{image.name}#view{i}")
