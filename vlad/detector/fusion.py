"""Score normalisation and tiered fusion: many scorers' outputs -> one image score and one map.

Scorers speak different units (WinCLIP: probabilities; MAEDAY: reconstruction errors; AnomalyDINO and
PatchCore: feature distances). Before fusing, each scorer's image scores and maps are brought to one
**calibrated scale** in ``[0, 1]``, higher more anomalous, on which ``0.5`` is the boundary of the
priors (without references); with references the thresholds come from :mod:`vlad.detector.calibration`. A :class:`Normaliser` does this, in one of three ways:

``"reference"`` (when there are at least ``MIN_CALIBRATION`` reference images)
    The scorer's scores on known-normal references describe its normal distribution. For a few-shot
    scorer these are *leave-one-out* scores (each reference scored against a memory of the others);
    a zero-shot scorer simply scores the references. Image level: ``z = (s - loc) / scale`` with
    ``loc, scale`` = median and 1.4826 * MAD (``method="robust"``, the default: one bad reference
    barely moves it) or mean and standard deviation (``method="zscore"``). Pixel level: ``loc`` = the
    median of all reference map values and ``scale = (q - loc) / z0`` with ``q`` their
    ``pixel_quantile`` (0.999) quantile, so that the reference maps' 99.9th percentile lands exactly on
    the boundary. Both scales are floored at ``SCALE_FLOOR * |loc|`` (and 1e-6) so that identical
    references cannot blow the scale up. Then ``c = sigmoid((z - z0) / temperature)``: an image ``z0``
    (3) normal standard deviations above the normal centre sits on the boundary 0.5.
``"probability"`` (prior for outputs that already are probabilities: a scorer or part whose
    declared scale is ``"probability"``, e.g. WinCLIP's zero-shot part)
    ``c = clip(s, 0, 1)`` for scores and maps.
``"self"`` (prior for any other output, e.g. MAEDAY, and for a few-shot scorer or part with a single
    reference, where leave-one-out is impossible)
    Each image is judged against its own map: ``loc`` = median of the map, ``scale`` = 1.4826 * MAD
    of the map. Pixels: ``c = sigmoid(((m - loc) / scale - z0_pixel) / temperature)`` with ``z0_pixel``
    = 4; image: the same on the image score with ``z0_image`` = 6 (the maximum of ~50k normal pixels
    already lies near 4.5 robust sigmas, so the image boundary sits above it). This is a scale-free
    prior: it knows nothing of what normal looks like, only how peaked the map is.

Fusion rules (on calibrated values, per image and per pixel, at each image's own resolution):
``"mean"`` (weighted arithmetic mean), ``"max"`` (maximum over the scorers with a positive weight) and
``"harmonic"`` (weighted harmonic mean ``sum(w) / sum(w / max(c, eps))``: one confident "normal"
vote pulls the result down, as WinCLIP fuses its own maps).

Tier weights (:func:`tier_weights`): scorers belong to the zero-shot tier or the few-shot tier. With
``k`` references the few-shot tier gets ``w_few = k / (k + k0)`` and the zero-shot tier ``1 - w_few``
(``k0 = 2``: one reference gives the few-shot tier 1/3, four give 2/3, sixteen 0.89); within a tier
the weight is split by the user's relative weights (``fusion_weights``, equal by default). A tier with no active scorer
gives its weight to the other.
A third tier sits between them: the unlabeled tier (MuSc: images of the line scored against each other
or against an unlabeled pool of u images) takes ``u / (u + u0)`` of what the few-shot tier leaves
(``u0 = 10``; without a pool, as if ``u = u0``), the zero-shot tier the remainder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ..errors import NonFiniteScoreError, VladError
from ..types import AnomalyResult, WorkingResult

FUSION_RULES = ("mean", "max", "harmonic")
NORMALISER_KINDS = ("reference", "probability", "self")
NORMALISATION_METHODS = ("robust", "zscore")
#: fewest normal samples a "reference" normaliser is fitted from; below that a prior is used
MIN_CALIBRATION = 2
SCALE_FLOOR = 0.05
EPS = 1e-6
_MAX_PIXELS = 2_000_000  # reference pixel statistics use at most this many values (evenly subsampled)


def _xp(x: Any):
    """The array module of ``x``: numpy for arrays (the torch-free runtime), torch for tensors (the
    detector's predict path, on the scorer's device). The math below is written once for both."""
    if isinstance(x, np.ndarray):
        return np
    import torch  # only reached with a tensor, so torch is already imported

    return torch


def _sigmoid(x: Any) -> Any:
    """Logistic function in the input's dtype, accurate for large negative ``x`` (no ``1 - tiny``)."""
    if not isinstance(x, np.ndarray):
        return x.sigmoid()
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, np.float32(1.0), e) / (1.0 + e)


def _logit_of(values: Any, loc: float, scale: float, z0: float, temperature: float) -> Any:
    """``((values - loc) / scale - z0) / temperature`` with one multiply: float32 values stay float32
    (the scales' floor, ``SCALE_FLOOR * |loc|``, bounds the cancellation to about 1e-6 of a logit)."""
    return (values - loc) * (1.0 / (scale * temperature)) - z0 / temperature


def _calibrated(values: Any, loc: float, scale: float, z0: float, temperature: float) -> Any:
    return _sigmoid(_logit_of(values, loc, scale, z0, temperature))


def _median(values: Any) -> float:
    """``numpy.median`` of a flat array or tensor (the mean of the two middle values for an even count),
    in float64; on a GPU without leaving it but for the result."""
    n = values.shape[0]
    ks = (n // 2,) if n % 2 else (n // 2 - 1, n // 2)
    if isinstance(values, np.ndarray) or values.device.type == "cpu":
        arr = values if isinstance(values, np.ndarray) else values.numpy()
        middle = np.partition(arr, ks)[list(ks)]
    else:
        middle = [values.kthvalue(k + 1).values for k in ks]
    return float(sum(float(v) for v in middle)) / len(ks)


def _robust_loc_scale(values: Any) -> tuple[float, float]:
    """Median and 1.4826 x the median absolute deviation of a flat array or tensor."""
    med = _median(values)
    return med, _median(abs(values - med)) * 1.4826


def _floor(scale: float, loc: float) -> float:
    return max(float(scale), SCALE_FLOOR * abs(float(loc)), EPS)


@dataclass
class Normaliser:
    """Maps one scorer's raw scores and maps to the calibrated ``[0, 1]`` scale (see module docstring).

    Attributes:
        kind: ``"reference"``, ``"probability"`` or ``"self"``.
        image_loc, image_scale: centre and spread of normal image scores (``"reference"`` only).
        pixel_loc, pixel_scale: centre and spread of normal map values (``"reference"`` only).
        z0_image, z0_pixel: standardised distance from normal that maps to the boundary 0.5.
        temperature: softness of the sigmoid (1 = one standard unit per logit).
        n_samples: how many reference images the statistics come from.
        method: ``"robust"`` (median/MAD) or ``"zscore"`` (mean/std), for ``"reference"``.
    """

    kind: str = "self"
    image_loc: float = 0.0
    image_scale: float = 1.0
    pixel_loc: float = 0.0
    pixel_scale: float = 1.0
    z0_image: float = 6.0
    z0_pixel: float = 4.0
    temperature: float = 1.0
    n_samples: int = 0
    method: str = "robust"

    def __post_init__(self) -> None:
        if self.kind not in NORMALISER_KINDS:
            raise VladError(f"normaliser kind must be one of {NORMALISER_KINDS}, got {self.kind!r}")
        if self.temperature <= 0:
            raise VladError(f"normaliser temperature must be > 0, got {self.temperature}")

    # -- applying --------------------------------------------------------------------------
    def transform(self, scores: np.ndarray, maps: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Calibrate ``scores`` ``(B,)`` and ``maps`` (B maps ``(H_i, W_i)``) -> same shapes in ``[0, 1]``,
        float32 (see :meth:`transform_arrays`)."""
        return self.transform_arrays(np.asarray(scores, dtype=np.float32).reshape(-1),
                                     [np.asarray(m, dtype=np.float32) for m in maps])

    def transform_arrays(self, scores: Any, maps: Sequence[Any]) -> tuple[Any, list[Any]]:
        """:meth:`transform` on float32 numpy arrays or torch tensors (kept on their device): scores
        ``(B,)`` and B maps ``(H_i, W_i)`` of the same kind."""
        t = self.temperature
        if self.kind == "probability":
            return scores.clip(0.0, 1.0), [m.clip(0.0, 1.0) for m in maps]
        if self.kind == "reference":
            out_s = _calibrated(scores, self.image_loc, self.image_scale, self.z0_image, t)
            return out_s, [_calibrated(m, self.pixel_loc, self.pixel_scale, self.z0_pixel, t) for m in maps]
        # "self": each image against its own map
        out_s, out_m = [], []
        for i, m in enumerate(maps):
            loc, scale = _robust_loc_scale(m.reshape(-1))
            scale = _floor(scale, loc)
            out_s.append(_calibrated(scores[i : i + 1], loc, scale, self.z0_image, t))
            out_m.append(_calibrated(m, loc, scale, self.z0_pixel, t))
        return (_xp(scores).concatenate(out_s) if out_s else scores[:0]), out_m

    def apply(self, result: AnomalyResult) -> AnomalyResult:
        """A calibrated copy of ``result`` (names kept; labels, masks and components dropped)."""
        return self.apply_working(WorkingResult.of(result)).to_result()

    def apply_working(self, result: WorkingResult) -> WorkingResult:
        """:meth:`apply` on a :class:`~vlad.types.WorkingResult` (arrays or tensors, kept where they are)."""
        s, m = self.transform_arrays(result.scores, result.maps)
        return WorkingResult(s, m, names=result.names)

    # -- (de)serialising -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Normaliser:
        """Rebuild from :meth:`to_dict` output, checking keys and types.

        Raises:
            VladError: ``data`` is not a dict of the expected keys with number/str values.
        """
        if not isinstance(data, dict):
            raise VladError(f"a normaliser must be a JSON object, got {type(data).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        extra = set(data) - set(known)
        if extra:
            raise VladError(f"unexpected normaliser keys {sorted(extra)}; expected some of {sorted(known)}")
        clean: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("kind", "method"):
                if not isinstance(value, str):
                    raise VladError(f"normaliser {key!r} must be a string, got {type(value).__name__}")
            elif key == "n_samples":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise VladError(f"normaliser 'n_samples' must be an integer, got {value!r}")
            else:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    raise VladError(f"normaliser {key!r} must be a finite number, got {value!r}")
                value = float(value)
            clean[key] = value
        return cls(**clean)


def prior_normaliser(output_scale: str, **overrides: Any) -> Normaliser:
    """The calibration used without normal data to fit on: ``"probability"`` for outputs whose declared
    scale is ``"probability"`` (WinCLIP's zero-shot part), otherwise the scale-free ``"self"`` prior."""
    return Normaliser(kind="probability" if output_scale == "probability" else "self", **overrides)


def fit_reference_normaliser(
    scores: np.ndarray,
    maps: Sequence[np.ndarray],
    method: str = "robust",
    z0_image: float = 3.0,
    pixel_quantile: float = 0.999,
    z0_pixel: float = 3.0,
    temperature: float = 1.0,
) -> Normaliser:
    """Fit a ``"reference"`` normaliser from a scorer's scores and maps of known-normal images.

    Args:
        scores: ``(n,)`` image scores of normal references (leave-one-out for few-shot scorers).
        maps: n maps ``(H_i, W_i)`` of the same references.
        method: ``"robust"`` (median / 1.4826 MAD) or ``"zscore"`` (mean / std) for image scores.
        z0_image: standardised distance that maps to the boundary 0.5 for image scores.
        pixel_quantile: the reference maps' quantile that maps to the pixel boundary 0.5.
        z0_pixel: standardised pixel distance of that quantile.
        temperature: softness of the sigmoid.

    Raises:
        VladError: fewer than :data:`MIN_CALIBRATION` samples, or an unknown method.
    """
    if method not in NORMALISATION_METHODS:
        raise VladError(f"normalisation method must be one of {NORMALISATION_METHODS}, got {method!r}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) < MIN_CALIBRATION or len(maps) != len(scores):
        raise VladError(
            f"a reference normaliser needs at least {MIN_CALIBRATION} normal scores and one map each, "
            f"got {len(scores)} scores and {len(maps)} maps; use prior_normaliser() with fewer references"
        )
    if not np.isfinite(scores).all() or not all(np.isfinite(np.asarray(m)).all() for m in maps):
        raise NonFiniteScoreError("reference scores or maps contain NaN or infinite values; the scorer or its "
                                  "saved state is broken: fit it again")
    if method == "robust":
        loc, scale = _robust_loc_scale(scores)
        if scale <= EPS:  # more than half the scores tie: MAD is 0, fall back to the std
            scale = float(np.std(scores, ddof=1))
    else:
        loc, scale = float(np.mean(scores)), float(np.std(scores, ddof=1))
    values = np.concatenate([np.asarray(m, dtype=np.float64).reshape(-1) for m in maps])
    if values.size > _MAX_PIXELS:
        values = values[:: int(math.ceil(values.size / _MAX_PIXELS))]
    ploc = float(np.median(values))
    phigh = float(np.quantile(values, pixel_quantile))
    pscale = (phigh - ploc) / z0_pixel if z0_pixel > 0 else phigh - ploc
    return Normaliser(
        kind="reference",
        image_loc=loc,
        image_scale=_floor(scale, loc),
        pixel_loc=ploc,
        pixel_scale=_floor(pscale, ploc),
        z0_image=float(z0_image),
        z0_pixel=float(z0_pixel),
        temperature=float(temperature),
        n_samples=int(len(scores)),
        method=method,
    )


# -- fusion --------------------------------------------------------------------------------------
def _check_rule(rule: str) -> None:
    if rule not in FUSION_RULES:
        raise VladError(f"fusion rule must be one of {FUSION_RULES}, got {rule!r}")


def _checked_weights(n_values: int, weights: Sequence[float]) -> tuple[list[int], np.ndarray]:
    """The inputs with a positive weight and their weights normalised to sum 1."""
    if n_values != len(weights) or not n_values:
        raise VladError(f"need one weight per input, got {n_values} inputs and {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise VladError(f"fusion weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    keep = [i for i in range(len(w)) if w[i] > 0]
    return keep, w[keep] / w[keep].sum()


def fuse_arrays(values: Sequence[Any], weights: Sequence[float], rule: str = "mean") -> Any:
    """Fuse same-shaped calibrated arrays (one per scorer) into one.

    Args:
        values: S arrays of one shape (e.g. ``(B,)`` scores or one ``(H, W)`` map each), in ``[0, 1]``:
            numpy arrays, or torch tensors (fused on their device).
        weights: S non-negative weights, at least one positive (ignored by ``"max"`` except that
            zero-weight scorers are left out).
        rule: ``"mean"``, ``"max"`` or ``"harmonic"``.

    Returns:
        float32 array (or tensor) of the common shape.
    """
    _check_rule(rule)
    keep, w = _checked_weights(len(values), weights)
    tensor = next((values[i] for i in keep if not isinstance(values[i], np.ndarray)), None)
    if tensor is not None:  # on the first tensor's device (a host-side scorer's arrays join it)
        torch = _xp(tensor)
        parts = [torch.as_tensor(values[i]).to(tensor.device).float() for i in keep]
    else:
        parts = [np.asarray(values[i], dtype=np.float32) for i in keep]
    if rule == "max":
        out = parts[0]
        for p in parts[1:]:
            out = _xp(out).maximum(out, p)
        return out
    # a running weighted sum: no (S, ...) stack of full-size maps
    if rule == "mean":
        out = parts[0] * float(w[0])
        for wi, p in zip(w[1:], parts[1:]):
            out = out + p * float(wi)
        return out
    out = float(w[0]) / parts[0].clip(EPS, None)
    for wi, p in zip(w[1:], parts[1:]):
        out = out + float(wi) / p.clip(EPS, None)
    return 1.0 / out


def fuse_results(
    results: Mapping[str, AnomalyResult], weights: Mapping[str, float], rule: str = "mean"
) -> AnomalyResult:
    """Fuse calibrated per-scorer results of the same images into one :class:`AnomalyResult`.

    Maps are fused image by image at each image's own resolution (mixed sizes give a list).
    ``components`` of the output holds the inputs.
    """
    return fuse_working({n: WorkingResult.of(r) for n, r in results.items()}, weights, rule).to_result()


def fuse_working(results: Mapping[str, WorkingResult], weights: Mapping[str, float], rule: str = "mean") -> WorkingResult:
    """:func:`fuse_results` on :class:`~vlad.types.WorkingResult` s (arrays, or tensors fused on their
    device); ``parts`` of the output holds the inputs."""
    names = [n for n in results if weights.get(n, 0.0) > 0]
    if not names:
        raise VladError(f"no scorer with a positive weight among {list(results)} (weights {dict(weights)})")
    w = [float(weights[n]) for n in names]
    n_images = {len(results[n].maps) for n in names}
    if len(n_images) != 1:
        raise VladError(f"components scored different numbers of images: { {n: len(results[n].maps) for n in names} }")
    scores = fuse_arrays([results[n].scores for n in names], w, rule)
    maps = []
    for i in range(len(results[names[0]].maps)):
        per_scorer = [results[n].maps[i] for n in names]
        shapes = {tuple(m.shape) for m in per_scorer}
        if len(shapes) != 1:
            raise VladError(f"image {i}: components returned maps of different sizes {sorted(shapes)}")
        maps.append(fuse_arrays(per_scorer, w, rule))
    return WorkingResult(scores, maps, parts=dict(results), names=results[names[0]].names)


def calibrate_units(
    units: Mapping[str, AnomalyResult], normalisers: Mapping[str, Normaliser], names: tuple[str, ...] | None = None
) -> AnomalyResult:
    """One scorer's calibrated result from its calibration units (the scorer's name, or ``name/part``
    per part): each unit calibrated by its normaliser; several units are averaged, and kept as
    ``components`` (part name -> calibrated result).

    Raises:
        VladError: a unit without a normaliser.
    """
    return calibrate_working({u: WorkingResult.of(r) for u, r in units.items()}, normalisers, names).to_result()


def calibrate_working(
    units: Mapping[str, WorkingResult], normalisers: Mapping[str, Normaliser], names: tuple[str, ...] | None = None
) -> WorkingResult:
    """:func:`calibrate_units` on :class:`~vlad.types.WorkingResult` s, kept where they are."""
    missing = [u for u in units if u not in normalisers]
    if missing:
        raise VladError(f"no calibration for {missing}: the detector changed without recalibrating; call "
                        "recalibrate() (or export it again)")
    done = {unit: normalisers[unit].apply_working(r) for unit, r in units.items()}
    if len(done) == 1:
        return next(iter(done.values()))
    merged = fuse_working(done, {u: 1.0 for u in done}, "mean")
    return WorkingResult(merged.scores, merged.maps, names=names,
                         parts={u.split("/", 1)[1]: r for u, r in done.items()})


def tier_weights(
    tiers: Mapping[str, str],
    n_references: int,
    k0: float = 2.0,
    fusion_weights: Mapping[str, float] | None = None,
    n_unlabeled: int | None = None,
    u0: float = 10.0,
) -> dict[str, float]:
    """Weight per active scorer: the few-shot tier gets ``k / (k + k0)``; the rest goes to the
    unlabeled tier (``u / (u + u0)`` of it) and the zero-shot tier (the remainder).

    Args:
        tiers: active scorer name -> ``"zero"``, ``"unlabeled"`` or ``"few"``.
        n_references: k, the number of reference images.
        k0: references at which both the few-shot tier and the others weigh the same (> 0).
        fusion_weights: optional relative weights within a tier (default 1 each).
        n_unlabeled: u, the images in the unlabeled pool; None (no pool: the unlabeled scorers score
            each call's images against each other) counts as ``u0``.
        u0: pool size at which the unlabeled and zero-shot tiers weigh the same (> 0).

    Returns:
        name -> weight, summing to 1. A tier with no active scorer gives its weight to the others.
    """
    if k0 <= 0 or u0 <= 0:
        raise VladError(f"k0 and u0 must be > 0, got {k0}, {u0}")
    if not tiers:
        raise VladError("no active scorer to weigh")
    bad = {n: t for n, t in tiers.items() if t not in ("zero", "unlabeled", "few")}
    if bad:
        raise VladError(f"tiers must be 'zero', 'unlabeled' or 'few', got {bad}")
    sw = dict(fusion_weights or {})
    members = {t: [n for n in tiers if tiers[n] == t] for t in ("zero", "unlabeled", "few")}
    k = max(0, int(n_references))
    u = float(u0) if n_unlabeled is None else max(0, int(n_unlabeled))
    w_few = k / (k + k0) if members["few"] else 0.0
    if not (members["zero"] or members["unlabeled"]):
        w_few = 1.0
    w_unl = u / (u + u0) if members["zero"] else 1.0
    if not members["unlabeled"]:
        w_unl = 0.0
    tier_w = {"few": w_few, "unlabeled": (1.0 - w_few) * w_unl, "zero": (1.0 - w_few) * (1.0 - w_unl)}
    out: dict[str, float] = {}
    for t, names in members.items():
        rel = np.array([float(sw.get(n, 1.0)) for n in names], dtype=np.float64)
        if names and (rel < 0).any():
            raise VladError(f"fusion weights must be >= 0, got {sw}")
        total = rel.sum()
        for n, r in zip(names, rel):
            out[n] = tier_w[t] * (r / total) if total > 0 else 0.0
    return out
