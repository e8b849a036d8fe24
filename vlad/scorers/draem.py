"""DRAEM: a discriminatively trained reconstruction embedding for surface anomaly detection.

Zavrtanik, Kristan and Skočaj, ICCV 2021, arXiv 2108.07610. Two sub-networks trained on normal images
with synthetic anomalies (:func:`vlad.synthesis.perlin_blend`: Perlin-noise masks filled with a texture):

* a reconstructive encoder-decoder learns to map the augmented image back to the clean one
  (loss: L2 + SSIM);
* a discriminative U-Net sees ``concat(augmented, reconstruction)`` and segments the synthetic anomaly
  (loss: focal, gamma 2).

At test time the map is the discriminative network's anomaly probability, smoothed with a Gaussian; the
image score is the max of the smoothed map.

Reduced for a CPU (documented departures from the paper): the paper's widths are 128 (reconstructive) and 64
(discriminative) with 700 epochs on 256 px images and DTD textures; here the reconstructive network is vlad's
strided convolutional autoencoder (width 16, ``16 x 16 x 64`` code at 256 x 256 px; inputs keep the
references' aspect ratio at about that area) and the discriminative U-Net has width 16 (strided convolutions,
skip connections, working at half resolution), trained for ``train_steps=400`` steps of ``batch_size=4`` with
Adam lr 1e-3 (paper: 1e-4, decayed) -- a few minutes on 2 cores. The texture of each synthetic anomaly is
another reference image (or the image itself), re-styled by :func:`vlad.synthesis.augment_texture` (no DTD
dataset is shipped); half the training samples carry no anomaly, as in the paper.

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
from vlad.ops import gaussian_blur
from vlad.scorers.autoencoder import (
    ConvAutoEncoder,
    aspect_size,
    check_weights_mode,
    images_to_tensor,
    resolve_size,
    seeded,
    ssim_map,
    train_loop,
)
from vlad.scorers.base import BaseScorer
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


class DRAEM(BaseScorer):
    """DRAEM (reduced width for CPU training) on Perlin-noise synthetic anomalies.

    Args:
        backbone: unused (trained from scratch); must be None.
        weights: ``"random"`` (default widths; ``"pretrained"`` is a synonym, nothing pretrained is used)
            or ``"tiny"`` (quarter widths, for tests).
        device: torch device or ``"auto"``.
        batch_size: images per training step and per prediction batch.
        random_state: seed of the initialisation, the batch sampling and the anomaly synthesis.
        image_size: int or ``(H, W)``, multiples of 32; None = about 256 x 256 pixels in the
            references' aspect ratio (e.g. 416 x 160 for 203 x 512 images).
        train_steps: optimisation steps (the training budget).
        lr: Adam learning rate (decayed x0.2 at 80% and 90% of the steps, as the paper's schedule).
        recon_channels, latent_channels, disc_channels: network widths.
        anomaly_probability: fraction of training samples that receive a synthetic anomaly (paper: 0.5).
        sigma: Gaussian smoothing of the output map, in pixels at ``image_size``.
    """

    requires_references = True

    def __init__(
        self,
        backbone: str | None = None,
        weights: str = "random",
        device: str = "cpu",
        batch_size: int = 4,
        random_state: int | None = 0,
        image_size: int | tuple[int, int] | None = None,
        train_steps: int = 400,
        lr: float = 1e-3,
        recon_channels: int = 16,
        latent_channels: int = 64,
        disc_channels: int = 16,
        anomaly_probability: float = 0.5,
        sigma: float = 4.0,
    ):
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.image_size = image_size
        self.train_steps = train_steps
        self.lr = lr
        self.recon_channels = recon_channels
        self.latent_channels = latent_channels
        self.disc_channels = disc_channels
        self.anomaly_probability = anomaly_probability
        self.sigma = sigma

    def _build(self) -> None:
        if self.backbone is not None:
            raise InvalidParameterError(f"DRAEM is trained from scratch and takes no backbone; got {self.backbone!r}, "
                             "pass backbone=None")
        mode = check_weights_mode(self.weights, "DRAEM")
        if not 0.0 <= self.anomaly_probability <= 1.0:
            raise InvalidParameterError(f"anomaly_probability must be in [0, 1], got {self.anomaly_probability}")
        self.size_ = resolve_size(self.image_size, 256, multiple=32)
        div = 4 if mode == "tiny" else 1
        with seeded(self.random_state):
            self.model_ = DRAEMNet(max(4, self.recon_channels // div), max(4, self.latent_channels // div),
                                   max(4, self.disc_channels // div)).to(self.device_)
        self.model_.eval()

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

    def _fit(self, references: list[LoadedImage] | None) -> None:
        if self.image_size is None:
            self.size_ = aspect_size(references, 256, multiple=32)
        data = images_to_tensor(references, self.size_).permute(0, 2, 3, 1).contiguous().numpy()
        seed = 0 if self.random_state is None else int(self.random_state)
        rng = np.random.default_rng(seed)
        n_steps = int(self.train_steps)
        opt = torch.optim.Adam(self.model_.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(n_steps * 0.8), int(n_steps * 0.9)], gamma=0.2)
        bs = max(1, int(self.batch_size))
        self.model_.train()

        def step(_: int) -> float:
            idx = rng.integers(0, len(data), size=bs)
            aug, mask, clean = (t.to(self.device_) for t in self._synthesize(data, idx, rng))
            recon, logits = self.model_(aug)
            loss = (F.mse_loss(recon, clean) + (1 - ssim_map(recon, clean)).mean()
                    + focal_loss(logits, mask))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return loss.item()

        with seeded(seed, self.device_):
            self.loss_history_, self.interrupted_ = train_loop(step, n_steps, "DRAEM training", logger)
        self.model_.eval()

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_to_tensor(images, self.size_, self.device_)
        _, logits = self.model_(x)
        maps = gaussian_blur(logits.softmax(dim=1)[:, 1], self.sigma)
        return maps.flatten(1).amax(dim=1), maps

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        return tensors, {"loss_history": self.loss_history_, "interrupted": self.interrupted_,
                         "size": list(self.size_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.model_.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.model_.eval()
        self.loss_history_ = list(meta.get("loss_history", []))
        self.interrupted_ = bool(meta.get("interrupted", False))
        if "size" in meta:
            self.size_ = resolve_size(meta["size"], 256, multiple=32)
