"""What the scorers trained from scratch (autoencoder, DRAEM) share beyond the network: a training
budget that scales with the references under a time cap, early stopping on held-out normal references,
a canvas policy for images of any size and aspect ratio, and the rule turning error maps into an anomaly
map and an image score.

**Budget.** ``train_steps=None`` gives :func:`auto_steps`: enough steps for every reference to be seen
about ``epochs`` times (at least ``min_steps``), so the budget grows with what the scorer is given. A
time cap (seconds of wall-clock training) stops training earlier; when the cap binds, the model depends
on the machine's speed (a warning says so): set ``time_limit=None`` for a bit-reproducible model.

**Early stopping.** A fraction of the references (``validation_fraction``, drawn with the scorer's seed)
is held out; every ``eval_every`` steps the loss on them is measured, the best weights are kept and
training stops after ``patience`` evaluations without improvement.

**Canvas.** ``"letterbox"`` scales an image to fit inside the working size ``(H, W)`` keeping its
aspect ratio and pads the rest by reflection; the map is cropped back to the image's own region, so a
defect at the edge of a wide image stays in the map and is never squashed. ``"stretch"`` resizes every
image to ``(H, W)`` (the 0.1 behaviour).

**Map rule** (:class:`MapRule`, chosen by the leave-one-set-out protocol of ``python -m vlad.bench
quality``). ``normalize="position"`` divides each pixel's error, minus the references' mean error at
that position, by the references' spread there (per pixel, the spread floored at a fraction
of its mean), so positions where normal texture is hard to reconstruct stop dominating;
``"global"`` only divides each error term by its mean over the references. ``shift`` > 0 makes the
position statistics tolerant to misaligned parts: the highest mean and spread within ``+-shift`` pixels. The normalised map is
smoothed (``sigma``) and the image score is the mean of its top ``topk_fraction`` of pixels (0 = max)
over the image's own region.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlad.errors import InvalidParameterError, VladError
from vlad.images import LoadedImage
from vlad.ops import gaussian_blur, resize_blur
from vlad.progress import track

logger = logging.getLogger(__name__)

CANVAS_MODES = ("letterbox", "stretch")
NORMALIZE_MODES = ("position", "global")
#: references held out for statistics only when at least this many are held out (else all are used)
MIN_HELD_OUT_FOR_STATS = 8


# -- budget and early stopping ---------------------------------------------------------------------------
def auto_steps(n_train: int, batch_size: int, epochs: float = 30.0, min_steps: int = 200,
               max_steps: int = 4000) -> int:
    """Steps for about ``epochs`` passes over ``n_train`` references, within ``[min_steps, max_steps]``."""
    return int(min(max_steps, max(min_steps, math.ceil(epochs * n_train / max(1, batch_size)))))


#: from 4 x this many references on, at least this many are held out (when any are): a choice made on
#: two held-out parts is noise (a 16-reference detector trains on 12: 2 held out gave MPDD 78.8 image
#: AUROC for the autoencoder, 3 gave 89.0, 3 seeds)
MIN_HELD_OUT = 3


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, who: str, lr: float) -> float:
    """One optimisation step on ``loss``; its value. A non-finite loss raises (``who`` names the scorer)
    instead of writing NaN into the weights."""
    if not torch.isfinite(loss):
        raise VladError(f"{who}: the training loss became {loss.item()} (diverged); lower lr "
                        f"(now {lr}) or check the reference images")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def split_held_out(n: int, fraction: float, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, held_out)`` of ``n`` references: ``round(n * fraction)``, at least 1, and at
    least :data:`MIN_HELD_OUT` once ``n >= 4 * MIN_HELD_OUT``; nothing is held out below 4 references or
    with ``fraction`` 0. The draw follows ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise InvalidParameterError(f"validation_fraction must be in [0, 1), got {fraction}; e.g. 0.2")
    floor = MIN_HELD_OUT if n >= 4 * MIN_HELD_OUT else 1
    n_out = 0 if n < 4 or fraction == 0 else min(max(floor, int(round(n * fraction))), n - 2)
    perm = np.random.default_rng(0 if seed is None else int(seed) + 7919).permutation(n)
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


@dataclass
class TrainLog:
    """What a training run did: losses per step, validation losses, why it stopped, how long it took."""

    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped: str = "budget"  # "budget", "time", "early", "interrupted"
    best_step: int | None = None
    planned_steps: int = 0
    seconds: float = 0.0

    def as_meta(self) -> dict:
        """JSON-able summary (saved with the scorer)."""
        return {"stopped": self.stopped, "best_step": self.best_step, "planned_steps": self.planned_steps,
                "seconds": round(self.seconds, 3), "val_losses": [[s, v] for s, v in self.val_losses]}


def fit_loop(
    step: Callable[[int], float],
    n_steps: int,
    desc: str,
    *,
    model: nn.Module | None = None,
    validate: Callable[[int], float] | None = None,
    eval_every: int = 20,
    patience: int = 5,
    min_delta: float = 0.0,
    min_steps: int = 0,
    min_kept_step: int = 0,
    ema: float | None = None,
    time_limit: float | None = None,
    log: logging.Logger = logger,
    clock: Callable[[], float] = time.perf_counter,
) -> TrainLog:
    """Run ``step(i) -> loss`` up to ``n_steps`` times with a progress bar, a time cap and early stopping.

    With ``validate(step)`` (a held-out loss, lower is better) and ``model``, the weights of the best
    evaluation are restored at the end; ``patience`` evaluations without an improvement of more than
    ``min_delta`` stop training, never before ``min_steps`` steps (``patience=0``: never stop early, but
    still keep the best weights). Evaluations before step ``min_kept_step`` are made (``validate`` sees
    them) but their weights are never kept and they count neither as an improvement nor against the
    patience (a network that must learn before its output means anything). ``ema`` (a decay in (0, 1),
    with ``model``): evaluate and keep an exponential moving average of the weights instead of the last
    step's (a small, noisy training set makes step-to-step weights swing; their average is steadier).
    ``time_limit`` (seconds) stops training once exceeded. A KeyboardInterrupt keeps what was trained (a
    second one aborts).

    Raises:
        FloatingPointError: the loss became NaN or infinite (lower the learning rate).
    """
    out = TrainLog(planned_steps=int(n_steps))
    best, best_state, bad = math.inf, None, 0
    t0 = clock()
    every = max(1, int(eval_every))
    average = _WeightAverage(model, float(ema)) if ema is not None and model is not None else None

    def evaluate(i: int) -> bool:
        nonlocal best, best_state, bad
        if model is not None:
            model.eval()
        with torch.no_grad(), (average.swapped() if average is not None else contextlib.nullcontext()):
            value = float(validate(i))
            eligible = i >= min_kept_step
            improved = eligible and value < best - max(float(min_delta),
                                                       1e-6 * abs(best if math.isfinite(best) else 1.0))
            if improved and model is not None:
                best_state = copy.deepcopy(model.state_dict())
        if model is not None:
            model.train()
        out.val_losses.append((i, value))
        if improved:
            best, bad, out.best_step = value, 0, i
        elif eligible:
            bad += 1
        return patience > 0 and bad >= patience and i >= min_steps

    try:
        for i in track(range(n_steps), desc, total=n_steps):
            out.losses.append(float(step(i)))
            if average is not None:
                average.update()
            if not math.isfinite(out.losses[-1]):
                raise FloatingPointError(f"{desc}: training loss became {out.losses[-1]} at step {i}; "
                                         "lower the learning rate")
            done = i + 1
            if validate is not None and (done % every == 0 or done == n_steps) and evaluate(done):
                out.stopped = "early"
                break
            if time_limit is not None and clock() - t0 > time_limit:
                out.stopped = "time"
                log.warning("%s: time limit of %.0f s reached after %d of %d steps; the model now depends on "
                            "this machine's speed (time_limit=None for a reproducible model)",
                            desc, time_limit, done, n_steps)
                if validate is not None and done % every:
                    evaluate(done)
                break
    except KeyboardInterrupt:
        out.stopped = "interrupted"
        log.warning("%s: training interrupted after %d of %d steps; keeping the model trained so far",
                    desc, len(out.losses), n_steps)
    if best_state is not None and model is not None:
        model.load_state_dict(best_state)
    elif average is not None:
        average.copy_to_model()
    out.seconds = clock() - t0
    if out.losses:
        log.info("%s: %d/%d steps (%s), loss %.4g -> %.4g, best held-out at step %s, %.1f s", desc,
                 len(out.losses), n_steps, out.stopped, out.losses[0], out.losses[-1], out.best_step, out.seconds)
    return out


class _WeightAverage:
    """An exponential moving average of a model's floating-point parameters and buffers (integer buffers,
    e.g. batch-norm counters, are copied), swapped in for evaluation."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise InvalidParameterError(f"ema must be a decay in (0, 1), got {decay}")
        self.model, self.decay = model, decay
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if v.is_floating_point():
                    self.avg[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
                else:
                    self.avg[k].copy_(v)

    def copy_to_model(self) -> None:
        self.model.load_state_dict(self.avg)

    @contextlib.contextmanager
    def swapped(self):
        """The average in the model for the block, the trained weights back after it."""
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.avg)
        try:
            yield
        finally:
            self.model.load_state_dict(current)


# -- canvas: images of any size and aspect ratio --------------------------------------------------------
def to_canvas(images: Sequence[LoadedImage], size: tuple[int, int], mode: str = "letterbox",
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """Images on the working canvas: float32 ``(B, 3, H, W)`` in [0, 1] and each image's region
    ``(y0, x0, h, w)`` on it (the whole canvas for ``"stretch"``).

    Raises:
        InvalidParameterError: unknown ``mode``.
    """
    if mode not in CANVAS_MODES:
        raise InvalidParameterError(f"canvas must be one of {CANVAS_MODES}, got {mode!r}")
    H, W = int(size[0]), int(size[1])
    out, boxes = [], []
    for img in images:
        x = torch.from_numpy(img.pixels).permute(2, 0, 1)[None]
        h, w = img.size
        if mode == "stretch":
            nh, nw = H, W
        else:
            s = min(H / h, W / w)
            nh, nw = max(1, min(H, int(round(h * s)))), max(1, min(W, int(round(w * s))))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
        y0, x0 = (H - nh) // 2, (W - nw) // 2
        if (nh, nw) != (H, W):
            pads = (x0, W - nw - x0, y0, H - nh - y0)
            reflect = max(pads[0], pads[1]) < nw and max(pads[2], pads[3]) < nh
            x = F.pad(x, pads, mode="reflect" if reflect else "replicate")
        out.append(x)
        boxes.append((y0, x0, nh, nw))
    return torch.cat(out).to(device), boxes


def crop_regions(maps: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]]) -> list[torch.Tensor]:
    """Each canvas map ``(B, H, W)`` cut to its image's region: a list of ``(h, w)`` tensors."""
    return [m[y0 : y0 + h, x0 : x0 + w] for m, (y0, x0, h, w) in zip(maps, boxes, strict=True)]


def stack_or_list(maps: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One ``(B, h, w)`` tensor when all maps share a size, else the list (as ``_predict_batch`` allows)."""
    return torch.stack(maps) if len({tuple(m.shape) for m in maps}) == 1 else maps


# -- map rule --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MapRule:
    """How raw error maps become an anomaly map and an image score (see the module docstring).

    ``terms``: indices of the raw error terms used (e.g. AE: 0 = 1 - SSIM, 1 = squared error).
    """

    normalize: str = "position"
    sigma: float = 4.0
    topk_fraction: float = 0.01
    terms: tuple[int, ...] = (0, 1)
    stats_sigma: float = 0.0
    floor: float = 0.25
    shift: int = 0

    def check(self) -> MapRule:
        """Self, or InvalidParameterError naming the bad field."""
        if self.normalize not in NORMALIZE_MODES:
            raise InvalidParameterError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if not 0.0 <= self.topk_fraction <= 1.0:
            raise InvalidParameterError(f"topk_fraction must be in [0, 1] (0 = max), got {self.topk_fraction}")
        if self.sigma < 0:
            raise InvalidParameterError(f"sigma must be >= 0, got {self.sigma}")
        if self.shift < 0:
            raise InvalidParameterError(f"shift_tolerance must be >= 0 pixels, got {self.shift}")
        return self

    def as_meta(self) -> dict:
        """JSON-able fields (saved with a scorer; :meth:`from_meta` reads them back)."""
        return {"normalize": self.normalize, "sigma": self.sigma, "topk_fraction": self.topk_fraction,
                "terms": list(self.terms), "stats_sigma": self.stats_sigma, "floor": self.floor, "shift": self.shift}

    @classmethod
    def from_meta(cls, meta: dict) -> MapRule:
        """The rule :meth:`as_meta` wrote, checked."""
        return cls(**{**meta, "terms": tuple(meta["terms"])}).check()

    def label(self, term_names: Sequence[str] | None = None) -> str:
        """Short text, e.g. ``position s4 top1% ssim+l2``."""
        agg = "max" if self.topk_fraction <= 0 else f"top{self.topk_fraction * 100:g}%"
        terms = "+".join(term_names[t] for t in self.terms) if term_names else ",".join(map(str, self.terms))
        norm = f"{self.normalize}±{self.shift}" if self.shift else self.normalize
        return f"{norm} s{self.sigma:g} {agg} {terms}"


def reference_stats(raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of the references' raw error maps ``(N, T, H, W)``: per-position mean and variance
    ``(T, H, W)`` and the global mean per term ``(T,)``."""
    raw = raw.float()
    return {"mean": raw.mean(dim=0), "var": raw.var(dim=0, unbiased=raw.shape[0] > 1),
            "global": raw.mean(dim=(0, 2, 3)).clamp_min(1e-8)}


def apply_rule(raw: torch.Tensor, stats: dict[str, torch.Tensor], rule: MapRule,
               boxes: Sequence[tuple[int, int, int, int]] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image scores ``(B,)`` and maps (each cut to its region) from raw error maps ``(B, T, H, W)``."""
    raw = raw.float()
    terms = list(rule.terms)
    if rule.normalize == "global":
        err = (raw[:, terms] / stats["global"][terms].view(1, -1, 1, 1)).sum(dim=1)
    else:
        mean = gaussian_blur(stats["mean"][terms], rule.stats_sigma)
        std = gaussian_blur(stats["var"][terms], rule.stats_sigma).clamp_min(0).sqrt()
        if rule.shift > 0:  # tolerate misalignment: the highest normal error within +-shift pixels
            k = 2 * int(rule.shift) + 1
            mean = F.max_pool2d(mean[None], k, stride=1, padding=int(rule.shift))[0]
            std = F.max_pool2d(std[None], k, stride=1, padding=int(rule.shift))[0]
        floor = rule.floor * std.mean(dim=(1, 2), keepdim=True) + 1e-6 * stats["global"][terms].view(-1, 1, 1)
        err = ((raw[:, terms] - mean) / (std + floor)).mean(dim=1)
    maps = resize_blur(err, tuple(err.shape[-2:]), rule.sigma)  # as gaussian_blur, as matrix products: faster
    boxes = boxes if boxes is not None else [(0, 0, raw.shape[-2], raw.shape[-1])] * raw.shape[0]
    regions = crop_regions(maps, boxes)
    scores = torch.stack([_topk(r.reshape(-1), rule.topk_fraction) for r in regions])
    return scores, regions


def _topk(values: torch.Tensor, fraction: float) -> torch.Tensor:
    if fraction <= 0:
        return values.max()
    k = max(1, int(round(values.numel() * fraction)))
    return values.topk(k).values.mean()
