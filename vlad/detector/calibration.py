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

RULES = ("conformal", "best-available", "prior", "override")
PATHS = ("exchangeable", "leave-one-out", "held-out", "none")


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
    v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    n = v.size
    if n == 0:
        raise VladError("a conformal threshold needs at least one normal score")
    if not np.isfinite(v).all():
        raise VladError("calibration scores contain NaN or infinity; the scorer is broken: fit it again")
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if k <= n:
        return float(v[k - 1]), "conformal", (n + 1 - k) / (n + 1)
    return float(v[-1]), "best-available", 1.0 / (n + 1)


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
        rule: ``"conformal"`` (alpha guaranteed), ``"best-available"`` (too few references for alpha:
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

    def describe(self) -> str:
        """One plain sentence for a line engineer (the CLI summary line and the app show it)."""
        a = f"{self.false_alarm_rate:.0%}" if self.false_alarm_rate >= 0.01 else f"{self.false_alarm_rate:.2%}"
        refs = f"{self.n_references} reference{'s' if self.n_references != 1 else ''}"
        if self.rule == "override":
            return f"{refs}: thresholds set by hand, so no false-alarm rate is guaranteed"
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
