"""The written scorer contract: scikit-learn estimator rules plus vlad's image handling.

**Parameters.** ``__init__`` lists the parameters and stores them as they are: no downloads, no
conversion, no other attributes (so ``get_params``, ``set_params`` and ``sklearn.base.clone`` work; the
protocol comes from :class:`vlad.params.ParamsMixin`, which does not import scikit-learn). Every
parameter is declared in the class attribute ``_param_specs`` (name -> :class:`vlad.paramspec.Spec`: its
type and a sane range; the parameters many scorers share, :data:`vlad.paramspec.COMMON_SPECS`, are
declared here) and checked where it enters: at construction (``__init_subclass__`` wraps ``__init__``, so a
scorer does not call the check itself; a value is refused, never modified), by ``set_params`` (before
anything is set), when a saved config loads (:func:`check_params`, naming the file) and again at ``fit``
(for values assigned as attributes). A refused value is an :class:`~vlad.errors.InvalidParameterError`
naming the scorer, the parameter, the accepted values and the value. What needs the backbone (e.g. a
multiple of its patch size) is checked when it is built.

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
``requires_references`` (cannot predict without normal images), ``tier`` (``"zero"``, ``"unlabeled"``
or ``"few"``; follows ``requires_references`` unless set; ``"unlabeled"``: the scorer scores the images
of one ``predict`` call against each other, or against a pool given by ``add_unlabeled(images)``, so
one image alone without a pool is refused (MuSc); the detector hands such a scorer whole batches, feeds
its pool and weighs it between the other two tiers), ``incremental`` (``add_references`` grows the memory in
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

**Tiling** (:mod:`vlad.tiling`) is generic: every scorer class gets the keyword parameters
``tile_size`` (None/0: off; else the side of a square tile in image pixels, best the backbone's input
size) and ``tile_overlap`` (pixels; None: a quarter of the tile), added to its ``__init__`` here (by
``__init_subclass__``), so no scorer declares them. With tiling on, an image larger than one tile is
cut into overlapping tiles, each tile goes through ``_predict_batch`` as an image, and the tile maps
are blended into one map whose maximum is the image score; references are cut the same way before
``_fit`` / ``_embed_references``. An incremental scorer then holds one memory entry per *tile*;
``tile_groups_`` records which tiles belong to which reference image, and ``list_references``,
``remove_reference`` and ``without_reference`` work per image.

**Working resolution.** ``predict_working(images)`` returns maps at :func:`vlad.tiling.working_shape`
(the image's own size up to :data:`vlad.tiling.WORK_PIXELS`); ``predict`` upsamples them once to
each image's size. The detector calibrates and fuses at the working resolution and upsamples only the
fused map, so memory stays bounded on huge images.

Incremental scorers mix in :class:`FewShotMixin` and implement ``_embed_references`` and
``_memory_changed`` (see there).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vlad import errors
from vlad.backbones import resolve_device
from vlad.errors import (
    EmptyReferenceSetError,
    InvalidDeviceError,
    InvalidParameterError,
    UnknownScorerError,
    VladError,
)
from vlad.images import LoadedImage, load_images
from vlad.params import ParamsMixin
from vlad.paramspec import COMMON_SPECS, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, Number, Spec, check_values  # noqa: F401 (sides: re-exported)
from vlad.precision import autocast, check_precision
from vlad.progress import track
from vlad.registry import parameter_names
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
from vlad.tiling import Stitcher, check_tiling, needs_tiling, tile_boxes, upsample_maps, working_shape
from vlad.types import AnomalyResult, ImagesLike, WorkingResult, check_finite  # noqa: F401 (check_finite: re-exported)

logger = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 2
TIERS = ("zero", "unlabeled", "few")
OUTPUT_SCALES = ("probability", "score")
#: the parameters every scorer gets from BaseScorer (see the module docstring, "Tiling")
TILING_PARAMS = {"tile_size": None, "tile_overlap": None}


def _checked_init(init):
    """``init`` with the keyword-only parameters of :data:`TILING_PARAMS` added where it lacks them (stored
    as attributes, visible to ``get_params``/``clone`` through the signature), and the parameters checked
    against the class's ``_param_specs`` once the outermost ``__init__`` has stored them (a subclass's
    ``super().__init__`` call does not check a half-built object)."""
    sig = inspect.signature(init)
    add_tiling = not all(name in sig.parameters for name in TILING_PARAMS)

    if add_tiling:
        @functools.wraps(init)
        def __init__(self, *args, tile_size=None, tile_overlap=None, **kwargs):
            init(self, *args, **kwargs)
            self.tile_size = tile_size
            self.tile_overlap = tile_overlap
            if type(self).__init__ is __init__:
                self._check_stored_params()

        params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in TILING_PARAMS.items()]
        params += [p for p in sig.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
        __init__.__signature__ = sig.replace(parameters=params)
    else:
        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if type(self).__init__ is __init__:
                self._check_stored_params()

    return __init__


class BaseScorer(ParamsMixin):
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
    #: False for a scorer whose result depends on whole images together (MuSc): a detector's shared
    #: ``tile_size``/``tile_overlap`` then skip it, and setting them on it is an error
    tiles: ClassVar[bool] = True

    #: parameter name -> :class:`vlad.paramspec.Spec` (see the module docstring, "Parameters"); a subclass
    #: declares its own, merged over those of its bases by ``__init_subclass__``
    _param_specs: ClassVar[Mapping[str, Spec]] = COMMON_SPECS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _checked_init(cls.__dict__["__init__"])
        specs: dict[str, Spec] = {}
        for base in reversed(cls.__bases__):
            specs.update(getattr(base, "_param_specs", {}))
        specs.update(cls.__dict__.get("_param_specs", {}))
        cls._param_specs = specs
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

    def _autocast(self):
        """The context of this scorer's pretrained-backbone forwards: :func:`vlad.precision.autocast` at its
        ``precision`` (a scorer without the parameter: fp32, no autocast) on its device. Cast what the
        backbone returns with :func:`vlad.precision.to_float32` before using it."""
        return autocast(getattr(self, "precision", "fp32"), self.device_)

    @property
    def weights_seed(self) -> int:
        """Seed of the backbone's initialisation with ``weights="random"``/``"tiny"``: the scorer's
        ``random_state`` (0 when it is None or absent), so a saved scorer reloads the same backbone."""
        seed = getattr(self, "random_state", 0)
        return 0 if seed is None else int(seed)

    # -- public API ---------------------------------------------------------------------------
    def fit(self, reference_images: ImagesLike | None = None) -> BaseScorer:
        """Prepare the scorer; learn from normal ``reference_images`` if given.

        Raises:
            EmptyReferenceSetError: the scorer needs references and got none.
            InvalidImageError: a reference is not a readable image.
        """
        self._check_stored_params()  # again: a value may have been assigned as an attribute since
        references = self._load_references(reference_images)
        tiling = self._tiling()
        self.device_ = resolve_device(getattr(self, "device", "cpu"))
        check_precision(getattr(self, "precision", "fp32"), self.device_)
        self._build()
        if references is not None and tiling is not None:
            tiles, groups = tile_references(references, tiling)
            self._fit(tiles)
            if type(self).incremental:
                self.tile_groups_ = groups
        else:
            self._fit(references)
            self.__dict__.pop("tile_groups_", None)
        self.n_references_ = 0 if references is None else len(references)
        return self

    def predict(self, images: ImagesLike) -> AnomalyResult:
        """Score ``images``: one score per image and one map at each image's own resolution.

        A scorer with ``part_scales`` also returns its parts in ``components`` (part name -> result).
        With ``tile_size`` set, images larger than a tile are scored tile by tile (module docstring).

        Raises:
            NotFittedError: ``fit`` was not called.
            InvalidImageError: an input is not a readable image (the message names it).
            NonFiniteScoreError: the scorer produced NaN or infinity for an image (names it).
        """
        self._check_fitted()
        loaded = load_images(images)
        work = self.predict_working(loaded)
        sizes = [img.size for img in loaded]
        components = {p: AnomalyResult(c.image_scores, upsample_maps(c.map_list(), sizes), names=c.names)
                      for p, c in work.components.items()}
        return AnomalyResult(work.image_scores, upsample_maps(work.map_list(), sizes), components=components,
                             names=work.names)

    def predict_working(self, images: ImagesLike) -> AnomalyResult:
        """:meth:`predict` with maps at the working resolution (:func:`vlad.tiling.working_shape`: each
        image's own size up to :data:`vlad.tiling.WORK_PIXELS` pixels, else scaled down to that). For
        callers that combine maps before bringing them to full size once (the detector).

        Raises:
            as :meth:`predict`.
        """
        self._check_fitted()
        result = self._predict_working(load_images(images)).to_result()
        check_finite(result, self.scorer_name or type(self).__name__)
        return result

    def _predict_working(self, loaded: list[LoadedImage]) -> WorkingResult:
        """:meth:`predict_working` before the copy to the host: maps stay on the scorer's device (tiled
        images are stitched on the host); not checked for non-finite values."""
        tiling = self._tiling()
        batch_size = max(1, int(getattr(self, "batch_size", 8) or 8))
        plain = [i for i, img in enumerate(loaded) if not needs_tiling(img.size, tiling)]
        tiled = [i for i, img in enumerate(loaded) if needs_tiling(img.size, tiling)]
        batches = [plain[i : i + batch_size] for i in range(0, len(plain), batch_size)]
        per_image: list[tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = [None] * len(loaded)  # type: ignore[list-item]
        label = f"{self.scorer_name or type(self).__name__}"
        with torch.inference_mode():
            for batch in (track(batches, label) if len(batches) > 1 else batches):
                out = self._predict_batch([loaded[i] for i in batch])
                scores, maps = _flat_scores(out[0]), _detach_maps(out[1])
                parts = {p: (_flat_scores(ps), _detach_maps(pm)) for p, (ps, pm) in _parts(out).items()}
                for j, i in enumerate(batch):
                    shape = working_shape(loaded[i].size)
                    per_image[i] = (scores[j], _resize(maps[j], shape),
                                    {p: (ps[j], _resize(pm[j], shape)) for p, (ps, pm) in parts.items()})
            for i in tiled:
                score, stitched, parts = self._predict_in_tiles(loaded[i], tiling, batch_size, label)
                dev = per_image[plain[0]][0].device if plain else stitched.device
                per_image[i] = (torch.tensor(score, device=dev), stitched.to(dev),
                                {p: (torch.tensor(ps, device=dev), pm.to(dev)) for p, (ps, pm) in parts.items()})
        names = tuple(img.name for img in loaded)
        part_names = set(per_image[0][2]) if per_image else set()
        parts_out = {}
        if part_names and all(set(r[2]) == part_names for r in per_image):  # every image gave its parts
            parts_out = {p: WorkingResult(_stack_scores([r[2][p][0] for r in per_image]), [r[2][p][1] for r in per_image],
                                          names=names)
                         for p in sorted(part_names)}
        return WorkingResult(_stack_scores([r[0] for r in per_image]), [r[1] for r in per_image], parts_out, names)

    def _predict_in_tiles(self, image: LoadedImage, tiling: tuple[int, int], batch_size: int, label: str):
        """One image scored tile by tile: ``(score, stitched map, {part: (score, map)})`` at the working
        resolution; the score is the maximum of the stitched map (see :mod:`vlad.tiling`)."""
        stitcher = Stitcher(image.size, *tiling)
        part_stitchers: dict[str, Stitcher] = {}
        boxes = stitcher.boxes
        steps = [boxes[k : k + batch_size] for k in range(0, len(boxes), batch_size)]
        for step in (track(steps, f"{label} tiles of {image.name}") if len(steps) > 1 else steps):
            out = self._predict_batch([image.crop(*box) for box in step])
            maps = _detach_maps(out[1])
            for box, m in zip(step, maps, strict=True):
                stitcher.add(box, m)
            for part, (_, pm) in _parts(out).items():
                ps = part_stitchers.setdefault(part, Stitcher(image.size, *tiling, shape=stitcher.shape))
                for box, m in zip(step, _detach_maps(pm), strict=True):
                    ps.add(box, m)
        stitched = stitcher.result()
        parts = {p: (float(m.max()), m) for p, m in ((p, st.result()) for p, st in part_stitchers.items())}
        return float(stitched.max()), stitched, parts

    def _tiling(self) -> tuple[int, int] | None:
        """``(tile_size, tile_overlap)`` checked, or None without tiling."""
        return check_tiling(getattr(self, "tile_size", None), getattr(self, "tile_overlap", None))

    def save(self, path: str | Path) -> Path:
        """Save parameters and metadata (``config.json``, with the state file's sha256) and the fitted
        state (``state.safetensors``) to the folder ``path``.

        Raises:
            NotFittedError: nothing to save yet.
            UnknownScorerError: the class is not registered, so the folder could not be loaded again.
            VladError: the folder cannot be written.
        """
        self._check_fitted()
        name = self._registered_name()
        folder = make_folder(path)
        tensors, meta = self._get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_safetensors(tensors, folder / STATE_FILE)
        config = {
            "format_version": FORMAT_VERSION,
            "scorer": name,
            "params": to_jsonable(self.get_params(deep=False), f"{name} parameters"),
            "n_references": int(getattr(self, "n_references_", 0)),
            "meta": to_jsonable(meta, f"{name} metadata"),
            "sha256": {STATE_FILE: sha256_file(folder / STATE_FILE)},
        }
        if hasattr(self, "tile_groups_"):
            config["tile_groups"] = to_jsonable(self.tile_groups_, f"{name} tile groups")
        write_json(folder / CONFIG_FILE, config)
        return folder

    def _registered_name(self) -> str:
        """The registry's name of this scorer's own class (what :func:`vlad.load` finds it by)."""
        from vlad.registry import registered_name

        name = registered_name(type(self))
        if name is None:
            raise errors.UnknownScorerError(
                f"{type(self).__name__} is not a registered scorer, so a saved copy could not be loaded "
                f"again; register the class first with @vlad.register_scorer('a_name')"
            )
        return name

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, precision: str | None = None) -> BaseScorer:
        """Load a scorer saved with :meth:`save` (checked; see :func:`load_scorer`), on ``device`` (None:
        the saved device when this machine has it, else the CPU, with a logged warning); ``precision``
        (None: as saved) replaces the saved one."""
        return load_scorer(path, device=device, precision=precision)

    # -- parameter checks (module docstring, "Parameters") --------------------------------------
    @classmethod
    def _check_param_values(cls, params: Mapping[str, Any], where: str | None = None,
                            current: Mapping[str, Any] | None = None) -> None:
        """Check ``params`` against ``_param_specs``, then the rules that join parameters (tiling), on
        ``params`` over ``current`` (the values not being changed); ``where``: the saved file they came from.

        Raises:
            InvalidParameterError: names the scorer, the parameter, the accepted values and the value.
        """
        owner = cls.scorer_name or cls.__name__
        check_values(owner, cls._param_specs, params, where)
        merged = {**(current or {}), **params}
        if "tile_size" in merged and ("tile_size" in params or "tile_overlap" in params):
            try:
                check_tiling(merged.get("tile_size"), merged.get("tile_overlap"))
            except InvalidParameterError as exc:
                prefix = f"{where}: {owner!r}" if where else owner
                raise InvalidParameterError(f"{prefix}: {exc}") from None

    def _check_stored_params(self) -> None:
        """Check the values this scorer holds (after ``__init__``, and at ``fit``)."""
        self._check_param_values({n: getattr(self, n) for n in self._get_param_names() if hasattr(self, n)})

    def _check_set_params(self, params: dict[str, Any]) -> None:
        """:meth:`set_params`' check, before anything is set."""
        current = {n: getattr(self, n) for n in self._get_param_names() if hasattr(self, n)}
        self._check_param_values(params, current=current)

    # -- helpers for subclasses ---------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "device_"):
            raise errors.NotFittedError(  # looked up here: the class imports scikit-learn
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


def tile_references(references: list[LoadedImage], tiling: tuple[int, int] | None
                    ) -> tuple[list[LoadedImage], list[list[Any]]]:
    """References cut into tiles as test images are: ``(tiles, groups)``, ``groups`` = one
    ``[image name, number of tiles]`` per reference, in order (an image within one tile stays whole)."""
    tiles: list[LoadedImage] = []
    groups: list[list[Any]] = []
    for img in references:
        if needs_tiling(img.size, tiling):
            parts = [img.crop(*box) for box in tile_boxes(img.size, *tiling)]
        else:
            parts = [img]
        tiles.extend(parts)
        groups.append([img.name, len(parts)])
    return tiles, groups


def _parts(out: tuple) -> dict[str, tuple[torch.Tensor, Any]]:
    return out[2] if len(out) > 2 else {}


def _resize(m: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """One map ``(h, w)`` brought to ``shape`` (bilinear), on its device."""
    m = m.float()
    if tuple(m.shape) == tuple(shape):
        return m
    return torch.nn.functional.interpolate(m[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0]


def _flat_scores(s: torch.Tensor) -> torch.Tensor:
    return s.detach().float().reshape(-1)


def _stack_scores(scores: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(scores) if scores else torch.zeros(0)


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


#: ``check_references``'s threshold: a finite number above 0 (NaN would flag nothing)
Z_THRESHOLD = Number(0, None, lo_open=True).explain(
    "in robust standard deviations: 3.5 by default, lower flags more references")


def check_z_threshold(z_threshold: Any) -> None:
    """Refuse a ``check_references`` threshold that is not a finite number above 0.

    Raises:
        InvalidParameterError: anything else.
    """
    check_values("check_references", {"z_threshold": Z_THRESHOLD}, {"z_threshold": z_threshold})


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
        """Append normal images to the memory in place (no refit of what is there). Returns self.

        With tiling, each image is cut into tiles as test images are, one memory entry per tile."""
        self._check_fitted()
        loaded = load_images(images)
        tiling = self._tiling()
        if tiling is not None or hasattr(self, "tile_groups_"):
            groups = self._tile_groups()
            loaded, new = tile_references(loaded, tiling)
            self.tile_groups_ = groups + new
        with torch.inference_mode():
            chunks = self._embed_references(loaded)
        self.memory_chunks_.extend(chunks)
        self.reference_names_.extend(img.name for img in loaded)
        self.n_references_ = len(self._tile_groups())
        self._memory_changed()
        return self

    def _tile_groups(self) -> list[list[Any]]:
        """``[image name, number of memory entries]`` per reference image (one entry each without tiling)."""
        groups = getattr(self, "tile_groups_", None)
        if groups is None:
            return [[name, 1] for name in self.reference_names_]
        return [list(g) for g in groups]

    def _entries_of(self, which: int | str) -> tuple[int, list[int]]:
        """Reference image ``which`` -> (its index, the indices of its memory entries)."""
        groups = self._tile_groups()
        i = reference_index([g[0] for g in groups], which)
        start = sum(g[1] for g in groups[:i])
        return i, list(range(start, start + groups[i][1]))

    def list_references(self) -> list[str]:
        """Names of the reference images in memory, in the order they were added."""
        self._check_fitted()
        return [g[0] for g in self._tile_groups()]

    def remove_reference(self, which: int | str):
        """Forget one reference (by index or name), e.g. one found to be defective. Returns self.

        Raises:
            InvalidParameterError: no such reference, or ``which`` is neither an int nor a str.
        """
        self._check_fitted()
        i, entries = self._entries_of(which)
        for j in reversed(entries):
            del self.memory_chunks_[j]
            del self.reference_names_[j]
            for attr in self._aligned_lists:
                del getattr(self, attr)[j]
        if hasattr(self, "tile_groups_"):
            self.tile_groups_ = [g for k, g in enumerate(self._tile_groups()) if k != i]
        self.n_references_ = len(self._tile_groups())
        self._memory_changed()
        return self

    def without_reference(self, which: int | str):
        """A leave-one-out view: a copy whose memory lacks reference ``which``; this scorer is untouched.

        The copy shares the backbone and the memory tensors (never mutated) and has its own lists (and
        copies of dict entries), so rebuilding its caches cannot reach this scorer. This is the one
        leave-one-out path: the detector scores each reference with it as a held-out normal image.
        """
        self._check_fitted()
        i, entries = self._entries_of(which)
        clone = copy.copy(self)
        keep = [j for j in range(len(self.reference_names_)) if j not in set(entries)]
        if hasattr(self, "tile_groups_"):
            clone.tile_groups_ = [g for k, g in enumerate(self._tile_groups()) if k != i]

        def pick(items: list) -> list:
            return [dict(items[j]) if isinstance(items[j], dict) else items[j] for j in keep]

        clone.memory_chunks_ = pick(self.memory_chunks_)
        clone.reference_names_ = [self.reference_names_[j] for j in keep]
        for attr in self._aligned_lists:
            setattr(clone, attr, pick(getattr(self, attr)))
        for key, value in vars(self).items():  # caches: own containers, never the original's
            if key not in ("memory_chunks_", "reference_names_", "tile_groups_", *self._aligned_lists):
                if isinstance(value, (list, dict)):
                    setattr(clone, key, copy.copy(value))
        clone.n_references_ = len(clone._tile_groups())
        clone._memory_changed()
        return clone

    def leave_one_out_scores(self) -> np.ndarray:
        """Image score of each reference against a memory of all the *other* references: ``(n_refs,)``.

        These are scores of known-normal images under the scorer's own rules, so they describe its
        normal score distribution (used by :meth:`check_references`). Subclasses may override with a
        faster path giving the same scores.

        Raises:
            VladError: fewer than two references.
            UnsupportedOperationError: the scorer does not implement it.
        """
        raise errors.UnsupportedOperationError(
            f"{type(self).__name__} does not implement leave_one_out_scores, so its references cannot be "
            "checked; check them with a scorer that does (patchcore, anomalydino, winclip)")

    def check_references(self, z_threshold: float = 3.5) -> list[str]:
        """Names of references whose leave-one-out score is an outlier (robust z-score above
        ``z_threshold``, from median and MAD): likely defective or mislabelled references.

        Needs at least 3 references; with fewer, returns an empty list.

        Raises:
            InvalidParameterError: ``z_threshold`` is not a positive finite number.
            UnsupportedOperationError: the scorer scores tiles (``tile_size``), where a reference's own
                sibling tiles would stand in for it.
        """
        check_z_threshold(z_threshold)
        self._check_fitted()
        if hasattr(self, "tile_groups_"):
            raise errors.UnsupportedOperationError(
                f"{type(self).__name__}.check_references is not available with tiling (tile_size="
                f"{getattr(self, 'tile_size', None)!r}): a reference's sibling tiles would stand in for it; check "
                "the references with the same scorer built without tile_size")
        if len(self.reference_names_) < 3:
            return []
        scores = np.asarray(self.leave_one_out_scores(), dtype=np.float64)
        med = np.median(scores)
        mad = np.median(np.abs(scores - med)) * 1.4826
        scale = mad if mad > 1e-12 else (np.std(scores) or 1.0)
        z = (scores - med) / scale
        return [name for name, zi in zip(self.reference_names_, z) if zi > z_threshold]


def check_params(name: str, cls: type, params: Any, where: str) -> dict[str, Any]:
    """Saved parameters of scorer ``name``: a plain JSON object of parameters ``cls`` accepts.

    Raises:
        VladError: not an object, non-plain values, or unknown parameter names.
        InvalidParameterError: a value its spec refuses (names ``where``, the scorer, the parameter and the value).
    """
    if not isinstance(params, dict):
        raise VladError(f"{where}: 'params' of {name!r} must be a JSON object, got {type(params).__name__}")
    check_plain(params, f"{where} parameters")
    extra = set(params) - set(parameter_names(cls))
    if extra:
        raise VladError(f"{where}: scorer {name!r} has no parameter(s) {sorted(extra)}; it accepts "
                        f"{parameter_names(cls)}")
    # JSON has no tuples: give back a tuple where the parameter's default is one (layers, scales, ...)
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
    params = {k: tuple(v) if isinstance(v, list) and isinstance(defaults.get(k), tuple) else v
              for k, v in params.items()}
    check_values_of = getattr(cls, "_check_param_values", None)
    if check_values_of is not None:  # every value checked against the class's specs, naming the file
        check_values_of(params, where=where, current=_defaults_of(cls))
    return params


def _defaults_of(cls: type) -> dict[str, Any]:
    """The defaults of ``cls.__init__``'s parameters (those that have one)."""
    return {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
            if v.default is not inspect.Parameter.empty}


def loading_device(saved: Any, device: str | None) -> tuple[Any, bool]:
    """The device a saved scorer is loaded on, and whether that is the CPU instead of an unavailable
    saved device: ``device`` when given (checked later, an unavailable one is an error); else the saved
    device when it is available here, else ``"cpu"`` (e.g. a scorer saved on a GPU machine loaded on a
    laptop).

    Raises:
        InvalidDeviceError: the saved device is not a device name torch knows (not a machine difference:
            a damaged file).
    """
    if device is not None:
        return device, False
    try:
        resolve_device(saved)
    except InvalidDeviceError:
        try:
            torch.device(saved.strip() if isinstance(saved, str) else saved)
        except (RuntimeError, TypeError, ValueError):
            raise InvalidDeviceError(f"saved device {saved!r} is not a device name torch knows; the saved file "
                                     "was edited: save it again, or pass device='cpu'") from None
        return "cpu", True
    return saved, False


def warn_cpu_fallback(what: str | Path, saved: Any) -> None:
    """The one-line warning of a load that fell back to the CPU (see :func:`loading_device`)."""
    logger.warning("%s was saved to run on %s, which this machine does not have; loading it on the CPU "
                   "(pass device=... to choose)", what, saved)


def load_scorer(path: str | Path, device: str | None = None, expected: str | None = None,
                precision: str | None = None, *, fallbacks: list[str] | None = None) -> BaseScorer:
    """The one checked loader of a scorer folder written by :meth:`BaseScorer.save`.

    Checks, before any tensor is read: ``config.json`` is plain JSON with the known keys, names a
    registered scorer (``expected`` if given) with parameters it accepts, and the sha256 of
    ``state.safetensors`` matches the one recorded at saving. Never executes code from the files.

    ``device``: where to load it (its ``device`` parameter becomes that); None: the device it was saved
    with when this machine has it, else the CPU, with one logged warning (or, when ``fallbacks`` is a
    list, the saved device appended to it instead, for a caller that warns once for many scorers).
    ``precision`` (None: as saved) replaces the saved value, for a scorer that has one.

    Raises:
        VladError: missing files, not JSON, unknown scorer or keys, a saved state that does not fit.
        IntegrityError: the state file changed after it was saved.
    """
    from vlad.registry import get_scorer_class, list_scorers

    folder = Path(path)
    cfg_path = folder / CONFIG_FILE
    config = read_json(cfg_path, "a scorer config written by Scorer.save()")
    check_keys(config, {"format_version", "scorer", "params", "n_references", "meta", "sha256", "tile_groups"}, str(cfg_path),
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
    if "device" in params:
        saved = params["device"]
        params["device"], fell_back = loading_device(saved, device)
        if fell_back:
            if fallbacks is None:
                warn_cpu_fallback(folder, saved)
            else:
                fallbacks.append(str(saved))
    if precision is not None and "precision" in parameter_names(get_scorer_class(name)):
        params["precision"] = precision
    from vlad.registry import create_scorer

    scorer = create_scorer(name, **params)
    try:
        scorer.device_ = resolve_device(params.get("device", "cpu"))
        check_precision(params.get("precision", "fp32"), scorer.device_)
        scorer._build()
        tensors = load_safetensors(folder / STATE_FILE, device=str(scorer.device_))
        scorer._set_state(tensors, meta)
    except VladError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:  # state that does not fit
        raise VladError(f"{folder}: the saved {name!r} state does not fit this scorer "
                        f"({type(exc).__name__}: {exc}); fit and save it again") from exc
    scorer.n_references_ = n_refs
    if "tile_groups" in config:
        groups = config["tile_groups"]
        names = getattr(scorer, "reference_names_", None)
        ok = isinstance(groups, list) and all(
            isinstance(g, list) and len(g) == 2 and isinstance(g[0], str) and isinstance(g[1], int)
            and not isinstance(g[1], bool) and g[1] > 0 for g in groups)
        if not ok or names is None or sum(g[1] for g in groups) != len(names) or len(groups) != n_refs:
            raise VladError(f"{cfg_path}: 'tile_groups' must list [reference name, tiles > 0] per reference, "
                            f"covering the {0 if names is None else len(names)} saved memory entries; save it again")
        scorer.tile_groups_ = [list(g) for g in groups]
    return scorer
