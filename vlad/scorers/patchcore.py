"""PatchCore: a memory bank of locally aware patch features with a greedy coreset.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022, arXiv:2106.08265.

Recipe (paper and reference code): WideResNet-50 features of layers 2 and 3; each position averaged
over its 3x3 neighbourhood; layer 3 upsampled bilinearly to layer 2's grid; each layer's channels
adaptively average-pooled to ``embed_dim`` (1024), the layers stacked and pooled again to ``embed_dim``;
memory = greedy k-center coreset (:func:`vlad.memory.greedy_coreset`, 128-dim random projection) of
the reference patches; patch score = L2 distance to the nearest memory patch (exact, :class:`vlad.memory.KnnIndex`;
memories of 4096+ rows are searched with its exact pruning, which skips most rows by a PCA lower bound);
image score = the
largest patch score reweighted by how isolated its nearest memory patch is (the paper's Eq. 7 with
``num_neighbors`` = b = 9, as anomalib's ``compute_anomaly_score``); map = patch scores upsampled
bilinearly to the input size and smoothed with a Gaussian of sigma 4.

Few-shot use: :meth:`add_references` embeds only the new images and appends them; the coreset is
applied to each added batch separately (``fit`` is the first batch), so adding references never
re-selects what is there. With ``coreset_ratio=1.0`` (keep every patch) incremental and batch fits
give exactly the same memory. The memory is kept as one chunk per reference, so a reference found
to be defective can be removed (:meth:`remove_reference`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlad.backbones import load_backbone
from vlad.errors import EmptyReferenceSetError, InvalidParameterError, VladError
from vlad.images import LoadedImage
from vlad.memory import DEFAULT_MAX_BYTES, KnnIndex, greedy_coreset, knn_distances, resolve_prune, squared_norms
from vlad.ops import preprocess_batch, resize_blur
from vlad.precision import to_float32
from vlad.progress import track
from vlad import paramspec as ps
from vlad.scorers.base import BaseScorer, FewShotMixin

logger = logging.getLogger(__name__)


class PatchCore(FewShotMixin, BaseScorer):
    """PatchCore anomaly scorer (few-shot / full-shot, needs normal reference images).

    Args:
        backbone: CNN weight name (see :mod:`vlad.weights`); the paper's WideResNet-50.
        weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path to local weights.
        device: torch device, or ``"auto"``.
        batch_size: images per forward pass.
        layers: backbone stages used (1 = layer1 ... 4 = layer4); the first sets the patch grid.
        embed_dim: patch feature dimension after channel pooling.
        coreset_ratio: fraction of each added batch's patches kept in memory; 1.0 keeps all.
        projection_dim: random projection dimension of the coreset selection.
        num_neighbors: memory neighbours of the paper's image-score reweighting (1 = plain max).
        sigma: Gaussian smoothing of the map, in input pixels (0 = none).
        image_size: input size; None = the backbone's preprocessing size (224). Images are resized,
            never cropped, so maps cover the whole image.
        random_state: seed of the coreset's projection and start point, and of a ``weights="random"``
            backbone.
        max_bytes: bound on the distance block held at once during nearest-neighbour search.
        pruned_search: search memories of at least 4096 rows with the exact pruning of
            :class:`~vlad.memory.KnnIndex` (:class:`~vlad.memory.BoundedIndex`, built on the first
            predict after a memory change) instead of the dense product. Same nearest neighbours; at
            200 references (random weights) it scored 2.7% of the query-row pairs, in about a fifth of the
            dense search's time (``python -m vlad.bench patchcore``); False = always dense; ``"auto"`` (the
            default) = pruned on the CPU, dense on a GPU, where the dense product is faster
            (:func:`~vlad.memory.knn.resolve_prune` gives the figures).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the pretrained backbone's forwards run
            under autocast at that dtype and their outputs are cast to float32 before anything else
            (:mod:`vlad.precision`).

    Before the coreset picks its rows, the reference patches of one fit (or one ``add_references``
    call) are held in float16 (half the peak memory: 200 references are 157k x 1024 patches, 321 MB
    instead of 642 MB); the coreset and the memory are computed from those values, so memory rows
    carry float16 rounding (relative 5e-4). With ``coreset_ratio=1.0`` (no coreset) nothing is
    rounded, and a batch whose features would overflow float16 keeps the stack in float32.
    """

    requires_references = True
    #: memories at least this large are searched with the exact pruned index (BoundedIndex)
    _INDEX_MIN_ROWS = 4096
    #: features above this magnitude keep the pre-coreset stack in float32 (float16 max is 65504)
    _FLOAT16_SAFE = 6.0e4

    #: what each parameter accepts (see vlad.paramspec; device, batch_size, ... are BaseScorer's)
    _param_specs = {
        "layers": ps.CNN_STAGES_ANY_ORDER,
        "embed_dim": ps.WIDTH,
        "coreset_ratio": ps.Number(0, 1, lo_open=True).explain("1.0 keeps every patch"),
        "projection_dim": ps.Int(1, 16_384, none=True).explain("None = no projection"),
        "num_neighbors": ps.Int(1, 100_000),
        "image_size": ps.SQUARE_IMAGE_SIZE,
        "pruned_search": ps.Choice(False, True, "auto"),
    }

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        weights: str = "pretrained",
        device: str = "cpu",
        batch_size: int = 8,
        layers: tuple[int, ...] = (2, 3),
        embed_dim: int = 1024,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_neighbors: int = 9,
        sigma: float = 4.0,
        image_size: int | None = None,
        random_state: int | None = 0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        pruned_search: bool | str = "auto",
        precision: str = "fp32",
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.layers = layers
        self.embed_dim = embed_dim
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.sigma = sigma
        self.image_size = image_size
        self.random_state = random_state
        self.max_bytes = max_bytes
        self.pruned_search = pruned_search
        self.precision = precision

    # -- building and embedding ---------------------------------------------------------------
    def _build(self) -> None:
        if not 0.0 < float(self.coreset_ratio) <= 1.0:
            raise InvalidParameterError(f"coreset_ratio must be in (0, 1] (1.0 keeps every patch), got {self.coreset_ratio}")
        if int(self.num_neighbors) < 1:
            raise InvalidParameterError(f"num_neighbors must be >= 1, got {self.num_neighbors}")
        resolve_prune(self.pruned_search, self.device_)
        layers = tuple(int(i) for i in self.layers)
        if not layers:
            raise InvalidParameterError("layers must name at least one backbone stage, e.g. (2, 3)")
        self.backbone_ = load_backbone(self.backbone, self.weights, self.device_, seed=self.weights_seed,
                                      out_indices=layers)
        self.input_size_ = int(self.image_size or self.backbone_.spec.preprocess.size)

    def _embed(self, images: list[LoadedImage]) -> torch.Tensor:
        """Locally aware patch features ``(B, h, w, embed_dim)`` on layer ``layers[0]``'s grid."""
        x = preprocess_batch(images, self.backbone_.spec.preprocess, self.device_, size=self.input_size_)
        with torch.inference_mode():
            with self._autocast():
                feats = self.backbone_.model(x)
            feats = to_float32(feats)
            grid = feats[0].shape[-2:]
            b, e, n_layers = x.shape[0], int(self.embed_dim), len(feats)
            # pooling the concatenation (B*h*w, L*E) to E averages windows of L channels; when L divides E
            # each window lies inside one layer's block, so each layer is pooled straight into its slice
            # of z (the same numbers, without the concatenation and every layer's (B*h*w, E) alive at once)
            width = e // n_layers if e % n_layers == 0 else None
            z = x.new_empty((b * grid[0] * grid[1], e)) if width else None
            pooled = []
            for i, f in enumerate(feats):
                # channels-last: the 3x3 average is ~8x faster and the permute below is free
                f = F.avg_pool2d(f.contiguous(memory_format=torch.channels_last), kernel_size=3, stride=1, padding=1)
                if f.shape[-2:] != grid:
                    f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
                p = pool_channels(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), e)  # (B*h*w, E)
                del f
                if width:
                    z[:, i * width : (i + 1) * width] = pool_channels(p, width)
                else:
                    pooled.append(p)
                del p
            if not width:
                z = pool_channels(torch.cat(pooled, dim=1), e)
        return z.reshape(b, grid[0], grid[1], e)

    def _embed_references(self, images: list[LoadedImage]) -> list[torch.Tensor]:
        """One memory chunk ``(n_i, embed_dim)`` per image: the coreset of this batch's patches.

        The chunks are consecutive views of one tensor (``_memory_changed`` then needs no copy).
        """
        bs = max(1, int(self.batch_size or 8))
        batches = [images[i : i + bs] for i in range(0, len(images), bs)]
        use_coreset = float(self.coreset_ratio) < 1.0
        bank = None
        per_image = 0
        row = 0
        it = track(batches, "PatchCore: embedding references") if len(batches) > 1 else batches
        for batch in it:
            z = self._embed(batch)
            per_image = z.shape[1] * z.shape[2]
            z = z.reshape(-1, z.shape[-1])
            if bank is None:  # preallocate: no second copy of the whole stack when concatenating
                dtype = torch.float16 if use_coreset else torch.float32
                bank = z.new_empty((len(images) * per_image, z.shape[-1]), dtype=dtype)
            # the largest magnitude from the min and max: z.abs() would be a second copy of the batch
            if bank.dtype == torch.float16 and not bool(torch.stack(torch.aminmax(z)).abs().amax() < self._FLOAT16_SAFE):
                logger.info("PatchCore: features beyond the float16 range; holding the patch stack in float32")
                bank = bank.float()
            bank[row : row + z.shape[0]] = z
            row += z.shape[0]
            del z
        owner = torch.arange(len(images), device=bank.device).repeat_interleave(per_image)
        if use_coreset:
            keep = greedy_coreset(
                bank, ratio=float(self.coreset_ratio), projection_dim=self.projection_dim,
                random_state=self.random_state,
            ).to(bank.device).sort().values
            logger.info("PatchCore: coreset kept %d of %d patches", keep.numel(), bank.shape[0])
            bank, owner = _gather_rows(bank, keep), owner[keep]
        counts = torch.bincount(owner, minlength=len(images)).tolist()
        return list(bank.split(counts))

    # -- fitting and memory bookkeeping ---------------------------------------------------------
    def _fit(self, references: list[LoadedImage] | None) -> None:
        self.memory_chunks_ = self._embed_references(references)
        self.reference_names_ = [img.name for img in references]
        self._memory_changed()

    def _memory_changed(self) -> None:
        """Rebuild the concatenated memory; chunks become views into it (no second copy kept)."""
        e = int(self.embed_dim)
        sizes = [c.shape[0] for c in self.memory_chunks_]
        self.memory_ = _rows_as_one(self.memory_chunks_, e, self.device_)
        self.memory_chunks_ = list(self.memory_.split(sizes)) if sizes else []
        self.memory_sq_ = squared_norms(self.memory_)
        self._index = None  # built on the first search

    # -- scoring ------------------------------------------------------------------------------
    def _image_scores(
        self, queries: torch.Tensor, dist: torch.Tensor, nn_idx: torch.Tensor, memory: torch.Tensor,
        memory_sq: torch.Tensor,
    ) -> torch.Tensor:
        """The paper's reweighted image score.

        Args:
            queries: ``(B, P, E)`` patch features.
            dist: ``(B, P)`` nearest-neighbour distances.
            nn_idx: ``(B, P)`` rows of ``memory`` of those neighbours.
            memory: ``(M, E)``; memory_sq its squared norms ``(M,)``.

        Returns:
            ``(B,)`` scores ``s = (1 - softmax(||m_test* - m_i||)_0) * s*`` over the ``num_neighbors``
            memory neighbours ``m_i`` of ``m*`` (the nearest memory patch of the worst test patch).
        """
        b = torch.arange(dist.shape[0], device=dist.device)
        worst = dist.argmax(dim=1)
        s_star = dist[b, worst]
        k = min(int(self.num_neighbors), memory.shape[0])
        if k <= 1:
            return s_star
        m_star = memory[nn_idx[b, worst]]  # (B, E)
        _, support = knn_distances(m_star, memory, k=k, memory_sq_norms=memory_sq, max_bytes=self.max_bytes)
        feats = queries[b, worst]  # (B, E)
        d = torch.linalg.norm(feats[:, None, :] - memory[support], dim=2)  # (B, k)
        weights = 1.0 - torch.softmax(d, dim=1)[:, 0]
        return weights * s_star

    def _search_index(self) -> KnnIndex:
        """The exact nearest-neighbour index of the memory, built on the first search after a change."""
        index = getattr(self, "_index", None)
        prune = resolve_prune(self.pruned_search, self.memory_.device)
        if index is None or index.prune != (prune and self.memory_.shape[0] >= self._INDEX_MIN_ROWS):
            index = KnnIndex(self.memory_, "l2", memory_sq_norms=self.memory_sq_, max_bytes=self.max_bytes,
                             prune=prune, prune_min_rows=self._INDEX_MIN_ROWS)
            self._index = index
        return index

    def _check_memory(self) -> None:
        if self.memory_.shape[0] == 0:
            raise EmptyReferenceSetError(
                "PatchCore's memory is empty (every reference was removed); add_references() first"
            )

    def _predict_batch(self, images: list[LoadedImage]) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_memory()
        z = self._embed(images)
        bsz, h, w, e = z.shape
        q = z.reshape(-1, e)
        d, i = self._search_index().search(q)
        d, i = d[:, 0].reshape(bsz, h * w), i[:, 0].reshape(bsz, h * w)
        scores = self._image_scores(q.reshape(bsz, h * w, e), d, i, self.memory_, self.memory_sq_)
        maps = resize_blur(d.reshape(bsz, h, w), (self.input_size_, self.input_size_), float(self.sigma))
        return scores, maps

    def leave_one_out_scores(self) -> np.ndarray:
        """Image score of each reference against the memory of all the others: ``(n_refs,)``.

        The queries are the patches each reference keeps in memory: with ``coreset_ratio=1.0``, all
        its patches (the exact leave-one-out score); with a coreset, its retained patches (greedy
        k-center keeps the most outlying ones, so the maximum is usually among them; an approximation).

        Raises:
            VladError: fewer than two references.
        """
        self._check_fitted()
        n = len(self.memory_chunks_)
        if n < 2:
            raise VladError(f"leave-one-out scores need at least 2 references, have {n}; add_references() first")
        sizes = [c.shape[0] for c in self.memory_chunks_]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        out = np.zeros(n, dtype=np.float64)
        with torch.inference_mode():
            for r in range(n):
                q = self.memory_chunks_[r]
                if q.shape[0] == 0:
                    out[r] = 0.0
                    continue
                others = torch.cat([self.memory_[: starts[r]], self.memory_[starts[r + 1] :]])
                others_sq = torch.cat([self.memory_sq_[: starts[r]], self.memory_sq_[starts[r + 1] :]])
                if others.shape[0] == 0:
                    out[r] = 0.0
                    continue
                d, i = knn_distances(q, others, k=1, memory_sq_norms=others_sq, max_bytes=self.max_bytes)
                s = self._image_scores(q[None], d[:, 0][None], i[:, 0][None], others, others_sq)
                out[r] = float(s[0])
        return out

    # -- persistence --------------------------------------------------------------------------
    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        meta = {
            "chunk_sizes": [int(c.shape[0]) for c in self.memory_chunks_],
            "reference_names": list(self.reference_names_),
        }
        return {"memory": self.memory_}, meta

    def _set_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        memory = tensors["memory"].to(self.device_).float()
        sizes = [int(s) for s in meta["chunk_sizes"]]
        names = list(meta["reference_names"])
        if sum(sizes) != memory.shape[0] or len(sizes) != len(names):
            raise VladError(
                f"saved PatchCore state is inconsistent: memory has {memory.shape[0]} rows, chunk sizes sum "
                f"to {sum(sizes)} for {len(names)} references; save the scorer again"
            )
        self.memory_chunks_ = list(memory.split(sizes)) if sizes else []
        self.reference_names_ = names
        self._memory_changed()


def _gather_rows(bank: torch.Tensor, keep: torch.Tensor, step: int = 4096) -> torch.Tensor:
    """``bank[keep]`` as float32, gathered ``step`` rows at a time: no float16 copy of all kept rows next to
    the float32 one (the end of ``fit`` is PatchCore's memory peak)."""
    out = torch.empty((keep.numel(), bank.shape[1]), dtype=torch.float32, device=bank.device)
    for s in range(0, keep.numel(), step):
        out[s : s + step] = bank[keep[s : s + step]]
    return out


def _rows_as_one(chunks: list[torch.Tensor], dim: int, device: torch.device) -> torch.Tensor:
    """The chunks' rows as one ``(M, dim)`` float32 tensor on ``device``: the chunks' own storage when
    they are already consecutive views of one tensor there (no copy), else a concatenation."""
    if not chunks:
        return torch.empty((0, dim), device=device)
    first = chunks[0]
    step, ptr, rows = dim * first.element_size(), first.data_ptr(), 0
    joined = first.dtype == torch.float32 and first.device == torch.device(device)
    for c in chunks:
        if not joined:
            break
        if c.shape[0] and (c.dtype != first.dtype or c.device != first.device or not c.is_contiguous()
                           or c.data_ptr() != ptr + rows * step):
            joined = False
        rows += c.shape[0]
    if joined and first.storage_offset() * first.element_size() + rows * step <= first.untyped_storage().nbytes():
        return first.as_strided((rows, dim), (dim, 1))
    return torch.cat(chunks).to(device=device, dtype=torch.float32)


def pool_channels(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling of the channels of ``(N, C)`` to ``(N, size)``: ``F.adaptive_avg_pool1d``,
    bit for bit, with fast paths for the cases PatchCore meets (repeating each channel when ``size`` is
    a multiple of ``C``, averaging pairs when ``C = 2 size``); 3x faster than the general pooling."""
    n, c = x.shape
    if c == size:
        return x
    if size % c == 0:  # each output window holds one input channel
        return x.repeat_interleave(size // c, dim=1)
    if c == 2 * size:  # windows of two: (a + b) / 2, as the pooling computes it
        return x.reshape(n, size, 2).sum(dim=2).div_(2.0)
    return F.adaptive_avg_pool1d(x[:, None], size)[:, 0]
