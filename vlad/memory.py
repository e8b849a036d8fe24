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
  :func:`greedy_coreset` selects the same indices in the same order (float32 near-ties aside) but
  much faster: greedy picks run on a few thousand candidate points while they provably are the
  farthest (every other point's distance is bounded by a stale upper bound), the picked centres are
  then applied to the other points in large matrix products, and points already closer than the
  current level are left stale until the level reaches them (details in its docstring).
"""

from __future__ import annotations

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


def _apply_centres(
    x: torch.Tensor,
    x_sq: torch.Tensor,
    centres: torch.Tensor,
    centres_sq: torch.Tensor,
    cur: torch.Tensor,
    rows: int,
) -> torch.Tensor:
    """``cur <- min(cur, min_j ||x - c_j||^2)`` in place, as chunked matrix products; returns ``cur``.

    ``||x||^2 + min_j (||c_j||^2 - 2 x.c_j)`` in float32 (the arithmetic of every distance in
    :func:`greedy_coreset`); the ``(rows, centres)`` product block stays within ~2 MB (cache-resident).
    """
    n, k = x.shape[0], centres.shape[0]
    if n == 0 or k == 0:
        return cur
    rows = max(1, min(int(rows), n))
    cols = max(64, (1 << 19) // rows)
    buf = x.new_empty((rows, min(cols, k)))
    for a in range(0, k, cols):
        e = min(k, a + cols)
        c_t, c_sq = centres[a:e].T, centres_sq[None, a:e]
        for s in range(0, n, rows):
            t = min(n, s + rows)
            b = buf[: t - s, : e - a]
            torch.addmm(c_sq, x[s:t], c_t, beta=1.0, alpha=-2.0, out=b)
            torch.minimum(cur[s:t], b.amin(dim=1).add_(x_sq[s:t]), out=cur[s:t])
    return cur


def greedy_coreset(
    features: torch.Tensor,
    n_select: int | None = None,
    ratio: float | None = None,
    projection_dim: int | None = 128,
    random_state: int | None = 0,
    block_size: int = 1024,
    candidates: int = 4096,
    max_batch: int = 2048,
) -> torch.Tensor:
    """Greedy k-center coreset indices of ``features``, fast and exact (same picks as the plain loop).

    ``min_d`` (squared distance of every point to the nearest selected centre) only ever decreases,
    so a value computed against the first centres is an upper bound later. Rounds of three steps:

    1. candidates: the ``candidates`` points with the largest ``min_d``, and ``T``, the next largest
       value (an upper bound on every other point). Greedy picks run on the candidates alone: pick the
       largest, update the candidates' distances with one small matrix-vector product, repeat while the
       largest exceeds ``T`` (then it is certainly the global farthest point, as in the plain loop) and
       at most ``max_batch`` times.
    2. the centres picked in the round are applied to the active points at once: a few large matrix
       products (compute-bound), instead of one memory-bound pass over all N points per centre.
    3. lazy freezing: points whose ``min_d`` fell below a level ``L`` (chosen so about
       ``max(4 * candidates, N / 16)`` points stay active) leave the active set, remembering how many
       centres they have seen. ``L`` bounds them in step 1; when the active set gets small, ``L`` is
       lowered and only the frozen points whose stale bound reaches the new ``L`` get the centres they
       missed. Points whose bound falls below the final k-center radius are never touched again,
       which on 156,800 Gaussian points halves the distance computations.

    All distances are ``||x||^2 - 2 x.c + ||c||^2`` in float32 after centring the projected features
    (same distances, smaller norms, less cancellation), so picks equal the plain loop's
    (:func:`greedy_coreset_reference`, direct ``||x - c||``) except where two points' distances agree to
    ~1e-7 relative (float32 near-ties), which may swap. Exact ties resolve as ``torch.argmax`` would only
    when the round has to fall back to a full refresh (rare; continuous data has no exact ties).
    On CPU the loop runs with one torch thread (restored afterwards): its thousands of small ops were
    7x slower with two threads on a busy 2-core machine, and one thread loses little when idle.

    Args:
        features: ``(N, D)`` float tensor (CPU or GPU).
        n_select: number of points to select; or
        ratio: fraction of N to select (``int(N * ratio)``, at least 1); 1.0 keeps every point.
        projection_dim: random projection dimension used for the distances (None or >= D: none).
            A different dimension is a different selection.
        random_state: seed of the projection and of the start point.
        block_size: rows per matrix-product chunk (speed only; the selection does not depend on it).
        candidates: candidate points per round (speed only).
        max_batch: most centres picked per round (speed only).

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
    threads = torch.get_num_threads()
    if x.device.type == "cpu" and threads > 1:
        # thousands of small ops: with other processes on the cores, every multi-threaded op waits for a
        # descheduled worker (measured 7x slower on a busy 2-core machine); one thread is robust
        torch.set_num_threads(1)
    try:
        return _greedy_rounds(x, start, size, block_size, candidates, max_batch)
    finally:
        torch.set_num_threads(threads)


def _greedy_rounds(
    x: torch.Tensor, start: int, size: int, block_size: int, candidates: int, max_batch: int
) -> torch.Tensor:
    """The rounds of :func:`greedy_coreset` on centred projected features ``x`` from point ``start``."""
    n = x.shape[0]
    sq = squared_norms(x)
    dev = x.device
    rows = max(1, int(block_size))

    centres = x.new_empty((size + 1, x.shape[1]))
    centres_sq = x.new_empty(size + 1)
    centres[0], centres_sq[0] = x[start], sq[start]
    n_c = 1
    min_d = (sq - 2.0 * (x @ x[start]) + sq[start]).clamp_min_(0.0)
    min_d[start] = 0.0

    m_cand = max(1, min(int(candidates), n - 1))
    keep_active = max(4 * m_cand, n // 16)
    act = torch.arange(n, device=dev)  # active points: min_d exact against all n_c centres
    xa, sqa = x, sq
    frozen: list[tuple[torch.Tensor, int]] = []  # (points, centres applied): min_d[points] < level
    level = -math.inf
    selected: list[int] = []
    stats = {"rounds": 0, "pairs": n, "lowerings": 0, "fallbacks": 0}

    def _freeze(act, xa, sqa, level):
        low = min_d[act] < level
        if bool(low.any()):
            frozen.append((act[low], n_c))
            keep = ~low
            act, xa, sqa = act[keep], xa[keep], sqa[keep]
        return act, xa, sqa

    def _refresh(points: torch.Tensor, applied: int) -> None:
        cur = min_d[points]
        _apply_centres(x[points], sq[points], centres[applied:n_c], centres_sq[applied:n_c], cur, rows)
        min_d[points] = cur
        stats["pairs"] += points.numel() * (n_c - applied)

    while len(selected) < size:
        stats["rounds"] += 1
        # lower the level when few points are active: frozen points whose bound reaches it catch up
        lowered = False
        while frozen and (act.numel() == 0 or (not lowered and act.numel() < keep_active)):
            # (again only if every point brought back fell below the new level)
            new_level = float(torch.kthvalue(min_d, n - keep_active + 1).values) if keep_active < n else -math.inf
            if not new_level < level:
                break
            stats["lowerings"] += 1
            lowered, level = True, new_level
            still, back = [], []
            for pts, applied in frozen:
                up = min_d[pts] >= level
                if bool(up.any()):
                    _refresh(pts[up], applied)
                    back.append(pts[up])
                    pts = pts[~up]
                if pts.numel():
                    still.append((pts, applied))
            frozen = still
            if back:
                act = torch.cat([act, *back])
                xa, sqa = x[act], sq[act]
                act, xa, sqa = _freeze(act, xa, sqa, level)

        # 1. greedy picks among the candidates while they provably are the global farthest points
        ua = min_d[act]
        if act.numel() > m_cand:
            vals, pos = torch.topk(ua, m_cand + 1)
            bound = max(float(vals[m_cand]), level)
            vals, pos = vals[:m_cand], pos[:m_cand]
        else:
            vals, pos, bound = ua, torch.arange(act.numel(), device=dev), level
        cand, cand_d, cand_x, cand_sq = act[pos], vals.clone(), xa[pos], sqa[pos]
        picked: list[int] = []
        budget = min(int(max_batch), size - len(selected))
        while cand_d.numel() and len(picked) < budget:
            v, j = cand_d.max(dim=0)
            if not float(v) > bound:
                break
            j = int(j)
            idx = int(cand[j])
            picked.append(idx)
            d = torch.addmv(cand_sq, cand_x, x[idx], alpha=-2.0).add_(sq[idx])
            torch.minimum(cand_d, d, out=cand_d)
            cand_d[j] = 0.0
        if not picked:  # a float tie at the bound: make everything exact and take the first argmax
            stats["fallbacks"] += 1
            for pts, applied in frozen:
                _refresh(pts, applied)
            frozen, level = [], -math.inf
            act, xa, sqa = torch.arange(n, device=dev), x, sq
            picked.append(int(torch.argmax(min_d)))
        selected.extend(picked)

        # 2. apply this round's centres to every active point at once
        k0 = n_c
        pt = torch.tensor(picked, dtype=torch.long, device=dev)
        centres[k0 : k0 + len(picked)], centres_sq[k0 : k0 + len(picked)] = x[pt], sq[pt]
        n_c += len(picked)
        cur = min_d[act]
        _apply_centres(xa, sqa, centres[k0:n_c], centres_sq[k0:n_c], cur, rows)
        min_d[act] = cur
        min_d[pt] = 0.0
        stats["pairs"] += act.numel() * (n_c - k0)

        # 3. freeze the active points below the level (raised so about keep_active stay active)
        if act.numel() > keep_active:
            level = max(level, float(torch.kthvalue(min_d[act], act.numel() - keep_active + 1).values))
        act, xa, sqa = _freeze(act, xa, sqa, level)
    logger.debug(
        "greedy_coreset: %d of %d points, %d rounds, %d level lowerings, %d fallbacks, %.2f of N x k distances",
        size, n, stats["rounds"], stats["lowerings"], stats["fallbacks"], stats["pairs"] / (n * (size + 1)),
    )
    return torch.tensor(selected, dtype=torch.long)
