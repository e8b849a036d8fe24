"""PaDiM: a Patch Distribution Modeling framework (Defard et al., ICPR 2021 workshops, arXiv 2011.08785).

Each position of a frozen CNN's feature grid gets a multivariate Gaussian fitted on the reference
(normal) images; a test patch scores its Mahalanobis distance to the Gaussian of its position.

Recipe (paper defaults): stages 1-3 of a WideResNet-50 concatenated on stage 1's grid (coarser stages
copied to the cells they cover, as the reference code), a seeded random subset of ``d`` channels
(550 for WRN-50, 100 for ResNet-18), per position mean and covariance ``S + 0.01 I``. The map is the
Mahalanobis distance upsampled to the input size and smoothed by a Gaussian of sigma 4; the image
score is the map's maximum.

Inverting the covariances: done once at fit, batched over positions. With ``n`` references and
``n < d`` the sample covariance has rank below ``n``; then ``S + eps I`` is inverted exactly in its
low-rank form (SVD of the centred features, ``(S + eps I)^-1 = Q diag(1/(l + eps)) Q^T + (I - QQ^T)/eps``),
which costs ``P d n`` memory instead of ``P d^2`` (WRN-50 at 224 px, 16 refs: 110 MB instead of 3.8 GB).
With ``n >= d`` the full covariance is Cholesky-factorised and its inverse factor stored.

``selection="synthetic"`` (off by default, the paper's map): the Gaussians are first fitted without a fifth
of the references, the map's smoothing and pooling (max or top-k mean) are chosen on synthetic defects pasted
into those (:mod:`vlad.selftune`, the mechanism the trained scorers share; ``selection_report()``), then the
Gaussians are fitted again on every reference.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from vlad.errors import VladError
from vlad.features import check_layers, embed_all, load_cnn_stages, stage_channels, stage_outputs
from vlad.images import LoadedImage
from vlad.rng import cpu_generator
from vlad.ops import preprocess_batch, resize_blur
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer
from vlad.scorers.scratch import MapRule, reference_stats
from vlad.selftune import SelfTuned, no_selection_note, normalized, rules_for, select_once, stretched_canvas
from vlad.weights import get_spec

logger = logging.getLogger(__name__)

#: the paper's number of random channels per architecture
PAPER_N_FEATURES = {"wide_resnet50_2": 550, "resnet18": 100}
#: floats per position chunk when building/applying the per-position matrices (~256 MB)
_CHUNK_FLOATS = 64_000_000


class PaDiM(SelfTuned, BaseScorer):
    """Per-position Gaussian of CNN patch features; Mahalanobis distance as the anomaly score.

    Args:
        backbone: a CNN weight name (``wide_resnet50_2.tv_in1k`` default, ``resnet18.tv_in1k``).
        weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path to weights.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        batch_size: images per backbone forward.
        image_size: square input size; None = the backbone's preprocessing size (224).
        layers: CNN stages concatenated on the first one's grid.
        n_features: random channels kept; None = the paper's (550 WRN-50, 100 ResNet-18; otherwise 100),
            capped at the channels available.
        epsilon: ridge added to each covariance (``S + epsilon I``).
        sigma: Gaussian smoothing of the upsampled map, in input pixels (0 = none).
        random_state: seed of the channel subset and of a ``weights="random"`` backbone.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the pretrained backbone's forwards run
            under autocast at that dtype and their outputs are cast to float32 before anything else
            (:mod:`vlad.precision`).
        selection: None (default): the paper's map (``sigma``, max); ``"synthetic"``: the smoothing and
            the pooling are chosen on synthetic defects of held-out references (:mod:`vlad.selftune`;
            ``selection_report()``).
    """

    requires_references = True
    TERMS = ("mahalanobis",)
    #: with selection="synthetic" every part of the map rule is searched (``sigma`` is the paper map's)
    RULE_PARAMS = ()

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "image_size": ps.SQUARE_IMAGE_SIZE,
        "layers": ps.CNN_STAGES,
        "n_features": ps.Int(1, 1_000_000, none=True).explain("None = the paper's, capped at the channels"),
        "epsilon": ps.Number(0, 1e6, lo_open=True),
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
        n_features: int | None = None,
        epsilon: float = 0.01,
        sigma: float = 4.0,
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
        self.n_features = n_features
        self.epsilon = epsilon
        self.sigma = sigma
        self.random_state = random_state
        self.precision = precision
        self.selection = selection

    # -- building -----------------------------------------------------------------------------
    def _build(self) -> None:
        self.layers_ = check_layers(self.layers, "PaDiM")
        if not self.epsilon > 0:
            raise VladError(f"PaDiM: epsilon must be > 0 (the covariance ridge), got {self.epsilon!r}")
        self.backbone_ = load_cnn_stages(self.backbone, self.weights, self.device_, self.layers_,
                                         seed=self.weights_seed)
        self.size_ = int(self.image_size or self.backbone_.spec.preprocess.size)
        total = sum(stage_channels(self.backbone_))
        if self.n_features is None:
            d = min(PAPER_N_FEATURES.get(get_spec(self.backbone).arch, 100), total)
        else:
            d = int(self.n_features)
            if not 1 <= d <= total:
                raise VladError(
                    f"PaDiM: n_features must be in 1..{total} (channels of layers {self.layers_} of "
                    f"{self.backbone_.spec.name}), got {self.n_features!r}; use None for the paper's default"
                )
        g = cpu_generator(self.random_state)
        self.channel_index_ = torch.randperm(total, generator=g)[:d].sort().values.to(self.device_)
        self.map_rule_, self.selection_, self.selection_note_ = None, None, None

    def _features(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """``(B, d, h, w)``: selected channels of the stages on the first stage's grid.

        Equal to ``aligned_features(stages, 0, "nearest")[:, channel_index_]``, but selects the channels
        of each stage before upsampling it (the index is sorted, so the order is the same).
        """
        grid = stages[0].shape[-2:]
        picked, start = [], 0
        for f in stages:
            c = f.shape[1]
            idx = self.channel_index_[(self.channel_index_ >= start) & (self.channel_index_ < start + c)] - start
            start += c
            if idx.numel():  # a small subset may take no channel of a stage
                f = f.index_select(1, idx)
                picked.append(f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="nearest"))
        return torch.cat(picked, dim=1)

    # -- fitting ------------------------------------------------------------------------------
    def _fit(self, references: list[LoadedImage] | None) -> None:
        assert references is not None
        if self.selection == "synthetic":
            canvas, boxes, train_idx, held_idx = self._held_out_canvas(references)
            feats = self._canvas_features(canvas)
            if len(held_idx):  # the Gaussians without the held-out references, to choose the rule
                self._fit_gaussians(feats[torch.from_numpy(train_idx).to(feats.device)])
            select_once(self, "PaDiM", data=canvas, boxes=boxes, train_idx=train_idx, held_idx=held_idx, log=logger)
            self._fit_gaussians(feats)
            self.stats_ = reference_stats(self._raw_of(feats))  # the features of every reference, computed once
            return
        self.selection_note_ = no_selection_note(self, len(references))
        self._fit_gaussians(embed_all(references, self.backbone_, self.size_, self.device_, self.batch_size,
                                      self._features, "PaDiM features", precision=self.precision))

    def _fit_gaussians(self, feats: torch.Tensor) -> None:
        """The per-position Gaussians of features ``(n, d, h, w)``."""
        n, d, h, w = feats.shape
        self.grid_ = (h, w)
        x = feats.flatten(2).permute(2, 0, 1)  # (P, n, d)
        del feats
        self.mean_ = x.mean(dim=1)  # (P, d)
        self.low_rank_ = n < d
        chunk = max(1, _CHUNK_FLOATS // (d * max(d, n) * 2))
        parts_a, parts_b = [], []
        for p0 in range(0, x.shape[0], chunk):
            xc = (x[p0 : p0 + chunk] - self.mean_[p0 : p0 + chunk, None]).double()  # (p, n, d)
            if self.low_rank_:
                u = xc.transpose(1, 2) / math.sqrt(max(n - 1, 1))  # (p, d, n): S = U U^T
                q, s, _ = torch.linalg.svd(u, full_matrices=False)  # q (p, d, n), s (p, n)
                parts_a.append(q.float())
                parts_b.append((s.square() + self.epsilon).rsqrt().float())
            else:
                cov = xc.transpose(1, 2) @ xc / max(n - 1, 1)
                cov += self.epsilon * torch.eye(d, dtype=cov.dtype, device=cov.device)
                chol = torch.linalg.cholesky(cov)
                eye = torch.eye(d, dtype=cov.dtype, device=cov.device).expand_as(cov)
                parts_a.append(torch.linalg.solve_triangular(chol, eye, upper=False).float())  # L^-1
        # low rank: basis (P, d, r) and 1/sqrt(l + eps) (P, r); full: inverse Cholesky factor (P, d, d)
        self.basis_ = torch.cat(parts_a)
        self.inv_scale_ = torch.cat(parts_b) if self.low_rank_ else torch.empty(0, device=self.device_)

    # -- scoring ------------------------------------------------------------------------------
    def mahalanobis(self, feats: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each position's feature to its Gaussian.

        Args:
            feats: ``(B, d, h, w)`` features from the fitted channel subset.

        Returns:
            ``(B, h, w)``.
        """
        b, d, h, w = feats.shape
        v = feats.flatten(2).permute(2, 0, 1) - self.mean_[:, None]  # (P, B, d)
        chunk = max(1, _CHUNK_FLOATS // (d * self.basis_.shape[-1] + 1))
        out = []
        for p0 in range(0, v.shape[0], chunk):
            vc = v[p0 : p0 + chunk]
            basis = self.basis_[p0 : p0 + chunk]
            if self.low_rank_:
                a = vc @ basis  # (p, B, r): coordinates in the sample covariance's eigenbasis
                resid = vc - a @ basis.transpose(1, 2)
                d2 = (a * self.inv_scale_[p0 : p0 + chunk, None]).square().sum(-1)
                d2 = d2 + resid.square().sum(-1) / self.epsilon
            else:
                d2 = (vc @ basis.transpose(1, 2)).square().sum(-1)  # |L^-1 v|^2
            out.append(d2)
        return torch.cat(out).clamp_min(0.0).sqrt().T.reshape(b, h, w)

    # -- the map rule's side (selection="synthetic"; vlad.selftune) -----------------------------------
    def _map_rule(self) -> None:
        return None  # without a selection: the paper's map (_predict_batch)

    def _candidates(self) -> list[MapRule]:
        # one term, already a distance in units of each position's spread: a global scale is the only
        # normalisation that makes sense; smoothing and pooling are searched
        return rules_for("global", 0, None, None, [(0,)])

    def _canvas(self, images: list[LoadedImage]):
        return stretched_canvas(images, self.size_, self.backbone_.spec.preprocess.interpolation)

    def _canvas_features(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_features` of canvas images ``x`` (in [0, 1]): ``(B, d, h, w)``."""
        bs = max(1, int(self.batch_size or 8))
        with torch.inference_mode():
            return torch.cat([self._features(stage_outputs(self.backbone_, normalized(
                x[i : i + bs], self.backbone_.spec.preprocess, self.device_), self.precision))
                for i in range(0, x.shape[0], bs)])

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """Raw maps ``(B, 1, H, W)`` of canvas images: the Mahalanobis distance at the input size."""
        return self._raw_of(self._canvas_features(x))

    def _raw_of(self, feats: torch.Tensor) -> torch.Tensor:
        """:meth:`_raw` of canvas features ``(B, d, h, w)``."""
        return resize_blur(self.mahalanobis(feats), (self.size_, self.size_), 0.0)[:, None].cpu()

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.map_rule_ is not None:
            return self._rule_predict(images)
        x = preprocess_batch(images, self.backbone_.spec.preprocess, self.device_, size=self.size_)
        dist = self.mahalanobis(self._features(stage_outputs(self.backbone_, x, self.precision)))
        maps = resize_blur(dist, (self.size_, self.size_), self.sigma)
        return maps.flatten(1).max(dim=1).values, maps

    # -- persistence --------------------------------------------------------------------------
    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"mean": self.mean_, "basis": self.basis_, "channel_index": self.channel_index_}
        if self.low_rank_:
            tensors["inv_scale"] = self.inv_scale_
        return self._save_stats(tensors), {"grid": list(self.grid_), "low_rank": self.low_rank_, **self._selection_meta()}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.mean_ = tensors["mean"]
        self.basis_ = tensors["basis"]
        self.channel_index_ = tensors["channel_index"]
        self.low_rank_ = bool(meta["low_rank"])
        self.inv_scale_ = tensors.get("inv_scale", torch.empty(0, device=self.device_))
        self.grid_ = tuple(meta["grid"])
        self._restore_selection(meta)
        self._load_stats(tensors)
