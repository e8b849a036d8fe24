"""EfficientAD-S style student-teacher: a patch description network (PDN) regressing teacher features.

Batzner, Heckler and König, "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level
Latencies", WACV 2024, arXiv 2303.14535. A small PDN student (EfficientAD-S: four convolutions, two
average pools, receptive field 33 px, 384 output channels) is trained on normal images to predict a
frozen teacher's features with the *hard feature loss*: of the squared differences ``(T - S)^2`` only
those at or above their 0.999 quantile contribute. The anomaly map is the channel mean of ``(T - S)^2``,
normalised with the 0.9 and 0.995 quantiles ``q_a, q_b`` of the reference images' maps:
``0.1 * (map - q_a) / (q_b - q_a)``; the image score is the max of the map.

Documented simplifications:

* Teacher: in the paper a PDN distilled from a pretrained WideResNet-101 (a 60 h ImageNet job). Here the
  teacher is the frozen pretrained CNN itself (default ``wide_resnet50_2.tv_in1k``, layers 2 and 3): each
  layer is locally averaged (3 x 3, as PatchCore), bilinearly resized to the PDN's output grid,
  concatenated and projected to 384 channels by a fixed seeded random projection (Johnson-Lindenstrauss;
  skipped when the channel count already matches), then normalised per channel with the mean and std
  over the references (as the paper normalises its teacher).
* No ImageNet penalty loss (no ImageNet on the machine) and no autoencoder branch (logical anomalies);
  the student-teacher branch alone is EfficientAD's structural-anomaly detector.
* Budget: Adam lr 1e-4, weight decay 1e-5 (paper), ``train_steps=300`` steps of ``batch_size=4``
  (the paper: 70,000 steps of 1) -- minutes on 2 CPU cores. The quantiles come from the references
  themselves (the paper uses held-out normal images), so they are optimistic; a threshold set on them is
  strict.

Input size: 256 px (the paper's) unless ``image_size`` is given; the PDN grid is 56 x 56 at 256 px.

``selection="synthetic"`` (off by default, the paper's map): a fifth of the references is held out of
training, and the map rule (normalisation per position or global, smoothing, max or top-k pooling) and the
training length are chosen on synthetic defects pasted into them (:mod:`vlad.selftune`, the mechanism of
every trained scorer; ``selection_report()`` says what was chosen).
Stopping: Ctrl-C during training keeps the student trained so far (warning logged, ``interrupted_=True``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlad.backbones import load_backbone
from vlad.errors import InvalidParameterError
from vlad.features import stage_outputs
from vlad.images import LoadedImage
from vlad.ops import preprocess_batch, to_batch
from vlad.rng import seeded
from vlad.scorers.autoencoder import resolve_size, train_loop
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer
from vlad.scorers.scratch import MapRule
from vlad.selftune import SelfTuned, no_selection_note, normalized, rules_for, stretched_canvas

logger = logging.getLogger(__name__)

PDN_RECEPTIVE_FIELD = 33


class PDNSmall(nn.Module):
    """EfficientAD-S patch description network, no padding: ``(B, 3, H, W)`` -> ``(B, C, h, w)``.

    ``h = pdn_grid(H)`` (56 at 256 px); each output sees a 33 x 33 pixel patch, stride 4.
    """

    def __init__(self, out_channels: int = 384, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(width, 2 * width, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(2 * width, 2 * width, 3), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, out_channels, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch descriptors ``(B, C, h, w)``."""
        return self.net(x)


def pdn_grid(size: int) -> int:
    """Output side of :class:`PDNSmall` for an input side ``size``."""
    return (((size - 3) // 2) - 3) // 2 - 2 - 3


def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor, quantile: float = 0.999) -> torch.Tensor:
    """Mean of the squared differences at or above their ``quantile`` (EfficientAD's hard feature loss)."""
    d = (teacher - student).pow(2).flatten()
    # torch.quantile's linear interpolation, via kthvalue (no 16M-element limit)
    pos = quantile * (d.numel() - 1)
    lo = int(math.floor(pos))
    flat = d.detach()
    v_lo = torch.kthvalue(flat, lo + 1).values
    v_hi = torch.kthvalue(flat, min(lo + 2, flat.numel())).values
    d_hard = v_lo + (pos - lo) * (v_hi - v_lo)
    return d[d >= d_hard].mean()


class EfficientAD(SelfTuned, BaseScorer):
    """EfficientAD-S style student-teacher anomaly detection (student-teacher branch).

    Args:
        backbone: pretrained CNN acting as the teacher (a :mod:`vlad.weights` name).
        weights: teacher weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path. The student is
            always trained from scratch (``random_state``).
        device: torch device or ``"auto"``.
        batch_size: images per training step and per prediction batch.
        random_state: seed of the student init, the projection, the batch sampling and of a
            ``weights="random"`` teacher.
        image_size: int or ``(H, W)``; None = 256 (the paper's).
        layers: teacher stages used (2 and 3 by default).
        out_channels: feature channels the student regresses (paper: 384).
        train_steps: optimisation steps (the training budget).
        lr, weight_decay: Adam parameters (paper: 1e-4, 1e-5).
        hard_quantile: quantile of the hard feature loss (paper: 0.999).
        map_quantiles: ``(q_a, q_b)`` quantiles of the reference maps used to normalise maps (paper: 0.9, 0.995).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the pretrained backbone's forwards run
            under autocast at that dtype and their outputs are cast to float32 before anything else
            (:mod:`vlad.precision`). Only the frozen teacher's forwards; the student trains and runs in
            float32.
        selection: None (default): the paper's map and budget; ``"synthetic"``: the map rule and the
            training length (at most ``train_steps``) are chosen on synthetic defects of held-out references
            (:mod:`vlad.selftune`; ``selection_report()``).
    """

    requires_references = True
    TERMS = ("distance",)
    #: with selection="synthetic" every part of the map rule is searched
    RULE_PARAMS = ()

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "layers": ps.CNN_STAGES_ANY_ORDER,
        "out_channels": ps.WIDTH,
        "train_steps": ps.STEPS,
        "lr": ps.LEARNING_RATE,
        "weight_decay": ps.WEIGHT_DECAY,
        "hard_quantile": ps.Number(0, 1).explain("the paper uses 0.999"),
        "map_quantiles": ps.Seq(ps.Number(0, 1), 2, 2, increasing=True, example="(0.9, 0.995), the paper's"),
        "selection": ps.BACKBONE_SELECTION,
    }

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        weights: str = "pretrained",
        device: str = "cpu",
        batch_size: int = 4,
        random_state: int | None = 0,
        image_size: int | tuple[int, int] | None = None,
        layers: tuple[int, ...] = (2, 3),
        out_channels: int = 384,
        train_steps: int = 300,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        hard_quantile: float = 0.999,
        map_quantiles: tuple[float, float] = (0.9, 0.995),
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
        self.out_channels = out_channels
        self.train_steps = train_steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.hard_quantile = hard_quantile
        self.map_quantiles = map_quantiles
        self.precision = precision
        self.selection = selection

    def _build(self) -> None:
        layers = tuple(int(i) for i in self.layers)
        if not layers or any(i < 1 or i > 4 for i in layers):
            raise InvalidParameterError(f"layers must be backbone stages in 1..4, got {self.layers!r}; e.g. (2, 3)")
        qa, qb = (float(q) for q in self.map_quantiles)
        if not 0.0 <= qa < qb <= 1.0:
            raise InvalidParameterError(f"map_quantiles must satisfy 0 <= q_a < q_b <= 1, got {self.map_quantiles!r}")
        self.size_ = resolve_size(self.image_size, 256)
        self.grid_ = (pdn_grid(self.size_[0]), pdn_grid(self.size_[1]))
        if min(self.grid_) < 1:
            raise InvalidParameterError(f"image_size {self.size_} is too small for the PDN (receptive field "
                             f"{PDN_RECEPTIVE_FIELD} px); use at least 48 px, 256 is the paper's")
        self.teacher_ = load_backbone(self.backbone, self.weights, self.device_, seed=self.weights_seed,
                                      out_indices=layers)
        tiny = self.weights == "tiny"
        channels = max(8, int(self.out_channels) // 4) if tiny else int(self.out_channels)
        with torch.no_grad():
            probe = self.teacher_.model(torch.zeros(1, 3, 64, 64, device=self.device_))
        in_channels = sum(f.shape[1] for f in probe)
        with seeded(0 if self.random_state is None else int(self.random_state)):  # on the CPU (vlad.rng)
            student = PDNSmall(channels, width=32 if tiny else 128)
            if in_channels == channels:
                proj = torch.eye(channels)
            else:
                proj = torch.randn(in_channels, channels) / math.sqrt(channels)
        self.student_ = student.to(self.device_).eval()
        self.projection_ = proj.to(self.device_)
        self.mean_ = torch.zeros(1, channels, 1, 1, device=self.device_)
        self.std_ = torch.ones(1, channels, 1, 1, device=self.device_)
        self.map_rule_, self.selection_, self.selection_note_ = None, None, None

    # -- features ------------------------------------------------------------------------------------
    def _teacher_raw(self, images: list[LoadedImage]) -> torch.Tensor:
        """Projected teacher features on the PDN grid, before normalisation: ``(B, C, h, w)``."""
        return self._teacher_features(preprocess_batch(images, self.teacher_.spec.preprocess, self.device_,
                                                       size=self.size_))

    def _teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_teacher_raw` of an input batch already normalised for the teacher."""
        feats = [F.interpolate(F.avg_pool2d(f, 3, 1, 1, count_include_pad=False), size=self.grid_,
                               mode="bilinear", align_corners=False)
                 for f in stage_outputs(self.teacher_, x, self.precision)]
        f = torch.cat(feats, dim=1)
        return torch.einsum("bchw,cd->bdhw", f, self.projection_)

    def _teacher(self, images: list[LoadedImage]) -> torch.Tensor:
        return (self._teacher_raw(images) - self.mean_) / self.std_

    def _student_input(self, images: list[LoadedImage]) -> torch.Tensor:
        pre = self.teacher_.spec.preprocess
        return to_batch(images, self.size_, pre.mean, pre.std, self.device_, "bilinear")

    def _raw_map(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """Channel mean of ``(T - S)^2`` on the grid, padded to align patch centres, at input size ``(B, H, W)``."""
        m = (teacher - student).pow(2).mean(dim=1, keepdim=True)
        pad = PDN_RECEPTIVE_FIELD // 2 // 4  # 16 px of border = 4 grid cells
        m = F.pad(m, (pad, pad, pad, pad), mode="replicate")
        return F.interpolate(m, size=self.size_, mode="bilinear", align_corners=False)[:, 0]

    # -- training ------------------------------------------------------------------------------------
    def _fit(self, references: list[LoadedImage] | None) -> None:
        bs = max(1, int(self.batch_size))
        synthetic = self.selection == "synthetic"
        if synthetic:  # the teacher and the student see the same canvas, as the synthetic defects are made on it
            canvas, boxes, train_idx, held_idx = self._held_out_canvas(references)
            train = canvas[torch.from_numpy(train_idx)]
            batches = [normalized(train[i : i + bs], self.teacher_.spec.preprocess, self.device_)
                       for i in range(0, len(train), bs)]
        with torch.no_grad():
            if synthetic:
                raw = torch.cat([self._teacher_features(x) for x in batches])
                inputs = torch.cat(batches).cpu()
            else:
                raw = torch.cat([self._teacher_raw(references[i : i + bs]) for i in range(0, len(references), bs)])
                inputs = torch.cat([self._student_input(references[i : i + bs])
                                    for i in range(0, len(references), bs)]).cpu()
            self.mean_ = raw.mean(dim=(0, 2, 3), keepdim=True)
            self.std_ = raw.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
            targets = ((raw - self.mean_) / self.std_).to(torch.float16).cpu()  # ~2.4 MB per reference at 256 px
        del raw
        seed = 0 if self.random_state is None else int(self.random_state)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.student_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.student_.train()

        def step(_: int) -> float:
            idx = torch.randint(0, inputs.shape[0], (bs,), generator=gen)
            t = targets[idx].to(self.device_, torch.float32)
            loss = hard_feature_loss(t, self.student_(inputs[idx].to(self.device_)), self.hard_quantile)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        if synthetic:
            self._train_selected(step, int(self.train_steps), "EfficientAD training", self.student_, logger,
                                 canvas=canvas, boxes=boxes, train_idx=train_idx, held_idx=held_idx)
        else:
            self.loss_history_, self.interrupted_ = train_loop(step, int(self.train_steps), "EfficientAD training", logger)
            self.selection_note_ = no_selection_note(self, len(references))
        self.student_.eval()
        with torch.no_grad():
            maps = torch.cat([
                self._raw_map(targets[i : i + bs].to(self.device_, torch.float32),
                              self.student_(inputs[i : i + bs].to(self.device_)))
                for i in range(0, inputs.shape[0], bs)
            ])
        values = maps.flatten()
        if values.numel() > 4_000_000:  # quantile of a large sample: subsample deterministically
            values = values[:: values.numel() // 4_000_000 + 1]
        qa, qb = (float(q) for q in self.map_quantiles)
        self.q_a_ = torch.quantile(values.float().cpu(), qa).to(self.device_)
        self.q_b_ = torch.quantile(values.float().cpu(), qb).to(self.device_)

    # -- the map rule's side (selection="synthetic"; vlad.selftune) -----------------------------------
    def _map_rule(self) -> None:
        return None  # without a selection: the paper's map (_predict_batch)

    def _candidates(self) -> list[MapRule]:
        return rules_for(None, None, None, None, [(0,)])

    def _canvas(self, images: list[LoadedImage]):
        return stretched_canvas(images, self.size_, self.teacher_.spec.preprocess.interpolation)

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """Raw maps ``(B, 1, H, W)`` of canvas images: the channel mean of ``(T - S)^2`` at the input size."""
        out, bs = [], max(1, int(self.batch_size))
        with torch.inference_mode():
            for i in range(0, x.shape[0], bs):
                xb = normalized(x[i : i + bs], self.teacher_.spec.preprocess, self.device_)
                t = self._frozen(x, i, lambda: (self._teacher_features(xb) - self.mean_) / self.std_)  # noqa: B023
                out.append(self._raw_map(t, self.student_(xb))[:, None].cpu())
        return torch.cat(out)

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.map_rule_ is not None:
            return self._rule_predict(images)
        m = self._raw_map(self._teacher(images), self.student_(self._student_input(images)))
        maps = 0.1 * (m - self.q_a_) / (self.q_b_ - self.q_a_).clamp_min(1e-12)
        return maps.flatten(1).amax(dim=1), maps

    # -- persistence ---------------------------------------------------------------------------------
    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"student.{k}": v for k, v in self.student_.state_dict().items()}
        tensors.update(projection=self.projection_, mean=self.mean_, std=self.std_,
                       q_a=self.q_a_.reshape(1), q_b=self.q_b_.reshape(1))
        return self._save_stats(tensors), {"loss_history": self.loss_history_, "interrupted": self.interrupted_,
                                           **self._selection_meta()}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.student_.load_state_dict({k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")})
        self.student_.eval()
        self.projection_, self.mean_, self.std_ = tensors["projection"], tensors["mean"], tensors["std"]
        self.q_a_, self.q_b_ = tensors["q_a"][0], tensors["q_b"][0]
        self.loss_history_ = list(meta.get("loss_history", []))
        self.interrupted_ = bool(meta.get("interrupted", False))
        self._restore_selection(meta)
        self._load_stats(tensors)
