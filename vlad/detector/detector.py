"""The tiered detector: zero-shot scorers from the first image, few-shot scorers as good images arrive.

>>> det = vlad.create_detector(object_name="metal plate")        # doctest: +SKIP
>>> det.fit()                      # zero-shot: WinCLIP + MAEDAY, no images needed
>>> det.add_references(good)       # AnomalyDINO joins; normalisers and thresholds come from `good`
>>> res = det.predict(images)      # res.image_scores, res.anomaly_maps, res.labels, res.masks,
...                                # res.components["winclip"], ...
>>> det.threshold_info().describe()
'20 references: at most 5% of good parts will be flagged (asked for 5%)'

**Spec.** ``"winclip+maeday+anomalydino"`` names the scorers (see ``vlad.list_scorers()``); the default
(``spec=None``) is :data:`~vlad.detector.spec.DEFAULT_SPEC`. Options are routed by
:mod:`vlad.detector.spec`.

**Tiers.** A scorer whose declared ``tier`` is ``"few"`` (it needs references: AnomalyDINO, PatchCore,
...) is *inactive* until the first reference arrives; the others work from the start. Tier weights
follow :func:`vlad.detector.fusion.tier_weights` (``w_few = k / (k + k0)``), scaled within a tier by
``fusion_weights``.

**References.** ``fit(references)`` and ``add_references(images)`` hand the images to every scorer that
learns from them: ``incremental`` scorers (AnomalyDINO, PatchCore, WinCLIP -> WinCLIP+) grow their
memory; other few-tier scorers are (re)fitted on the references not held out for calibration; zero-tier
scorers that are not incremental (MAEDAY) are fitted once without references and the references only
calibrate them. ``remove_reference(i | name)`` forgets one everywhere.

**The unlabeled tier.** A scorer whose ``tier`` is ``"unlabeled"`` (MuSc) needs no references: it scores
each call's images against each other, or, once ``add_unlabeled(images)`` has given it a pool of the
line's own unlabeled images, each new image against that pool. It weighs between the other two tiers
(:func:`vlad.detector.fusion.tier_weights`). From the pool, ``bootstrap_references(n)`` picks the images
judged most normal as pseudo-references for the few-shot tier (listing them and every pool score so a
person can veto a pick), and, with fewer than 2 known-good references, the thresholds come from the
pool under a stated assumption (``pool_defect_rate``: at most 5% of the pool is defective), which
:meth:`Detector.threshold_info` reports as an assumption, not a guarantee.

**Normalisation and thresholds** (recomputed lazily after the references change): see
:mod:`vlad.detector.calibration`. In short, the thresholds come from the ``false_alarm_rate`` the user
states (default 5%) by the split-conformal rule on references scored as new images would be;
:meth:`Detector.threshold_info` says which guarantee is in force, in numbers and words.
With one reference, its ``reference_views`` (default 8) jittered views stand in for other good parts,
and a call of 10 or more images with an unlabeled scorer and no references calibrates itself: both
under an assumption the sentence states. ``set_thresholds`` overrides either threshold or the rate.

**Save/load.** :meth:`Detector.save` / :func:`vlad.detector.persistence.load_detector`: JSON and
safetensors only, every file's sha256 checked on load.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlad.detector.calibration import (
    Calibration,
    ThresholdInfo,
    check_rate,
    conformal_threshold,
    evenly,
    pool_threshold,
    held_out_indices,
    references_for_rate,
)
from vlad.detector.fusion import (
    FUSION_RULES,
    MIN_CALIBRATION,
    NORMALISATION_METHODS,
    Normaliser,
    calibrate_units,
    calibrate_working,
    fit_reference_normaliser,
    fuse_results,
    fuse_working,
    prior_normaliser,
    tier_weights,
)
from vlad.detector.views import DEFAULT_VIEWS, reference_views

#: fewest images one predict call must hold to calibrate itself (unlabeled tier, no references, no pool)
BATCH_CALIBRATION_MIN = 10
from vlad.detector.spec import SHARED_OPTIONS, build_scorers, did_you_mean, parse_spec
from vlad import errors
from vlad.errors import EmptyReferenceSetError, InvalidParameterError, VladError
from vlad.images import LoadedImage, as_image_list, load_images, load_readable
from vlad.paramspec import Choice, Int, MappingOf, Number, Spec, check_values
from vlad.precision import check_precision_value
from vlad.registry import parameter_names
from vlad.scorers.base import check_finite, check_z_threshold, reference_index
from vlad.ops import resize_maps, shared_device_copies
from vlad.progress import track
from vlad.types import AnomalyResult, ImagesLike, WorkingResult

logger = logging.getLogger(__name__)

#: detector options and their defaults (everything else is routed to the scorers)
DETECTOR_DEFAULTS: dict[str, Any] = {
    "fusion": "mean",
    "k0": 2.0,
    "fusion_weights": None,
    "normalisation": "robust",
    "z0": 3.0,
    "temperature": 1.0,
    "pixel_quantile": 0.999,
    "false_alarm_rate": 0.05,
    "u0": 10.0,
    "pool_defect_rate": 0.05,
    "calibration_refs": None,
    "calibration_split": 0.25,
    "reference_views": DEFAULT_VIEWS,
    "prior_image_threshold": 0.5,
    "prior_pixel_threshold": 0.5,
    "image_threshold": None,
    "pixel_threshold": None,
}

#: what each detector option accepts (:mod:`vlad.paramspec`), checked at construction (:class:`Detector`,
#: :func:`create_detector`) and when a saved detector loads (:func:`check_options`, naming the file)
OPTION_SPECS: dict[str, Spec] = {
    "fusion": Choice(*FUSION_RULES),
    "k0": Number(0, 1e6, lo_open=True).explain("references at which the few-shot tier weighs half"),
    "fusion_weights": MappingOf(Number(0, 1e6), none=True, what="a dict").explain(
        "scorer name -> relative weight within its tier, default 1 each"),
    "normalisation": Choice(*NORMALISATION_METHODS),
    "z0": Number(0, 1e6, lo_open=True),
    "temperature": Number(0, 1e6, lo_open=True),
    "pixel_quantile": Number(0, 1),
    "false_alarm_rate": Number(0, 1, lo_open=True, hi_open=True).explain("e.g. 0.05 for 5% of good parts flagged"),
    "u0": Number(0, 1e6, lo_open=True).explain("unlabeled images at which the unlabeled tier weighs half"),
    "pool_defect_rate": Number(0, 1, hi_open=True),
    "calibration_refs": Int(MIN_CALIBRATION, 10_000_000, none=True).explain("None = all references"),
    "calibration_split": Number(0, 1, lo_open=True, hi_open=True),
    "reference_views": Int(0, 64).explain("0 = priors at one reference, else at least 2 views"),
    "prior_image_threshold": Number(0, 1),
    "prior_pixel_threshold": Number(0, 1),
    "image_threshold": Number(none=True).explain("None = from the references or the prior"),
    "pixel_threshold": Number(none=True).explain("None = from the references or the prior"),
}


def check_options(options: Mapping[str, Any], where: str | None = None) -> None:
    """Check detector option values against :data:`OPTION_SPECS`; ``where``: the saved file they came from.

    Raises:
        InvalidParameterError: names the option, the accepted values and the value (and ``where``).
    """
    check_values("detector", OPTION_SPECS, options, where)


#: what :meth:`Detector.predict` does with an input it cannot read
ON_ERROR = ("raise", "skip")


def _check_on_error(on_error: Any) -> None:
    if not isinstance(on_error, str) or on_error not in ON_ERROR:
        raise InvalidParameterError(f"on_error must be 'raise' (an unreadable image stops the call) or 'skip' "
                                    f"(score the others, list it in result.failures), got {on_error!r}")


def _read(images: ImagesLike, on_error: str) -> tuple[list[LoadedImage], tuple]:
    """The readable images and the failures (with ``on_error="skip"``; else the first one raises)."""
    return load_readable(images) if on_error == "skip" else (load_images(images), ())


@dataclass(frozen=True)
class BootstrapReport:
    """Which unlabeled pool images :meth:`Detector.bootstrap_references` picked, and why.

    Attributes:
        picked: pool positions of the picks, most normal first.
        names: names of all pool images, by position.
        scores: the unlabeled-tier score of every pool image (lower = more like the rest of the pool).
        rule: the rule, in words.
    """

    picked: list[int]
    names: list[str]
    scores: list[float]
    rule: str

    def describe(self) -> str:
        """A few lines for a person who may veto a pick (``Detector.remove_reference(name)``)."""
        order = sorted(range(len(self.scores)), key=lambda i: self.scores[i])
        rank = {i: r for r, i in enumerate(order)}
        lines = [f"picked {self.rule}:"]
        for i in self.picked:
            lines.append(f"  #{i} {self.names[i]}: score {self.scores[i]:.4g} (rank {rank[i] + 1} of {len(order)})")
        worst = order[-1]
        lines.append(f"  (pool median {float(np.median(self.scores)):.4g}; highest #{worst} {self.names[worst]} "
                     f"{self.scores[worst]:.4g}); veto a pick with remove_reference(name)")
        return "\n".join(lines)


def create_detector(spec: str | Sequence[str] | None = None, **options: Any) -> Detector:
    """Build a :class:`Detector` from a spec (options routed as in :mod:`vlad.detector.spec`).

    Args:
        spec: ``"winclip+maeday+anomalydino"``-style names (one name is a one-scorer detector); None
            for the default.
        **options: detector options (:data:`DETECTOR_DEFAULTS`, e.g. ``false_alarm_rate=0.01``),
            ``scorer_options`` (name -> params), and shared scorer parameters (``object_name``,
            ``weights``, ``device``, ...).

    Raises:
        VladError: an option no scorer and not the detector accepts, or bad ``scorer_options``.
    """
    names = parse_spec(spec)
    scorer_options = options.pop("scorer_options", None)
    det_opts = {k: options.pop(k) for k in list(options) if k in DETECTOR_DEFAULTS}
    scorers = build_scorers(names, options, scorer_options, detector_options=DETECTOR_DEFAULTS)
    return Detector(scorers, **det_opts)


class Detector:
    """Several scorers, calibrated and fused into one image score and one map per image.

    Args:
        scorers: name -> unfitted scorer (as built by :func:`create_detector`).
        **options: see :data:`DETECTOR_DEFAULTS` and the module docstring.
    """

    def __init__(self, scorers: Mapping[str, Any], **options: Any) -> None:
        if not scorers:
            raise VladError("a detector needs at least one scorer")
        unknown = sorted(set(options) - set(DETECTOR_DEFAULTS))
        if unknown:
            hints = "".join(did_you_mean(k, DETECTOR_DEFAULTS) for k in unknown)
            raise InvalidParameterError(f"unknown detector option(s) {unknown}{hints}; known: {sorted(DETECTOR_DEFAULTS)}")
        self.scorers = dict(scorers)
        self.options = {**DETECTOR_DEFAULTS, **options}
        self._check_options()
        self.tiers = {n: type(s).tier for n, s in self.scorers.items()}
        self.references_: list[LoadedImage] = []
        self.unlabeled_: list[LoadedImage] = []
        self._bootstrapped: set[int] = set()  # id() of references picked from the pool
        self.active_: dict[str, bool] = {n: False for n in self.scorers}
        self.fitted_ = False
        self._image_override = self.options["image_threshold"]
        self._pixel_override = self.options["pixel_threshold"]
        self._calibration: Calibration | None = None
        #: (the calibration in force, the one the last predict call made from its own batch), see
        #: :meth:`_batch_calibration`; threshold_info() reports the latter while the former holds
        self._batch_cal: tuple[Calibration, Calibration] | None = None

    def _check_options(self) -> None:
        o = self.options
        check_options(o)
        if o["reference_views"] == 1:
            raise InvalidParameterError("detector: reference_views must be 0 (priors at one reference) or an "
                                        f"integer in [{MIN_CALIBRATION}, 64], got 1")
        for name, scorer in self.scorers.items():  # a scorer option, checked here to fail before any fit
            if "precision" in parameter_names(type(scorer)):
                check_precision_value(scorer.precision, f"precision (of scorer {name!r})")
        fw = o["fusion_weights"]
        if fw is not None:
            if not isinstance(fw, Mapping) or set(fw) - set(self.scorers):
                raise InvalidParameterError(f"fusion_weights must map names of this detector's scorers "
                                            f"({list(self.scorers)}) to weights >= 0, got {fw!r}")

    @property
    def requires_references(self) -> bool:
        """True when every scorer needs reference images (no zero-shot tier)."""
        return all(t == "few" for t in self.tiers.values())

    @property
    def batch_size(self) -> int:
        """The largest batch size of the scorers (how many images to hand ``predict`` at once)."""
        return max(int(getattr(s, "batch_size", 8) or 8) for s in self.scorers.values())

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        """Detector options plus every scorer parameter (first scorer's value), shared options included:
        the keys :func:`create_detector` accepts for this spec."""
        params: dict[str, Any] = {k: None for k in SHARED_OPTIONS}
        for scorer in self.scorers.values():
            for k, v in scorer.get_params(deep=False).items():
                if params.get(k) is None:
                    params[k] = v
        params.update(self.options)
        return params

    def __repr__(self) -> str:
        active = [n for n, a in self.active_.items() if a]
        return (f"Detector({'+'.join(self.scorers)}, fusion={self.options['fusion']!r}, "
                f"references={len(self.references_)}, active={active})")

    # -- fitting ---------------------------------------------------------------------------
    def _trained_on_references(self, name: str) -> bool:
        """Few-tier scorers that are not incremental learn from (and so score too well) their references."""
        return self.tiers[name] == "few" and not type(self.scorers[name]).incremental

    def _held_out(self) -> list[int]:
        if not any(self._trained_on_references(n) for n in self.scorers):
            return []
        return held_out_indices(len(self.references_), float(self.options["calibration_split"]))

    def _training_references(self) -> list[LoadedImage]:
        held = set(self._held_out())
        return [r for i, r in enumerate(self.references_) if i not in held]

    def fit(self, references: ImagesLike | None = None) -> Detector:
        """Fit every scorer that can run: zero-shot ones always, few-shot ones when there are references.

        Raises:
            EmptyReferenceSetError: no references and every scorer needs some.
            InvalidImageError: a reference is unreadable (the message names it).
        """
        refs = [] if references is None else load_images(references)
        if not refs and self.requires_references:
            raise EmptyReferenceSetError(
                f"every scorer of this detector ({'+'.join(self.scorers)}) needs reference images: pass "
                "good images to fit(), or add a zero-shot scorer (winclip, maeday) to the spec"
            )
        self.references_ = list(refs)
        self.unlabeled_ = []
        self._bootstrapped = set()
        self.fitted_ = False
        for name, scorer in self.scorers.items():
            if self.tiers[name] == "few" and not refs:
                self.active_[name] = False
            elif type(scorer).incremental:
                scorer.fit(refs or None)
                self.active_[name] = True
            elif self.tiers[name] == "few":
                scorer.fit(self._training_references())
                self.active_[name] = True
            else:
                scorer.fit(None)
                self.active_[name] = True
        self.fitted_ = True
        self._calibration = None
        return self

    def add_references(self, images: ImagesLike) -> Detector:
        """Add good images: incremental scorers grow their memory, few-shot scorers join or refit."""
        self._check_fitted()
        new = load_images(images)
        if not new:
            return self
        self.references_.extend(new)
        for name, scorer in self.scorers.items():
            if type(scorer).incremental and self.active_[name]:
                scorer.add_references(new)
            elif type(scorer).incremental and self.tiers[name] == "few":
                scorer.fit(list(self.references_))  # joins now
                self.active_[name] = True
            elif self.tiers[name] == "few":
                scorer.fit(self._training_references())  # joins now, or refits (no incremental memory)
                self.active_[name] = True
        self._calibration = None
        return self

    def list_references(self) -> list[str]:
        """Names of the references, in the order they were added."""
        return [r.name for r in self.references_]

    def remove_reference(self, which: int | str) -> Detector:
        """Forget one reference (index or name) in every scorer; few-shot scorers with none left go idle.

        Raises:
            InvalidParameterError: no such reference, or ``which`` is neither an int nor a str.
        """
        self._check_fitted()
        which = reference_index(self.list_references(), which)
        self._bootstrapped.discard(id(self.references_[which]))
        del self.references_[which]
        for name, scorer in self.scorers.items():
            if not self.active_[name]:
                continue
            if self.tiers[name] == "few" and not self.references_:
                self.active_[name] = False
            elif type(scorer).incremental:
                scorer.remove_reference(which)
            elif self.tiers[name] == "few":
                scorer.fit(self._training_references())
        if not any(self.active_.values()):
            self.fitted_ = False
        self._calibration = None
        return self

    def recalibrate(self) -> Detector:
        """Forget the normalisers and derived thresholds; they are recomputed at the next use. Call it
        after changing a scorer in place (e.g. edited WinCLIP prompts)."""
        self._calibration = None
        return self

    def check_references(self, z_threshold: float = 3.5) -> dict[str, list[str]]:
        """Suspicious references per incremental scorer (``FewShotMixin.check_references``: a robust
        z-score of the leave-one-out score above ``z_threshold``; needs >= 3 references). Remove a
        flagged one with :meth:`remove_reference`. A scorer that cannot check its references (one that
        scores tiles) is left out of the answer, with a warning that says so."""
        check_z_threshold(z_threshold)
        self._check_fitted()
        out = {}
        for name, scorer in self.scorers.items():
            if self.active_[name] and type(scorer).incremental:
                try:
                    out[name] = scorer.check_references(z_threshold)
                except errors.UnsupportedOperationError as exc:
                    logger.warning("%s: its references were not checked: %s", name, exc)
        return out

    # -- the unlabeled tier ----------------------------------------------------------------
    def _unlabeled_scorers(self) -> list[str]:
        return [n for n, t in self.tiers.items() if t == "unlabeled"]

    def add_unlabeled(self, images: ImagesLike) -> Detector:
        """Add unlabeled images of the line (nearly all normal, none checked) to the unlabeled tier's
        pool: the unlabeled scorers (MuSc) then score new images against it, it can seed references
        (:meth:`bootstrap_references`) and, with fewer than 2 known-good references, set the thresholds
        under a stated assumption (``pool_defect_rate``). The pool keeps the newest ``pool_size`` images
        of the scorer (first in, first out).

        Raises:
            VladError: no unlabeled-tier scorer in the spec (add ``musc``).
            InvalidImageError: an unreadable image (named).
        """
        self._check_fitted()
        names = self._unlabeled_scorers()
        if not names:
            raise VladError(f"this detector ({'+'.join(self.scorers)}) has no unlabeled-tier scorer to use "
                            "unlabeled images; add one to the spec, e.g. create_detector('musc+anomalydino')")
        new = load_images(images)
        if not new:
            return self
        for name in names:
            self.scorers[name].add_unlabeled(new)
            self.active_[name] = True
        self.unlabeled_.extend(new)
        cap = min(int(self.scorers[n].pool_size) for n in names)
        if len(self.unlabeled_) > cap:
            del self.unlabeled_[: len(self.unlabeled_) - cap]
        self._calibration = None
        return self

    @property
    def batch_scoring(self) -> bool:
        """True when an active scorer scores each ``predict`` call's images against each other (an
        unlabeled-tier scorer without a pool): hand it all images in one call (the paper's setting), not
        in small batches, and never one image alone."""
        return any(self.active_[n] for n in self._unlabeled_scorers()) and self._n_pool() == 0

    def _n_pool(self) -> int:
        """Images in the unlabeled scorers' pool (kept by the scorers, so also after loading a detector)."""
        sizes = [len(self.scorers[n].list_unlabeled()) for n in self._unlabeled_scorers() if self.active_[n]]
        return max(sizes, default=0)

    def list_unlabeled(self) -> list[str]:
        """Names of the unlabeled pool's images, oldest first."""
        return [img.name for img in self.unlabeled_]

    def pool_scores(self) -> np.ndarray:
        """The unlabeled tier's score of each pool image, scored against the rest of the pool, ``(u,)``:
        the scorer's raw score (with several unlabeled scorers, the mean of their ranks in [0, 1]);
        higher = less like the rest of the pool.

        Raises:
            VladError: no unlabeled scorer, or fewer than 2 pool images.
        """
        self._check_fitted()
        names = self._unlabeled_scorers()
        if not names or self._n_pool() < 2:
            raise VladError(f"scoring the pool needs an unlabeled-tier scorer (musc) and at least 2 pool images; "
                            f"have {self._n_pool()}: add images with add_unlabeled(...)")
        per = [np.asarray(self.scorers[n].pool_scores(), dtype=np.float64) for n in names]
        if len(per) == 1:
            return per[0]
        ranks = [np.argsort(np.argsort(p, kind="stable"), kind="stable") / max(1, len(p) - 1) for p in per]
        return np.mean(ranks, axis=0)  # several scorers: mean rank (their scales differ)

    def bootstrap_references(self, n: int = 4, add: bool = True) -> BootstrapReport:
        """Pick the ``n`` pool images judged most normal (lowest unlabeled-tier score against the rest
        of the pool) as pseudo-references for the few-shot tier.

        Returns the picks and every pool image's score so a person can veto a pick
        (``remove_reference(name)``). Picked references never calibrate the thresholds (they are the
        pool's most normal-looking images: thresholds from them would be too low).

        Args:
            n: how many to pick (at most the pool size minus one).
            add: add them as references now (``False``: only report).

        Raises:
            VladError: no unlabeled scorer or too small a pool; ``n`` not a positive integer.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InvalidParameterError(f"n must be a positive integer (how many references to pick), got {n!r}")
        scores = self.pool_scores()
        if len(self.unlabeled_) != len(scores):
            raise VladError("the unlabeled pool's images are not kept when a detector is saved (its features "
                            "are); add the images again with add_unlabeled(...) to pick references from them")
        if n >= len(scores):
            raise InvalidParameterError(f"cannot pick {n} references from a pool of {len(scores)}: pick fewer, or "
                                        "add more unlabeled images")
        order = np.argsort(scores, kind="stable")
        picked = [int(i) for i in order[:n]]
        report = BootstrapReport(
            picked=picked, names=self.list_unlabeled(), scores=[float(x) for x in scores],
            rule=(f"the {n} of {len(scores)} unlabeled images with the lowest unlabeled-tier score (each scored "
                  "against the rest of the pool: the most like the others)"),
        )
        if add:
            chosen = [self.unlabeled_[i] for i in picked]
            self._bootstrapped.update(id(img) for img in chosen)
            self.add_references(chosen)
        return report

    def _pool_calibration_images(self) -> list[int]:
        """Pool images that can calibrate: all but those picked as references."""
        if not self._unlabeled_scorers():
            return []
        return [j for j, img in enumerate(self.unlabeled_) if id(img) not in self._bootstrapped]

    def _pool_results(self, name: str, idx: list[int]) -> AnomalyResult:
        """Pool images ``idx`` scored by scorer ``name`` as new images would be: against the rest of the
        pool (unlabeled scorers), else as they are (none of them is a reference)."""
        scorer = self.scorers[name]
        images = [self.unlabeled_[j] for j in idx]
        if self.tiers[name] == "unlabeled":
            full = scorer.pool_anomaly_result(self.unlabeled_)
            maps = full.map_list()
            return AnomalyResult(full.image_scores[idx], [maps[j] for j in idx],
                                 names=tuple(img.name for img in images))
        return scorer.predict(images)

    def _fit_normalisers(self, results: Mapping[str, AnomalyResult]) -> dict[str, Normaliser]:
        """One normaliser per calibration unit (scorer, or scorer/part) from its results on normal images."""
        o = self.options
        normalisers: dict[str, Normaliser] = {}
        for name, result in results.items():
            for unit, r in self._units(name, result).items():
                normalisers[unit] = fit_reference_normaliser(
                    r.image_scores, r.map_list(), method=o["normalisation"], z0_image=o["z0"],
                    pixel_quantile=o["pixel_quantile"], z0_pixel=o["z0"], temperature=o["temperature"],
                )
        return normalisers

    def _pool_calibration(self, active: list[str], held: list[int]) -> Calibration:
        """Normalisers and thresholds from the unlabeled pool, under the ``pool_defect_rate`` assumption."""
        idx = self._pool_calibration_images()
        results = {name: self._pool_results(name, idx) for name in active}
        return self._calibration_from(results, rule="pool-assumption", path="unlabeled-pool", held_out=held,
                                      n_pool=len(idx))

    # -- thresholds ------------------------------------------------------------------------
    def set_thresholds(
        self, image: float | str | None = None, pixel: float | str | None = None,
        false_alarm_rate: float | None = None,
    ) -> Detector:
        """Override the image and/or pixel threshold (calibrated scale); ``"auto"`` returns to the derived
        one, None leaves it as it is. ``false_alarm_rate`` restates the rate the derived thresholds keep.

        Raises:
            InvalidParameterError: a threshold that is not a finite number or ``"auto"``, or a rate
                outside (0, 1).
        """
        if false_alarm_rate is not None:
            self.options["false_alarm_rate"] = check_rate(false_alarm_rate)
            if self._calibration is not None:  # same references: only the order statistic changes
                self._set_thresholds_from_references(self._calibration)
        for key, value in (("image", image), ("pixel", pixel)):
            if value is None:
                continue
            if isinstance(value, str) and value == "auto":
                value = None
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidParameterError(f"{key} threshold must be a finite number or 'auto', got {value!r}")
            else:
                value = float(value)
            setattr(self, f"_{key}_override", value)
        return self

    @property
    def image_threshold(self) -> float:
        """The image threshold in use: the override, else derived from the references (or the prior)."""
        if self._image_override is not None:
            return self._image_override
        return self._in_force().image_threshold

    @property
    def pixel_threshold(self) -> float:
        """The pixel threshold in use: the override, else derived from the references (or the prior)."""
        if self._pixel_override is not None:
            return self._pixel_override
        return self._in_force().pixel_threshold

    def threshold_info(self) -> ThresholdInfo:
        """What the thresholds in force promise (rule, guaranteed rate, references needed) and a plain
        sentence for it (``.describe()``)."""
        cal = self._in_force()
        alpha = float(self.options["false_alarm_rate"])
        n = len(self.references_)
        need = references_for_rate(alpha)
        if any(self._trained_on_references(s) and self.active_[s] for s in self.scorers):
            split, total = float(self.options["calibration_split"]), n
            while len(held_out_indices(total, split)) < need:
                total += 1
            more = total - n
        elif cal.rule in ("pool-assumption", "views-assumption"):
            more = need - sum(id(r) not in self._bootstrapped for r in self.references_)
        else:
            more = need - (len(cal.reference_scores) if cal.rule != "prior" else n)
        overridden = self._image_override is not None or self._pixel_override is not None
        return ThresholdInfo(
            rule="override" if overridden else cal.rule,
            path=cal.path,
            false_alarm_rate=alpha,
            guaranteed_rate=None if overridden else cal.guaranteed_rate,
            n_references=n,
            n_calibration=len(cal.reference_scores),
            references_needed=max(0, more),
            image_threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            n_pool=cal.n_pool,
            pool_defect_rate=float(self.options["pool_defect_rate"]) if cal.rule == "pool-assumption" else None,
        )

    @property
    def normalisers(self) -> dict[str, Normaliser]:
        """Calibration unit (scorer name, or ``name/part``) -> its current normaliser."""
        return dict(self._calibrated().normalisers)

    @property
    def fusion_weights(self) -> dict[str, float]:
        """Active scorer name -> its fusion weight (tier weights for the current number of references)."""
        return self._weights()

    def reference_scores(self) -> np.ndarray:
        """Fused image scores of the calibration references, each scored as a new image ``(n,)``
        (empty below 2 references)."""
        return np.asarray(self._calibrated().reference_scores, dtype=np.float32)

    # -- predicting ------------------------------------------------------------------------
    def predict(self, images: ImagesLike, on_error: str = "raise") -> AnomalyResult:
        """Score ``images``: fused scores ``(B,)``, maps at each image's size, labels and masks from the
        thresholds, and ``components`` (name -> that scorer's calibrated result).

        Scorers' maps are calibrated and fused at the working resolution (:mod:`vlad.tiling`: the
        image's own size up to 2048 x 2048 pixels) and only the fused map is brought to the image's
        size, so the ``components`` of a larger image hold maps at the working resolution. With
        ``tile_size`` set (an option of every scorer, e.g. ``create_detector(tile_size=448)``), large
        images are scored tile by tile.

        Args:
            images: paths, PIL images, arrays or tensors (see :mod:`vlad.images`).
            on_error: what an input that cannot be read does (a corrupt, truncated, empty or missing
                file, a file this user may not read, a wrongly shaped array). ``"raise"`` (default): it
                raises and nothing is scored. ``"skip"``: every readable input is scored, and each
                unreadable one is listed in the result's ``failures`` (an
                :class:`~vlad.types.ImageFailure`: its position among ``images``, its name and the
                error's message); the result's scores, maps, labels and masks then hold the readable
                images only, in input order (``B`` of them, perhaps none). Only reading is covered: an
                error while scoring raises either way.

        Many images are scored in chunks of whole scorer batches (the same batches, so the same
        result), with a progress bar; the next chunk's files are read in a background thread while
        the current one is scored, so the device does not wait for image decoding, and only one or two
        chunks of decoded images are held at once.

        Raises:
            NotFittedError: ``fit`` was not called.
            InvalidImageError: an input is unreadable (named), with ``on_error="raise"``; no input at all.
            InvalidParameterError: ``on_error`` is neither ``"raise"`` nor ``"skip"``.
            NonFiniteScoreError: a scorer produced NaN or infinity (named); never labelled normal.
        """
        items = as_image_list(images)
        chunk = self._chunk_size()
        if chunk is None or len(items) <= chunk:
            return self._predict_working(items, on_error)[0]
        self._check_fitted()
        _check_on_error(on_error)
        parts = [items[i : i + chunk] for i in range(0, len(items), chunk)]
        results = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlad-read") as reader:
            pending = reader.submit(_read, parts[0], on_error)
            for k in track(range(len(parts)), f"scoring {len(items)} images", total=len(parts)):
                loaded, failures = pending.result()
                if k + 1 < len(parts):
                    pending = reader.submit(_read, parts[k + 1], on_error)
                results.append(self._predict_loaded(loaded, failures)[0])
                del loaded
        return AnomalyResult.concatenate(results)

    def _chunk_size(self) -> int | None:
        """Images per chunk of a long :meth:`predict` call: a whole number of every active scorer's
        batches (their least common multiple, at least 32 images), or None where the images of a call
        must be scored together (an unlabeled-tier scorer without a pool)."""
        if self.batch_scoring:
            return None
        step = 1
        for name, scorer in self.scorers.items():
            if self.active_[name]:
                step = math.lcm(step, max(1, int(getattr(scorer, "batch_size", 8) or 8)))
        return step * max(1, -(-32 // step)) if step <= 256 else None

    def predict_with_raw(
        self, images: ImagesLike, on_error: str = "raise"
    ) -> tuple[AnomalyResult, dict[str, AnomalyResult]]:
        """:meth:`predict` plus each active scorer's raw (uncalibrated) result, from the same pass: for
        evaluations that rank by a scorer's own scores while judging the detector's decisions. Raw
        maps are at the working resolution (the image's own up to 2048 x 2048 pixels)."""
        fused, raw = self._predict_working(images, on_error)
        return fused, {n: r.to_result() for n, r in raw.items()}

    def _predict_working(
        self, images: ImagesLike, on_error: str = "raise"
    ) -> tuple[AnomalyResult, dict[str, WorkingResult]]:
        """The fused result (maps at the images' sizes, thresholds applied, ``failures`` listed) and each
        active scorer's raw result as computed (on its device). Calibration and fusion run where the maps
        are, in float32; maps come to the host once, at the end."""
        self._check_fitted()
        _check_on_error(on_error)
        return self._predict_loaded(*_read(images, on_error))

    def _predict_loaded(
        self, loaded: list[LoadedImage], failures: tuple = ()
    ) -> tuple[AnomalyResult, dict[str, WorkingResult]]:
        """:meth:`_predict_working` on images already read (``failures``: the unreadable ones, listed)."""
        if not loaded:  # every input failed: an empty result that lists them
            empty = AnomalyResult(np.zeros(0, np.float32), [], names=(), failures=failures)
            return empty.with_thresholds(self.image_threshold, self.pixel_threshold), {}
        cal = self._calibrated()
        raw = self._raw_predict(loaded)
        if cal.rule == "prior" and self.batch_scoring and len(loaded) >= BATCH_CALIBRATION_MIN:
            base, cal = cal, self._batch_calibration(raw)
            self._batch_cal = (base, cal)
        else:
            self._batch_cal = None
        comps = {name: self._apply_working(cal, name, r) for name, r in raw.items()}
        fused = fuse_working(comps, self._weights(), self.options["fusion"])
        sizes = [img.size for img in loaded]
        del loaded  # images read from files are freed before the full-size maps are made
        # to each image's size once, at the very end, where the maps are (a host-side scorer's arrays too)
        fused.maps = [resize_maps(torch.as_tensor(m)[None], size)[0] for m, size in zip(fused.maps, sizes, strict=True)]
        out = replace(fused.to_result(), failures=failures)
        check_finite(out, "the fused detector")
        image_t = cal.image_threshold if self._image_override is None else self._image_override
        pixel_t = cal.pixel_threshold if self._pixel_override is None else self._pixel_override
        return out.with_thresholds(image_t, pixel_t), raw

    def _raw_predict(self, loaded: list[LoadedImage]) -> dict[str, WorkingResult]:
        with shared_device_copies():  # each image goes to a GPU once, for all the scorers
            raw = {n: s._predict_working(loaded) for n, s in self.scorers.items() if self.active_[n]}
        for name, r in raw.items():
            r.check_finite(name)
        return raw

    def _weights(self) -> dict[str, float]:
        tiers = {n: t for n, t in self.tiers.items() if self.active_[n]}
        return tier_weights(tiers, len(self.references_), self.options["k0"], self.options["fusion_weights"],
                            n_unlabeled=self._n_pool() or None, u0=self.options["u0"])

    def _check_fitted(self) -> None:
        if not self.fitted_:
            raise errors.NotFittedError("this Detector is not fitted yet; call fit() (optionally with good images) first")

    # -- calibration -----------------------------------------------------------------------
    def _units(self, name: str, raw: AnomalyResult | WorkingResult) -> dict[str, Any]:
        """Calibration units of one scorer's raw result: unit -> result of the same type. A scorer whose
        result carries its declared parts is calibrated part by part; otherwise as a whole."""
        held = raw.components if isinstance(raw, AnomalyResult) else raw.parts
        parts = {p: held[p] for p in type(self.scorers[name]).part_scales if p in held}
        return {f"{name}/{p}": r for p, r in parts.items()} if parts else {name: raw}

    def _apply(self, cal: Calibration, name: str, raw: AnomalyResult) -> AnomalyResult:
        """One scorer's calibrated result: its units calibrated and averaged (parts kept as components)."""
        return calibrate_units(self._units(name, raw), cal.normalisers, raw.names)

    def _apply_working(self, cal: Calibration, name: str, raw: WorkingResult) -> WorkingResult:
        """:meth:`_apply` on a :class:`~vlad.types.WorkingResult`, kept where it is."""
        return calibrate_working(self._units(name, raw), cal.normalisers, raw.names)

    def _in_force(self) -> Calibration:
        """The calibration the last result was labelled with: the one a batch made of itself in the last
        call (:meth:`_batch_calibration`) while nothing changed since, else the detector's."""
        cal = self._calibrated()
        if self._batch_cal is not None and self._batch_cal[0] is cal:
            return self._batch_cal[1]
        return cal

    def _calibrated(self) -> Calibration:
        self._check_fitted()
        if self._calibration is None:
            self._calibration = self._calibrate()
        return self._calibration

    def _calibrate(self) -> Calibration:
        o = self.options
        n = len(self.references_)
        held = self._held_out()
        trained = any(self._trained_on_references(s) and self.active_[s] for s in self.scorers)
        candidates = held if trained else list(range(n))
        candidates = [i for i in candidates if id(self.references_[i]) not in self._bootstrapped]
        idx = evenly(candidates, o["calibration_refs"]) if n >= MIN_CALIBRATION else []
        active = [s for s in self.scorers if self.active_[s]]
        if len(idx) < MIN_CALIBRATION:
            if len(self._pool_calibration_images()) >= MIN_CALIBRATION:
                return self._pool_calibration(active, held)
            real = [r for r in self.references_ if id(r) not in self._bootstrapped]
            if len(real) == 1 and o["reference_views"] >= MIN_CALIBRATION:
                return self._views_calibration(active, held, real[0])
            return self._prior_calibration(active, held)
        results = {name: self._reference_results(name, idx) for name in active}
        path = ("held-out" if trained else
                "leave-one-out" if any(type(self.scorers[s]).incremental for s in active) else "exchangeable")
        return self._calibration_from(results, rule="conformal", path=path, held_out=held)

    def _views_calibration(self, active: list[str], held: list[int], reference: LoadedImage) -> Calibration:
        """One reference: its jittered views (:mod:`vlad.detector.views`), each scored as a new image,
        stand in for other good parts under the rule ``"views-assumption"``."""
        o = self.options
        views = reference_views(reference, int(o["reference_views"]), seed=0)
        with torch.inference_mode():
            results = {name: self.scorers[name].predict_working(views) for name in active}
        return self._calibration_from(results, rule="views-assumption", path="reference-views", held_out=held)

    def _batch_calibration(self, raw: Mapping[str, WorkingResult]) -> Calibration:
        """No known-good image and no pool, but a batch scored together by the unlabeled tier: the batch
        calibrates itself under the pool assumption (each image was scored as a new one: the unlabeled
        scorers against the rest of the batch, the zero-shot ones as they are). For this call only."""
        results = {name: r.to_result() for name, r in raw.items()}
        n_pool = len(next(iter(results.values())).image_scores)
        return self._calibration_from(results, rule="pool-assumption", path="this-batch", n_pool=n_pool)

    def _calibration_from(self, results: Mapping[str, AnomalyResult], **fields: Any) -> Calibration:
        """Normalisers fitted on ``results`` (normal images, each scored as a new image would be), their
        fused scores and map maxima, and the thresholds of ``fields["rule"]`` from them."""
        cal = Calibration(self._fit_normalisers(results), 0.0, 0.0, n_references=len(self.references_), **fields)
        fused = fuse_results({nm: self._apply(cal, nm, r) for nm, r in results.items()}, self._weights(),
                             self.options["fusion"])
        cal.reference_scores = fused.image_scores.astype(np.float64).tolist()
        cal.reference_map_maxima = [float(m.max()) for m in fused.map_list()]
        self._set_thresholds_from_references(cal)
        return cal

    def _set_thresholds_from_references(self, cal: Calibration) -> None:
        """The conformal thresholds of ``cal``'s calibration scores for the stated rate (priors untouched;
        pool calibrations under the stated pool assumption)."""
        if cal.rule == "prior":
            return
        alpha = float(self.options["false_alarm_rate"])
        if cal.rule == "pool-assumption":
            rate = float(self.options["pool_defect_rate"])
            cal.image_threshold, cal.rule, cal.guaranteed_rate = pool_threshold(cal.reference_scores, alpha, rate)
            cal.pixel_threshold, _, _ = pool_threshold(cal.reference_map_maxima, alpha, rate)
            return
        if cal.rule == "views-assumption":  # the conformal order statistic of the views; no guarantee
            cal.image_threshold, _, cal.guaranteed_rate = conformal_threshold(cal.reference_scores, alpha)
            cal.pixel_threshold, _, _ = conformal_threshold(cal.reference_map_maxima, alpha)
            return
        cal.image_threshold, cal.rule, cal.guaranteed_rate = conformal_threshold(cal.reference_scores, alpha)
        cal.pixel_threshold, _, _ = conformal_threshold(cal.reference_map_maxima, alpha)

    def _unit_scales(self, name: str) -> dict[str, str]:
        """Calibration unit -> declared scale of scorer ``name`` as it stands: its parts once an
        incremental scorer with ``part_scales`` holds references (WinCLIP+), else the whole scorer."""
        cls = type(self.scorers[name])
        if cls.part_scales and cls.incremental and self.references_:
            return {f"{name}/{part}": scale for part, scale in cls.part_scales.items()}
        return {name: cls.output_scale}

    def _prior_calibration(self, active: list[str], held: list[int]) -> Calibration:
        """Too few references to calibrate on: each unit's explicit prior, the prior thresholds."""
        normalisers = {unit: prior_normaliser(scale) for name in active
                       for unit, scale in self._unit_scales(name).items()}
        o = self.options
        return Calibration(normalisers, float(o["prior_image_threshold"]), float(o["prior_pixel_threshold"]),
                           rule="prior", path="none", held_out=held, n_references=len(self.references_))

    def _reference_results(self, name: str, idx: list[int]) -> AnomalyResult:
        """The references ``idx`` scored by scorer ``name`` as new images would be: against a memory
        without each (incremental scorers), or as they are (zero-shot scorers, and scorers trained
        without these held-out references)."""
        scorer = self.scorers[name]
        refs = self.references_
        if not type(scorer).incremental:
            return scorer.predict_working([refs[i] for i in idx])
        held = scorer.list_references()
        if len(held) != len(refs):
            raise VladError(f"{name} holds {len(held)} references but the detector {len(refs)}; refit the detector")
        with torch.inference_mode():
            return AnomalyResult.concatenate([scorer.without_reference(i).predict_working([refs[i]]) for i in idx])

    # -- save / load -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the detector to the folder ``path`` (see :mod:`vlad.detector.persistence`)."""
        from vlad.detector.persistence import save_detector

        return save_detector(self, path)

    def export(self, path: str | Path, format: str = "onnx", image_size: tuple[int, int] | None = None) -> Path:
        """Export the active scorers, calibration, fusion and thresholds for :mod:`vlad.runtime` (see
        :func:`vlad.export.export_detector`; ``image_size`` ``(H, W)`` fixes the aspect of AnomalyDINO's
        graph, default the first reference's)."""
        from vlad.export import export_detector

        return export_detector(self, path, format=format, image_size=image_size)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, precision: str | None = None) -> Detector:
        """Load a detector saved with :meth:`save`; checked, never executes code from the files. ``device``:
        where it runs (None: where it was saved when this machine has that device, else the CPU, with a
        logged warning); ``precision`` (None: as saved) replaces the saved one in every scorer."""
        from vlad.detector.persistence import load_detector

        return load_detector(path, device=device, precision=precision)
