"""MuSc: zero-shot anomaly scores from a batch of the line's own unlabeled images, by mutual scoring.

Li, Huang, Liu, Wang, Zheng, Lin, Deng. "MuSc: Zero-Shot Industrial Anomaly Classification and
Segmentation with Mutual Scoring of the Unlabeled Images", ICLR 2024, arXiv:2401.16753; reference code
github.com/xrli-U/MuSc. Nearly all images of a line are normal, so a patch that has no close match in
most other images of the batch is anomalous. No prompts, no references, no training. Recipe:

* **Features.** Patch tokens of four intermediate layers of a ViT (paper default: CLIP ViT-L-14-336,
  OpenAI weights, at 518 px (37 x 37 patches), the outputs of blocks 6, 12, 18 and 24, i.e. 0-based
  ``(5, 11, 17, 23)``: the raw residual stream for CLIP; DINO/DINOv2 tokens after the final norm, as
  the reference's ``get_intermediate_layers``). Class token dropped.
* **LNAMD** (local neighbourhood aggregation with multiple degrees), per layer and per image: a layer
  norm over all of that layer's ``(P, D)`` tokens (no affine), then for each degree ``r`` in
  ``(1, 3, 5)`` the mean over the ``r x r`` neighbourhood of each patch (zero padding counted: the
  reference's unfold + adaptive average pooling, which is exactly ``avg_pool2d(r, stride 1, padding
  r // 2, count_include_pad=True)``), then L2 normalisation.
* **MSM** (mutual scoring), per layer and degree: a patch's score against another image is the
  Euclidean distance to that image's nearest patch; its mutual score is the mean of the lowest 30%
  (``int(0.3 (N - 1))``) of its scores against the N - 1 other images. The map is the mean over layers
  and degrees; bilinear upsampling; image score = the map's maximum.
* **RsCIN** (re-scoring with constrained image-level neighbourhood): with ``W`` the class-embedding
  similarities of the batch's images, for each window ``k`` in ``(1, 2, 3)`` each image's score becomes
  the ``W``-weighted mean of the scores of its ``k`` most similar images (itself included); the final
  score is the mean over the windows.

The all-pairs search (``N^2 P^2`` distances) runs blocked with bounded memory in
:mod:`vlad.memory.mutual`, each pair of images once. On the CPU it is exact (the same minima as a dense
``cdist``); on a GPU (``search_precision="auto"``) TF32 tensor cores pick the nearest patches and the
kept distances are recomputed in float32 (``search_precision="fp32"`` makes it exact there too).

**Unlabeled pool.** ``add_unlabeled(images)`` stores images (their layer-normed tokens, not their
scores) in a pool of at most ``pool_size`` images (the rule: first in, first out, the oldest images
leave first, so the pool follows the line as it drifts; 200 = the reference's batch for its timing).
With a pool, ``predict`` scores each new image against the pool alone, without recomputing the pool:
its map equals the map it would get inside a batch made of the pool plus itself; each image's result
is independent of the other images of the call. Without a pool, ``predict`` scores the images of the
call against each other (the paper's setting: the whole test set is one batch); one image alone cannot
be scored (:class:`InsufficientBatchError`). :meth:`MuSc.pool_result` scores the pool against itself.

Differences from the paper / reference code, and why:

* Default backbone = the paper's (``ViT-L-14-336``, OpenAI weights through :mod:`vlad.weights`), 518 px.
  Other ViTs vlad ships (DINOv2 ViT-S/B/L/14, CLIP ViT-B-16, ViT-B-16-plus-240) are selectable; for a
  ViT of depth d the default layers are the same relative positions, ``d/4 - 1, d/2 - 1, 3d/4 - 1,
  d - 1`` (12 blocks: ``2, 5, 8, 11``; the reference gives no layers for 12-block models).
* Preprocessing: the image is resized (bicubic) to ``image_size`` x ``image_size`` without cropping
  (the reference's DINO path resizes the same way; its CLIP path resizes the shorter edge and
  centre-crops, which cuts off the border of non-square images), so maps cover the whole image. For
  CLIP, the positional embedding is resized bicubically to the grid (as open_clip does when loading
  weights at another size).
* float32 throughout (the reference runs the backbone and LNAMD under CUDA autocast), except that on a
  GPU, by default, TF32 products choose each nearest patch; the distances kept are float32
  (``search_precision``).
* Lowest fraction: at least one image (``max(1, int(0.3 (N - 1)))``); the reference takes the mean of
  an empty set (NaN) for batches of 4 images or fewer.
* RsCIN is applied to the raw MSM scores, not to their min-max normalisation over the batch: it is a
  row-stochastic averaging, so it commutes with the (per-batch, increasing, affine) min-max map: the
  same ranking and metrics, but scores stay on the maps' distance scale, comparable across batches and
  with a pool, and a batch of equal scores does not divide by zero. Similarities below 0 count as 0
  (weights must not be negative; the k most similar images of a real batch never are); an image is
  always its own first neighbour (the reference's ``topk`` may pick a duplicate image instead). Class
  embeddings are L2-normalised for every backbone (the reference normalises CLIP's, not DINO's).
  Windows are ``(1, 2, 3)`` (the reference's MVTec AD / BTAD setting; VisA uses ``(1, 8, 9)``), capped
  at the batch size.
* Maps are upsampled with ``align_corners=False`` to each image's own size (the reference:
  ``align_corners=True`` to the square input); the image score is the maximum of the patch grid, the
  same value either way.
* Pool scoring as described above is vlad's: RsCIN for a new image uses the pool's stored scores
  (from the pool scored against itself), which do not include the new image, so it can differ
  slightly from the score inside a batch; the map and the raw score are the same.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlad.errors import InvalidParameterError, VladError
from vlad.images import LoadedImage, load_images
from vlad.memory.mutual import SEARCH_PRECISIONS, lowest_mean_distances
from vlad.ops import resize_maps, to_batch
from vlad.precision import to_float32
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer, check_finite
from vlad.tiling import working_shape
from vlad.types import AnomalyResult, ImagesLike, WorkingResult

logger = logging.getLogger(__name__)

__all__ = [
    "InsufficientBatchError",
    "MuSc",
    "MutualResult",
    "default_layers",
    "layer_norm_tokens",
    "lnamd",
    "mutual_patch_scores",
    "pool_patch_scores",
    "rscin",
]

#: the paper's default backbone (CLIP ViT-L/14 at 336, OpenAI weights), run at 518 px
PAPER_BACKBONE = "ViT-L-14-336"
PAPER_IMAGE_SIZE = 518


class InsufficientBatchError(VladError, ValueError):
    """MuSc was asked to score fewer images than mutual scoring needs."""


# ---------------------------------------------------------------------------------------------------
# plain-torch pieces of the algorithm
# ---------------------------------------------------------------------------------------------------
def default_layers(depth: int) -> tuple[int, ...]:
    """The paper's layer positions for a ViT of ``depth`` blocks (0-based): ``d/4-1, d/2-1, 3d/4-1, d-1``
    (24 blocks: ``5, 11, 17, 23``, the paper's; 12 blocks: ``2, 5, 8, 11``), duplicates dropped."""
    return tuple(sorted({max(0, (i + 1) * depth // 4 - 1) for i in range(4)}))


def layer_norm_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """LNAMD's layer norm: each image's ``(P, D)`` tokens of one layer normalised together (no affine).

    Args:
        tokens: ``(B, P, D)``.
    """
    return F.layer_norm(tokens.float(), tokens.shape[1:])


def lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Aggregate layer-normed tokens over each patch's ``r x r`` neighbourhood and L2-normalise.

    Args:
        tokens: layer-normed tokens ``(B, h * w, D)`` (:func:`layer_norm_tokens`).
        grid: ``(h, w)``.
        r: odd aggregation degree (1 = no aggregation).

    Returns:
        Unit rows ``(B, h * w, D)``.
    """
    b, p, d = tokens.shape
    x = tokens
    if r > 1:
        x = x.transpose(1, 2).reshape(b, d, *grid)
        x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
        x = x.reshape(b, d, p).transpose(1, 2)
    return F.normalize(x, dim=-1)


def lowest_count(n_others: int, fraction: float) -> int:
    """How many of the per-image scores MSM averages: ``max(1, int(fraction * n_others))``."""
    return max(1, int(n_others * fraction))


def mutual_patch_scores(
    features: torch.Tensor, fraction: float = 0.3, query_block: int | None = None, pool_block: int | None = None,
    max_bytes: int | None = None, precision: str = "fp32",
) -> torch.Tensor:
    """MSM of a batch against itself: each patch's mean of its lowest ``fraction`` of nearest-patch
    distances to the other images.

    Args:
        features: unit rows ``(N, P, D)``, N >= 2.
        fraction: share of the N - 1 other images averaged (the paper's 0.3).
        query_block, pool_block, max_bytes: blocking (:func:`vlad.memory.mutual.lowest_mean_distances`);
            the result does not depend on them.
        precision: ``"fp32"``, ``"tf32"`` or ``"auto"`` (:func:`vlad.memory.mutual.lowest_mean_distances`).

    Returns:
        ``(N, P)`` float32.
    """
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    k = lowest_count(features.shape[0] - 1, fraction)
    return lowest_mean_distances(features, features, k, exclude_self=True, query_block=query_block,
                                 pool_block=pool_block, precision=precision, **kwargs)


def pool_patch_scores(
    queries: torch.Tensor, pool: torch.Tensor, fraction: float = 0.3, query_block: int | None = None,
    pool_block: int | None = None, max_bytes: int | None = None, precision: str = "fp32",
) -> torch.Tensor:
    """MSM of new images against a pool of N images: each query's patch scores as inside a batch of
    the pool plus that query (N other images).

    Args:
        queries: unit rows ``(M, P, D)``.
        pool: unit rows ``(N, P, D)``, N >= 1.

    Returns:
        ``(M, P)`` float32.
    """
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    k = lowest_count(pool.shape[0], fraction)
    return lowest_mean_distances(queries, pool, k, query_block=query_block, pool_block=pool_block,
                                 precision=precision, **kwargs)


def rscin(scores: torch.Tensor, embeddings: torch.Tensor, windows: Sequence[int] = (1, 2, 3),
          others: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RsCIN: re-score each image by the similarity-weighted mean score of its ``k`` most similar images
    (itself included), averaged over the windows ``k``.

    Args:
        scores: raw image scores ``(N,)`` of the images to re-score.
        embeddings: their unit class embeddings ``(N, E)``.
        windows: window sizes ``k`` (each capped at the number of candidate images).
        others: optional ``(scores (M,), unit embeddings (M, E))`` of further candidate images (a
            pool) that are not re-scored themselves. Without it, the N images are each other's
            candidates (a batch).

    Returns:
        ``(N,)`` float32.
    """
    scores = scores.double()
    emb = embeddings.double()
    if others is None:
        cand_s, cand_e = scores, emb
        sim = emb @ emb.T
    else:
        cand_s = torch.cat([scores, others[0].double()])
        cand_e = torch.cat([emb, others[1].double()])
        sim = emb @ cand_e.T
        sim[:, : scores.shape[0]] = -float("inf")  # the other new images are not candidates ...
        sim[torch.arange(scores.shape[0]), torch.arange(scores.shape[0])] = (emb * emb).sum(1)  # ... itself is
    n = scores.shape[0]
    rank = sim.clone()
    rank[torch.arange(n), torch.arange(n)] = float("inf")  # itself first, even when another image ties
    out = []
    m = sim.shape[1] - (0 if others is None else n - 1)
    for k in windows:
        kk = max(1, min(int(k), m))
        idx = rank.topk(kk, dim=1).indices
        w = sim.gather(1, idx).clamp_min(0.0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))  # all-zero rows: a plain mean
        out.append((w * cand_s[idx]).sum(1) / w.sum(1))
    return torch.stack(out).mean(0).float()


@dataclass
class MutualResult:
    """Everything MuSc computes for a set of images (for evaluations and tests).

    Attributes:
        patch_scores: ``(N, h, w)`` maps on the patch grid (mean over layers and degrees).
        raw_scores: ``(N,)`` maximum of each map (before RsCIN).
        scores: ``(N,)`` image scores after RsCIN.
    """

    patch_scores: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor


# ---------------------------------------------------------------------------------------------------
# feature extraction from the ViTs vlad ships
# ---------------------------------------------------------------------------------------------------
class _ClipTokens:
    """Intermediate patch tokens and the class embedding of an open_clip ViT image tower at any size."""

    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...] | None) -> None:
        visual = model.visual
        needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "proj")
        missing = [a for a in needed if getattr(visual, a, None) is None]
        if missing:
            raise VladError(f"MuSc needs an open_clip ViT image tower; {type(visual).__name__} lacks {missing}. "
                            f"Use a ViT backbone such as {PAPER_BACKBONE!r} or 'vit_small_patch14_dinov2.lvd142m'")
        self.visual = visual
        self.blocks = list(visual.transformer.resblocks)
        self.depth = len(self.blocks)
        self.layers = tuple(layers) if layers is not None else default_layers(self.depth)
        self.patch = int(visual.conv1.kernel_size[0])
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        self._pos: dict[tuple[int, int], torch.Tensor] = {}

    def _positional(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._pos:
            pos = self.visual.positional_embedding
            cls_pos, patch_pos = pos[:1], pos[1:]
            g = int(round(math.sqrt(patch_pos.shape[0])))
            if (g, g) != grid:
                p = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
                p = F.interpolate(p, size=grid, mode="bicubic", align_corners=False)
                patch_pos = p.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
            self._pos[grid] = torch.cat([cls_pos, patch_pos])
        return self._pos[grid]

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        v = self.visual
        t = v.conv1(x.to(v.conv1.weight.dtype))
        grid = tuple(t.shape[-2:])
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1), t], dim=1)
        t = v.ln_pre(t + self._positional(grid).to(t.dtype))
        if not self.batch_first:
            t = t.transpose(0, 1)
        out = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in self.layers:
                out.append((t if self.batch_first else t.transpose(0, 1))[:, 1:].float())
        t = t if self.batch_first else t.transpose(0, 1)
        pooled, _ = v._pool(t)
        emb = pooled @ v.proj if v.proj is not None else pooled
        return out, F.normalize(emb.float(), dim=-1)


class _TimmTokens:
    """Intermediate patch tokens (after the final norm) and the class token of a timm ViT (DINOv2)."""

    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...] | None) -> None:
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise VladError(f"MuSc needs a vision transformer; got {type(model).__name__}. Use e.g. "
                            f"{PAPER_BACKBONE!r} or 'vit_small_patch14_dinov2.lvd142m'")
        self.model = model
        self.depth = len(model.blocks)
        self.layers = tuple(layers) if layers is not None else default_layers(self.depth)
        ps = model.patch_embed.patch_size
        self.patch = int(ps[0] if isinstance(ps, (tuple, list)) else ps)

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        final, inter = self.model.forward_intermediates(x, indices=list(self.layers), norm=True, output_fmt="NLC")
        return [t.float() for t in inter], F.normalize(final[:, 0].float(), dim=-1)


# ---------------------------------------------------------------------------------------------------
# the scorer
# ---------------------------------------------------------------------------------------------------
class MuSc(BaseScorer):
    """Zero-shot batch scorer by mutual scoring of unlabeled images (Li et al., ICLR 2024, arXiv:2401.16753).

    Args:
        backbone: a ViT weight name: the paper's ``"ViT-L-14-336"`` (CLIP, OpenAI), or
            ``"vit_small_patch14_dinov2.lvd142m"`` etc., ``"ViT-B-16"``, ``"ViT-B-16-plus-240"``.
        weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path.
        device: torch device or ``"auto"``.
        batch_size: images per backbone forward pass (mutual scoring always spans the whole call).
        image_size: square input size in pixels (a multiple of the patch size is best); None = the
            paper's 518 for the paper's backbone, the backbone's preprocess size otherwise.
        layers: 0-based block indices whose outputs are used; None = :func:`default_layers`.
        degrees: LNAMD aggregation degrees ``r`` (the paper's ``(1, 3, 5)``).
        lowest_fraction: MSM averages this share of the lowest per-image scores (the paper's 0.3).
        rscin_windows: RsCIN window sizes (the paper's ``(1, 2, 3)`` for MVTec AD; ``()`` or ``(1,)``
            switches re-scoring off).
        pool_size: most images the unlabeled pool keeps (first in, first out).
        max_bytes: bound on the similarity block of the mutual search (memory, not results).
        search_precision: ``"auto"`` (default: the TF32 candidate pass on a GPU, float32 on the CPU),
            ``"fp32"`` (every product of the mutual search in float32) or ``"tf32"``: TF32 tensor-core
            products pick each nearest patch and the distances that are kept are recomputed in float32
            (:mod:`vlad.memory.mutual`; a kept distance can be to a patch whose similarity is within 2e-3
            of the nearest, far less in practice).
        random_state: seed of the backbone's initialisation with ``weights="random"`` (nothing else in
            MuSc is random).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the pretrained backbone's forwards run
            under autocast at that dtype and their outputs are cast to float32 before anything else
            (:mod:`vlad.precision`).

    Fitted attributes: ``pool_tokens_`` (list per layer of ``(N, P, D)`` layer-normed tokens),
    ``pool_embeddings_`` ``(N, E)``, ``pool_names_``, ``grid_``.
    """

    tier = "unlabeled"
    requires_references = False
    tiles = False  # a tile's patches would be scored against the other tiles of the same image

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "image_size": ps.SQUARE_IMAGE_SIZE,
        "layers": ps.Seq(ps.Int(0, 1023), 1, 1024, none=True, example="(5, 11, 17, 23)"),
        "degrees": ps.Seq(ps.Int(1, 99, odd=True), 1, 16, example="(1, 3, 5), the paper's"),
        "lowest_fraction": ps.Number(0, 1, lo_open=True).explain("the paper uses 0.3"),
        "rscin_windows": ps.Seq(ps.Int(1, 1024), 0, 16, example="(1, 2, 3); () switches re-scoring off"),
        "pool_size": ps.Int(2, 1_000_000),
        "search_precision": ps.Choice(*SEARCH_PRECISIONS).explain(
            "'auto' uses TF32 candidates on a GPU and float32 on the CPU"),
        "random_state": ps.SEED,
        "tile_size": ps.Choice(None, 0).explain(
            "musc scores whole images against each other, so it cannot score tiles; leave tile_size unset for "
            "musc (other scorers of a detector may tile)"),
    }

    def __init__(
        self,
        backbone: str = PAPER_BACKBONE,
        weights: str = "pretrained",
        device: str = "cpu",
        batch_size: int = 8,
        image_size: int | None = None,
        layers: tuple[int, ...] | None = None,
        degrees: tuple[int, ...] = (1, 3, 5),
        lowest_fraction: float = 0.3,
        rscin_windows: tuple[int, ...] = (1, 2, 3),
        pool_size: int = 200,
        max_bytes: int = 64 * 2**20,
        search_precision: str = "auto",
        random_state: int = 0,
        precision: str = "fp32",
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.image_size = image_size
        self.layers = layers
        self.degrees = degrees
        self.lowest_fraction = lowest_fraction
        self.rscin_windows = rscin_windows
        self.pool_size = pool_size
        self.max_bytes = max_bytes
        self.search_precision = search_precision
        self.random_state = random_state
        self.precision = precision

    # -- building ------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if not 0.0 < float(self.lowest_fraction) <= 1.0:
            raise InvalidParameterError(f"lowest_fraction must be in (0, 1], got {self.lowest_fraction!r} "
                                        "(the paper uses 0.3)")
        degrees = tuple(self.degrees)
        if not degrees or any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 or r % 2 == 0
                              for r in degrees):
            raise InvalidParameterError(f"degrees must be odd integers >= 1, e.g. (1, 3, 5); got {self.degrees!r}")
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in self.rscin_windows):
            raise InvalidParameterError(f"rscin_windows must be integers >= 1, e.g. (1, 2, 3); got {self.rscin_windows!r}")
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, (int, np.integer)) or self.pool_size < 2:
            raise InvalidParameterError(f"pool_size must be an integer >= 2, got {self.pool_size!r}")
        if self._tiling() is not None:
            raise InvalidParameterError(
                f"musc scores whole images against each other, so it cannot score tiles (tile_size="
                f"{self.tile_size!r}); leave tile_size unset for musc (other scorers of a detector may tile)"
            )

    def _build(self) -> None:
        from vlad.backbones import load_backbone

        self._check_params()
        bb = load_backbone(self.backbone, self.weights, self.device_, seed=self.weights_seed)
        model = bb.model
        self.preprocess_ = bb.spec.preprocess
        if hasattr(model, "visual"):
            self.extractor_ = _ClipTokens(model, self.layers)
        else:
            self.extractor_ = _TimmTokens(model, self.layers)
        bad = [i for i in self.extractor_.layers if not 0 <= int(i) < self.extractor_.depth]
        if bad:
            raise InvalidParameterError(f"layers {bad} do not exist in {self.backbone!r} ({self.extractor_.depth} "
                                        f"blocks: 0 to {self.extractor_.depth - 1})")
        self.model_ = model
        size = self.image_size
        if size is None:
            size = PAPER_IMAGE_SIZE if self.backbone == PAPER_BACKBONE and self.weights != "tiny" else self.preprocess_.size
        patch = self.extractor_.patch
        self.input_size_ = max(patch, int(round(int(size) / patch)) * patch)
        self.grid_ = (self.input_size_ // patch, self.input_size_ // patch)

    def _fit(self, references: list[LoadedImage] | None) -> None:
        if references:
            logger.info("MuSc uses no references; the %d given join the unlabeled pool", len(references))
        self.pool_tokens_: list[torch.Tensor] = []
        self.pool_embeddings_ = torch.zeros((0, 0))
        self.pool_names_: list[str] = []
        self._pool_cache: MutualResult | None = None
        if references:
            self.add_unlabeled(references)

    # -- features ------------------------------------------------------------------------------
    def _input(self, images: list[LoadedImage]) -> torch.Tensor:
        pre = self.preprocess_
        return to_batch(images, self.input_size_, pre.mean, pre.std, self.device_, pre.interpolation)

    def embed(self, images: ImagesLike) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Layer-normed tokens per layer ``[(N, P, D)]`` and unit class embeddings ``(N, E)``."""
        self._check_fitted()
        loaded = load_images(images)
        per_layer: list[list[torch.Tensor]] = []
        embs = []
        bs = max(1, int(self.batch_size or 8))
        with torch.inference_mode():
            for s in range(0, len(loaded), bs):
                x = self._input(loaded[s : s + bs])
                with self._autocast():
                    tokens, emb = self.extractor_(x)
                tokens, emb = to_float32(tokens), emb.float()
                for i, t in enumerate(tokens):
                    if len(per_layer) <= i:
                        per_layer.append([])
                    per_layer[i].append(layer_norm_tokens(t))
                embs.append(emb)
        return [torch.cat(ts) for ts in per_layer], torch.cat(embs)

    # -- scoring -------------------------------------------------------------------------------
    def _maps(self, tokens: list[torch.Tensor], pool: list[torch.Tensor] | None) -> torch.Tensor:
        """Mean over degrees and layers of the MSM patch scores ``(N, P)``."""
        total = None
        frac = float(self.lowest_fraction)
        search = {"max_bytes": self.max_bytes, "precision": self.search_precision}
        for r in self.degrees:
            for li, t in enumerate(tokens):
                z = lnamd(t, self.grid_, int(r))
                if pool is None:
                    s = mutual_patch_scores(z, frac, **search)
                else:
                    s = pool_patch_scores(z, lnamd(pool[li], self.grid_, int(r)), frac, **search)
                total = s if total is None else total.add_(s)
        return total / (len(self.degrees) * len(tokens))

    def _result(self, patch: torch.Tensor, embeddings: torch.Tensor,
                others: tuple[torch.Tensor, torch.Tensor] | None = None) -> MutualResult:
        raw = patch.amax(dim=1)
        windows = tuple(self.rscin_windows)
        scores = rscin(raw, embeddings, windows, others) if windows else raw.clone()
        return MutualResult(patch.view(-1, *self.grid_), raw, scores)

    def score_batch(self, images: ImagesLike) -> MutualResult:
        """Score ``images`` against each other (the paper's setting), ignoring any pool.

        Raises:
            InsufficientBatchError: fewer than 2 images.
        """
        self._check_fitted()
        loaded = load_images(images)
        if len(loaded) < 2:
            raise InsufficientBatchError(
                f"MuSc scores images against each other and got {len(loaded)} image(s): pass at least 2 in one "
                "call (the paper scores whole test sets; dozens work best), or first give it unlabeled images "
                "of the line with add_unlabeled(...) and then score single images against that pool"
            )
        tokens, emb = self.embed(loaded)
        with torch.inference_mode():
            return self._result(self._maps(tokens, None), emb)

    def score_against_pool(self, images: ImagesLike) -> MutualResult:
        """Score each of ``images`` against the unlabeled pool alone (the pool is not recomputed).

        Raises:
            InsufficientBatchError: the pool is empty.
        """
        self._check_fitted()
        if not self.pool_names_:
            raise InsufficientBatchError("the unlabeled pool is empty: add images of the line with "
                                         "add_unlabeled(...) first, or score a batch with score_batch(...)")
        loaded = load_images(images)
        tokens, emb = self.embed(loaded)
        with torch.inference_mode():
            patch = self._maps(tokens, self.pool_tokens_)
            others = None
            if tuple(self.rscin_windows):
                pool = self.pool_result()
                others = (pool.raw_scores, self.pool_embeddings_)
            return self._result(patch, emb, others)

    def predict(self, images: ImagesLike) -> AnomalyResult:
        """Score ``images``: against the unlabeled pool when there is one (each image on its own), else
        against each other (at least 2 images).

        Raises:
            NotFittedError: ``fit`` was not called.
            InsufficientBatchError: no pool and fewer than 2 images.
            InvalidImageError: an unreadable input (named).
            NonFiniteScoreError: NaN or infinity in a result (named).
        """
        return self._predict_at(images, working=False)

    def predict_working(self, images: ImagesLike) -> AnomalyResult:
        """:meth:`predict` with maps at the working resolution (:func:`vlad.tiling.working_shape`), as the
        detector asks for them; all images of the call are still scored together (the base class would
        score them in batches of ``batch_size``, which changes MuSc's result)."""
        return self._predict_at(images, working=True)

    def _predict_working(self, loaded: list[LoadedImage]) -> WorkingResult:
        return WorkingResult.of(self._predict_at(loaded, working=True))

    def _predict_at(self, images: ImagesLike, working: bool) -> AnomalyResult:
        """All images of the call scored together; maps at each image's size or its working size."""
        self._check_fitted()
        loaded = load_images(images)
        sizes = [working_shape(img.size) if working else img.size for img in loaded]
        return self._to_anomaly_result(self._mutual(loaded), loaded, sizes)

    def _mutual(self, images: list[LoadedImage]) -> MutualResult:
        """Against the unlabeled pool when there is one (each image on its own), else against each other."""
        return self.score_against_pool(images) if self.pool_names_ else self.score_batch(images)

    def _to_anomaly_result(self, res: MutualResult, loaded: list[LoadedImage],
                           sizes: Sequence[tuple[int, int]]) -> AnomalyResult:
        maps = [resize_maps(m[None].float(), size)[0].cpu().numpy().astype(np.float32)
                for m, size in zip(res.patch_scores, sizes, strict=True)]
        result = AnomalyResult(res.scores.float().cpu().numpy(), maps, names=tuple(i.name for i in loaded))
        check_finite(result, "musc")
        return result

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        res = self._mutual(images)
        return res.scores, res.patch_scores

    # -- the unlabeled pool --------------------------------------------------------------------
    def add_unlabeled(self, images: ImagesLike) -> MuSc:
        """Add unlabeled images of the line to the pool (oldest dropped beyond ``pool_size``). Returns self."""
        self._check_fitted()
        loaded = load_images(images)
        if not loaded:
            return self
        tokens, emb = self.embed(loaded)
        if self.pool_tokens_:
            self.pool_tokens_ = [torch.cat([p, t]) for p, t in zip(self.pool_tokens_, tokens)]
            self.pool_embeddings_ = torch.cat([self.pool_embeddings_, emb])
        else:
            self.pool_tokens_, self.pool_embeddings_ = tokens, emb
        self.pool_names_.extend(img.name for img in loaded)
        extra = len(self.pool_names_) - int(self.pool_size)
        if extra > 0:
            logger.info("unlabeled pool over its cap of %d: the %d oldest image(s) leave it", self.pool_size, extra)
            self.pool_tokens_ = [p[extra:] for p in self.pool_tokens_]
            self.pool_embeddings_ = self.pool_embeddings_[extra:]
            del self.pool_names_[:extra]
        self._pool_cache = None
        return self

    def clear_unlabeled(self) -> MuSc:
        """Empty the pool. Returns self."""
        self._check_fitted()
        self.pool_tokens_, self.pool_embeddings_, self.pool_names_ = [], torch.zeros((0, 0)), []
        self._pool_cache = None
        return self

    def list_unlabeled(self) -> list[str]:
        """Names of the pool's images, oldest first."""
        self._check_fitted()
        return list(self.pool_names_)

    def pool_result(self) -> MutualResult:
        """The pool scored against itself (cached until the pool changes).

        Raises:
            InsufficientBatchError: fewer than 2 images in the pool.
        """
        self._check_fitted()
        if len(self.pool_names_) < 2:
            raise InsufficientBatchError(f"the unlabeled pool holds {len(self.pool_names_)} image(s); mutual "
                                         "scoring needs at least 2: add more with add_unlabeled(...)")
        if self._pool_cache is None:
            with torch.inference_mode():
                self._pool_cache = self._result(self._maps(self.pool_tokens_, None), self.pool_embeddings_)
        return self._pool_cache

    def pool_anomaly_result(self, images: ImagesLike) -> AnomalyResult:
        """:meth:`pool_result` as an :class:`AnomalyResult`, maps at the sizes of ``images`` (the pool's
        images, in pool order; the scorer keeps features only)."""
        loaded = load_images(images)
        if len(loaded) != len(self.pool_names_):
            raise VladError(f"expected the {len(self.pool_names_)} pool images, got {len(loaded)}")
        return self._to_anomaly_result(self.pool_result(), loaded, [img.size for img in loaded])

    def pool_scores(self) -> np.ndarray:
        """Image scores ``(N,)`` of the pool's images, each scored against the rest of the pool."""
        return self.pool_result().scores.cpu().numpy().astype(np.float32)

    # -- state -----------------------------------------------------------------------------------
    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"pool_tokens_{i}": t for i, t in enumerate(self.pool_tokens_)}
        tensors["pool_embeddings"] = self.pool_embeddings_
        return tensors, {"pool_names": list(self.pool_names_), "n_layers": len(self.pool_tokens_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        names = meta.get("pool_names", [])
        n_layers = meta.get("n_layers", 0)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise VladError("musc state: 'pool_names' must be a list of strings")
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 0:
            raise VladError("musc state: 'n_layers' must be a non-negative integer")
        self.pool_tokens_ = [tensors[f"pool_tokens_{i}"].float() for i in range(n_layers)]
        self.pool_embeddings_ = tensors["pool_embeddings"].float()
        if any(t.shape[0] != len(names) for t in self.pool_tokens_) or (names and self.pool_embeddings_.shape[0] != len(names)):
            raise VladError("musc state: pool tensors and names disagree in length; fit and save again")
        if self.pool_tokens_ and (len(self.pool_tokens_) != len(self.extractor_.layers)
                                  or self.pool_tokens_[0].shape[1] != self.grid_[0] * self.grid_[1]):
            raise VladError("musc state: the saved pool does not match this backbone's layers or grid")
        self.pool_names_ = list(names)
        self._pool_cache = None
