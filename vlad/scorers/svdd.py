"""Patch-level Deep SVDD on frozen CNN features (one-class family).

Deep SVDD (Ruff et al., ICML 2018) trains a network ``phi`` without bias terms so that normal data maps
close to a fixed centre ``c``; the anomaly score is ``||phi(x) - c||^2``. Patch SVDD (Yi & Yoon, ACCV
2020, arXiv 2006.16067) applies the idea to image patches to get anomaly maps. Here, as in the survey's
"one-class on pretrained features" variant, the patches are the positions of a frozen ImageNet CNN's
feature grid (stages 2 and 3 of a WideResNet-50 by default, 3x3 local average, stage 3 upsampled to stage
2's grid) and ``phi`` is a small bias-free MLP head trained on the reference patches:

* ``c`` = mean of the head's initial outputs over the reference patches, each coordinate with
  ``|c_i| < 0.1`` pushed to ``+-0.1`` (Deep SVDD's guard against the trivial collapse to 0);
* loss = mean ``||phi(x) - c||^2`` (one-class objective), Adam with weight decay, ``epochs`` passes over
  (at most ``max_patches``, seeded subsample of) the reference patches;
* map = per-position ``||phi(x) - c||^2`` upsampled to the input size, Gaussian sigma 4; image score = max.

Training is seeded by ``random_state`` (head initialisation, patch subsample and shuffling) and a
KeyboardInterrupt during training keeps the head trained so far (with a warning).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from vlad.errors import VladError
from vlad.features import aligned_features, check_layers, embed_all, load_cnn_stages
from vlad.features import stage_channels, stage_outputs
from vlad.images import LoadedImage
from vlad.ops import preprocess_batch, resize_blur
from vlad.progress import track
from vlad.rng import cpu_generator, init_module
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer
from vlad.scorers.scratch import optimizer_step

logger = logging.getLogger(__name__)

#: coordinates of the centre closer to 0 than this are pushed to +-this (Deep SVDD)
CENTRE_EPS = 0.1


def make_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The bias-free projection head ``phi``: ``(n, in_dim) -> (n, out_dim)``."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.LeakyReLU(0.1), nn.Linear(hidden_dim, out_dim, bias=False)
    )


class PatchSVDD(BaseScorer):
    """Deep SVDD head on CNN patch features; distance to the centre as the patch score.

    Args:
        backbone: a CNN weight name (``wide_resnet50_2.tv_in1k`` default, ``resnet18.tv_in1k``).
        weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path to weights.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        batch_size: images per backbone forward.
        image_size: square input size; None = the backbone's preprocessing size (224).
        layers: CNN stages concatenated on the first one's grid.
        hidden_dim: width of the head's hidden layer.
        out_dim: dimension of the head's output space.
        epochs: passes over the training patches (default 20: ~1 min on 2 CPU cores for 16 WRN-50 refs).
        lr: Adam learning rate.
        weight_decay: Adam weight decay (Deep SVDD's regulariser on the weights).
        patch_batch: patches per optimisation step.
        max_patches: at most this many reference patches are trained on (seeded subsample).
        sigma: Gaussian smoothing of the upsampled map, in input pixels (0 = none).
        random_state: seed of the head's initialisation, the subsample, the shuffling and a
            ``weights="random"`` backbone.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the pretrained backbone's forwards run
            under autocast at that dtype and their outputs are cast to float32 before anything else
            (:mod:`vlad.precision`). Only the frozen backbone's forwards; the head trains and runs in float32.
    """

    requires_references = True

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "image_size": ps.SQUARE_IMAGE_SIZE,
        "layers": ps.CNN_STAGES,
        "hidden_dim": ps.WIDTH,
        "out_dim": ps.WIDTH,
        "epochs": ps.Int(0, 1_000_000),
        "lr": ps.LEARNING_RATE,
        "weight_decay": ps.WEIGHT_DECAY,
        "patch_batch": ps.Int(1, 2**24),
        "max_patches": ps.Int(1, 2**31 - 1),
    }

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        weights: str = "pretrained",
        device: str = "cpu",
        batch_size: int = 8,
        image_size: int | None = None,
        layers: tuple[int, ...] = (2, 3),
        hidden_dim: int = 512,
        out_dim: int = 128,
        epochs: int = 20,
        lr: float = 1e-4,
        weight_decay: float = 1e-6,
        patch_batch: int = 4096,
        max_patches: int = 100_000,
        sigma: float = 4.0,
        random_state: int | None = 0,
        precision: str = "fp32",
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.image_size = image_size
        self.layers = layers
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.patch_batch = patch_batch
        self.max_patches = max_patches
        self.sigma = sigma
        self.random_state = random_state
        self.precision = precision

    def _build(self) -> None:
        self.layers_ = check_layers(self.layers, "PatchSVDD")
        for name in ("hidden_dim", "out_dim", "patch_batch", "max_patches"):
            if int(getattr(self, name)) < 1:
                raise VladError(f"PatchSVDD: {name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.epochs) < 0:
            raise VladError(f"PatchSVDD: epochs must be >= 0, got {self.epochs!r}")
        self.backbone_ = load_cnn_stages(self.backbone, self.weights, self.device_, self.layers_,
                                         seed=self.weights_seed)
        self.size_ = int(self.image_size or self.backbone_.spec.preprocess.size)
        in_dim = sum(stage_channels(self.backbone_))
        self.head_ = init_module(lambda: make_head(in_dim, int(self.hidden_dim), int(self.out_dim)), self.device_,
                                 self.random_state)
        self.head_.eval()

    def _features(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """``(B, D, h, w)``: the stages with 3x3 local averaging on the first stage's grid."""
        return aligned_features(stages, target=0, mode="bilinear", local_pool=3)

    def _fit(self, references: list[LoadedImage] | None) -> None:
        assert references is not None
        g = cpu_generator(self.random_state)
        per_image = math.ceil(int(self.max_patches) / len(references))

        def sample(stages: list[torch.Tensor]) -> torch.Tensor:
            f = self._features(stages).flatten(2).transpose(1, 2)  # (B, P, D)
            if f.shape[1] > per_image:
                keep = torch.randperm(f.shape[1], generator=g)[:per_image].to(f.device)
                f = f[:, keep]
            return f.reshape(-1, f.shape[-1])

        patches = embed_all(references, self.backbone_, self.size_, self.device_, self.batch_size, sample,
                            "PatchSVDD features", precision=self.precision)
        patches = patches.clone()  # a normal tensor: used with autograd below
        # one fixed scalar so that the head sees unit-RMS inputs whatever the backbone
        self.input_scale_ = patches.square().mean().rsqrt().reshape(1)
        patches *= self.input_scale_
        with torch.no_grad():
            init = torch.cat([self.head_(p) for p in patches.split(8192)]).mean(0)
        sign = torch.where(init >= 0, 1.0, -1.0)
        self.center_ = torch.where(init.abs() < CENTRE_EPS, sign * CENTRE_EPS, init)
        self.loss_history_: list[float] = []
        self.interrupted_ = False
        opt = torch.optim.Adam(self.head_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.head_.train()
        try:
            for _ in track(range(int(self.epochs)), "PatchSVDD training"):
                order = torch.randperm(len(patches), generator=g).to(patches.device)
                total, count = 0.0, 0
                for idx in order.split(int(self.patch_batch)):
                    loss = (self.head_(patches[idx]) - self.center_).square().sum(1).mean()
                    total += optimizer_step(opt, loss, "PatchSVDD", self.lr) * len(idx)
                    count += len(idx)
                self.loss_history_.append(total / count)
                logger.debug("PatchSVDD epoch %d: loss %.5f", len(self.loss_history_), total / count)
        except KeyboardInterrupt:
            self.interrupted_ = True
            if not self.loss_history_:
                raise VladError("PatchSVDD: training interrupted before the first epoch finished; nothing "
                                "usable was learned. Call fit() again (fewer epochs: epochs=N)") from None
            logger.warning("PatchSVDD training interrupted after %d of %d epochs; keeping the head trained so far",
                           len(self.loss_history_), self.epochs)
        finally:
            self.head_.eval()

    def patch_distances(self, feats: torch.Tensor) -> torch.Tensor:
        """Squared distance to the centre of every position: ``(B, D, h, w)`` -> ``(B, h, w)``."""
        b, _, h, w = feats.shape
        z = self.head_(feats.flatten(2).transpose(1, 2) * self.input_scale_)
        return (z - self.center_).square().sum(-1).reshape(b, h, w)

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        x = preprocess_batch(images, self.backbone_.spec.preprocess, self.device_, size=self.size_)
        dist = self.patch_distances(self._features(stage_outputs(self.backbone_, x, self.precision)))
        maps = resize_blur(dist, (self.size_, self.size_), self.sigma)
        return maps.flatten(1).max(dim=1).values, maps

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"head.{k}": v for k, v in self.head_.state_dict().items()}
        tensors.update(center=self.center_, input_scale=self.input_scale_)
        return tensors, {"loss_history": self.loss_history_, "interrupted": self.interrupted_}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.head_.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        self.head_.eval()
        self.center_ = tensors["center"]
        self.input_scale_ = tensors["input_scale"]
        self.loss_history_ = list(meta.get("loss_history", []))
        self.interrupted_ = bool(meta.get("interrupted", False))
