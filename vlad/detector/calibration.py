"""What a label and a mask mean: thresholds from a false-alarm rate the user states.

**The rule.** The user states ``false_alarm_rate`` (alpha, default 0.05): the share of *good* parts
the detector may flag. From n calibration references (known-normal images, each scored as a new image
would be: see below) the detector takes the fused score of each, sorts them, and sets the image
threshold at the ``ceil((n + 1)(1 - alpha))``-th smallest (split conformal prediction; Vovk et al.
2005, Angelopoulos & Bates 2021). If a new good image is exchangeable with the references (same line,
same conditions), the chance that it scores above that threshold is at most
``(n + 1 - k) / (n + 1) <= alpha``, whatever the scorer: no distribution is assumed.

**Too few references.** The rule needs ``n >= 1/alpha - 1`` (19 references for 5%, 4 for 20%). With
fewer, the detector does not pretend: it uses the largest calibration score (the best its references
can do), which bounds the false-alarm rate by ``1 / (n + 1)``, and :class:`ThresholdInfo` says so in
words, with how many references would reach alpha.

**How each reference is scored** (the *path*):

``"exchangeable"``
    Zero-shot scorers never learn from the references, so a reference's score is exactly what a new
    good image would get: the split-conformal bound holds as stated (for one scorer; with several,
    their normalisers are fitted on the same references, a small departure measured by
    ``python -m vlad.bench calibration``).
``"leave-one-out"``
    Memory scorers (``incremental``: AnomalyDINO, PatchCore, WinCLIP+) score each reference against a
    memory of all the others (``without_reference``), a jackknife. For nearest-neighbour scores that can
    only fall when the memory grows (AnomalyDINO, WinCLIP+), each leave-one-out score is at least what
    that reference would get in the exchangeable (n + 1)-image setting, so the bound holds,
    conservatively. PatchCore's neighbourhood reweighting is not monotone in the memory, so there the
    bound is the jackknife's: approximate, worst case weaker (Barber et al. 2021, "Predictive
    inference with the jackknife+"); the benchmark measures it.
``"held-out"``
    Scorers trained on their references (PaDiM, autoencoders, flows, ...) score their own training
    images too well. The detector holds out a share of the references (``calibration_split``, at least
    2, evenly spaced in the order given; from 4 references on), trains on the rest and calibrates on
    the held-out ones: split conformal again, with n = the held-out count.

**Masks.** The pixel threshold uses the same rule on one number per calibration reference: the maximum
of its fused map. A new good image's mask is then empty with probability at least ``1 - alpha``.

**An unlabeled pool** (``Detector.add_unlabeled``, with fewer than 2 real references; references picked
from the pool by ``bootstrap_references`` do not count, they are its most normal-looking images and would
set the thresholds too low): the pool's images, each scored as a new image would be (the unlabeled tier
against the rest of the pool), stand in for the references *under a stated assumption*: at most a
share ``pool_defect_rate`` (default 5%) of the pool is defective, and its good images are exchangeable
with new good ones. With u pool images, at most ``m = floor(rate * u)`` defective, the threshold is the
``(k + m)``-th smallest score, ``k = ceil((u - m + 1)(1 - alpha))``: removing any m scores moves an order
statistic up by at most m places, so it is at least the conformal threshold of the good images,
whichever they are (:func:`pool_threshold`). Under the assumption the false-alarm bound holds; the
assumption itself is not checked, and :class:`ThresholdInfo` says so in words.

**One reference** (and no pool): the detector makes ``reference_views`` (default 8) jittered views of
it (:mod:`vlad.detector.views`: moved, turned, scaled and lit a little differently), scores each as a
new image against everything learnt from the reference, and treats the views' scores as references'
(rule ``"views-assumption"``, path ``"reference-views"``). The assumption: a view differs from the
reference as another good part would. Parts on a line also differ in texture and tolerances, so this
is an approximation, not a guarantee; :class:`ThresholdInfo` says so, and how many more references
give one. ``python -m vlad.bench calibration`` measures the rate it gives (its k = 1 rows).
``reference_views=0`` uses the priors instead.

**A batch calibrates itself** (no known-good image, no pool, an unlabeled-tier scorer such as MuSc,
and at least 10 images in one ``predict`` call): the call's images, each scored as a new image (the
unlabeled tier against the rest of the batch), calibrate that call under the pool assumption above
(path ``"this-batch"``); :meth:`Detector.threshold_info` describes it until the detector changes.

**Priors** (0 references, or too few to calibrate on): each scorer's output is put on the calibrated
scale by an explicit prior (:func:`vlad.detector.fusion.prior_normaliser`: probabilities as they are;
other scores judged against the image's own map), and the thresholds are ``prior_image_threshold`` and
``prior_pixel_threshold`` (0.5). These carry no guarantee; ``python -m vlad.bench calibration``
measures what rate they give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vlad.detector.fusion import Normaliser
from vlad.errors import InvalidParameterError, VladError

RULES = ("conformal", "best-available", "prior", "override", "pool-assumption", "views-assumption")
PATHS = ("exchangeable", "leave-one-out", "held-out", "none", "unlabeled-pool", "reference-views", "this-batch")


def references_for_rate(alpha: float) -> int:
    """Fewest calibration references for which the conformal rule guarantees ``alpha``: ``ceil(1/alpha - 1)``."""
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def conformal_threshold(values: Sequence[float], alpha: float) -> tuple[float, str, float]:
    """The split-conformal threshold of normal ``values`` for false-alarm rate ``alpha``.

    Args:
        values: n >= 1 scores of known-normal images (higher is more anomalous).
        alpha: the stated false-alarm rate, in (0, 1).

    Returns:
        ``(threshold, rule, bound)``: the ``ceil((n+1)(1-alpha))``-th smallest value, ``"conformal"``
        and ``(n+1-k)/(n+1) <= alpha``; or, when n is too small, the largest value,
        ``"best-available"`` and ``1/(n+1)``. A new exchangeable normal value exceeds the threshold with
        probability at most ``bound``.

    Raises:
        VladError: no values, or non-finite values.
    """
    v = _sorted_finite(values, "a conformal threshold needs at least one normal score", "calibration scores")
    n = v.size
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if k <= n:
        return float(v[k - 1]), "conformal", (n + 1 - k) / (n + 1)
    return float(v[-1]), "best-available", 1.0 / (n + 1)


def _sorted_finite(values: Sequence[float], empty_message: str, what: str) -> np.ndarray:
    """``values`` as sorted float64, or a VladError when there are none or one is not finite."""
    v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    if v.size == 0:
        raise VladError(empty_message)
    if not np.isfinite(v).all():
        raise VladError(f"{what} contain NaN or infinity; the scorer is broken: fit it again")
    return v


def pool_threshold(values: Sequence[float], alpha: float, defect_rate: float) -> tuple[float, str, float]:
    """The threshold of unlabeled pool scores for false-alarm rate ``alpha``, assuming at most a share
    ``defect_rate`` of the pool is defective (see the module docstring).

    Returns:
        ``(threshold, "pool-assumption", bound)``: the ``(k + m)``-th smallest value with ``m =
        floor(defect_rate * u)``, ``k = ceil((u - m + 1)(1 - alpha))``, and the bound ``(g + 1 - k) /
        (g + 1)`` (g = u - m good images) that holds under the assumption; when ``k + m > u``, the
        largest value and ``1 / (g + 1)``.

    Raises:
        VladError: no values, non-finite values, or a rate outside [0, 1).
    """
    v = _sorted_finite(values, "a pool threshold needs at least one pool score", "pool scores")
    u = v.size
    if not 0.0 <= float(defect_rate) < 1.0:
        raise InvalidParameterError(f"pool_defect_rate must be in [0, 1), got {defect_rate!r}")
    m = int(math.floor(float(defect_rate) * u + 1e-9))
    g = u - m
    k = math.ceil((g + 1) * (1.0 - alpha) - 1e-9)
    if k + m <= u:
        return float(v[k + m - 1]), "pool-assumption", (g + 1 - k) / (g + 1)
    return float(v[-1]), "pool-assumption", 1.0 / (g + 1)


def held_out_indices(n_references: int, split: float) -> list[int]:
    """References held out from scorers trained on them: ``max(2, floor(n * split))`` of n, evenly
    spaced in the order given (so drift along a sequence is spread over both sides), provided at least
    2 remain to train on; otherwise none (the detector then uses its priors)."""
    m = max(2, int(math.floor(n_references * split)))
    if split <= 0 or n_references - m < 2:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n_references - 1, m)})


def evenly(indices: Sequence[int], cap: int | None) -> list[int]:
    """At most ``cap`` of ``indices``, evenly spaced (all of them when ``cap`` is None)."""
    idx = list(indices)
    if cap is None or len(idx) <= cap:
        return idx
    return [idx[int(round(x))] for x in np.linspace(0, len(idx) - 1, cap)]


@dataclass(frozen=True)
class ThresholdInfo:
    """What the detector's thresholds promise, in numbers and in words (:meth:`describe`).

    Attributes:
        rule: ``"conformal"`` (alpha guaranteed), ``"pool-assumption"`` (from the unlabeled pool, under
            the stated assumption, see :attr:`assumption`), ``"views-assumption"`` (one reference: from
            its jittered views, under the stated assumption), ``"best-available"`` (too few references for alpha:
            the largest calibration score, guaranteeing ``guaranteed_rate``), ``"prior"`` (no normal
            data: an explicit prior, no guarantee) or ``"override"`` (a threshold the user set).
        path: how the calibration references were scored (see the module docstring).
        false_alarm_rate: the rate the user asked for.
        guaranteed_rate: the bound on the share of good images flagged that holds under the rule
            (None when nothing is guaranteed).
        n_references: references the detector holds.
        n_calibration: references the thresholds were computed from.
        references_needed: how many more references would guarantee ``false_alarm_rate`` (0 if it is).
        image_threshold, pixel_threshold: the thresholds in force.
        n_pool: unlabeled pool images the thresholds were computed from (``"pool-assumption"``).
        pool_defect_rate: the assumed share of defective pool images (``"pool-assumption"``).
    """

    rule: str
    path: str
    false_alarm_rate: float
    guaranteed_rate: float | None
    n_references: int
    n_calibration: int
    references_needed: int
    image_threshold: float
    pixel_threshold: float
    n_pool: int = 0
    pool_defect_rate: float | None = None

    @property
    def assumption(self) -> str | None:
        """The assumption the thresholds rest on (None when they rest on known-good references only)."""
        if self.rule == "views-assumption":
            return (f"its {self.n_calibration} jittered views (moved, turned and lit a little differently) differ "
                    "from it as other good parts do")
        if self.rule != "pool-assumption":
            return None
        if self.path == "this-batch":
            return (f"at most {self.pool_defect_rate:.0%} of these {self.n_pool} images are defective, and its "
                    "good images are like the line's other good images")
        return (f"at most {self.pool_defect_rate:.0%} of the {self.n_pool} unlabeled pool images are defective, "
                "and its good images are like new good images")

    def describe(self) -> str:
        """One plain sentence for a line engineer (the CLI summary line and the app show it)."""
        a = f"{self.false_alarm_rate:.0%}" if self.false_alarm_rate >= 0.01 else f"{self.false_alarm_rate:.2%}"
        refs = f"{self.n_references} reference{'s' if self.n_references != 1 else ''}"
        if self.rule == "override":
            return f"{refs}: thresholds set by hand, so no false-alarm rate is guaranteed"
        if self.rule == "pool-assumption":
            g = f"{self.guaranteed_rate:.0%}" if self.guaranteed_rate >= 0.01 else f"{self.guaranteed_rate:.2%}"
            source = (f"the {self.n_pool} images scored together in the last call" if self.path == "this-batch"
                      else f"{self.n_pool} unlabeled images")
            return (f"{source}, ASSUMING {self.assumption.split(', and')[0]}: then at most "
                    f"{g} of good parts will be flagged (asked for {a}); an assumption, not a guarantee: add "
                    f"{self.references_needed} known-good references for a guarantee")
        if self.rule == "views-assumption":
            g = f"{self.guaranteed_rate:.0%}" if self.guaranteed_rate >= 0.01 else f"{self.guaranteed_rate:.2%}"
            return (f"{refs}, ASSUMING {self.assumption}: then at most {g} of good parts will be flagged (asked "
                    f"for {a}); an approximation, not a guarantee: add {self.references_needed} more good images "
                    "for a guarantee")
        if self.rule == "prior":
            more = f"add {self.references_needed} more good images to guarantee {a}"
            return (f"{refs}: too few good images to measure what normal looks like; the thresholds are a "
                    f"prior with no guaranteed false-alarm rate ({more})")
        held = (f" ({self.n_calibration} of them held out for calibration)" if self.path == "held-out"
                else "")
        g = f"{self.guaranteed_rate:.0%}" if self.guaranteed_rate >= 0.01 else f"{self.guaranteed_rate:.2%}"
        if self.rule == "conformal":
            return f"{refs}{held}: at most {g} of good parts will be flagged (asked for {a})"
        return (f"{refs}{held}: the lowest false-alarm rate that can be guaranteed is {g}; add "
                f"{self.references_needed} more for {a}")


@dataclass
class Calibration:
    """Fitted calibration of a detector: normalisers per scorer (or scorer part) and thresholds.

    Attributes:
        normalisers: unit -> normaliser; a unit is a scorer name, or ``"name/part"`` for a scorer whose
            result carries parts (WinCLIP+).
        image_threshold, pixel_threshold: derived thresholds on the calibrated scale.
        rule, path, guaranteed_rate: see :class:`ThresholdInfo`.
        reference_scores: fused calibrated image scores of the calibration references.
        reference_map_maxima: the maximum of each calibration reference's fused map.
        held_out: indices of references held out from scorers trained on them.
        n_references: references held when this calibration was computed.
        n_pool: unlabeled pool images it was computed from (rule ``"pool-assumption"``).
    """

    normalisers: dict[str, Normaliser]
    image_threshold: float
    pixel_threshold: float
    rule: str = "prior"
    path: str = "none"
    guaranteed_rate: float | None = None
    reference_scores: list[float] = field(default_factory=list)
    reference_map_maxima: list[float] = field(default_factory=list)
    held_out: list[int] = field(default_factory=list)
    n_references: int = 0
    n_pool: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        d = asdict(self)
        d["normalisers"] = {k: v.to_dict() for k, v in self.normalisers.items()}
        return d

    @classmethod
    def from_dict(cls, data: Any, units: set[str], n_references: int) -> Calibration:
        """Rebuild from :meth:`to_dict` output, checking every value.

        Raises:
            VladError: wrong keys, types, non-finite numbers, or normalisers for other scorers.
        """
        from vlad.serialization import check_keys

        check_keys(data, {f for f in cls.__dataclass_fields__}, "calibration",
                   required={"normalisers", "image_threshold", "pixel_threshold"})
        norms = data["normalisers"]
        if not isinstance(norms, dict) or set(norms) != units:
            raise VladError(f"calibration: expected normalisers for {sorted(units)}, got "
                            f"{sorted(norms) if isinstance(norms, dict) else norms!r}")
        out: dict[str, Any] = {"normalisers": {n: Normaliser.from_dict(v) for n, v in norms.items()}}
        for key in ("image_threshold", "pixel_threshold"):
            out[key] = _finite(data[key], f"calibration: {key}")
        rule, path = data.get("rule", "prior"), data.get("path", "none")
        if rule not in RULES or path not in PATHS:
            raise VladError(f"calibration: rule {rule!r} / path {path!r} not among {RULES} / {PATHS}")
        g = data.get("guaranteed_rate")
        out.update(rule=rule, path=path, guaranteed_rate=None if g is None else _finite(g, "guaranteed_rate"))
        for key in ("reference_scores", "reference_map_maxima"):
            vals = data.get(key, [])
            if not isinstance(vals, list):
                raise VladError(f"calibration: {key} must be a list of numbers")
            out[key] = [_finite(v, f"calibration: {key}") for v in vals]
        held = data.get("held_out", [])
        if not isinstance(held, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                 and 0 <= i < n_references for i in held):
            raise VladError(f"calibration: held_out must list reference indices below {n_references}")
        out["held_out"] = list(held)
        out["n_references"] = n_references
        n_pool = data.get("n_pool", 0)
        if isinstance(n_pool, bool) or not isinstance(n_pool, int) or n_pool < 0:
            raise VladError("calibration: n_pool must be a non-negative integer")
        out["n_pool"] = n_pool
        return cls(**out)


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise VladError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def check_rate(alpha: Any) -> float:
    """A false-alarm rate in (0, 1).

    Raises:
        InvalidParameterError: otherwise.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InvalidParameterError(f"false_alarm_rate must be a number in (0, 1), e.g. 0.05 for 5% of good "
                                    f"parts flagged; got {alpha!r}")
    return float(alpha)
