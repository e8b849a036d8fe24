"""FastFlow: unsupervised anomaly detection with 2D normalizing flows (Yu et al. 2021, arXiv 2111.07677).

One 2D normalizing flow per CNN stage maps frozen ImageNet features (layer-normalised over ``(C, H, W)``,
as FastFlow does for ResNets) to a standard Gaussian, trained by maximum likelihood on the reference
images only. Plain torch, no flow library:

* a flow step = learned per-channel affine (log-scale and shift, FrEIA's "global affine") + affine
  coupling (the first half of the channels conditions a scale and shift of the second half through a
  conv-ReLU-conv subnet, soft-clamped scales ``clamp * tanh(s / clamp)``, last conv zero-initialised so
  each step starts as the identity) + a fixed seeded channel permutation;
* subnets alternate 3x3 and 1x1 kernels (FastFlow's ResNet setting), hidden width ``hidden_ratio * C``;
* loss = negative log-likelihood per dimension, ``0.5 |z|^2 - log|det J|`` averaged over positions,
  channels and stages; Adam (lr 1e-3, weight decay 1e-5, the paper's).

Map: per stage the per-position negative log-likelihood per channel, ``0.5 mean_c z^2 - logdet / C``,
upsampled bilinearly to the input size and averaged over the stages; image score = max of the map
(``score="topk"``: mean of its top 1%).

Budget (defaults): the frozen features are computed once and cached; only the flows train. FastFlow's
paper trains 500 epochs on a GPU; on CPU the default trains for ``epochs=None`` -> as many epochs as
make about ``image_steps=240`` image passes (15 epochs for 16 refs, 2 for 100, at least 1), with
``flow_steps=4`` and ``hidden_ratio=0.5`` (paper: 8 and 1.0 for ResNets; 3.7x the compute). One image
pass (forward + backward of the three WRN-50 flows at 224 px) is ~28 GMAC, about 1 s on 2 CPU cores, so
the default budget is ~4 minutes there whatever the number of references; on a GPU raise ``epochs`` and
use the paper's sizes. A KeyboardInterrupt during training keeps the flow trained so far (with a warning); before the
first epoch finished it raises a clear error.

``selection="synthetic"`` (off by default, the paper's map): a fifth of the references is held out of
training, and the map rule (normalisation per position, smoothing, max or top-k pooling) and the training
length are chosen on synthetic defects pasted into them (:mod:`vlad.selftune`, the mechanism of every
trained scorer; ``selection_report()``). The per-position normalisation is the only one offered: a
log-likelihood has no natural zero to divide by.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlad.errors import VladError
from vlad.features import check_layers, embed_all, load_cnn_stages, stage_channels, stage_outputs
from vlad.images import LoadedImage
from vlad.ops import gaussian_blur, preprocess_batch, resize_maps, topk_mean
from vlad.progress import track
from vlad.rng import cpu_generator, init_module
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer
from vlad.scorers.scratch import MapRule, optimizer_step
from vlad.selftune import SelfTuned, no_selection_note, normalized, rules_for, stretched_canvas

logger = logging.getLogger(__name__)

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class CouplingStep(nn.Module):
    """Per-channel affine + affine coupling + fixed permutation: ``(B, C, h, w)`` -> same, plus log-det ``(B, h, w)``."""

    def __init__(self, channels: int, hidden: int, kernel: int, clamp: float, perm: torch.Tensor) -> None:
        super().__init__()
        self.split = channels // 2
        self.clamp = clamp
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))
        pad = kernel // 2
        self.subnet = nn.Sequential(
            nn.Conv2d(self.split, hidden, kernel, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * (channels - self.split), kernel, padding=pad),
        )
        nn.init.zeros_(self.subnet[-1].weight)
        nn.init.zeros_(self.subnet[-1].bias)
        self.register_buffer("perm", perm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * self.log_scale.exp() + self.shift
        logdet = self.log_scale.sum()
        x1, x2 = x[:, : self.split], x[:, self.split :]
        s, t = self.subnet(x1).chunk(2, dim=1)
        s = self.clamp * torch.tanh(s / self.clamp)
        y = torch.cat([x1, x2 * s.exp() + t], dim=1)
        return y.index_select(1, self.perm), s.sum(1) + logdet


class StageFlow(nn.Module):
    """A FastFlow 2D flow for one stage: ``(B, C, h, w)`` -> ``z`` of the same shape and log-det ``(B, h, w)``."""

    def __init__(self, channels: int, steps: int, hidden_ratio: float, clamp: float, gen: torch.Generator):
        super().__init__()
        hidden = max(1, int(round(channels * hidden_ratio)))
        self.steps = nn.ModuleList(
            CouplingStep(channels, hidden, 3 if i % 2 == 0 else 1, clamp, torch.randperm(channels, generator=gen))
            for i in range(steps)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0], *x.shape[2:])
        for step in self.steps:
            x, ld = step(x)
            logdet = logdet + ld
        return x, logdet


def nll_per_dim(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per channel at each position: ``(B, C, h, w)``, ``(B, h, w)`` -> ``(B, h, w)``."""
    return 0.5 * z.square().mean(1) - logdet / z.shape[1] + _HALF_LOG_2PI


class FastFlow(SelfTuned, BaseScorer):
    """2D normalizing flows on frozen CNN features; per-position negative log-likelihood as the map.

    Args:
        backbone: a CNN weight name (``wide_resnet50_2.tv_in1k`` default, ``resnet18.tv_in1k``).
        weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path to weights.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        batch_size: images per backbone forward and per training step.
        image_size: square input size; None = the backbone's preprocessing size (224).
        layers: CNN stages, one flow each.
        flow_steps: coupling steps per flow (paper: 8).
        hidden_ratio: subnet width as a fraction of the stage's channels (paper: 1.0 for ResNets).
        clamp: soft clamp of the coupling log-scales.
        epochs: passes over the references; None = ``round(image_steps / n_refs)``, at least 1.
        image_steps: the image-pass budget used when ``epochs`` is None.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        score: ``"max"`` of the map or ``"topk"`` (mean of the top 1%) as the image score.
        sigma: Gaussian smoothing of the map in input pixels (0 = none, FastFlow's).
        random_state: seed of initialisation (incl. a ``weights="random"`` backbone), permutations and
            shuffling.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the pretrained backbone's forwards run
            under autocast at that dtype and their outputs are cast to float32 before anything else
            (:mod:`vlad.precision`). Only the frozen backbone's forwards; the flows train and run in float32.
        selection: None (default): the paper's map and budget; ``"synthetic"``: the map rule and the
            training length (at most the epochs above) are chosen on synthetic defects of held-out
            references (:mod:`vlad.selftune`; ``selection_report()``).
    """

    requires_references = True
    #: with selection="synthetic" every part of the map rule is searched (``sigma`` and ``score`` are the paper map's)
    RULE_PARAMS = ()

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "image_size": ps.SQUARE_IMAGE_SIZE,
        "layers": ps.CNN_STAGES,
        "flow_steps": ps.Int(1, 64).explain("the paper uses 8"),
        "hidden_ratio": ps.Number(0, 16, lo_open=True),
        "clamp": ps.Number(0, 100, lo_open=True),
        "epochs": ps.Int(0, 1_000_000, none=True).explain("None = from image_steps"),
        "image_steps": ps.STEPS,
        "lr": ps.LEARNING_RATE,
        "weight_decay": ps.WEIGHT_DECAY,
        "score": ps.Choice("max", "topk"),
        "selection": ps.BACKBONE_SELECTION,
    }

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        weights: str = "pretrained",
        device: str = "cpu",
        batch_size: int = 8,
        image_size: int | None = None,
        layers: tuple[int, ...] = (1, 2, 3),
        flow_steps: int = 4,
        hidden_ratio: float = 0.5,
        clamp: float = 2.0,
        epochs: int | None = None,
        image_steps: int = 240,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        score: str = "max",
        sigma: float = 0.0,
        random_state: int | None = 0,
        precision: str = "fp32",
        selection: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.image_size = image_size
        self.layers = layers
        self.flow_steps = flow_steps
        self.hidden_ratio = hidden_ratio
        self.clamp = clamp
        self.epochs = epochs
        self.image_steps = image_steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.score = score
        self.sigma = sigma
        self.random_state = random_state
        self.precision = precision
        self.selection = selection

    def _build(self) -> None:
        self.layers_ = check_layers(self.layers, "FastFlow")
        if int(self.flow_steps) < 1 or not float(self.hidden_ratio) > 0 or not float(self.clamp) > 0:
            raise VladError(
                f"FastFlow: flow_steps >= 1, hidden_ratio > 0 and clamp > 0 expected, got flow_steps="
                f"{self.flow_steps!r}, hidden_ratio={self.hidden_ratio!r}, clamp={self.clamp!r}"
            )
        if self.score not in ("max", "topk"):
            raise VladError(f"FastFlow: score must be 'max' or 'topk', got {self.score!r}")
        if self.epochs is not None and int(self.epochs) < 0:
            raise VladError(f"FastFlow: epochs must be >= 0 or None (automatic), got {self.epochs!r}")
        self.backbone_ = load_cnn_stages(self.backbone, self.weights, self.device_, self.layers_,
                                         seed=self.weights_seed)
        self.size_ = int(self.image_size or self.backbone_.spec.preprocess.size)
        gen = cpu_generator(self.random_state)
        self.flows_ = init_module(lambda: nn.ModuleList(
            StageFlow(c, int(self.flow_steps), float(self.hidden_ratio), float(self.clamp), gen)
            for c in stage_channels(self.backbone_)
        ), self.device_, self.random_state)
        self.flows_.eval()
        self.map_rule_, self.selection_, self.selection_note_ = None, None, None

    @staticmethod
    def _normalise(stages: list[torch.Tensor]) -> list[torch.Tensor]:
        """Parameter-free layer norm of each stage over ``(C, h, w)``."""
        return [F.layer_norm(f, f.shape[1:]) for f in stages]

    def _nll_maps(self, stages: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-stage NLL maps ``(B, h_l, w_l)`` and the training loss (mean NLL per dimension)."""
        maps = []
        for flow, f in zip(self.flows_, stages):
            z, logdet = flow(f)
            maps.append(nll_per_dim(z, logdet))
        loss = torch.stack([m.mean() for m in maps]).mean()
        return maps, loss

    def _train_batch(self, opt: torch.optim.Optimizer, stages: list[torch.Tensor]) -> float:
        """One optimisation step of the flows on a batch's stage features; its loss."""
        return optimizer_step(opt, self._nll_maps(stages)[1], "FastFlow", self.lr)

    def _fit(self, references: list[LoadedImage] | None) -> None:
        assert references is not None
        if self.selection == "synthetic":
            return self._fit_selected(references)
        self.selection_note_ = no_selection_note(self, len(references))
        shapes: list[tuple[int, ...]] = []

        def fn(stages: list[torch.Tensor]) -> torch.Tensor:
            shapes[:] = [tuple(f.shape[1:]) for f in stages]
            return torch.cat([f.flatten(1) for f in self._normalise(stages)], dim=1)

        cache = embed_all(references, self.backbone_, self.size_, self.device_, self.batch_size, fn,
                          "FastFlow features", precision=self.precision).clone()  # frozen features, computed once
        sizes = [math.prod(s) for s in shapes]
        n = len(references)
        epochs = int(self.epochs) if self.epochs is not None else max(1, round(int(self.image_steps) / n))
        self.epochs_ = epochs
        g = cpu_generator(self.random_state)
        opt = torch.optim.Adam(self.flows_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.loss_history_: list[float] = []
        self.interrupted_ = False
        self.flows_.train()
        try:
            for _ in track(range(epochs), "FastFlow training"):
                total = 0.0
                for idx in torch.randperm(n, generator=g).split(max(1, int(self.batch_size or 8))):
                    rows = cache[idx.to(cache.device)]
                    stages = [c.reshape(len(idx), *s) for c, s in zip(rows.split(sizes, dim=1), shapes)]
                    total += self._train_batch(opt, stages) * len(idx)
                self.loss_history_.append(total / n)
                logger.debug("FastFlow epoch %d/%d: loss %.5f", len(self.loss_history_), epochs, total / n)
        except KeyboardInterrupt:
            self.interrupted_ = True
            if not self.loss_history_:
                raise VladError("FastFlow: training interrupted before the first epoch finished; nothing "
                                "usable was learned. Call fit() again (fewer epochs: epochs=N)") from None
            logger.warning("FastFlow training interrupted after %d of %d epochs; keeping the flow trained so far",
                           len(self.loss_history_), epochs)
        finally:
            self.flows_.eval()

    # -- the map rule's side (selection="synthetic"; vlad.selftune) -----------------------------------
    @property
    def TERMS(self) -> tuple[str, ...]:  # noqa: N802  (the name every self-tuned scorer's terms go by)
        """The raw maps' terms: each stage's negative log-likelihood."""
        return tuple(f"stage{i}" for i in self.layers_)

    def _map_rule(self) -> None:
        return None  # without a selection: the paper's map (_predict_batch)

    def _candidates(self) -> list[MapRule]:
        return rules_for("position", None, None, None, [tuple(range(len(self.layers_)))])

    def _canvas(self, images: list[LoadedImage]):
        return stretched_canvas(images, self.size_, self.backbone_.spec.preprocess.interpolation)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised stage features of canvas images ``x`` (in [0, 1])."""
        xb = normalized(x, self.backbone_.spec.preprocess, self.device_)
        return self._normalise(stage_outputs(self.backbone_, xb, self.precision))

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """Raw maps ``(B, L, H, W)`` of canvas images: each stage's NLL map at the input size."""
        out, bs, size = [], max(1, int(self.batch_size or 8)), (self.size_, self.size_)
        with torch.inference_mode():
            for i in range(0, x.shape[0], bs):
                stages = self._frozen(x, i, lambda: self._stages(x[i : i + bs]))  # noqa: B023
                maps, _ = self._nll_maps(stages)
                out.append(torch.stack([resize_maps(m, size) for m in maps], dim=1).cpu())
        return torch.cat(out)

    def _fit_selected(self, references: list[LoadedImage]) -> None:
        """``fit`` with ``selection="synthetic"``: the same training, one batch per step, judged on synthetic
        defects of held-out references (vlad.selftune)."""
        canvas, boxes, train_idx, held_idx = self._held_out_canvas(references)
        train = canvas[torch.from_numpy(train_idx)]
        bs = max(1, int(self.batch_size or 8))
        with torch.no_grad():
            feats = [self._stages(train[i : i + bs]) for i in range(0, len(train), bs)]
        stages = [torch.cat([f[j] for f in feats]) for j in range(len(feats[0]))]  # frozen features, computed once
        n = len(train)
        epochs = int(self.epochs) if self.epochs is not None else max(1, round(int(self.image_steps) / n))
        self.epochs_ = epochs
        per_epoch = math.ceil(n / bs)
        g = cpu_generator(self.random_state)
        opt = torch.optim.Adam(self.flows_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        order: list[torch.Tensor] = []

        def step(i: int) -> float:
            if i % per_epoch == 0:  # a new epoch: a new order of the references, as the paper's loop
                order[:] = torch.randperm(n, generator=g).split(bs)
            return self._train_batch(opt, [s[order[i % per_epoch]] for s in stages])

        self.flows_.train()
        self._train_selected(step, epochs * per_epoch, "FastFlow training", self.flows_, logger, canvas=canvas,
                             boxes=boxes, train_idx=train_idx, held_idx=held_idx)
        self.flows_.eval()

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.map_rule_ is not None:
            return self._rule_predict(images)
        x = preprocess_batch(images, self.backbone_.spec.preprocess, self.device_, size=self.size_)
        maps, _ = self._nll_maps(self._normalise(stage_outputs(self.backbone_, x, self.precision)))
        size = (self.size_, self.size_)
        amap = gaussian_blur(torch.stack([resize_maps(m, size) for m in maps]).mean(0), self.sigma)
        flat = amap.flatten(1)
        scores = flat.max(dim=1).values if self.score == "max" else topk_mean(flat, 0.01)
        return scores, amap

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = self._save_stats({f"flows.{k}": v for k, v in self.flows_.state_dict().items()})
        return tensors, {"loss_history": self.loss_history_, "interrupted": self.interrupted_,
                         "epochs": self.epochs_, **self._selection_meta()}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.flows_.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("flows.")})
        self.flows_.eval()
        self.loss_history_ = list(meta.get("loss_history", []))
        self.interrupted_ = bool(meta.get("interrupted", False))
        self.epochs_ = int(meta.get("epochs", 0))
        self._restore_selection(meta)
        self._load_stats(tensors)
