"""DRAEM: a discriminatively trained reconstruction embedding for surface anomaly detection.

Zavrtanik, Kristan and Skočaj, ICCV 2021, arXiv 2108.07610. Two sub-networks trained on normal images
with synthetic anomalies (:func:`vlad.synthesis.perlin_blend`: Perlin-noise masks filled with a texture):

* a reconstructive encoder-decoder learns to map the augmented image back to the clean one
  (loss: L2 + SSIM);
* a discriminative U-Net sees ``concat(augmented, reconstruction)`` and segments the synthetic anomaly
  (loss: focal, gamma 2).

At test time the paper's raw map is the discriminative network's anomaly probability. vlad also keeps the
reconstructive network's error (``1 - SSIM`` and the squared error between the image and its reconstruction,
as the autoencoder scores) as candidate maps: which of them are scored (the probability, the reconstruction
error, or both, each normalised), how they become a map and a score (normalised by the references' own maps
per position or globally, smoothed, pooled: see :mod:`vlad.scorers.scratch`) and how long the networks
train are chosen by each line at ``fit`` on synthetic defects pasted into held-out references
(:mod:`vlad.selftune`, ``selection_report()``); a parameter given a value is kept. The training length is
judged by the probability's candidates alone (:data:`DRAEM.JUDGED_TERMS`), and no weights from the first
quarter of the budget are kept (:data:`DRAEM.MIN_KEPT_FRACTION`). The probability alone can miss
what the discriminative network never learnt to segment (16 references, image AUROC, probability alone ->
choice: KolektorSDD's thin cracks 72.2 -> 74.4, MVTec bottle 84.2 -> 89.1; docs/benchmarks.md). With
fewer than 4 references: the probability, normalised per position, ``sigma=2`` px, the map's max.

Reduced for a CPU (documented departures from the paper): the paper's widths are 128 (reconstructive) and 64
(discriminative) with 700 epochs on 256 px images and DTD textures; here the reconstructive network is vlad's
strided convolutional autoencoder (width 16, ``H/16 x W/16 x 64`` code) and the discriminative U-Net has
width 16 (strided convolutions, skip connections, working at half resolution), on a canvas of about
128 x 128 px in the references' aspect ratio (images letterboxed onto it), with batches of 4 and Adam lr
1e-3 (paper: 1e-4, decayed), a budget growing with the references (``train_steps=None``) under a
``time_limit`` (300 s) and early stopping on a held-out fifth of the references (their loss on a fixed
draw of synthetic anomalies). The texture of each synthetic anomaly is another reference image (or the
image itself), re-styled by :func:`vlad.synthesis.augment_texture` (no DTD dataset is shipped); half the
training samples carry no anomaly, as in the paper.

Stopping: Ctrl-C during training keeps the model trained so far (warning logged, ``interrupted_=True``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlad.errors import InvalidParameterError
from vlad.images import LoadedImage
from vlad.rng import init_module
from vlad.scorers.autoencoder import (
    DEFAULT_SIDE,
    AutoEncoder,
    ConvAutoEncoder,
    aspect_size,
    check_weights_mode,
    resolve_size,
    ssim_map,
)
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
from vlad.synthesis import perlin_blend

logger = logging.getLogger(__name__)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    k, p = (4, 1) if stride == 2 else (3, 1)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class DiscriminativeUNet(nn.Module):
    """U-Net over ``(B, 6, H, W)`` (image and reconstruction) -> logits ``(B, 2, H, W)`` (normal, anomalous).

    The stem is strided (features at ``H/2``, a CPU-budget reduction); the logits are upsampled x2.
    ``H`` and ``W`` must be multiples of ``2**(depth + 1)``.
    """

    def __init__(self, base_channels: int = 16, depth: int = 4):
        super().__init__()
        chans = [min(base_channels * 2**i, base_channels * 8) for i in range(depth + 1)]
        self.stem = _block(6, chans[0], stride=2)  # works at H/2 (CPU budget); logits upsampled x2
        self.down = nn.ModuleList(_block(chans[i], chans[i + 1], stride=2) for i in range(depth))
        self.up = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                          nn.Conv2d(chans[i + 1], chans[i], 3, 1, 1, bias=False), nn.BatchNorm2d(chans[i]),
                          nn.ReLU(inplace=True))
            for i in reversed(range(depth))
        )
        self.fuse = nn.ModuleList(_block(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], 2, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``(B, 2, H, W)``."""
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            h = fuse(torch.cat([up(h), skips.pop()], dim=1))
        return F.interpolate(self.head(h), scale_factor=2, mode="bilinear", align_corners=False)


class DRAEMNet(nn.Module):
    """Reconstructive + discriminative sub-networks; ``forward(x) -> (reconstruction, logits)``."""

    def __init__(self, recon_channels: int = 16, latent_channels: int = 64, disc_channels: int = 16):
        super().__init__()
        self.reconstructive = ConvAutoEncoder(recon_channels, latent_channels, depth=4)
        self.discriminative = DiscriminativeUNet(disc_channels, depth=4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, 3, H, W)`` in [0, 1] -> reconstruction ``(B, 3, H, W)``, logits ``(B, 2, H, W)``."""
        recon = self.reconstructive(x)
        return recon, self.discriminative(torch.cat([x, recon], dim=1))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of 2-class ``logits`` ``(B, 2, H, W)`` against a 0/1 ``target`` ``(B, H, W)``."""
    logp = F.log_softmax(logits, dim=1)
    logp_t = logp.gather(1, target.long()[:, None])[:, 0]
    return (-((1 - logp_t.exp()) ** gamma) * logp_t).mean()


#: the rule without a selection, for what the user leaves at None (the rule 0.2 shipped)
FALLBACK_RULE = MapRule("position", 2.0, 0.0, (0,))


class DRAEM(SelfTuned, BaseScorer):
    """DRAEM (reduced width for CPU training) on Perlin-noise synthetic anomalies.

    Args:
        backbone: unused (trained from scratch); must be None.
        weights: ``"random"`` (default widths; ``"pretrained"`` is a synonym, nothing pretrained is used)
            or ``"tiny"`` (quarter widths, for tests).
        device: torch device or ``"auto"``.
        batch_size: images per training step and per prediction batch.
        random_state: seed of the initialisation, the held-out split, the batch sampling and the anomaly
            synthesis.
        image_size: int or ``(H, W)``, multiples of 32; None = about ``DEFAULT_SIDE**2`` pixels in the
            references' median aspect ratio.
        canvas: ``"letterbox"`` (keep each image's aspect ratio, pad, crop the map back) or ``"stretch"``.
        train_steps: optimisation steps; None = :func:`~vlad.scorers.scratch.auto_steps` (grows with
            the number of references).
        time_limit: seconds of training at most (None = no cap; a binding cap makes the model depend
            on the machine's speed).
        validation_fraction: share of the references held out for early stopping (their loss on a fixed
            draw of synthetic anomalies) and, when at least 8 are held out, for the map statistics;
            nothing is held out below 4 references, at least 3 from 12 on.
        patience: held-out evaluations without improvement before training stops (0 = never early).
        lr: Adam learning rate (decayed x0.2 at 80% and 90% of the steps, as the paper's schedule).
        recon_channels, latent_channels, disc_channels: network widths.
        anomaly_probability: fraction of training samples that receive a synthetic anomaly (paper: 0.5).
        normalize: ``"position"`` or ``"global"`` (see :mod:`vlad.scorers.scratch`).
        sigma: Gaussian smoothing of the output map, in pixels at the working size.
        topk_fraction: image score = mean of this top fraction of the map (0 = max).
        shift_tolerance: with ``normalize="position"``, compare each pixel with the references' highest
            error within this many pixels (tolerates misaligned parts; 0 = the same pixel only).
        error_terms: the raw maps scored: ``"prob"`` (the discriminative network's anomaly probability,
            the paper's map), ``"ssim+l2"`` (the reconstructive network's error) or ``"prob+ssim+l2"``
            (both, each normalised by the references' own maps).
            Each of these five left at None is chosen at ``fit`` on synthetic defects (:mod:`vlad.selftune`).
        selection: ``"synthetic"`` (default): the map rule and the training length are chosen on synthetic
            defects of held-out references; ``"loss"``: training stops on the held-out loss (a fixed draw
            of the training anomalies) and the rule is the given values with the fallback for the rest.
    """

    requires_references = True
    TERMS = ("prob", "ssim", "l2")
    #: the ``error_terms`` choices, as indices into TERMS (None searches them all)
    TERM_CHOICES = {"prob": (0,), "ssim+l2": (1, 2), "prob+ssim+l2": (0, 1, 2)}
    #: how long to train is judged by the probability's candidates alone: the reconstruction error
    #: separates synthetic defects almost at once (an untrained convolutional network already acts as a
    #: high-pass filter), and judged by it, training would stop before the discriminative network learns
    JUDGED_TERMS = (0,)
    #: no weights from the first quarter of the budget are kept: untrained, the discriminative network is a
    #: random filter, and synthetic defects' sharp edges can reward it three evaluations in a row (MPDD's
    #: plates, each image turned at random, 16 references, seed 1: kept at step 36 of 200, 50.1 image AUROC)
    MIN_KEPT_FRACTION = 0.25

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        **ps.scratch_training_specs(CANVAS_MODES),
        "recon_channels": ps.WIDTH,
        "latent_channels": ps.WIDTH,
        "disc_channels": ps.WIDTH,
        "anomaly_probability": ps.Number(0, 1).explain("the paper uses 0.5"),
        "error_terms": ps.Choice(None, *TERM_CHOICES).explain(ps.SEARCHED),
        **ps.map_rule_specs(NORMALIZE_MODES, SELECTION_MODES),
    }

    def __init__(
        self,
        backbone: str | None = None,
        weights: str = "random",
        device: str = "cpu",
        batch_size: int = 4,
        random_state: int | None = 0,
        image_size: int | tuple[int, int] | None = None,
        canvas: str = "letterbox",
        train_steps: int | None = None,
        time_limit: float | None = 300.0,
        validation_fraction: float = 0.2,
        patience: int = 5,
        lr: float = 1e-3,
        recon_channels: int = 16,
        latent_channels: int = 64,
        disc_channels: int = 16,
        anomaly_probability: float = 0.5,
        normalize: str | None = None,
        sigma: float | None = None,
        topk_fraction: float | None = None,
        shift_tolerance: int | None = None,
        error_terms: str | None = None,
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
        self.recon_channels = recon_channels
        self.latent_channels = latent_channels
        self.disc_channels = disc_channels
        self.anomaly_probability = anomaly_probability
        self.normalize = normalize
        self.sigma = sigma
        self.topk_fraction = topk_fraction
        self.shift_tolerance = shift_tolerance
        self.error_terms = error_terms
        self.selection = selection

    def _build(self) -> None:
        if self.backbone is not None:
            raise InvalidParameterError(f"DRAEM is trained from scratch and takes no backbone; got {self.backbone!r}, "
                             "pass backbone=None")
        mode = check_weights_mode(self.weights, "DRAEM")
        if not 0.0 <= self.anomaly_probability <= 1.0:
            raise InvalidParameterError(f"anomaly_probability must be in [0, 1], got {self.anomaly_probability}")
        if self.canvas not in CANVAS_MODES:
            raise InvalidParameterError(f"canvas must be one of {CANVAS_MODES}, got {self.canvas!r}")
        self.size_ = resolve_size(self.image_size, DEFAULT_SIDE, multiple=32)
        self.map_rule_ = self._map_rule()
        div = 4 if mode == "tiny" else 1
        self.model_ = init_module(lambda: DRAEMNet(max(4, self.recon_channels // div), max(4, self.latent_channels // div),
                                                   max(4, self.disc_channels // div)),
                                  self.device_, 0 if self.random_state is None else int(self.random_state))
        self.model_.eval()

    def _map_rule(self) -> MapRule:
        """The rule without a selection: the user's values, the rest from :data:`FALLBACK_RULE`."""
        terms = FALLBACK_RULE.terms if self.error_terms is None else self._terms()[0]
        return fixed_rule(self.normalize, self.shift_tolerance, self.sigma, self.topk_fraction, terms, FALLBACK_RULE)

    def _candidates(self) -> list[MapRule]:
        return rules_for(self.normalize, self.shift_tolerance, self.sigma, self.topk_fraction, self._terms())

    def _synthesize(self, data: np.ndarray, idx: np.ndarray, rng: np.random.Generator):
        """Augmented batch and masks for references ``data[idx]`` (``(N, H, W, 3)`` float32)."""
        augs, masks = [], []
        for i in idx:
            img = data[i]
            if rng.random() < self.anomaly_probability:
                texture = data[int(rng.integers(0, len(data)))] if rng.random() < 0.5 else None
                aug, mask = perlin_blend(img, rng, texture=texture)
            else:
                aug, mask = img, np.zeros(img.shape[:2], np.float32)
            augs.append(aug)
            masks.append(mask)
        to_t = torch.from_numpy
        return (to_t(np.stack(augs)).permute(0, 3, 1, 2).contiguous(), to_t(np.stack(masks)),
                to_t(data[idx]).permute(0, 3, 1, 2).contiguous())

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """Raw maps ``(B, 3, H, W)`` of canvas images ``x``: the anomaly probability, then the reconstruction's
        ``1 - SSIM`` and squared error (:data:`TERMS`). One image per forward, so that no image's result
        depends on the others in its call (see ``AutoEncoder._raw``)."""
        out = []
        with torch.inference_mode():
            for i in range(x.shape[0]):
                xb = x[i : i + 1].to(self.device_)
                recon, logits = self.model_(xb)
                dssim, sq = AutoEncoder._error_terms(xb, recon)
                out.append(torch.stack([logits.softmax(dim=1)[:, 1], dssim, sq], dim=1).cpu())
        return torch.cat(out)

    def raw_error_maps(self, images) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """Raw maps ``(B, 3, H, W)`` (:data:`TERMS`) on the canvas and each image's region."""
        from vlad.images import load_images

        self._check_fitted()
        x, boxes = to_canvas(load_images(images), self.size_, self.canvas)
        return self._raw(x), boxes

    def _loss(self, aug: torch.Tensor, mask: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        recon, logits = self.model_(aug)
        return F.mse_loss(recon, clean) + (1 - ssim_map(recon, clean)).mean() + focal_loss(logits, mask)

    def _fit(self, references: list[LoadedImage] | None) -> None:
        if self.image_size is None:
            self.size_ = aspect_size(references, DEFAULT_SIDE, multiple=32)
        canvas, boxes = to_canvas(references, self.size_, self.canvas)
        seed = 0 if self.random_state is None else int(self.random_state)
        train_idx, held_idx = split_held_out(len(canvas), float(self.validation_fraction), seed)
        data = canvas[torch.from_numpy(train_idx)].permute(0, 2, 3, 1).contiguous().numpy()
        held = canvas[torch.from_numpy(held_idx)].permute(0, 2, 3, 1).contiguous().numpy()
        rng = np.random.default_rng(seed)
        bs = max(1, int(self.batch_size))
        n_steps = int(self.train_steps) if self.train_steps is not None else auto_steps(len(data), bs)
        opt = torch.optim.Adam(self.model_.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(n_steps * 0.8), int(n_steps * 0.9)], gamma=0.2)
        self.model_.train()
        # selection="loss": a fixed draw of synthetic anomalies on the held-out references is the yardstick
        val_batches: list = []  # drawn at the first evaluation (not at all with selection="synthetic")

        def step(_: int) -> float:
            idx = rng.integers(0, len(data), size=bs)
            loss = self._loss(*(t.to(self.device_) for t in self._synthesize(data, idx, rng)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return loss.item()

        def validate(_: int) -> float:
            if not val_batches:
                val_batches.extend(self._synthesize(held, np.arange(i, min(i + bs, len(held))),
                                                    np.random.default_rng(seed + 1)) for i in range(0, len(held), bs))
            return float(np.mean([self._loss(*(t.to(self.device_) for t in b)).item() for b in val_batches]))

        log = train_and_select(self, step, n_steps, "DRAEM training", data=canvas, boxes=boxes,
                               train_idx=train_idx, held_idx=held_idx, loss_validate=validate, log=logger)
        self.loss_history_, self.interrupted_, self.train_log_ = log.losses, log.stopped == "interrupted", log.as_meta()

    def _predict_batch(self, images: list[LoadedImage]):
        x, boxes = to_canvas(images, self.size_, self.canvas, self.device_)
        scores, maps = apply_rule(self._raw(x), self.stats_, self.map_rule_, boxes)
        return scores, stack_or_list(maps)

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
            raise InvalidParameterError("this DRAEM was saved without its reference map statistics "
                                        "(an older vlad); fit it again and save it")
