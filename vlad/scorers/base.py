"""The base class every scorer derives from: scikit-learn estimator rules plus vlad's image handling.

A subclass lists its parameters in ``__init__`` (stored as is, nothing else), and implements:

* ``_build()``: create backbones/modules (called by ``fit`` and by ``load``; lazy, may download).
* ``_fit(references)``: learn from reference images (a list of :class:`~vlad.images.LoadedImage`, or
  None for zero-shot use). Set fitted attributes ending in ``_``.
* ``_predict_batch(images)``: return ``(scores (B,), maps (B, h, w))`` torch tensors; maps at any
  resolution (they are resized bilinearly to each image's own size by the base class).
* ``_get_state()`` / ``_set_state(tensors, meta)``: fitted state as named tensors plus JSON-able data.

Few-shot scorers also implement ``add_references(images) -> self`` (see :class:`FewShotMixin`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator

from vlad.backbones import resolve_device
from vlad.errors import EmptyReferenceSetError, NotFittedError, VladError
from vlad.images import LoadedImage, load_images
from vlad.ops import maps_to_image_sizes
from vlad.progress import track
from vlad.types import AnomalyResult, ImagesLike

logger = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


class BaseScorer(BaseEstimator):
    """Common machinery: input loading, batching, map resizing, fitted checks, save/load."""

    #: registry name, set by the registry
    scorer_name: ClassVar[str] = ""
    #: True when the scorer cannot predict without reference (normal) images
    requires_references: ClassVar[bool] = False
    #: True for scorers whose memory grows with add_references
    few_shot: ClassVar[bool] = False

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

        Raises:
            NotFittedError: ``fit`` was not called.
            InvalidImageError: an input is not a readable image (the message names it).
        """
        self._check_fitted()
        loaded = load_images(images)
        batch_size = max(1, int(getattr(self, "batch_size", 8) or 8))
        batches = [loaded[i : i + batch_size] for i in range(0, len(loaded), batch_size)]
        scores, maps = [], []
        iterator = track(batches, f"{self.scorer_name or type(self).__name__}") if len(batches) > 1 else batches
        with torch.inference_mode():
            for batch in iterator:
                s, m = self._predict_batch(batch)
                scores.append(s.detach().float().cpu().numpy().reshape(-1))
                # m: (B, h, w) tensor, or a list of (h_i, w_i) tensors when sizes differ within a batch
                m = m.detach().float() if isinstance(m, torch.Tensor) else [x.detach().float() for x in m]
                maps.extend(maps_to_image_sizes(m, batch))
        return AnomalyResult(np.concatenate(scores), maps, names=tuple(img.name for img in loaded))

    def save(self, path: str | Path) -> Path:
        """Save parameters (JSON) and fitted state (safetensors) to the folder ``path``."""
        from safetensors.torch import save_file

        self._check_fitted()
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = self._get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(folder / STATE_FILE))
        config = {
            "format_version": FORMAT_VERSION,
            "scorer": self.scorer_name,
            "params": self.get_params(deep=False),
            "n_references": getattr(self, "n_references_", 0),
            "meta": meta,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=_json_default))
        return folder

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> BaseScorer:
        """Load a scorer saved with :meth:`save`. Never executes code from the files."""
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


class FewShotMixin:
    """Reference bookkeeping for scorers whose memory grows incrementally.

    The subclass stores one memory tensor per reference in ``self.memory_chunks_`` (list) and names in
    ``self.reference_names_``; it implements ``_embed_references(images) -> list[Tensor]`` (one chunk per
    image) and ``_memory_changed()`` to rebuild any cached concatenation.
    """

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
        """Forget one reference (by index or name), e.g. one found to be defective. Returns self."""
        self._check_fitted()
        if isinstance(which, str):
            if which not in self.reference_names_:
                raise VladError(f"no reference named {which!r}; references: {self.reference_names_}")
            which = self.reference_names_.index(which)
        if not -len(self.reference_names_) <= which < len(self.reference_names_):
            raise VladError(f"reference index {which} out of range (have {len(self.reference_names_)})")
        del self.memory_chunks_[which]
        del self.reference_names_[which]
        self.n_references_ = len(self.reference_names_)
        self._memory_changed()
        return self

    def leave_one_out_scores(self) -> np.ndarray:
        """Image score of each reference against a memory of all the *other* references: ``(n_refs,)``.

        These are scores of known-normal images under the scorer's own rules, so they describe its
        normal score distribution (used for normalisation, thresholds and :meth:`check_references`).
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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray,)):
        return obj.tolist()
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot save parameter of type {type(obj).__name__} as JSON")


def load_scorer(path: str | Path, device: str | None = None) -> BaseScorer:
    """Rebuild a scorer saved with :meth:`BaseScorer.save`; reads only JSON and safetensors.

    Raises:
        VladError: the folder lacks the files, or they are not a vlad scorer.
    """
    from safetensors.torch import load_file

    from vlad.registry import create_scorer

    folder = Path(path)
    cfg_path, state_path = folder / CONFIG_FILE, folder / STATE_FILE
    if not cfg_path.is_file() or not state_path.is_file():
        raise VladError(f"{folder}: expected {CONFIG_FILE} and {STATE_FILE} written by Scorer.save()")
    try:
        config = json.loads(cfg_path.read_text())
        name, params = config["scorer"], dict(config["params"])
    except (ValueError, KeyError, TypeError) as exc:
        raise VladError(f"{cfg_path}: not a vlad scorer config ({exc})") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise VladError(f"{cfg_path}: format version {config.get('format_version')} is not {FORMAT_VERSION}")
    if device is not None and "device" in params:
        params["device"] = device
    scorer = create_scorer(name, **params)
    scorer.device_ = resolve_device(params.get("device", "cpu"))
    scorer._build()
    tensors = load_file(str(state_path), device=str(scorer.device_))
    scorer._set_state(tensors, config.get("meta", {}))
    scorer.n_references_ = int(config.get("n_references", 0))
    return scorer
