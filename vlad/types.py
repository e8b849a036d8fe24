"""Core data types: the result every scorer returns and the image inputs it accepts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from os import PathLike
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

import numpy as np

from .errors import InvalidArgumentError, NonFiniteScoreError

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: One image: a path, a PIL image, an ``(H, W)`` / ``(H, W, C)`` array or a ``(C, H, W)`` tensor.
ImageLike = Union[str, "PathLike[str]", "Image.Image", np.ndarray, "torch.Tensor"]
#: One image or a sequence of them.
ImagesLike = Union[ImageLike, Sequence[ImageLike]]


@dataclass(frozen=True)
class ImageFailure:
    """An input that could not be read, listed instead of raising (``Detector.predict(on_error="skip")``).

    Attributes:
        index: the input's position among the images of the call (after :meth:`AnomalyResult.concatenate`,
            among the images of all the calls joined).
        name: the file path, or ``<array>``, ``<PIL image>``, ``<tensor>`` for an image in memory.
        error: what is wrong with it, as the error raised for it says (``"a.png: the file is empty"``).
    """

    index: int
    name: str
    error: str

    @classmethod
    def from_error(cls, index: int, name: str, exc: BaseException) -> ImageFailure:
        """The failure of input ``index`` called ``name`` that raised ``exc``: the error's own message
        when it names the input (vlad's errors about an image start with its name), else the error's
        type and message."""
        message = str(exc).strip() or type(exc).__name__
        if not message.startswith(name):
            message = f"{type(exc).__name__}: {message}"
        return cls(int(index), str(name), message)


@dataclass(frozen=True)
class AnomalyResult:
    """Scores and maps for a batch of images. Higher always means more anomalous.

    Attributes:
        image_scores: float32 ``(B,)``.
        anomaly_maps: float32 ``(B, H, W)`` when all images share one size, else a list of ``(H_i, W_i)``
            arrays, each at its image's own resolution.
        labels: bool ``(B,)`` once an image threshold is set, else None.
        masks: bool maps shaped like ``anomaly_maps`` once a pixel threshold is set, else None.
        components: per-scorer results of a fused detector (name -> AnomalyResult), else empty.
        names: optional identifier per image (e.g. file paths).
        failures: the inputs that could not be read, when they were skipped rather than raised
            (``Detector.predict(images, on_error="skip")``): an :class:`ImageFailure` each, in input
            order. The other fields then hold the readable images only, in input order. Empty otherwise.
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray | list[np.ndarray]
    labels: np.ndarray | None = None
    masks: np.ndarray | list[np.ndarray] | None = None
    components: Mapping[str, AnomalyResult] = field(default_factory=dict)
    names: tuple[str, ...] | None = None
    failures: tuple[ImageFailure, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "failures", tuple(self.failures))
        scores = np.asarray(self.image_scores, dtype=np.float32).reshape(-1)
        object.__setattr__(self, "image_scores", scores)
        maps = self.anomaly_maps
        if isinstance(maps, np.ndarray):
            maps = maps.astype(np.float32, copy=False)
            if maps.ndim != 3:
                raise InvalidArgumentError(f"anomaly_maps must be (B, H, W), got shape {maps.shape}")
        else:
            maps = [np.asarray(m, dtype=np.float32) for m in maps]
            if maps and all(m.shape == maps[0].shape for m in maps):
                maps = np.stack(maps)
            elif not maps:
                maps = np.zeros((0, 0, 0), dtype=np.float32)
        object.__setattr__(self, "anomaly_maps", maps)
        if len(maps) != len(scores):
            raise InvalidArgumentError(f"{len(scores)} image scores but {len(maps)} anomaly maps")

    def __len__(self) -> int:
        """The number of images scored (``failures`` not counted)."""
        return len(self.image_scores)

    def map_list(self) -> list[np.ndarray]:
        """The anomaly maps as a list of ``(H_i, W_i)`` arrays, whatever their sizes."""
        return list(self.anomaly_maps)

    def with_thresholds(self, image_threshold: float | None, pixel_threshold: float | None) -> AnomalyResult:
        """A copy with ``labels`` (score > image_threshold) and ``masks`` (map > pixel_threshold) set.

        A value that is not a number (NaN) is never below a threshold: it counts as anomalous.
        """
        labels = None if image_threshold is None else ~(self.image_scores <= image_threshold)
        masks = None
        if pixel_threshold is not None:
            masks = [_above(m, pixel_threshold) for m in self.map_list()]
            if isinstance(self.anomaly_maps, np.ndarray):
                masks = np.stack(masks) if len(masks) > 1 else masks[0][None] if masks else np.zeros((0, 0, 0), bool)
        return replace(self, labels=labels, masks=masks)

    @staticmethod
    def concatenate(results: Sequence[AnomalyResult]) -> AnomalyResult:
        """Join the results of several batches, in order (labels, masks, components and failures
        included; a failure's ``index`` counts the inputs of the batches before its own)."""
        if not results:
            raise InvalidArgumentError("nothing to concatenate")
        failures, offset = [], 0
        for r in results:
            failures.extend(replace(f, index=f.index + offset) for f in r.failures)
            offset += len(r) + len(r.failures)
        scored = [r for r in results if len(r)]  # a batch whose every input failed adds no image
        if len(scored) <= 1:
            return replace(scored[0] if scored else results[0], failures=tuple(failures))
        results = scored
        scores = np.concatenate([r.image_scores for r in results])
        maps = [m for r in results for m in r.map_list()]
        labels = None
        if all(r.labels is not None for r in results):
            labels = np.concatenate([r.labels for r in results])
        masks = None
        if all(r.masks is not None for r in results):
            masks = [m for r in results for m in list(r.masks)]
            if all(m.shape == masks[0].shape for m in masks):
                masks = np.stack(masks)
        components = {}
        for name in results[0].components:
            if all(name in r.components for r in results):
                components[name] = AnomalyResult.concatenate([r.components[name] for r in results])
        names = None
        if all(r.names is not None for r in results):
            names = tuple(n for r in results for n in r.names)
        return AnomalyResult(scores, maps, labels, masks, components, names, tuple(failures))


def _above(values: np.ndarray, threshold: float) -> np.ndarray:
    """``~(values <= threshold)`` (NaN counts as above) in one boolean array, no temporary."""
    out = np.less_equal(values, threshold)
    return np.logical_not(out, out=out)


@runtime_checkable
class Scorer(Protocol):
    """What every scorer offers (scikit-learn estimator conventions)."""

    def fit(self, reference_images: ImagesLike | None = None) -> Scorer: ...

    def predict(self, images: ImagesLike) -> AnomalyResult: ...

    def get_params(self, deep: bool = True) -> dict[str, Any]: ...


@runtime_checkable
class FewShotScorer(Scorer, Protocol):
    """A scorer whose reference memory grows without refitting from scratch."""

    def add_references(self, images: ImagesLike) -> FewShotScorer: ...


@dataclass
class WorkingResult:
    """Scores and maps as the predict path computes them: numpy arrays or torch tensors, on the
    scorer's device, at the working resolution, not yet checked nor copied to the host. The internal
    currency between scorers, calibration and fusion (:meth:`vlad.detector.Detector.predict` keeps
    maps on the device until :meth:`to_result`, once, at the end).

    Attributes:
        scores: ``(B,)`` float32.
        maps: B maps ``(H_i, W_i)`` float32.
        parts: part or scorer name -> its own result (an :class:`AnomalyResult`'s ``components``).
        names: optional identifier per image.
    """

    scores: Any
    maps: list[Any]
    parts: dict[str, WorkingResult] = field(default_factory=dict)
    names: tuple[str, ...] | None = None

    @classmethod
    def of(cls, result: AnomalyResult) -> WorkingResult:
        """The arrays of ``result`` (no copy), its components as parts."""
        return cls(result.image_scores, result.map_list(), {p: cls.of(c) for p, c in result.components.items()},
                   result.names)

    def to_result(self) -> AnomalyResult:
        """The public :class:`AnomalyResult`: float32 numpy on the host, one copy per map at most."""
        return AnomalyResult(_host(self.scores), _host_maps(self.maps),
                             components={p: r.to_result() for p, r in self.parts.items()}, names=self.names)

    def check_finite(self, source: str) -> None:
        """Refuse NaN or infinity in scores, maps or parts, as :func:`check_finite` (where the maps are)."""
        if isinstance(self.scores, np.ndarray):
            bad = [not (_all_finite(self.scores[i]) and _all_finite(m)) for i, m in enumerate(self.maps)]
        else:  # one flag per image computed where the maps are, one copy to the host
            import torch

            flags = torch.stack([m.isfinite().all() for m in self.maps]) if self.maps else self.scores.isfinite()
            bad = (~(self.scores.isfinite() & flags)).cpu().tolist()
        _refuse_non_finite(np.array(bad, dtype=bool), self.names, source)
        for part, comp in self.parts.items():
            comp.check_finite(f"{source} ({part})")


def _all_finite(x: Any) -> bool:
    return bool(np.isfinite(x).all()) if isinstance(x, (np.ndarray, np.generic, float)) else bool(x.isfinite().all())


def _host(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    x = x.detach().float()
    if x.device.type != "cuda":
        return x.cpu().numpy()
    import torch  # x is a tensor: torch is already imported

    # through page-locked memory: measured on an H200, 128 MiB took 128 ms to pageable memory and
    # 2.5 ms to a freshly allocated page-locked buffer
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x).numpy()


def _host_maps(maps: list[Any]) -> np.ndarray | list[np.ndarray]:
    """Maps to host float32: one ``(B, H, W)`` array (stacked where they lie) when their shapes agree."""
    if maps and not isinstance(maps[0], np.ndarray) and all(m.shape == maps[0].shape for m in maps):
        import torch  # maps are tensors: torch is already imported

        return _host(maps[0][None] if len(maps) == 1 else torch.stack(maps))
    return [_host(m) for m in maps]


def _refuse_non_finite(bad: np.ndarray, names: tuple[str, ...] | None, source: str) -> None:
    if bad.any():
        names = names or tuple(f"image {i}" for i in range(len(bad)))
        which = [names[i] for i in np.flatnonzero(bad)[:5]]
        more = f" and {int(bad.sum()) - 5} more" if bad.sum() > 5 else ""
        raise NonFiniteScoreError(
            f"{source} produced NaN or infinite scores/maps for {which}{more}; such results are refused, "
            "never labelled normal. Causes: corrupted fitted state or weights (fit or save again), or an "
            "input the model cannot handle (check the image)"
        )


def check_finite(result: AnomalyResult, source: str) -> None:
    """Refuse a result holding NaN or infinity (in scores, maps or parts).

    Raises:
        NonFiniteScoreError: names ``source`` and the images concerned.
    """
    bad = ~np.isfinite(result.image_scores)
    for i, m in enumerate(result.map_list()):
        if not np.isfinite(m).all():
            bad[i] = True
    _refuse_non_finite(bad, result.names, source)
    for part, comp in result.components.items():
        check_finite(comp, f"{source} ({part})")
