"""Memory banks for few-shot scorers: exact chunked nearest-neighbour search and greedy k-center coresets.

Two building blocks shared by the memory-based scorers (PatchCore, AnomalyDINO, WinCLIP+, SPADE, ...):

* :func:`knn_distances`: exact k-nearest-neighbour search of ``(N, D)`` queries in an ``(M, D)``
  memory, L2 or cosine, as a few large matrix products (``||q||^2 - 2 q.m + ||m||^2``) processed in
  chunks so the extra memory stays bounded (``max_bytes``, 256 MB by default) whatever N and M are.
* :func:`greedy_coreset`: the greedy k-center coreset of PatchCore (Roth et al., "Towards Total Recall in
  Industrial Anomaly Detection", CVPR 2022, arXiv:2106.08265) as implemented by anomalib's
  ``KCenterGreedy`` (Sener & Savarese, arXiv:1708.00489): a random projection to ``projection_dim``
  dimensions (Johnson-Lindenstrauss), a seeded random start point, then repeatedly the point farthest
  from everything selected so far. :func:`greedy_coreset_reference` is that loop written plainly;
  :func:`greedy_coreset` selects the same indices in the same order (ties and float rounding aside)
  but much faster, by *lazy* evaluation over blocks of points:

  the minimum distance of every point to the selected centres only ever decreases, so the maximum
  over a block of points computed after some centres is an upper bound for later. The blocks sit in a
  max-heap by that bound. To find the next centre, pop the block with the largest bound; if centres
  were selected since its bound was computed, apply all of them at once (one small matrix product,
  compute-bound instead of one memory-bound pass over all N points per centre), push it back with its
  now exact maximum, and repeat. A popped block whose maximum is exact holds the global farthest point,
  since every other block's true maximum is at most its bound. Ties between blocks resolve to the lower
  index, as ``torch.argmax`` in the plain loop does.
"""

from __future__ import annotations

import heapq
import logging
import math

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 2**20
METRICS = ("l2", "cosine")


# -- nearest neighbours -------------------------------------------------------------------------------
def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Row-wise squared L2 norms of ``(N, D)`` as ``(N,)`` (cache them for a fixed memory)."""
    return x.pow(2).sum(dim=1)


def knn_distances(
    queries: torch.Tensor,
    memory: torch.Tensor,
    k: int = 1,
    metric: str = "l2",
    chunk: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    memory_sq_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of each query in ``memory``.

    Args:
        queries: ``(N, D)`` float tensor.
        memory: ``(M, D)`` float tensor on the same device.
        k: neighbours per query (``1 <= k <= M``).
        metric: ``"l2"`` (Euclidean distance) or ``"cosine"`` (``1 - cosine similarity``, in [0, 2]).
        chunk: queries per chunk; None picks the largest chunk within ``max_bytes``.
        max_bytes: bound on the distance block held at once (the memory is also split into pieces
            when a single query row against all of it would not fit).
        memory_sq_norms: optional precomputed :func:`squared_norms` of ``memory`` (``"l2"`` only).

    Returns:
        ``(distances, indices)``, both ``(N, k)``, sorted by increasing distance; ``indices`` are int64
        rows of ``memory``.

    Raises:
        ValueError: bad shapes, ``k`` or ``metric``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if queries.ndim != 2 or memory.ndim != 2 or queries.shape[1] != memory.shape[1]:
        raise ValueError(
            f"expected queries (N, D) and memory (M, D) with the same D, got {tuple(queries.shape)} and "
            f"{tuple(memory.shape)}"
        )
    n, m = queries.shape[0], memory.shape[0]
    if m == 0:
        raise ValueError("the memory is empty (M = 0): add reference features before searching it")
    if not 1 <= k <= m:
        raise ValueError(f"k must be between 1 and the memory size {m}, got {k}")
    if n == 0:
        return queries.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.long, device=queries.device)

    queries = queries.float()
    memory = memory.float()
    if metric == "cosine":
        queries = torch.nn.functional.normalize(queries, dim=1)
        memory = torch.nn.functional.normalize(memory, dim=1)
        m_sq = None
    else:
        m_sq = squared_norms(memory) if memory_sq_norms is None else memory_sq_norms.float()

    # block sizes: a (q_chunk, m_chunk) float32 block (plus top-k merging) must fit in max_bytes
    budget = max(1, int(max_bytes) // 4)
    m_chunk = min(m, max(k, budget // 64))  # at least 64 query rows per block
    q_chunk = chunk if chunk is not None else max(1, budget // m_chunk)
    q_chunk = max(1, min(n, int(q_chunk)))

    out_d = torch.empty((n, k), dtype=torch.float32, device=queries.device)
    out_i = torch.empty((n, k), dtype=torch.long, device=queries.device)
    for qs in range(0, n, q_chunk):
        q = queries[qs : qs + q_chunk]
        q_sq = squared_norms(q)[:, None] if metric == "l2" else None
        best_d = best_i = None
        for ms in range(0, m, m_chunk):
            mem = memory[ms : ms + m_chunk]
            if metric == "l2":
                d = torch.addmm(m_sq[None, ms : ms + m_chunk], q, mem.T, beta=1.0, alpha=-2.0)
                d.add_(q_sq)
            else:
                d = torch.mm(q, mem.T).neg_().add_(1.0)
            kk = min(k, d.shape[1])
            if kk == 1:
                dv, di = d.min(dim=1, keepdim=True)
            else:
                dv, di = d.topk(kk, dim=1, largest=False)
            di = di + ms
            if best_d is None:
                best_d, best_i = dv, di
            else:
                cat_d, cat_i = torch.cat([best_d, dv], 1), torch.cat([best_i, di], 1)
                if k == 1:
                    sel = cat_d.argmin(dim=1, keepdim=True)  # first = earlier memory row on ties
                    best_d, best_i = cat_d.gather(1, sel), cat_i.gather(1, sel)
                else:
                    best_d, sel = cat_d.topk(k, dim=1, largest=False)
                    best_i = cat_i.gather(1, sel)
        if metric == "l2":
            best_d = best_d.clamp_min_(0.0).sqrt_()
        else:
            best_d = best_d.clamp_(0.0, 2.0)
        out_d[qs : qs + q.shape[0]] = best_d
        out_i[qs : qs + q.shape[0]] = best_i
    return out_d, out_i


class BoundedL2Index:
    """Exact 1-nearest-neighbour L2 search that skips most of the memory with a PCA lower bound.

    For an orthonormal basis ``P`` (``rank`` directions, here the principal axes of the memory about
    its mean ``mu``) and residual norms ``r`` (the part of ``x - mu`` outside ``span(P)``),

    ``||q - m||^2 >= ||P(q - m)||^2 + (r_q - r_m)^2 = ||q-mu||^2 + ||m-mu||^2 - 2 (Pq.Pm + r_q r_m)``,

    a ``rank + 1``-dimensional product instead of a ``D``-dimensional one. For each chunk of queries the
    bound is computed against the whole memory, an upper bound comes from the exact distance to each
    query's best-bound candidate, and the exact distances are then computed only against the memory
    rows whose bound is below some query's upper bound (with a float slack), which always include every
    query's true nearest neighbour. The bound holds for any orthonormal basis, so exactness never
    depends on how well the basis fits; only the speed does. When pruning would not pay (the
    candidate rows exceed ``max_fraction`` of the memory) the chunk falls back to the dense search.

    Args:
        memory: ``(M, D)`` float tensor.
        rank: basis size (clipped to ``D - 1``).
        max_fraction: the fallback threshold described above.
        fit_rows: at most this many memory rows (evenly spaced) estimate the basis.
    """

    def __init__(self, memory: torch.Tensor, rank: int = 128, max_fraction: float = 0.5, fit_rows: int = 20_000):
        memory = memory.float()
        self.memory = memory
        self.max_fraction = float(max_fraction)
        m, d = memory.shape
        self.mean = memory.mean(dim=0)
        rank = max(1, min(int(rank), d - 1))
        sample = memory[:: max(1, m // fit_rows)] - self.mean
        if sample.shape[0] < d:  # few rows: their SVD is cheaper than a (D, D) eigendecomposition
            _, _, vh = torch.linalg.svd(sample.double(), full_matrices=False)
            vecs = vh[:rank].T
        else:
            _, vecs = torch.linalg.eigh((sample.T @ sample).double())
            vecs = vecs[:, -rank:]
        self.basis = vecs.float().contiguous()  # (D, r) orthonormal columns; any such basis keeps it exact
        centred = memory - self.mean
        proj = centred @ self.basis
        self.sq = squared_norms(centred)  # ||m - mu||^2
        resid = (self.sq - squared_norms(proj)).clamp_min(0.0).sqrt()
        self.aug = torch.cat([proj, resid[:, None]], dim=1).contiguous()  # (M, r + 1)
        self.mem_sq = squared_norms(memory)
        self.stats = {"chunks": 0, "dense_chunks": 0, "rows_searched": 0}

    def search(self, queries: torch.Tensor, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest neighbour of each query: ``(distances (N, 1), indices (N, 1))`` as :func:`knn_distances`."""
        if queries.ndim != 2 or queries.shape[1] != self.memory.shape[1]:
            raise ValueError(f"expected queries (N, {self.memory.shape[1]}), got {tuple(queries.shape)}")
        queries = queries.float()
        n, m = queries.shape[0], self.memory.shape[0]
        out_d = torch.empty((n, 1), device=queries.device)
        out_i = torch.empty((n, 1), dtype=torch.long, device=queries.device)
        for s in range(0, n, chunk):
            q = queries[s : s + chunk]
            qc = q - self.mean
            qp = qc @ self.basis
            q_sq = squared_norms(qc)
            q_aug = torch.cat([qp, (q_sq - squared_norms(qp)).clamp_min(0.0).sqrt()[:, None]], dim=1)
            lb = torch.addmm(self.sq[None], q_aug, self.aug.T, beta=1.0, alpha=-2.0).add_(q_sq[:, None])
            best = lb.argmin(dim=1)
            ub = (q - self.memory[best]).pow(2).sum(dim=1)
            slack = 1e-4 * (q_sq + self.sq.max()) + 1e-6 * ub  # float rounding of both sides
            rows = (lb <= (ub + slack)[:, None]).any(dim=0).nonzero()[:, 0]
            self.stats["chunks"] += 1
            if rows.numel() > self.max_fraction * m:
                self.stats["dense_chunks"] += 1
                self.stats["rows_searched"] += m
                d, i = knn_distances(q, self.memory, k=1, memory_sq_norms=self.mem_sq)
                out_d[s : s + q.shape[0]], out_i[s : s + q.shape[0]] = d, i
                continue
            self.stats["rows_searched"] += rows.numel()
            sub = self.memory[rows]
            d2 = torch.addmm(self.mem_sq[rows][None], q, sub.T, beta=1.0, alpha=-2.0).add_(squared_norms(q)[:, None])
            v, j = d2.min(dim=1)
            out_d[s : s + q.shape[0], 0] = v.clamp_min_(0.0).sqrt_()
            out_i[s : s + q.shape[0], 0] = rows[j]
        return out_d, out_i


# -- greedy k-center coreset --------------------------------------------------------------------------
def coreset_size(n: int, n_select: int | None = None, ratio: float | None = None) -> int:
    """Number of points a coreset keeps: ``n_select``, or ``int(n * ratio)`` (as anomalib), at least 1.

    Raises:
        ValueError: neither or both given, or values out of range.
    """
    if (n_select is None) == (ratio is None):
        raise ValueError("give exactly one of n_select (a count) or ratio (a fraction in (0, 1])")
    if ratio is not None:
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        return min(n, max(1, int(n * float(ratio))))
    if int(n_select) < 1:
        raise ValueError(f"n_select must be at least 1, got {n_select}")
    return min(n, int(n_select))


def _projected(features: torch.Tensor, projection_dim: int | None, random_state: int | None):
    """Shared first steps of both coreset implementations: the seeded random projection and start."""
    if features.ndim != 2:
        raise ValueError(f"expected features (N, D), got shape {tuple(features.shape)}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if random_state is None else int(random_state))
    x = features.float()
    n, d = x.shape
    if projection_dim is not None and 0 < projection_dim < d:
        # Gaussian Johnson-Lindenstrauss projection (scaled so distances are preserved in expectation)
        proj = torch.randn(d, projection_dim, generator=gen) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    start = int(torch.randint(high=n, size=(1,), generator=gen).item())
    return x.contiguous(), start


def greedy_coreset_reference(
    features: torch.Tensor,
    n_select: int | None = None,
    ratio: float | None = None,
    projection_dim: int | None = 128,
    random_state: int | None = 0,
) -> torch.Tensor:
    """Greedy k-center coreset, the plain loop (as anomalib's ``KCenterGreedy``): slow, for checks.

    One pass over every point per selected centre. The random start point updates the distances but
    is not itself returned (as in anomalib). Same arguments and result as :func:`greedy_coreset`.
    """
    n = features.shape[0]
    size = coreset_size(n, n_select, ratio)
    if size >= n:
        return torch.arange(n)
    x, idx = _projected(features, projection_dim, random_state)
    min_d = None
    selected = []
    for _ in range(size):
        d = torch.linalg.norm(x - x[idx], dim=1)
        min_d = d if min_d is None else torch.minimum(min_d, d)
        idx = int(torch.argmax(min_d).item())
        min_d[idx] = 0.0
        selected.append(idx)
    return torch.tensor(selected, dtype=torch.long)


def greedy_coreset(
    features: torch.Tensor,
    n_select: int | None = None,
    ratio: float | None = None,
    projection_dim: int | None = 128,
    random_state: int | None = 0,
    block_size: int = 1024,
) -> torch.Tensor:
    """Greedy k-center coreset indices of ``features``, fast and exact (see the module docstring).

    Args:
        features: ``(N, D)`` float tensor (CPU or GPU).
        n_select: number of points to select; or
        ratio: fraction of N to select (``int(N * ratio)``, at least 1); 1.0 keeps every point.
        projection_dim: random projection dimension used for the distances (None or >= D: none).
            A different dimension is a different selection.
        random_state: seed of the projection and of the start point.
        block_size: points per lazily updated block (speed only; the selection does not depend on it).

    Returns:
        int64 ``(n_select,)`` indices into ``features`` in selection order (``arange(N)`` when every
        point is kept).
    """
    n = features.shape[0]
    size = coreset_size(n, n_select, ratio)
    if size >= n:
        return torch.arange(n)
    x, start = _projected(features, projection_dim, random_state)
    x = x - x.mean(dim=0, keepdim=True)  # same distances; smaller norms -> less cancellation
    sq = squared_norms(x)
    p = x.shape[1]

    centres = x.new_empty((size + 1, p))
    centres_sq = x.new_empty(size + 1)
    centres[0], centres_sq[0] = x[start], sq[start]
    n_centres = 1

    # exact distances to the start point for every point, then per-block maxima
    min_d = (sq - 2.0 * (x @ x[start]) + sq[start]).clamp_min_(0.0)
    bounds = range(0, n, block_size)
    applied = [1] * len(bounds)
    arg_in_block = [0] * len(bounds)
    heap = []
    for b, s in enumerate(bounds):
        v, i = min_d[s : s + block_size].max(dim=0)
        arg_in_block[b] = int(i)
        heap.append((-float(v), b))
    heapq.heapify(heap)

    max_pending = max(1, (64 * 2**20) // (4 * block_size))  # bound the (block, pending) product
    selected: list[int] = []
    updates = 0
    while len(selected) < size:
        neg_v, b = heapq.heappop(heap)
        s = b * block_size
        if applied[b] < n_centres:  # stale bound: apply the centres selected since, all at once
            xb, mb = x[s : s + block_size], min_d[s : s + block_size]
            for a in range(applied[b], n_centres, max_pending):
                e = min(n_centres, a + max_pending)
                # min_j ||x - c_j||^2 = ||x||^2 + min_j (||c_j||^2 - 2 x.c_j): one pass over the block
                d = torch.addmm(centres_sq[None, a:e], xb, centres[a:e].T, beta=1.0, alpha=-2.0)
                torch.minimum(mb, d.amin(dim=1).add_(sq[s : s + block_size]), out=mb)
            applied[b] = n_centres
            v, i = mb.max(dim=0)
            arg_in_block[b] = int(i)
            heapq.heappush(heap, (-float(v), b))
            updates += 1
            continue
        idx = s + arg_in_block[b]
        selected.append(idx)
        min_d[idx] = 0.0
        centres[n_centres], centres_sq[n_centres] = x[idx], sq[idx]
        n_centres += 1
        heapq.heappush(heap, (neg_v, b))  # still an upper bound; made exact when popped again
    logger.debug("greedy_coreset: %d of %d points, %d block updates", size, n, updates)
    return torch.tensor(selected, dtype=torch.long)
