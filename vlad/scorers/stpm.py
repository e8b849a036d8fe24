"""STPM: Student-Teacher Feature Pyramid Matching for anomaly detection.

Wang, Han, Xu and Chen, BMVC 2021, arXiv 2103.04257. A frozen pretrained CNN teacher (ResNet-18,
layers 1-3) and a student of the same architecture trained from scratch on normal images to match the
teacher's channel-L2-normalised features at every layer: loss ``sum_l mean_positions 0.5 * ||t_l - s_l||^2``.
At test time each layer's map is ``0.5 * ||t_l - s_l||^2 = 1 - cos(t_l, s_l)`` per position, upsampled
(bilinear) to the input size; the anomaly map is the product over layers (as in the paper), lightly
smoothed (Gaussian ``sigma=4`` px); the image score is its max.

Defaults: teacher ``resnet18.tv_in1k`` at its spec size (224), SGD lr 0.4, momentum 0.9, weight decay
1e-4 (the paper's optimiser); the paper trains 100 epochs at batch 32 -- here ``train_steps=200`` steps of
``batch_size=8`` (minutes on 2 CPU cores; raise it with more time).

Stopping: Ctrl-C during training keeps the student trained so far (warning logged, ``interrupted_=True``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlad.backbones import load_backbone
from vlad.errors import InvalidParameterError
from vlad.features import stage_outputs
from vlad.images import LoadedImage
from vlad.ops import gaussian_blur, preprocess_batch
from vlad.rng import init_module
from vlad.scorers.autoencoder import resolve_size, train_loop
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer

logger = logging.getLogger(__name__)


def reinit_(model: nn.Module) -> nn.Module:
    """Re-draw every parameter of ``model`` from torch's global RNG: call it on the CPU inside
    :func:`vlad.rng.seeded` (here, through :func:`vlad.rng.init_module`), never on a GPU module, whose
    in-place draws would come from the GPU's generator and differ from the CPU's."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
    return model


def layer_distances(t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer ``0.5 * ||t/|t| - s/|s| ||^2`` over channels: a list of ``(B, h_l, w_l)`` maps."""
    return [0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1) for t, s in zip(t_feats, s_feats)]


class STPM(BaseScorer):
    """Student-teacher feature pyramid matching.

    Args:
        backbone: teacher CNN (a :mod:`vlad.weights` name); the student has the same architecture.
        weights: teacher weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path. The student is
            always randomly initialised (``random_state``).
        device: torch device or ``"auto"``.
        batch_size: images per training step and per prediction batch.
        random_state: seed of the student's initialisation, the batch sampling and a ``weights="random"``
            teacher.
        image_size: input size (int or ``(H, W)``); None = the backbone's preprocess size.
        layers: backbone stages used (1 = layer1 ... 4 = layer4); the paper uses 1-3.
        train_steps: optimisation steps (the training budget).
        lr, momentum, weight_decay: SGD parameters (paper: 0.4, 0.9, 1e-4).
        sigma: Gaussian smoothing of the map, pixels at ``image_size``.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the pretrained backbone's forwards run
            under autocast at that dtype and their outputs are cast to float32 before anything else
            (:mod:`vlad.precision`). Only the frozen teacher's forwards; the student trains and runs in
            float32.
    """

    requires_references = True

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "layers": ps.CNN_STAGES_ANY_ORDER,
        "train_steps": ps.STEPS,
        "lr": ps.LEARNING_RATE,
        "momentum": ps.Number(0, 1, hi_open=True),
        "weight_decay": ps.WEIGHT_DECAY,
    }

    def __init__(
        self,
        backbone: str = "resnet18.tv_in1k",
        weights: str = "pretrained",
        device: str = "cpu",
        batch_size: int = 8,
        random_state: int | None = 0,
        image_size: int | tuple[int, int] | None = None,
        layers: tuple[int, ...] = (1, 2, 3),
        train_steps: int = 200,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        sigma: float = 4.0,
        precision: str = "fp32",
    ):
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.image_size = image_size
        self.layers = layers
        self.train_steps = train_steps
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.sigma = sigma
        self.precision = precision

    def _build(self) -> None:
        layers = tuple(int(i) for i in self.layers)
        if not layers or any(i < 1 or i > 4 for i in layers):
            raise InvalidParameterError(f"layers must be backbone stages in 1..4, got {self.layers!r}; the paper uses (1, 2, 3)")
        self.teacher_ = load_backbone(self.backbone, self.weights, self.device_, seed=self.weights_seed,
                                      out_indices=layers)
        student_weights = "tiny" if self.weights == "tiny" else "random"
        # built and re-drawn on the CPU, then moved: the same student on every device (never a copy of
        # the teacher: the tiny twin is built from a fixed seed)
        student = init_module(lambda: reinit_(load_backbone(self.backbone, student_weights, "cpu", out_indices=layers).model),
                              self.device_, 0 if self.random_state is None else int(self.random_state))
        self.student_ = student.requires_grad_(True).eval()
        self.size_ = resolve_size(self.image_size, self.teacher_.spec.preprocess.size)

    def _inputs(self, images: list[LoadedImage]) -> torch.Tensor:
        return preprocess_batch(images, self.teacher_.spec.preprocess, self.device_, size=self.size_)

    def _fit(self, references: list[LoadedImage] | None) -> None:
        data = self._inputs(references).cpu()
        seed = 0 if self.random_state is None else int(self.random_state)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(self.student_.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        bs = max(1, int(self.batch_size))
        self.student_.train()

        def step(_: int) -> float:
            x = data[torch.randint(0, data.shape[0], (bs,), generator=gen)].to(self.device_)
            with torch.no_grad():
                t_feats = stage_outputs(self.teacher_, x, self.precision)
            loss = sum(d.mean() for d in layer_distances(t_feats, self.student_(x)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        self.loss_history_, self.interrupted_ = train_loop(step, int(self.train_steps), "STPM training", logger)
        self.student_.eval()

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._inputs(images)
        dists = layer_distances(stage_outputs(self.teacher_, x, self.precision), self.student_(x))
        maps = torch.ones(x.shape[0], *self.size_, device=x.device)
        for d in dists:
            maps = maps * F.interpolate(d[:, None], size=self.size_, mode="bilinear", align_corners=False)[:, 0]
        maps = gaussian_blur(maps, self.sigma)
        return maps.flatten(1).amax(dim=1), maps

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"student.{k}": v for k, v in self.student_.state_dict().items()}
        return tensors, {"loss_history": self.loss_history_, "interrupted": self.interrupted_}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.student_.load_state_dict({k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")})
        self.student_.eval()
        self.loss_history_ = list(meta.get("loss_history", []))
        self.interrupted_ = bool(meta.get("interrupted", False))
