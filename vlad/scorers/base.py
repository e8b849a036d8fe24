"""The written scorer contract: scikit-learn estimator rules plus vlad's image handling.

**Parameters.** ``__init__`` lists the parameters and stores them as they are: no downloads, no
validation, no other attributes (so ``get_params``, ``set_params`` and ``sklearn.base.clone`` work).

**Fitting.** ``fit(reference_images=None) -> self`` builds the backbone (lazily, from a weight name or
an injected module) and learns from the normal references, if any. Fitted state lives in attributes
ending in ``_``; anything random follows the ``random_state`` parameter. ``predict`` before ``fit``
raises :class:`~vlad.errors.NotFittedError`; a scorer that needs references raises
:class:`~vlad.errors.EmptyReferenceSetError` when given none.

**Predicting.** ``predict(images) -> AnomalyResult``: float32 scores ``(B,)`` and one map per image at
the image's own resolution; higher is more anomalous. Every score and map is finite: a scorer whose
output holds NaN or infinity raises :class:`~vlad.errors.NonFiniteScoreError` naming the images, so
that nothing undefined can be read as "normal" downstream.

**Capabilities** are declared class attributes that the detector and the app read:
``requires_references`` (cannot predict without normal images), ``tier`` (``"zero"`` or ``"few"``;
follows ``requires_references`` unless set), ``incremental`` (``add_references`` grows the memory in
place, ``remove_reference`` forgets one, ``without_reference(i)`` gives the leave-one-out view: set by
:class:`FewShotMixin`), ``output_scale`` (``"probability"``: raw outputs already are anomaly
probabilities; ``"score"``: any real number) and ``part_scales`` (parts a result carries in
``components``, each calibrated on its own; WinCLIP+ has a probability part and a distance part).

**Saving.** ``save(folder)`` writes ``config.json`` (name, parameters, JSON-able metadata and the sha256
of the state file) and ``state.safetensors``; :func:`load_scorer` is the one checked loader
(``vlad.load``, ``BaseScorer.load`` and the detector use it): a registered name, known keys and
parameters, plain JSON values, a matching checksum, and only then the tensors.

A subclass implements:

* ``_build()``: create backbones/modules (called by ``fit`` and by ``load``; lazy, may download).
* ``_fit(references)``: learn from reference images (a list of :class:`~vlad.images.LoadedImage`, or
  None for zero-shot use). Set fitted attributes ending in ``_``.
* ``_predict_batch(images)``: return ``(scores (B,), maps (B, h, w))`` torch tensors; maps at any
  resolution (they are resized bilinearly to each image's own size by the base class). A scorer with
  ``part_scales`` may add a third item, ``{part: (scores, maps)}``, returned as ``components``.
* ``_get_state()`` / ``_set_state(tensors, meta)``: fitted state as named tensors plus JSON-able data.

Incremental scorers mix in :class:`FewShotMixin` and implement ``_embed_references`` and
``_memory_changed`` (see there).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator

from vlad.backbones import resolve_device
from vlad.errors import (
    EmptyReferenceSetError,
    InvalidParameterError,
    NotFittedError,
    UnknownScorerError,
    VladError,
)
from vlad.images import LoadedImage, load_images
from vlad.ops import maps_to_image_sizes
from vlad.progress import track
from vlad.serialization import (
    check_digests,
    check_keys,
    check_plain,
    load_safetensors,
    make_folder,
    read_json,
    save_safetensors,
    sha256_file,
    to_jsonable,
    write_json,
)
from vlad.types import AnomalyResult, ImagesLike, check_finite  # noqa: F401 (check_finite: re-exported)

logger = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 2
TIERS = ("zero", "few")
OUTPUT_SCALES = ("probability", "score")


class BaseScorer(BaseEstimator):
    """Common machinery: input loading, batching, map resizing, fitted checks, save/load.

    Capabilities are declared here as class attributes (see the module docstring); the detector and the
    app read them, never probing a scorer's internals.
    """

    #: registry name, set by the registry
    scorer_name: ClassVar[str] = ""
    #: True when the scorer cannot predict without reference (normal) images
    requires_references: ClassVar[bool] = False
    #: True when ``add_references`` grows a memory in place and ``without_reference(i)`` exists
    #: (set by :class:`FewShotMixin`)
    incremental: ClassVar[bool] = False
    #: ``"zero"`` (works from the first image) or ``"few"`` (needs references); derived from
    #: ``requires_references`` unless a class sets it
    tier: ClassVar[str] = "zero"
    #: what the raw scores are: ``"probability"`` (already in [0, 1], 0.5 the natural boundary) or
    #: ``"score"`` (any real number, higher is more anomalous; calibrated from normal images)
    output_scale: ClassVar[str] = "score"
    #: parts a result may carry in ``components`` (part name -> its scale), each calibrated on its own
    #: by the detector; e.g. WinCLIP+ = a zero-shot probability part and a few-shot distance part
    part_scales: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "tier" not in cls.__dict__:
            cls.tier = "few" if cls.requires_references else "zero"
        for attr, allowed in (("tier", TIERS), ("output_scale", OUTPUT_SCALES)):
            if getattr(cls, attr) not in allowed:
                raise VladError(f"{cls.__name__}.{attr} must be one of {allowed}, got {getattr(cls, attr)!r}")

    # -- to implement -------------------------------------------------------------------------
    def _build(self) -> None:
        """Create backbones and modules (uses ``self.device_``)."""

    def _fit(self, references: list[LoadedImage] | None) -> None:
        raise NotImplementedError

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    # -- public API ---------------------------------------------------------------------------
    def fit(self, reference_images: ImagesLike | None = None) -> BaseScorer:
        """Prepare the scorer; learn from normal ``reference_images`` if given.

        Raises:
            EmptyReferenceSetError: the scorer needs references and got none.
            InvalidImageError: a reference is not a readable image.
        """
        references = self._load_references(reference_images)
        self.device_ = resolve_device(getattr(self, "device", "cpu"))
        self._build()
        self._fit(references)
        self.n_references_ = 0 if references is None else len(references)
        return self

    def predict(self, images: ImagesLike) -> AnomalyResult:
        """Score ``images``: one score per image and one map at each image's own resolution.

        A scorer with ``part_scales`` also returns its parts in ``components`` (part name -> result).

        Raises:
            NotFittedError: ``fit`` was not called.
            InvalidImageError: an input is not a readable image (the message names it).
            NonFiniteScoreError: the scorer produced NaN or infinity for an image (names it).
        """
        self._check_fitted()
        loaded = load_images(images)
        batch_size = max(1, int(getattr(self, "batch_size", 8) or 8))
        batches = [loaded[i : i + batch_size] for i in range(0, len(loaded), batch_size)]
        scores, maps = [], []
        parts: dict[str, tuple[list, list]] = {}
        iterator = track(batches, f"{self.scorer_name or type(self).__name__}") if len(batches) > 1 else batches
        with torch.inference_mode():
            for batch in iterator:
                out = self._predict_batch(batch)
                s, m = out[0], out[1]
                scores.append(_to_numpy_scores(s))
                maps.extend(maps_to_image_sizes(_detach_maps(m), batch))
                for part, (ps, pm) in (out[2] if len(out) > 2 else {}).items():
                    acc = parts.setdefault(part, ([], []))
                    acc[0].append(_to_numpy_scores(ps))
                    acc[1].extend(maps_to_image_sizes(_detach_maps(pm), batch))
        names = tuple(img.name for img in loaded)
        components = {}
        if parts and len(parts[next(iter(parts))][0]) == len(batches):  # every batch gave its parts
            components = {p: AnomalyResult(np.concatenate(ps), pm, names=names) for p, (ps, pm) in parts.items()}
        result = AnomalyResult(np.concatenate(scores), maps, components=components, names=names)
        check_finite(result, self.scorer_name or type(self).__name__)
        return result

    def save(self, path: str | Path) -> Path:
        """Save parameters and metadata (``config.json``, with the state file's sha256) and the fitted
        state (``state.safetensors``) to the folder ``path``.

        Raises:
            NotFittedError: nothing to save yet.
            VladError: the folder cannot be written.
        """
        self._check_fitted()
        folder = make_folder(path)
        tensors, meta = self._get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_safetensors(tensors, folder / STATE_FILE)
        config = {
            "format_version": FORMAT_VERSION,
            "scorer": self.scorer_name,
            "params": to_jsonable(self.get_params(deep=False), f"{self.scorer_name} parameters"),
            "n_references": int(getattr(self, "n_references_", 0)),
            "meta": to_jsonable(meta, f"{self.scorer_name} metadata"),
            "sha256": {STATE_FILE: sha256_file(folder / STATE_FILE)},
        }
        write_json(folder / CONFIG_FILE, config)
        return folder

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> BaseScorer:
        """Load a scorer saved with :meth:`save` (checked; see :func:`load_scorer`)."""
        return load_scorer(path, device=device)

    # -- helpers for subclasses ---------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "device_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit() (with reference images for "
                "few-shot scorers) before predict()"
            )

    def _load_references(self, reference_images: ImagesLike | None) -> list[LoadedImage] | None:
        if reference_images is None or (isinstance(reference_images, Sequence) and len(reference_images) == 0
                                        and not isinstance(reference_images, str)):
            if self.requires_references:
                raise EmptyReferenceSetError(
                    f"{type(self).__name__} learns from normal images: pass at least one reference image "
                    "to fit(), e.g. fit(['good1.png', ...])"
                )
            return None
        return load_images(reference_images)


def _to_numpy_scores(s: torch.Tensor) -> np.ndarray:
    return s.detach().float().cpu().numpy().reshape(-1)


def _detach_maps(m: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    # (B, h, w) tensor, or a list of (h_i, w_i) tensors when sizes differ within a batch
    return m.detach().float() if isinstance(m, torch.Tensor) else [x.detach().float() for x in m]


def reference_index(names: Sequence[str], which: Any) -> int:
    """The position of reference ``which`` (an index, negative allowed, or a name) among ``names``.

    Raises:
        InvalidParameterError: no such reference, or ``which`` is neither an int nor a str.
    """
    if isinstance(which, str):
        if which not in names:
            raise InvalidParameterError(f"no reference named {which!r}; references: {list(names)}")
        return list(names).index(which)
    if isinstance(which, bool) or not isinstance(which, (int, np.integer)):
        raise InvalidParameterError(f"a reference is chosen by its index (int) or name (str), got {which!r} "
                                    f"({type(which).__name__}); see list_references()")
    if not -len(names) <= int(which) < len(names):
        raise InvalidParameterError(f"reference index {which} out of range (have {len(names)} references)")
    return int(which) % len(names)


class FewShotMixin:
    """Reference bookkeeping for scorers whose memory grows incrementally (``incremental = True``).

    The subclass stores one memory entry per reference in ``self.memory_chunks_`` (a list: a tensor, or a
    dict of tensors) and names in ``self.reference_names_``; per-reference side information, if any,
    lives in lists named by ``_aligned_lists`` (kept index-aligned with the chunks here). It implements
    ``_embed_references(images) -> list`` (one chunk per image; side information for the new references
    may be left in ``self._pending_infos`` for ``_memory_changed`` to append) and ``_memory_changed()``,
    which rebuilds any cached concatenation *on this object only* (never mutating chunks in place).
    """

    incremental: ClassVar[bool] = True
    #: names of per-reference lists kept aligned with ``memory_chunks_`` (removed and copied with them)
    _aligned_lists: ClassVar[tuple[str, ...]] = ()

    def add_references(self, images: ImagesLike):
        """Append normal images to the memory in place (no refit of what is there). Returns self."""
        self._check_fitted()
        loaded = load_images(images)
        with torch.inference_mode():
            chunks = self._embed_references(loaded)
        self.memory_chunks_.extend(chunks)
        self.reference_names_.extend(img.name for img in loaded)
        self.n_references_ = len(self.reference_names_)
        self._memory_changed()
        return self

    def list_references(self) -> list[str]:
        """Names of the references in memory, in the order they were added."""
        self._check_fitted()
        return list(self.reference_names_)

    def remove_reference(self, which: int | str):
        """Forget one reference (by index or name), e.g. one found to be defective. Returns self.

        Raises:
            InvalidParameterError: no such reference, or ``which`` is neither an int nor a str.
        """
        self._check_fitted()
        i = reference_index(self.reference_names_, which)
        del self.memory_chunks_[i]
        del self.reference_names_[i]
        for attr in self._aligned_lists:
            del getattr(self, attr)[i]
        self.n_references_ = len(self.reference_names_)
        self._memory_changed()
        return self

    def without_reference(self, which: int | str):
        """A leave-one-out view: a copy whose memory lacks reference ``which``; this scorer is untouched.

        The copy shares the backbone and the memory tensors (never mutated) and has its own lists (and
        copies of dict entries), so rebuilding its caches cannot reach this scorer. This is the one
        leave-one-out path: the detector scores each reference with it as a held-out normal image.
        """
        self._check_fitted()
        i = reference_index(self.reference_names_, which)
        clone = copy.copy(self)
        keep = [j for j in range(len(self.reference_names_)) if j != i]

        def pick(items: list) -> list:
            return [dict(items[j]) if isinstance(items[j], dict) else items[j] for j in keep]

        clone.memory_chunks_ = pick(self.memory_chunks_)
        clone.reference_names_ = [self.reference_names_[j] for j in keep]
        for attr in self._aligned_lists:
            setattr(clone, attr, pick(getattr(self, attr)))
        for key, value in vars(self).items():  # caches: own containers, never the original's
            if key not in ("memory_chunks_", "reference_names_", *self._aligned_lists):
                if isinstance(value, (list, dict)):
                    setattr(clone, key, copy.copy(value))
        clone.n_references_ = len(clone.reference_names_)
        clone._memory_changed()
        return clone

    def leave_one_out_scores(self) -> np.ndarray:
        """Image score of each reference against a memory of all the *other* references: ``(n_refs,)``.

        These are scores of known-normal images under the scorer's own rules, so they describe its
        normal score distribution (used by :meth:`check_references`). Subclasses may override with a
        faster path giving the same scores.

        Raises:
            VladError: fewer than two references.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement leave_one_out_scores")

    def check_references(self, z_threshold: float = 3.5) -> list[str]:
        """Names of references whose leave-one-out score is an outlier (robust z-score above
        ``z_threshold``, from median and MAD): likely defective or mislabelled references.

        Needs at least 3 references; with fewer, returns an empty list.
        """
        self._check_fitted()
        if len(self.reference_names_) < 3:
            return []
        scores = np.asarray(self.leave_one_out_scores(), dtype=np.float64)
        med = np.median(scores)
        mad = np.median(np.abs(scores - med)) * 1.4826
        scale = mad if mad > 1e-12 else (np.std(scores) or 1.0)
        z = (scores - med) / scale
        return [name for name, zi in zip(self.reference_names_, z) if zi > z_threshold]


def _param_names(cls: type) -> set[str]:
    return set(cls._get_param_names()) if hasattr(cls, "_get_param_names") else set()


def check_params(name: str, cls: type, params: Any, where: str) -> dict[str, Any]:
    """Saved parameters of scorer ``name``: a plain JSON object of parameters ``cls`` accepts.

    Raises:
        VladError: not an object, non-plain values, or unknown parameter names.
    """
    if not isinstance(params, dict):
        raise VladError(f"{where}: 'params' of {name!r} must be a JSON object, got {type(params).__name__}")
    check_plain(params, f"{where} parameters")
    extra = set(params) - _param_names(cls)
    if extra:
        raise VladError(f"{where}: scorer {name!r} has no parameter(s) {sorted(extra)}; it accepts "
                        f"{sorted(_param_names(cls))}")
    # JSON has no tuples: give back a tuple where the parameter's default is one (layers, scales, ...)
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
    return {k: tuple(v) if isinstance(v, list) and isinstance(defaults.get(k), tuple) else v
            for k, v in params.items()}


def load_scorer(path: str | Path, device: str | None = None, expected: str | None = None) -> BaseScorer:
    """The one checked loader of a scorer folder written by :meth:`BaseScorer.save`.

    Checks, before any tensor is read: ``config.json`` is plain JSON with the known keys, names a
    registered scorer (``expected`` if given) with parameters it accepts, and the sha256 of
    ``state.safetensors`` matches the one recorded at saving. Never executes code from the files.

    Raises:
        VladError: missing files, not JSON, unknown scorer or keys, a saved state that does not fit.
        IntegrityError: the state file changed after it was saved.
    """
    from vlad.registry import get_scorer_class, list_scorers

    folder = Path(path)
    cfg_path = folder / CONFIG_FILE
    config = read_json(cfg_path, "a scorer config written by Scorer.save()")
    check_keys(config, {"format_version", "scorer", "params", "n_references", "meta", "sha256"}, str(cfg_path),
               required={"format_version", "scorer", "params"})
    if config.get("format_version") != FORMAT_VERSION:
        raise VladError(f"{cfg_path}: format version {config.get('format_version')!r}, this vlad reads "
                        f"{FORMAT_VERSION}; fit the scorer again and save it with this version")
    name = config.get("scorer")
    if not isinstance(name, str) or name not in list_scorers():
        raise UnknownScorerError(f"{cfg_path}: scorer {name!r} is not a registered scorer; "
                                 f"available: {', '.join(list_scorers())}")
    if expected is not None and name != expected:
        raise VladError(f"{folder}: holds scorer {name!r}, expected {expected!r}")
    params = check_params(name, get_scorer_class(name), config.get("params"), str(cfg_path))
    meta = config.get("meta", {})
    check_plain(meta, f"{cfg_path} meta")
    n_refs = config.get("n_references", 0)
    if isinstance(n_refs, bool) or not isinstance(n_refs, int) or n_refs < 0:
        raise VladError(f"{cfg_path}: 'n_references' must be a non-negative integer, got {n_refs!r}")
    check_digests(folder, config.get("sha256"), str(cfg_path))
    if set(config["sha256"]) != {STATE_FILE}:
        raise VladError(f"{cfg_path}: 'sha256' must list exactly {STATE_FILE}")
    if device is not None and "device" in params:
        params["device"] = device
    from vlad.registry import create_scorer

    scorer = create_scorer(name, **params)
    try:
        scorer.device_ = resolve_device(params.get("device", "cpu"))
        scorer._build()
        tensors = load_safetensors(folder / STATE_FILE, device=str(scorer.device_))
        scorer._set_state(tensors, meta)
    except VladError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:  # state that does not fit
        raise VladError(f"{folder}: the saved {name!r} state does not fit this scorer "
                        f"({type(exc).__name__}: {exc}); fit and save it again") from exc
    scorer.n_references_ = n_refs
    return scorer
