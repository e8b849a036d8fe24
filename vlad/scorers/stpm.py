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

``selection="synthetic"`` (off by default, the paper's map): a fifth of the references is held out of
training, and the map rule (layers multiplied as in the paper or averaged after normalisation; per
position or global normalisation; smoothing; max or top-k pooling) and the training length are chosen on
synthetic defects pasted into them, with :mod:`vlad.selftune`, the mechanism of every trained scorer
(``selection_report()`` says what was chosen).

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
from vlad.scorers.scratch import MapRule
from vlad.selftune import SelfTuned, no_selection_note, normalized, rules_for, stretched_canvas

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


class STPM(SelfTuned, BaseScorer):
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
        selection: None (default): the paper's map and budget; ``"synthetic"``: the map rule and the
            training length (at most ``train_steps``) are chosen on synthetic defects of held-out references
            (:mod:`vlad.selftune`; ``selection_report()``).
    """

    requires_references = True
    #: with selection="synthetic" every part of the map rule is searched (``sigma`` is the paper map's)
    RULE_PARAMS = ()

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "layers": ps.CNN_STAGES_ANY_ORDER,
        "train_steps": ps.STEPS,
        "lr": ps.LEARNING_RATE,
        "momentum": ps.Number(0, 1, hi_open=True),
        "weight_decay": ps.WEIGHT_DECAY,
        "selection": ps.BACKBONE_SELECTION,
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
        selection: str | None = None,
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
        self.selection = selection

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
        self.map_rule_, self.selection_, self.selection_note_ = None, None, None

    def _inputs(self, images: list[LoadedImage]) -> torch.Tensor:
        return preprocess_batch(images, self.teacher_.spec.preprocess, self.device_, size=self.size_)

    # -- the map rule's side (selection="synthetic"; vlad.selftune) -----------------------------------
    @property
    def TERMS(self) -> tuple[str, ...]:  # noqa: N802  (the name every self-tuned scorer's terms go by)
        """The raw maps' terms: each layer's distance, then their product (the paper's map)."""
        return (*(f"layer{i}" for i in self.layers), "product")

    def _map_rule(self) -> None:
        return None  # without a selection: the paper's map (_predict_batch)

    def _candidates(self) -> list[MapRule]:
        n = len(tuple(self.layers))
        return rules_for(None, None, None, None, [(n,), tuple(range(n))])

    def _canvas(self, images: list[LoadedImage]):
        return stretched_canvas(images, self.size_, self.teacher_.spec.preprocess.interpolation)

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """Raw maps ``(B, L + 1, H, W)`` of canvas images: each layer's distance at the input size, and
        their product."""
        out, bs = [], max(1, int(self.batch_size))
        with torch.inference_mode():
            for i in range(0, x.shape[0], bs):
                xb = normalized(x[i : i + bs], self.teacher_.spec.preprocess, self.device_)
                teacher = self._frozen(x, i, lambda: stage_outputs(self.teacher_, xb, self.precision))  # noqa: B023
                dists = layer_distances(teacher, self.student_(xb))
                up = [F.interpolate(d[:, None], size=self.size_, mode="bilinear", align_corners=False)[:, 0]
                      for d in dists]
                out.append(torch.stack([*up, torch.stack(up).prod(dim=0)], dim=1).cpu())
        return torch.cat(out)

    def _fit(self, references: list[LoadedImage] | None) -> None:
        if self.selection == "synthetic":
            canvas, boxes, train_idx, held_idx = self._held_out_canvas(references)
            data = normalized(canvas[torch.from_numpy(train_idx)], self.teacher_.spec.preprocess, "cpu")
        else:
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

        if self.selection == "synthetic":
            self._train_selected(step, int(self.train_steps), "STPM training", self.student_, logger, canvas=canvas,
                                 boxes=boxes, train_idx=train_idx, held_idx=held_idx)
        else:
            self.loss_history_, self.interrupted_ = train_loop(step, int(self.train_steps), "STPM training", logger)
            self.selection_note_ = no_selection_note(self, len(references))
        self.student_.eval()

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.map_rule_ is not None:
            return self._rule_predict(images)
        x = self._inputs(images)
        dists = layer_distances(stage_outputs(self.teacher_, x, self.precision), self.student_(x))
        maps = torch.ones(x.shape[0], *self.size_, device=x.device)
        for d in dists:
            maps = maps * F.interpolate(d[:, None], size=self.size_, mode="bilinear", align_corners=False)[:, 0]
        maps = gaussian_blur(maps, self.sigma)
        return maps.flatten(1).amax(dim=1), maps

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = self._save_stats({f"student.{k}": v for k, v in self.student_.state_dict().items()})
        return tensors, {"loss_history": self.loss_history_, "interrupted": self.interrupted_, **self._selection_meta()}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.student_.load_state_dict({k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")})
        self.student_.eval()
        self.loss_history_ = list(meta.get("loss_history", []))
        self.interrupted_ = bool(meta.get("interrupted", False))
        self._restore_selection(meta)
        self._load_stats(tensors)
