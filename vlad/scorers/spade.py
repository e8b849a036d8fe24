"""SPADE: Semantic Pyramid Anomaly Detection (Cohen & Hoshen 2020, arXiv 2005.02357).

Training-free kNN in two steps, on a frozen ImageNet CNN:

1. image level: the global-average-pooled last stage (``layer4``) of the test image is compared with
   those of the references; its ``k`` nearest references (k = 50 in the paper, capped at the number of
   references) are kept, and the image score is the mean L2 distance to them;
2. pixel level: for every stage of the feature pyramid (``layer1``-``layer3``), each test position's
   feature is matched to its nearest neighbour among *all positions* of those ``k`` images only (the
   alignment-free patch kNN of the paper); each stage's distance map is upsampled bilinearly to the
   input size, the stages are averaged and the result is smoothed by a Gaussian of sigma 4.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from vlad.errors import VladError
from vlad.features import check_layers, embed_all, load_cnn_stages, stage_outputs
from vlad.images import LoadedImage
from vlad.memory import knn_distances
from vlad.ops import gaussian_blur, preprocess_batch, resize_maps
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer

logger = logging.getLogger(__name__)


class SPADE(BaseScorer):
    """Image-level kNN on pooled deep features, then pixel kNN within the nearest reference images.

    Args:
        backbone: a CNN weight name (``wide_resnet50_2.tv_in1k`` default, ``resnet18.tv_in1k``).
        weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path to weights.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        batch_size: images per backbone forward.
        image_size: square input size; None = the backbone's preprocessing size (224).
        layers: CNN stages of the pixel-level pyramid (1 = layer1 ... 3 = layer3).
        k: nearest reference images (capped at the number of references).
        sigma: Gaussian smoothing of the map, in input pixels (0 = none).
        max_bytes: bound on each distance block of the pixel kNN (``vlad.memory.knn_distances``).
        random_state: seed of the backbone's initialisation with ``weights="random"`` (nothing else in
            SPADE is random).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the pretrained backbone's forwards run
            under autocast at that dtype and their outputs are cast to float32 before anything else
            (:mod:`vlad.precision`).
    """

    requires_references = True

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "image_size": ps.SQUARE_IMAGE_SIZE,
        "layers": ps.CNN_STAGES,
        "k": ps.Int(1, 1_000_000).explain("nearest reference images, capped at the number of references"),
        "random_state": ps.SEED,
    }

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        weights: str = "pretrained",
        device: str = "cpu",
        batch_size: int = 8,
        image_size: int | None = None,
        layers: tuple[int, ...] = (1, 2, 3),
        k: int = 50,
        sigma: float = 4.0,
        max_bytes: int = 256 * 2**20,
        random_state: int = 0,
        precision: str = "fp32",
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.image_size = image_size
        self.layers = layers
        self.k = k
        self.sigma = sigma
        self.max_bytes = max_bytes
        self.random_state = random_state
        self.precision = precision

    def _build(self) -> None:
        self.layers_ = check_layers(self.layers, "SPADE")
        if int(self.k) < 1:
            raise VladError(f"SPADE: k (nearest reference images) must be >= 1, got {self.k!r}")
        stages = tuple(sorted({*self.layers_, 4}))
        self.backbone_ = load_cnn_stages(self.backbone, self.weights, self.device_, stages,
                                         seed=self.weights_seed)
        self.size_ = int(self.image_size or self.backbone_.spec.preprocess.size)
        self._pyramid_pos = [stages.index(layer) for layer in self.layers_]

    def _embed(self, stages: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pooled last stage ``(B, C4)`` and pyramid stages as ``(B, h_l * w_l, C_l)``."""
        pooled = F.adaptive_avg_pool2d(stages[-1], 1).flatten(1)
        pyramid = [stages[i].flatten(2).transpose(1, 2).contiguous() for i in self._pyramid_pos]
        return pooled, pyramid

    def _fit(self, references: list[LoadedImage] | None) -> None:
        assert references is not None
        grids: list[tuple[int, int]] = []

        def fn(stages: list[torch.Tensor]) -> torch.Tensor:
            grids[:] = [tuple(stages[i].shape[-2:]) for i in self._pyramid_pos]
            pooled, pyramid = self._embed(stages)
            return torch.cat([pooled] + [p.flatten(1) for p in pyramid], dim=1)

        flat = embed_all(references, self.backbone_, self.size_, self.device_, self.batch_size, fn,
                         "SPADE features", precision=self.precision)
        self._unpack(flat, grids)

    def _unpack(self, flat: torch.Tensor, grids: list[tuple[int, int]]) -> None:
        channels = [c for c in self.backbone_.model.feature_info.channels()]
        stages = tuple(sorted({*self.layers_, 4}))
        c4 = channels[-1]
        self.grids_ = [tuple(g) for g in grids]
        self.pooled_ = flat[:, :c4].contiguous()
        self.pyramid_ = []
        start = c4
        for pos, (h, w) in zip(self._pyramid_pos, self.grids_):
            c = channels[pos]
            self.pyramid_.append(flat[:, start : start + h * w * c].reshape(len(flat), h * w, c).contiguous())
            start += h * w * c
        assert start == flat.shape[1] and len(stages) == len(channels)

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        x = preprocess_batch(images, self.backbone_.spec.preprocess, self.device_, size=self.size_)
        pooled, pyramid = self._embed(stage_outputs(self.backbone_, x, self.precision))
        k = min(int(self.k), self.pooled_.shape[0])
        dists, idx = knn_distances(pooled, self.pooled_, k=k)
        scores = dists.mean(dim=1)
        maps = torch.zeros(len(images), self.size_, self.size_, device=x.device)
        for b in range(len(images)):
            for feats, ref, (h, w) in zip(pyramid, self.pyramid_, self.grids_):
                gallery = ref.index_select(0, idx[b]).reshape(-1, ref.shape[-1])
                d = knn_distances(feats[b], gallery, k=1, max_bytes=self.max_bytes)[0].reshape(1, h, w)
                maps[b] += resize_maps(d, (self.size_, self.size_))[0]
        maps = gaussian_blur(maps / len(self.pyramid_), self.sigma)
        return scores, maps

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"pooled": self.pooled_}
        tensors.update({f"pyramid.{i}": p for i, p in enumerate(self.pyramid_)})
        return tensors, {"grids": [list(g) for g in self.grids_]}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.pooled_ = tensors["pooled"]
        self.grids_ = [tuple(g) for g in meta["grids"]]
        self.pyramid_ = [tensors[f"pyramid.{i}"] for i in range(len(self.grids_))]
