"""The tiered detector: zero-shot scorers from the first image, few-shot scorers as good images arrive.

>>> det = vlad.create_detector(object_name="metal plate")        # doctest: +SKIP
>>> det.fit()                      # zero-shot: WinCLIP + MAEDAY, no images needed
>>> det.add_references(good)       # AnomalyDINO joins; normalisers and thresholds come from `good`
>>> res = det.predict(images)      # res.image_scores, res.anomaly_maps, res.labels, res.masks,
...                                # res.components["winclip"], ...

**Spec.** ``"winclip+maeday+anomalydino"`` names the scorers (see ``vlad.list_scorers()``). The default
(``spec=None``) is :data:`DEFAULT_SPEC` = ``"winclip+maeday+anomalydino"``: zero-shot WinCLIP and MAEDAY
from the start, AnomalyDINO folded in once there is a reference. PatchCore is optional:
``"winclip+maeday+anomalydino+patchcore"``.

**Tiers.** A scorer that needs references (``requires_references``: AnomalyDINO, PatchCore, ...) is in
the few-shot tier and is *inactive* until the first reference arrives; the others are in the zero-shot
tier. Tier weights follow :func:`vlad.fusion.tier_weights` (``w_few = k / (k + k0)``).

**References.** ``fit(references)`` and ``add_references(images)`` hand the images to every scorer that
learns from them: incremental scorers (``add_references``: AnomalyDINO, PatchCore, WinCLIP -> WinCLIP+)
grow their memory; a scorer that needs references but has no ``add_references`` is refitted on all of
them; pure zero-shot scorers (no ``add_references``, e.g. MAEDAY) are fitted once without references and
the references only calibrate them. ``remove_reference(i | name)`` forgets one everywhere.

**Normalisation and thresholds** (recomputed lazily after the references change; see
:mod:`vlad.fusion`). With ``k >= 2`` references, each scorer's normaliser is fitted on its
*leave-one-out* results on (up to ``calibration_refs``, evenly chosen) references: a few-shot scorer
scores each reference against a memory without it; a zero-shot scorer scores the reference as is. The
fused leave-one-out results give the thresholds: ``image = q + margin * (1 - q)`` with ``q`` the
``image_quantile`` (0.95) quantile of the fused normal image scores, and the same with the
``pixel_quantile`` (0.999) quantile of the fused normal map values for ``pixel``. With ``k = 0`` every
scorer uses its zero-shot prior (WinCLIP's probabilities as they are; MAEDAY judged against its own
map) and the thresholds are ``default_image_threshold`` / ``default_pixel_threshold`` (0.5: the
calibrated scale's boundary, i.e. WinCLIP probability 0.5). With ``k = 1`` leave-one-out is impossible
(the memory without the only reference is empty): the few-shot scorers use the ``"self"`` prior, the
zero-shot scorers keep their priors, and the thresholds stay at their defaults. ``set_thresholds``
overrides either threshold (``"auto"`` returns to the derived one).

**Options** of :func:`create_detector` are routed: detector options (below) stay here; any other
option goes to every scorer whose ``get_params()`` has it (``object_name``, ``prompts``, ``weights``,
``device``, ``batch_size``, ``random_state``, ``n_masks``, ...) and must be accepted by at least one (except the shared ones, :data:`SHARED_OPTIONS`, which a
detector without e.g. a text-prompted scorer simply does not use);
``scorer_options={"maeday": {"n_masks": 16}}`` sets one scorer's parameters.

**Save/load.** ``save(folder)`` writes ``detector.json`` (spec, options, normalisers, thresholds,
reference names), ``references.safetensors`` (the reference pixels, so later calibration stays exact)
and one sub-folder per fitted scorer (:meth:`BaseScorer.save`). :func:`load_any` reads only JSON and
safetensors and rejects unknown scorer names, unexpected keys and non-JSON payloads with a VladError.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlad.errors import EmptyReferenceSetError, NotFittedError, UnknownScorerError, VladError
from vlad.fusion import (
    FUSION_RULES,
    MIN_CALIBRATION,
    NORMALISATION_METHODS,
    Normaliser,
    fit_reference_normaliser,
    fuse_results,
    prior_normaliser,
    tier_weights,
)
from vlad.images import LoadedImage, load_images
from vlad.registry import create_scorer, get_scorer_class, list_scorers
from vlad.types import AnomalyResult, ImagesLike

logger = logging.getLogger(__name__)

DEFAULT_SPEC = "winclip+maeday+anomalydino"
DETECTOR_FILE = "detector.json"
REFERENCES_FILE = "references.safetensors"
FORMAT = "vlad-detector"
FORMAT_VERSION = 1

#: detector options and their defaults (everything else is routed to the scorers)
DETECTOR_DEFAULTS: dict[str, Any] = {
    "fusion": "mean",
    "k0": 2.0,
    "scorer_weights": None,
    "normalisation": "robust",
    "z0": 3.0,
    "temperature": 1.0,
    "calibration_refs": 8,
    "image_quantile": 0.95,
    "pixel_quantile": 0.999,
    "margin": 0.1,
    "default_image_threshold": 0.5,
    "default_pixel_threshold": 0.5,
    "image_threshold": None,
    "pixel_threshold": None,
}


#: scorer parameters many scorers share: silently not routed to a scorer (or detector) that lacks them
SHARED_OPTIONS = frozenset({"object_name", "prompts", "weights", "device", "batch_size", "random_state"})


def parse_spec(spec: str | Sequence[str] | None) -> list[str]:
    """``"a+b"`` (or ``["a", "b"]``, or None for :data:`DEFAULT_SPEC`) -> checked list of scorer names.

    Raises:
        UnknownScorerError: a name is not registered.
        VladError: empty or repeated names.
    """
    if spec is None:
        spec = DEFAULT_SPEC
    names = [s.strip() for s in spec.split("+")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    if not names or any(not n for n in names):
        raise VladError(f"a detector spec is scorer names joined by '+', e.g. {DEFAULT_SPEC!r}; got {spec!r}")
    if len(set(names)) != len(names):
        raise VladError(f"detector spec {spec!r} names a scorer twice")
    known = set(list_scorers())
    for n in names:
        if n not in known:
            raise UnknownScorerError(f"unknown scorer {n!r} in detector spec {spec!r}; available: {', '.join(sorted(known))}")
    return names


def _param_names(cls: type) -> set[str]:
    return set(cls._get_param_names()) if hasattr(cls, "_get_param_names") else set()


def _is_incremental(scorer: Any) -> bool:
    return callable(getattr(scorer, "add_references", None))


def _tier(scorer: Any) -> str:
    return "few" if getattr(scorer, "requires_references", False) else "zero"


def create_detector(spec: str | Sequence[str] | None = None, **options: Any) -> Detector:
    """Build a :class:`Detector` from a spec (see the module docstring for routing of ``options``).

    Args:
        spec: ``"winclip+maeday+anomalydino"``-style names; None for :data:`DEFAULT_SPEC`.
        **options: detector options (:data:`DETECTOR_DEFAULTS`), ``scorer_options`` (name -> params),
            and shared scorer parameters (``object_name``, ``weights``, ``device``, ...).

    Raises:
        VladError: an option no scorer and not the detector accepts, or bad ``scorer_options``.
    """
    names = parse_spec(spec)
    scorer_options = options.pop("scorer_options", None) or {}
    if not isinstance(scorer_options, Mapping):
        raise VladError(f"scorer_options must map scorer name -> dict of parameters, got {type(scorer_options).__name__}")
    unknown = set(scorer_options) - set(names)
    if unknown:
        raise VladError(f"scorer_options names {sorted(unknown)}, which are not in the spec {names}")
    det_opts = {k: options.pop(k) for k in list(options) if k in DETECTOR_DEFAULTS}
    classes = {n: get_scorer_class(n) for n in names}
    accepted = {n: _param_names(c) for n, c in classes.items()}
    unrouted = [k for k in options if k not in SHARED_OPTIONS and not any(k in accepted[n] for n in names)]
    if unrouted:
        raise VladError(
            f"option(s) {unrouted} are accepted by no scorer of {names} and are not detector options "
            f"({sorted(DETECTOR_DEFAULTS)}); check the spelling, or pass per-scorer options as "
            "scorer_options={'name': {...}}"
        )
    scorers = {}
    for n in names:
        params = {k: v for k, v in options.items() if k in accepted[n]}
        own = scorer_options.get(n) or {}
        if not isinstance(own, Mapping):
            raise VladError(f"scorer_options[{n!r}] must be a dict of parameters, got {type(own).__name__}")
        bad = set(own) - accepted[n]
        if bad:
            raise VladError(f"scorer {n!r} has no parameter(s) {sorted(bad)}; it accepts {sorted(accepted[n])}")
        params.update(own)
        scorers[n] = create_scorer(n, **params)
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
        unknown = set(options) - set(DETECTOR_DEFAULTS)
        if unknown:
            raise VladError(f"unknown detector option(s) {sorted(unknown)}; known: {sorted(DETECTOR_DEFAULTS)}")
        self.scorers = dict(scorers)
        self.options = {**DETECTOR_DEFAULTS, **options}
        self._check_options()
        self.tiers = {n: _tier(s) for n, s in self.scorers.items()}
        self.references_: list[LoadedImage] = []
        self.active_: dict[str, bool] = {n: False for n in self.scorers}
        self.fitted_ = False
        self._image_override = self.options["image_threshold"]
        self._pixel_override = self.options["pixel_threshold"]
        self._calibration: dict[str, Any] | None = None

    def _check_options(self) -> None:
        o = self.options
        if o["fusion"] not in FUSION_RULES:
            raise VladError(f"fusion must be one of {FUSION_RULES}, got {o['fusion']!r}")
        if o["normalisation"] not in NORMALISATION_METHODS:
            raise VladError(f"normalisation must be one of {NORMALISATION_METHODS}, got {o['normalisation']!r}")
        for key in ("k0", "temperature", "z0"):
            if not isinstance(o[key], (int, float)) or not o[key] > 0:
                raise VladError(f"{key} must be a number > 0, got {o[key]!r}")
        for key in ("image_quantile", "pixel_quantile", "margin"):
            if not isinstance(o[key], (int, float)) or not 0 <= o[key] <= 1:
                raise VladError(f"{key} must be in [0, 1], got {o[key]!r}")
        if not isinstance(o["calibration_refs"], int) or o["calibration_refs"] < MIN_CALIBRATION:
            raise VladError(f"calibration_refs must be an integer >= {MIN_CALIBRATION}, got {o['calibration_refs']!r}")
        sw = o["scorer_weights"]
        if sw is not None:
            if not isinstance(sw, Mapping) or set(sw) - set(self.scorers if hasattr(self, "scorers") else ()):
                raise VladError(f"scorer_weights must map names of this detector's scorers to weights, got {sw!r}")

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
    def fit(self, references: ImagesLike | None = None) -> Detector:
        """Fit every scorer that can run: zero-shot ones always, few-shot ones when there are references.

        Raises:
            EmptyReferenceSetError: no references and every scorer needs some.
            InvalidImageError: a reference is unreadable (the message names it).
        """
        refs = [] if references is None else load_images(references)
        if not refs and all(self.tiers[n] == "few" for n in self.scorers):
            raise EmptyReferenceSetError(
                f"every scorer of this detector ({'+'.join(self.scorers)}) needs reference images: pass "
                "good images to fit(), or add a zero-shot scorer (winclip, maeday) to the spec"
            )
        self.references_ = list(refs)
        for name, scorer in self.scorers.items():
            if self.tiers[name] == "few" and not refs:
                self.active_[name] = False
                continue
            if _is_incremental(scorer) or self.tiers[name] == "few":
                scorer.fit(refs or None)
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
        self.references_.extend(new)
        for name, scorer in self.scorers.items():
            if _is_incremental(scorer) and self.active_[name]:
                scorer.add_references(new)
            elif self.tiers[name] == "few":
                scorer.fit(list(self.references_))  # joins now, or refits (no incremental memory)
                self.active_[name] = True
        self._calibration = None
        return self

    def list_references(self) -> list[str]:
        """Names of the references, in the order they were added."""
        return [r.name for r in self.references_]

    def remove_reference(self, which: int | str) -> Detector:
        """Forget one reference (index or name) in every scorer; few-shot scorers with none left go idle."""
        self._check_fitted()
        names = self.list_references()
        if isinstance(which, str):
            if which not in names:
                raise VladError(f"no reference named {which!r}; references: {names}")
            which = names.index(which)
        if not isinstance(which, (int, np.integer)) or not -len(names) <= which < len(names):
            raise VladError(f"reference index {which!r} out of range (have {len(names)} references)")
        which = int(which) % len(names)
        del self.references_[which]
        for name, scorer in self.scorers.items():
            if not self.active_[name]:
                continue
            if self.tiers[name] == "few" and not self.references_:
                self.active_[name] = False
            elif _is_incremental(scorer) and len(getattr(scorer, "reference_names_", [])) > which:
                scorer.remove_reference(which)
            elif self.tiers[name] == "few":
                scorer.fit(list(self.references_))
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
        """Suspicious references per scorer that can judge them (``FewShotMixin.check_references``: a
        robust z-score of the leave-one-out score above ``z_threshold``; needs >= 3 references).
        Remove a flagged one with :meth:`remove_reference`."""
        self._check_fitted()
        out = {}
        for name, scorer in self.scorers.items():
            if self.active_[name] and callable(getattr(scorer, "check_references", None)):
                try:
                    out[name] = scorer.check_references(z_threshold)
                except NotImplementedError:
                    continue
        return out

    # -- thresholds ------------------------------------------------------------------------
    def set_thresholds(self, image: float | str | None = None, pixel: float | str | None = None) -> Detector:
        """Override the image and/or pixel threshold (calibrated scale, [0, 1]); ``"auto"`` returns to the
        derived one, None leaves it as it is."""
        for key, value in (("image", image), ("pixel", pixel)):
            if value is None:
                continue
            if value == "auto":
                value = None
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise VladError(f"{key} threshold must be a finite number or 'auto', got {value!r}")
            else:
                value = float(value)
            setattr(self, f"_{key}_override", value)
        return self

    @property
    def image_threshold(self) -> float:
        """The image threshold in use: the override, else derived from the references (or the default)."""
        if self._image_override is not None:
            return self._image_override
        return self._calibrated()["image_threshold"]

    @property
    def pixel_threshold(self) -> float:
        """The pixel threshold in use: the override, else derived from the references (or the default)."""
        if self._pixel_override is not None:
            return self._pixel_override
        return self._calibrated()["pixel_threshold"]

    @property
    def normalisers(self) -> dict[str, Normaliser]:
        """Active scorer name -> its current :class:`~vlad.fusion.Normaliser`."""
        return dict(self._calibrated()["normalisers"])

    @property
    def weights(self) -> dict[str, float]:
        """Active scorer name -> its fusion weight (tier weights for the current number of references)."""
        return self._weights()

    def reference_scores(self) -> np.ndarray:
        """Fused leave-one-out image scores of the calibration references ``(n,)`` (empty below 2 refs)."""
        return np.asarray(self._calibrated()["loo_scores"], dtype=np.float32)

    # -- predicting ------------------------------------------------------------------------
    def predict(self, images: ImagesLike) -> AnomalyResult:
        """Score ``images``: fused scores ``(B,)``, maps at each image's size, labels and masks from the
        thresholds, and ``components`` (name -> that scorer's calibrated result)."""
        self._check_fitted()
        loaded = load_images(images)
        cal = self._calibrated()
        comps = {name: cal["normalisers"][name].apply(raw) for name, raw in self._raw_predict(loaded).items()}
        fused = fuse_results(comps, self._weights(), self.options["fusion"])
        return fused.with_thresholds(self.image_threshold, self.pixel_threshold)

    def _raw_predict(self, loaded: list[LoadedImage]) -> dict[str, AnomalyResult]:
        return {n: s.predict(loaded) for n, s in self.scorers.items() if self.active_[n]}

    def _weights(self) -> dict[str, float]:
        tiers = {n: t for n, t in self.tiers.items() if self.active_[n]}
        return tier_weights(tiers, len(self.references_), self.options["k0"], self.options["scorer_weights"])

    def _check_fitted(self) -> None:
        if not self.fitted_:
            raise NotFittedError("this Detector is not fitted yet; call fit() (optionally with good images) first")

    # -- calibration -----------------------------------------------------------------------
    def _calibrated(self) -> dict[str, Any]:
        self._check_fitted()
        if self._calibration is None:
            self._calibration = self._calibrate()
        return self._calibration

    def _calibration_indices(self) -> list[int]:
        n, m = len(self.references_), self.options["calibration_refs"]
        if n <= m:
            return list(range(n))
        return sorted({int(round(x)) for x in np.linspace(0, n - 1, m)})

    def _calibrate(self) -> dict[str, Any]:
        o = self.options
        refs = self.references_
        idx = self._calibration_indices() if len(refs) >= MIN_CALIBRATION else []
        normalisers: dict[str, Normaliser] = {}
        loo: dict[str, AnomalyResult] = {}
        for name, scorer in self.scorers.items():
            if not self.active_[name]:
                continue
            result = None
            if idx:
                try:
                    result = self._leave_one_out(name, scorer, idx)
                except NotImplementedError as exc:
                    logger.warning("%s: no leave-one-out results (%s); using its zero-shot prior", name, exc)
            if result is None:
                normalisers[name] = prior_normaliser(name)
                continue
            normalisers[name] = fit_reference_normaliser(
                result.image_scores, result.map_list(), method=o["normalisation"], z0_image=o["z0"],
                pixel_quantile=o["pixel_quantile"], z0_pixel=o["z0"], temperature=o["temperature"],
            )
            loo[name] = normalisers[name].apply(result)
        cal: dict[str, Any] = {
            "normalisers": normalisers,
            "image_threshold": float(o["default_image_threshold"]),
            "pixel_threshold": float(o["default_pixel_threshold"]),
            "loo_scores": [],
            "n_references": len(refs),
        }
        if loo and set(loo) == set(normalisers):
            fused = fuse_results(loo, self._weights(), o["fusion"])
            scores = fused.image_scores.astype(np.float64)
            pixels = np.concatenate([m.reshape(-1) for m in fused.map_list()]).astype(np.float64)
            q_img = float(np.quantile(scores, o["image_quantile"]))
            q_pix = float(np.quantile(pixels, o["pixel_quantile"]))
            cal["image_threshold"] = q_img + o["margin"] * (1.0 - q_img)
            cal["pixel_threshold"] = q_pix + o["margin"] * (1.0 - q_pix)
            cal["loo_scores"] = scores.tolist()
        return cal

    def _leave_one_out(self, name: str, scorer: Any, idx: list[int]) -> AnomalyResult:
        """Each chosen reference scored as a normal test image: against a memory without it for scorers
        holding references, as is for zero-shot ones."""
        refs = self.references_
        holds_refs = len(getattr(scorer, "reference_names_", []) or []) == len(refs) and hasattr(scorer, "memory_chunks_")
        if not holds_refs:
            if self.tiers[name] == "few":
                logger.warning("%s has no per-reference memory: its reference scores are in-sample (biased low)", name)
            return scorer.predict([refs[i] for i in idx])
        results = []
        with torch.inference_mode():
            for i in idx:
                results.append(_without_reference(scorer, i).predict([refs[i]]))
        return AnomalyResult.concatenate(results)

    # -- save / load -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the detector to the folder ``path`` (JSON + safetensors only; see module docstring)."""
        from safetensors.torch import save_file

        self._check_fitted()
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        cal = self._calibrated()
        scorers = {}
        for name, scorer in self.scorers.items():
            entry: dict[str, Any] = {"active": bool(self.active_[name]), "tier": self.tiers[name]}
            if self.active_[name]:
                scorer.save(folder / name)
                entry["folder"] = name
            else:
                entry["params"] = _jsonable(scorer.get_params(deep=False), f"{name} parameters")
            scorers[name] = entry
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spec": "+".join(self.scorers),
            "scorers": scorers,
            "options": _jsonable(self.options, "detector options"),
            "thresholds": {"image_override": self._image_override, "pixel_override": self._pixel_override},
            "calibration": {
                "normalisers": {n: nz.to_dict() for n, nz in cal["normalisers"].items()},
                "image_threshold": cal["image_threshold"],
                "pixel_threshold": cal["pixel_threshold"],
                "loo_scores": list(cal["loo_scores"]),
                "n_references": cal["n_references"],
            },
            "references": [r.name for r in self.references_],
        }
        tensors = {f"ref_{i:05d}": torch.from_numpy(np.ascontiguousarray(r.pixels)) for i, r in enumerate(self.references_)}
        save_file(tensors, str(folder / REFERENCES_FILE))
        (folder / DETECTOR_FILE).write_text(json.dumps(doc, indent=2))
        return folder

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Detector:
        """Load a detector saved with :meth:`save`. Never executes code from the files.

        Raises:
            VladError: missing files, not JSON, unknown scorer names, unexpected keys or types.
        """
        folder = Path(path)
        doc = _read_json(folder / DETECTOR_FILE, "a detector file written by Detector.save()")
        _check_plain(doc, str(folder / DETECTOR_FILE))
        _check_keys(doc, {"format", "format_version", "spec", "scorers", "options", "thresholds", "calibration",
                          "references"}, DETECTOR_FILE)
        if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise VladError(f"{folder / DETECTOR_FILE}: expected format {FORMAT!r} version {FORMAT_VERSION}, got "
                            f"{doc.get('format')!r} version {doc.get('format_version')!r}")
        entries = doc.get("scorers")
        if not isinstance(entries, dict) or not entries:
            raise VladError(f"{folder / DETECTOR_FILE}: 'scorers' must be a non-empty object of name -> entry")
        names = parse_spec(list(entries))
        scorers, active, tiers = {}, {}, {}
        for name in names:
            entry = entries[name]
            if not isinstance(entry, dict):
                raise VladError(f"{DETECTOR_FILE}: scorer entry {name!r} must be an object")
            _check_keys(entry, {"active", "tier", "folder", "params"}, f"scorer entry {name!r}")
            if entry.get("active") is True:
                if entry.get("folder") != name:
                    raise VladError(f"{DETECTOR_FILE}: scorer {name!r} must be saved in the sub-folder {name!r}, "
                                    f"got {entry.get('folder')!r}")
                scorers[name] = load_scorer_checked(folder / name, expected=name, device=device)
                active[name] = True
            elif entry.get("active") is False:
                params = _check_params(name, entry.get("params", {}))
                if device is not None and "device" in params:
                    params["device"] = device
                scorers[name] = create_scorer(name, **params)
                active[name] = False
            else:
                raise VladError(f"{DETECTOR_FILE}: scorer {name!r}: 'active' must be true or false")
            tiers[name] = _tier(scorers[name])
        options = doc.get("options", {})
        if not isinstance(options, dict):
            raise VladError(f"{DETECTOR_FILE}: 'options' must be an object")
        _check_keys(options, set(DETECTOR_DEFAULTS), "detector options")
        _check_plain(options, "detector options")
        det = cls(scorers, **options)
        det.active_ = active
        det.tiers = tiers
        det.fitted_ = any(active.values())
        thresholds = doc.get("thresholds", {})
        _check_keys(thresholds, {"image_override", "pixel_override"}, "thresholds")
        for key in ("image", "pixel"):
            value = thresholds.get(f"{key}_override")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise VladError(f"thresholds: {key}_override must be a number or null, got {value!r}")
            setattr(det, f"_{key}_override", None if value is None else float(value))
        det.references_ = _read_references(folder, doc.get("references", []))
        det._calibration = _read_calibration(doc.get("calibration"), set(n for n, a in active.items() if a),
                                             len(det.references_))
        return det


def _without_reference(scorer: Any, i: int) -> Any:
    """A shallow copy of a few-shot scorer whose memory lacks reference ``i``; the original is untouched.

    The copy shares the backbone and the memory tensors (never mutated) but has its own lists and dicts
    (one level deep), so the scorer's ``_memory_changed()`` rebuilds its caches on the copy only.
    """
    clone = copy.copy(scorer)
    for key, value in vars(scorer).items():
        if isinstance(value, list):
            setattr(clone, key, list(value))
        elif isinstance(value, dict):
            setattr(clone, key, dict(value))
    del clone.memory_chunks_[i]
    del clone.reference_names_[i]
    clone.n_references_ = len(clone.reference_names_)
    clone._memory_changed()
    return clone


# -- loading helpers (nothing here executes code from a file) ----------------------------------
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise VladError(f"{path}: not found; expected {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise VladError(f"{path}: not valid JSON (expected {what}); refusing to read it ({exc})") from exc
    if not isinstance(data, dict):
        raise VladError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def _check_keys(data: Any, allowed: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise VladError(f"{where}: expected a JSON object, got {type(data).__name__}")
    extra = set(data) - allowed
    if extra:
        raise VladError(f"{where}: unexpected key(s) {sorted(extra)}; allowed: {sorted(allowed)}")


def _check_plain(value: Any, where: str) -> None:
    """Reject anything but plain JSON data, and dict keys that look like Python object protocols."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for v in value:
            _check_plain(v, where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or k.startswith("__") or k.startswith("py/") or k.startswith("!!python"):
                raise VladError(f"{where}: refusing key {k!r} (object payloads are not loaded)")
            _check_plain(v, where)
        return
    raise VladError(f"{where}: value of type {type(value).__name__} is not plain JSON")


def _jsonable(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value, default=_json_default))
    except TypeError as exc:
        raise VladError(f"{where}: cannot be saved as JSON ({exc}); pass plain values (str, numbers, lists, dicts)") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray,)):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    raise TypeError(f"type {type(obj).__name__} is not JSON")


def _check_params(name: str, params: Any) -> dict:
    if not isinstance(params, dict):
        raise VladError(f"scorer {name!r}: 'params' must be a JSON object, got {type(params).__name__}")
    _check_plain(params, f"scorer {name!r} parameters")
    allowed = _param_names(get_scorer_class(name))
    extra = set(params) - allowed
    if extra:
        raise VladError(f"scorer {name!r}: unexpected parameter(s) {sorted(extra)}; it accepts {sorted(allowed)}")
    return dict(params)


def load_scorer_checked(path: str | Path, expected: str | None = None, device: str | None = None):
    """Load a scorer folder after checking its config: a registered name, known keys and parameters,
    plain JSON values only; safetensors errors become VladError."""
    from vlad.scorers.base import CONFIG_FILE, load_scorer

    folder = Path(path)
    config = _read_json(folder / CONFIG_FILE, "a scorer config written by Scorer.save()")
    _check_keys(config, {"format_version", "scorer", "params", "n_references", "meta"}, str(folder / CONFIG_FILE))
    name = config.get("scorer")
    if not isinstance(name, str) or name not in list_scorers():
        raise UnknownScorerError(f"{folder / CONFIG_FILE}: scorer {name!r} is not a registered scorer; "
                                 f"available: {', '.join(list_scorers())}")
    if expected is not None and name != expected:
        raise VladError(f"{folder}: holds scorer {name!r}, expected {expected!r}")
    _check_params(name, config.get("params"))
    _check_plain(config.get("meta", {}), f"{folder / CONFIG_FILE} meta")
    if not isinstance(config.get("n_references", 0), int):
        raise VladError(f"{folder / CONFIG_FILE}: 'n_references' must be an integer")
    try:
        return load_scorer(folder, device=device)
    except VladError:
        raise
    except Exception as exc:  # safetensors header errors, shape mismatches in _set_state, ...
        raise VladError(f"{folder}: could not load the saved {name!r} state ({type(exc).__name__}: {exc})") from exc


def _read_references(folder: Path, names: Any) -> list[LoadedImage]:
    from safetensors.torch import load_file

    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise VladError(f"{DETECTOR_FILE}: 'references' must be a list of names")
    if not names:
        return []
    path = folder / REFERENCES_FILE
    if not path.is_file():
        raise VladError(f"{path}: missing; the detector lists {len(names)} references")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise VladError(f"{path}: not a safetensors file ({type(exc).__name__}: {exc})") from exc
    refs = []
    for i, name in enumerate(names):
        t = tensors.get(f"ref_{i:05d}")
        if t is None or t.ndim != 3 or t.shape[2] != 3 or t.dtype != torch.float32:
            raise VladError(f"{path}: reference {i} ({name}) missing or not a float32 (H, W, 3) image")
        refs.append(LoadedImage(t.numpy(), name))
    return refs


def _read_calibration(data: Any, active: set[str], n_refs: int) -> dict[str, Any]:
    _check_keys(data, {"normalisers", "image_threshold", "pixel_threshold", "loo_scores", "n_references"},
                "calibration")
    norms = data.get("normalisers")
    if not isinstance(norms, dict) or set(norms) != active:
        raise VladError(f"calibration: expected normalisers for {sorted(active)}, got "
                        f"{sorted(norms) if isinstance(norms, dict) else norms!r}")
    out = {"normalisers": {n: Normaliser.from_dict(v) for n, v in norms.items()}}
    for key in ("image_threshold", "pixel_threshold"):
        v = data.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise VladError(f"calibration: {key} must be a finite number, got {v!r}")
        out[key] = float(v)
    loo = data.get("loo_scores", [])
    if not isinstance(loo, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in loo):
        raise VladError("calibration: loo_scores must be a list of numbers")
    out["loo_scores"] = [float(v) for v in loo]
    out["n_references"] = n_refs
    return out


def load_any(path: str | Path, device: str | None = None):
    """Load a detector folder (``detector.json``) or a scorer folder (``config.json``).

    Raises:
        VladError: the folder holds neither, or its files are not what vlad writes.
    """
    from vlad.scorers.base import CONFIG_FILE

    folder = Path(path)
    if not folder.is_dir():
        raise VladError(f"{folder}: not a folder; expected a folder written by Detector.save() or Scorer.save()")
    if (folder / DETECTOR_FILE).exists():
        return Detector.load(folder, device=device)
    if (folder / CONFIG_FILE).exists():
        return load_scorer_checked(folder, device=device)
    raise VladError(f"{folder}: contains neither {DETECTOR_FILE} (a detector) nor {CONFIG_FILE} (a scorer)")
