"""A convolutional autoencoder trained from scratch on normal images; anomalies = poor reconstructions.

The reconstruction family of the surveys, in the form of Bergmann et al., "Improving Unsupervised Defect
Segmentation by Applying Structural Similarity to Autoencoders" (VISAPP 2019, arXiv 1807.02011): a
convolutional AE with a narrow bottleneck, trained with an SSIM term, and a per-pixel ``1 - SSIM`` map
between an image and its reconstruction (DSSIM). No pretrained weights are involved, so results on real
data are real even on machines without a model hub.

Defaults: about 128 x 128 px in the references' median aspect ratio (:func:`aspect_size`; e.g. 192 x 96 for
KolektorSDD's 203 x 512), each image letterboxed onto that canvas (aspect ratio kept, reflection padding, map
cropped back: :mod:`vlad.scorers.scratch`), five stride-2 stages down to an ``H/32 x W/32 x 32`` bottleneck,
Adam lr 1e-3, batches of 8 references each moved and lit a little differently as good parts are on a line
(:func:`jitter`; with 16 references: KolektorSDD 76.0 -> 81.1, MPDD 90.5 -> 96.5, bottle 94.1 -> 95.0 image
AUROC over 6 seeds), a budget that grows with the references (``train_steps=None``: about 30 epochs, 200 to
4000 steps) under a ``time_limit`` (300 s), a fifth of the references held out of training. Error maps:
``1 - SSIM`` (11 x 11 Gaussian window, sigma 1.5) and the squared error. How they become a map and a score (error
terms, normalisation per position or global, smoothing, top-k pooling: :mod:`vlad.scorers.scratch`) and how
long the model trains are chosen by each line at ``fit``, on synthetic defects pasted into the held-out
references (:mod:`vlad.selftune`; ``selection_report()`` says what was chosen; the training length by the
synthetic image AUROC alone and its first evaluations as they are, :attr:`AutoEncoder.JUDGE_PIXEL_WEIGHT`,
:attr:`AutoEncoder.FIRST_EVALUATIONS_AT_CHANCE`); a parameter given a value is
kept as given. With fewer than 4 references nothing can be held out and the rule is ``1 - SSIM`` in units of
its references' mean, smoothed with ``sigma=2`` px, scored by the mean of its top 5%. The working size and
budget were fixed for a shared 2-core CPU (figures: ``python -m vlad.bench quality``).

Stopping: a KeyboardInterrupt (Ctrl-C) during training stops it cleanly: the model trained so far is kept,
a warning is logged, ``interrupted_`` is True and ``fit`` returns normally. A second Ctrl-C aborts.

This module also holds the small training helpers shared by vlad's trainable scorers (DRAEM, STPM,
EfficientAD): :func:`train_loop`, :func:`ssim_map`, :func:`images_to_tensor`. Their random numbers follow
:mod:`vlad.rng` (drawn on the CPU, the same on every device).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlad.errors import InvalidParameterError
from vlad.images import LoadedImage
from vlad.ops import to_batch
from vlad.progress import track
from vlad.rng import init_module
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer
from vlad.scorers.scratch import (
    CANVAS_MODES,
    NORMALIZE_MODES,
    MapRule,
    apply_rule,
    auto_steps,
    split_held_out,
    stack_or_list,
    to_canvas,
)
from vlad.selftune import SELECTION_MODES, SelfTuned, fixed_rule, rules_for, train_and_select

logger = logging.getLogger(__name__)

#: the default working size is about DEFAULT_SIDE**2 pixels (CPU budget; see the module docstring)
DEFAULT_SIDE = 128


# -- helpers shared by the trainable scorers ------------------------------------------------------------
def resolve_size(image_size: int | Sequence[int] | None, default: int | Sequence[int], multiple: int = 1) -> tuple[int, int]:
    """``image_size`` (int, (H, W) or None for ``default``) as ``(H, W)``, checked to be a multiple of ``multiple``."""
    size = default if image_size is None else image_size
    hw = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < multiple or any(s % multiple for s in hw):
        raise InvalidParameterError(
            f"image_size must be an int or (H, W) of positive multiples of {multiple}, got {image_size!r}; "
            f"e.g. image_size={multiple * max(1, round(256 / multiple))}"
        )
    return hw


def aspect_size(images: Sequence[LoadedImage], side: int, multiple: int) -> tuple[int, int]:
    """``(H, W)``, multiples of ``multiple``, of about ``side**2`` pixels in the images' median aspect ratio.

    The from-scratch scorers' default working size: squashing a 203 x 512 image into a square would halve
    its height and make thin horizontal defects vanish, so the shape of the references is kept instead.
    """
    ratio = float(np.median([img.size[0] / img.size[1] for img in images]))
    h = max(multiple, int(round(side * math.sqrt(ratio) / multiple)) * multiple)
    w = max(multiple, int(round(side / math.sqrt(ratio) / multiple)) * multiple)
    return h, w


def images_to_tensor(images: Sequence[LoadedImage], size: tuple[int, int], device="cpu") -> torch.Tensor:
    """Images resized to ``size``: float32 ``(N, 3, H, W)`` in [0, 1]."""
    return to_batch(images, size, None, None, device, "bilinear")


def train_loop(
    step: Callable[[int], float], n_steps: int, desc: str, log: logging.Logger = logger
) -> tuple[list[float], bool]:
    """Run ``step(i) -> loss`` for ``n_steps`` steps with a progress bar.

    A KeyboardInterrupt stops training cleanly: the steps done so far are kept and a warning logged.

    Returns:
        ``(losses, interrupted)``: the loss of each completed step and whether training was interrupted.
    """
    losses: list[float] = []
    try:
        for i in track(range(n_steps), desc, total=n_steps):
            losses.append(float(step(i)))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(
                    f"{desc}: training loss became {losses[-1]} at step {i}; lower the learning rate"
                )
    except KeyboardInterrupt:
        log.warning("%s: training interrupted after %d of %d steps; keeping the model trained so far",
                    desc, len(losses), n_steps)
        return losses, True
    if losses:
        log.info("%s: %d steps, loss %.4g -> %.4g", desc, n_steps, losses[0], losses[-1])
    return losses, False


def _gauss_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM of ``x`` and ``y`` ``(B, C, H, W)`` in [0, 1], averaged over channels: ``(B, H, W)``.

    Gaussian window (Wang et al. 2004 constants, data range 1), reflect padding so the map keeps the
    input's size.
    """
    c = x.shape[1]
    win = _gauss_window(window, sigma, c, x.device, x.dtype)
    pad = window // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"

    def filt(t):
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode=mode), win, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim.mean(dim=1)


def check_weights_mode(weights: Any, name: str) -> str:
    """Scorers trained from scratch accept ``"random"`` (full width) or ``"tiny"`` (narrow, for tests).

    ``"pretrained"`` (the library-wide default, e.g. of ``vlad eval``) is accepted and means the same as
    ``"random"``: such a method has no pretrained part, so nothing is silently replaced.
    """
    if weights == "pretrained":  # the common default: this method uses no pretrained network at all
        return "random"
    if weights not in ("random", "tiny"):
        raise InvalidParameterError(
            f"{name} is trained from scratch and has no pretrained weights: expected weights='random' "
            f"(full width; 'pretrained' is accepted as a synonym) or 'tiny' (narrow, for tests), got "
            f"{weights!r}. To reuse a trained {name}, save() it and load it with vlad.load(path)."
        )
    return weights


# -- the network ----------------------------------------------------------------------------------------
class ConvAutoEncoder(nn.Module):
    """Fully convolutional AE: ``depth`` stride-2 stages down to ``latent_channels`` at ``H / 2**depth``.

    Input/output ``(B, 3, H, W)`` in [0, 1] (sigmoid output); ``H`` and ``W`` multiples of ``2**depth``.
    """

    def __init__(self, base_channels: int = 16, latent_channels: int = 32, depth: int = 5):
        super().__init__()
        chans = [min(base_channels * 2**i, base_channels * 8) for i in range(depth)]
        enc: list[nn.Module] = []
        cin = 3
        for c in chans:
            enc += [nn.Conv2d(cin, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(0.2, inplace=True)]
            cin = c
        enc += [nn.Conv2d(cin, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(cin, latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, cin, 1), nn.BatchNorm2d(cin), nn.LeakyReLU(0.2, inplace=True)]
        for c in [*reversed(chans[:-1]), base_channels]:
            dec += [nn.ConvTranspose2d(cin, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(0.2, inplace=True)]
            cin = c
        dec += [nn.Conv2d(cin, 3, 3, 1, 1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x``: ``(B, 3, H, W)``."""
        return self.decoder(self.encoder(x))


def jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Canvas images ``(B, 3, H, W)`` each moved and lit a little differently, as good parts are on a line:
    rotation, shift, scale, brightness and contrast drawn within :data:`vlad.detector.views.JITTER` (the
    detector's views of a single reference), borders reflected. Never mirrored or turned over, so a part's
    orientation still counts. The random numbers come from ``gen`` (on the CPU)."""
    from vlad.detector.views import JITTER

    b = x.shape[0]
    rot, bright, scale, contrast, tx, ty = (torch.rand(b, 6, generator=gen) * 2 - 1).unbind(1)
    a = rot * math.radians(JITTER["rotate"])
    s = 1.0 + scale * JITTER["scale"]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a) / s, -torch.sin(a) / s
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a) / s, torch.cos(a) / s
    # affine_grid's coordinates span 2 per side: a shift of JITTER["shift"] of the side is twice that
    theta[:, 0, 2], theta[:, 1, 2] = tx * 2 * JITTER["shift"], ty * 2 * JITTER["shift"]
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    bright = (1 + bright * JITTER["brightness"]).view(b, 1, 1, 1).to(x)
    contrast = (1 + contrast * JITTER["contrast"]).view(b, 1, 1, 1).to(x)
    return ((out - mean) * contrast + mean * bright).clamp(0, 1)


#: the training augmentations a scratch scorer accepts (True is "flip", the meaning it had before 0.3)
AUGMENT_MODES = (False, True, "flip", "jitter", "flip+jitter")


def augment_batch(x: torch.Tensor, gen: torch.Generator, mode: bool | str) -> torch.Tensor:
    """Canvas images ``x`` augmented by ``mode`` (one of :data:`AUGMENT_MODES`; False: unchanged)."""
    if mode in (True, "flip", "flip+jitter"):
        x = _augment(x, gen)
    if mode in ("jitter", "flip+jitter"):
        x = jitter(x, gen)
    return x


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips per sample (same generator as the batch sampling)."""
    flips = torch.rand(x.shape[0], 2, generator=gen)
    out = x.clone()
    for i in range(x.shape[0]):
        if flips[i, 0] < 0.5:
            out[i] = out[i].flip(-1)
        if flips[i, 1] < 0.5:
            out[i] = out[i].flip(-2)
    return out


#: the rule without a selection, for what the user leaves at None (the rule 0.2 shipped)
FALLBACK_RULE = MapRule("global", 2.0, 0.05, (0,))


class AutoEncoder(SelfTuned, BaseScorer):
    """Convolutional autoencoder with an SSIM reconstruction map (trained from scratch on references).

    Args:
        backbone: unused (no pretrained network); kept for the common scorer signature. Must be None.
        weights: ``"random"`` (default width; ``"pretrained"`` is a synonym, nothing pretrained is
            used) or ``"tiny"`` (a quarter of the width, for tests).
        device: torch device or ``"auto"``.
        batch_size: images per training step and per prediction batch.
        random_state: seed of the initialisation, the held-out split and the batch sampling.
        image_size: working size, int or ``(H, W)``, multiples of 32; None = about ``DEFAULT_SIDE**2``
            pixels in the references' median aspect ratio (e.g. 256 x 96 for 203 x 512 images).
        canvas: ``"letterbox"`` (keep each image's aspect ratio, pad by reflection, crop the map back)
            or ``"stretch"`` (resize every image to the working size).
        train_steps: optimisation steps; None = :func:`~vlad.scorers.scratch.auto_steps` (grows with
            the number of references).
        time_limit: seconds of training at most (None = no cap; a binding cap makes the model depend
            on the machine's speed).
        validation_fraction: share of the references held out for early stopping (and, when at least
            8 are held out, for the error statistics); nothing is held out below 4 references, at least 3
            from 12 on.
        patience: held-out evaluations without improvement before training stops (0 = never early).
        lr: Adam learning rate.
        base_channels: width of the first stage (doubling per stage, capped at 8x).
        latent_channels: channels of the ``H/32 x W/32`` bottleneck.
        ssim_weight: weight of ``1 - SSIM`` in the training loss (the rest is the squared error).
        error_terms: error maps used: ``"ssim+l2"``, ``"ssim"`` or ``"l2"``.
        normalize: ``"position"`` (each pixel's error against the references' error there) or
            ``"global"`` (each term divided by its mean over the references); see
            :mod:`vlad.scorers.scratch`.
        sigma: Gaussian smoothing of the map, in pixels at the working size.
        topk_fraction: image score = mean of this top fraction of the map (0 = max).
        shift_tolerance: with ``normalize="position"``, compare each pixel with the references' highest
            error within this many pixels (tolerates misaligned parts; 0 = the same pixel only).
            Each of these five left at None is chosen at ``fit`` on synthetic defects (:mod:`vlad.selftune`).
        augment: what each training batch goes through: ``"jitter"`` (default: each image moved and lit a
            little differently, as good parts are on a line: :func:`jitter`; orientation is kept),
            ``"flip"`` (random mirror images: only where a mirrored part is still a good part),
            ``"flip+jitter"``, or False (the references as they are). True means ``"flip"``.
        selection: ``"synthetic"`` (default): the map rule and the training length are chosen on synthetic
            defects of held-out references; ``"loss"``: training stops on the held-out reconstruction loss
            and the rule is the given values with the fallback for the rest.
    """

    requires_references = True
    TERMS = ("ssim", "l2")
    #: the ``error_terms`` choices, as indices into TERMS (None searches them all, in this order)
    TERM_CHOICES = {"ssim+l2": (0, 1), "ssim": (0,), "l2": (1,)}
    #: how long to train is judged by the synthetic image AUROC alone: the pixel AUROC of a reconstruction
    #: error keeps rising as the reconstructions sharpen everywhere, which does not make the image score
    #: separate better (vlad.selftune; docs/benchmarks.md)
    JUDGE_PIXEL_WEIGHT = 0.0
    #: its first evaluations are judged as they are, not padded with chance: a barely trained autoencoder
    #: is a fair detector (its ``1 - SSIM`` against a flat reconstruction is a local-variance filter), and on
    #: a line where training pays, a later stretch beats it (KolektorSDD full shot, 6 seeds: 80.6 -> 81.8)
    FIRST_EVALUATIONS_AT_CHANCE = False

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        **ps.scratch_training_specs(CANVAS_MODES),
        "base_channels": ps.WIDTH,
        "latent_channels": ps.WIDTH,
        "ssim_weight": ps.Number(0, 1),
        "error_terms": ps.Choice(None, *TERM_CHOICES).explain(ps.SEARCHED),
        "augment": ps.Choice(*AUGMENT_MODES),
        **ps.map_rule_specs(NORMALIZE_MODES, SELECTION_MODES),
    }

    def __init__(
        self,
        backbone: str | None = None,
        weights: str = "random",
        device: str = "cpu",
        batch_size: int = 8,
        random_state: int | None = 0,
        image_size: int | tuple[int, int] | None = None,
        canvas: str = "letterbox",
        train_steps: int | None = None,
        time_limit: float | None = 300.0,
        validation_fraction: float = 0.2,
        patience: int = 5,
        lr: float = 1e-3,
        base_channels: int = 16,
        latent_channels: int = 32,
        ssim_weight: float = 0.85,
        error_terms: str | None = None,
        normalize: str | None = None,
        sigma: float | None = None,
        topk_fraction: float | None = None,
        shift_tolerance: int | None = None,
        augment: bool | str = "jitter",
        selection: str = "synthetic",
    ):
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.image_size = image_size
        self.canvas = canvas
        self.train_steps = train_steps
        self.time_limit = time_limit
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.lr = lr
        self.base_channels = base_channels
        self.latent_channels = latent_channels
        self.ssim_weight = ssim_weight
        self.error_terms = error_terms
        self.normalize = normalize
        self.sigma = sigma
        self.topk_fraction = topk_fraction
        self.shift_tolerance = shift_tolerance
        self.augment = augment
        self.selection = selection

    def _build(self) -> None:
        if self.backbone is not None:
            raise InvalidParameterError(f"AutoEncoder is trained from scratch and takes no backbone; got {self.backbone!r}, "
                             "pass backbone=None")
        mode = check_weights_mode(self.weights, "AutoEncoder")
        self.size_ = resolve_size(self.image_size, DEFAULT_SIDE, multiple=32)
        self.map_rule_ = self._map_rule()
        if self.canvas not in CANVAS_MODES:
            raise InvalidParameterError(f"canvas must be one of {CANVAS_MODES}, got {self.canvas!r}")
        width = max(4, self.base_channels // 4) if mode == "tiny" else self.base_channels
        latent = max(4, self.latent_channels // 4) if mode == "tiny" else self.latent_channels
        seed = 0 if self.random_state is None else int(self.random_state)
        self.model_ = init_module(lambda: ConvAutoEncoder(width, latent), self.device_, seed)
        self.model_.eval()

    def _map_rule(self) -> MapRule:
        """The rule without a selection: the user's values, the rest from :data:`FALLBACK_RULE`."""
        terms = self._terms()
        return fixed_rule(self.normalize, self.shift_tolerance, self.sigma, self.topk_fraction,
                          terms[0] if len(terms) == 1 else FALLBACK_RULE.terms, FALLBACK_RULE)

    def _candidates(self) -> list[MapRule]:
        return rules_for(self.normalize, self.shift_tolerance, self.sigma, self.topk_fraction, self._terms())

    @staticmethod
    def _error_terms(x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel ``1 - SSIM`` and squared error (mean over channels), each ``(B, H, W)``."""
        return 1.0 - ssim_map(x, recon), ((x - recon) ** 2).mean(dim=1)

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """Raw error maps ``(B, 2, H, W)`` (``1 - SSIM``, squared error) of canvas images ``x``.

        One image per forward: the position normalisation divides by the references' small spread, which
        would amplify the float rounding that differs between batch sizes; this way an image's result
        never depends on the others in its call.
        """
        out = []
        with torch.inference_mode():
            for i in range(x.shape[0]):
                xb = x[i : i + 1].to(self.device_)
                out.append(torch.stack(self._error_terms(xb, self.model_(xb)), dim=1).cpu())
        return torch.cat(out)

    def raw_error_maps(self, images) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """Raw error maps ``(B, 2, H, W)`` on the canvas and each image's region (for rule studies)."""
        from vlad.images import load_images

        self._check_fitted()
        x, boxes = to_canvas(load_images(images), self.size_, self.canvas)
        return self._raw(x), boxes

    def _fit(self, references: list[LoadedImage] | None) -> None:
        if self.image_size is None:
            self.size_ = aspect_size(references, DEFAULT_SIDE, multiple=32)
        data, boxes = to_canvas(references, self.size_, self.canvas)  # (N, 3, H, W), kept on CPU
        train_idx, held_idx = split_held_out(len(data), float(self.validation_fraction), self.random_state)
        train, held = data[torch.from_numpy(train_idx)], data[torch.from_numpy(held_idx)]
        gen = torch.Generator().manual_seed(0 if self.random_state is None else int(self.random_state))
        opt = torch.optim.Adam(self.model_.parameters(), lr=self.lr)
        bs = max(1, int(self.batch_size))
        n_steps = int(self.train_steps) if self.train_steps is not None else auto_steps(len(train), bs)
        self.model_.train()

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            dssim, sq = self._error_terms(x, self.model_(x))
            return (self.ssim_weight * dssim + (1.0 - self.ssim_weight) * sq).mean()

        def step(_: int) -> float:
            idx = torch.randint(0, train.shape[0], (bs,), generator=gen)
            x = train[idx]
            x = augment_batch(x, gen, self.augment)
            loss = loss_of(x.to(self.device_))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        def validate(_: int) -> float:
            return float(np.mean([loss_of(held[i : i + bs].to(self.device_)).item()
                                  for i in range(0, len(held), bs)]))

        log = train_and_select(self, step, n_steps, "AutoEncoder training", data=data, boxes=boxes,
                               train_idx=train_idx, held_idx=held_idx, loss_validate=validate, log=logger)
        self.loss_history_, self.interrupted_, self.train_log_ = log.losses, log.stopped == "interrupted", log.as_meta()

    def _predict_batch(self, images: list[LoadedImage]):
        x, boxes = to_canvas(images, self.size_, self.canvas, self.device_)
        scores, maps = apply_rule(self._raw(x), self.stats_, self.map_rule_, boxes)
        return scores, stack_or_list(maps)

    def reconstruct(self, images) -> torch.Tensor:
        """Reconstructions of ``images`` at the model's size: ``(B, 3, H, W)`` in [0, 1] (for inspection)."""
        from vlad.images import load_images

        self._check_fitted()
        with torch.inference_mode():
            x, _ = to_canvas(load_images(images), self.size_, self.canvas, self.device_)
            return self.model_(x).cpu()

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        tensors.update({f"stats.{k}": v for k, v in self.stats_.items()})
        return tensors, {"loss_history": self.loss_history_, "interrupted": self.interrupted_,
                         "size": list(self.size_), "train_log": self.train_log_, **self._selection_meta()}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.model_.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.model_.eval()
        self.loss_history_ = list(meta.get("loss_history", []))
        self.interrupted_ = bool(meta.get("interrupted", False))
        self.train_log_ = dict(meta.get("train_log", {}))
        self._restore_selection(meta)
        if "size" in meta:
            self.size_ = resolve_size(meta["size"], DEFAULT_SIDE, multiple=32)
        self.stats_ = {k[len("stats."):]: v.cpu() for k, v in tensors.items() if k.startswith("stats.")}
        if set(self.stats_) != {"mean", "var", "global"}:
            raise InvalidParameterError("this AutoEncoder was saved without its reference error statistics "
                                        "(an older vlad); fit it again and save it")
