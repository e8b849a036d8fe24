"""The one exact nearest-neighbour search every memory scorer uses (PatchCore, AnomalyDINO, WinCLIP+, SPADE).

:class:`KnnIndex` holds a fixed memory (one ``(M, D)`` tensor, or a list of blocks searched in place,
never concatenated) with what every search needs precomputed (squared norms for ``"l2"``, unit rows
for ``"cosine"``), and answers :meth:`KnnIndex.search`: the ``k`` nearest memory rows of each query
with their distances, on the memory's device (CPU or GPU).

The search is brute force as matrix products, so it is exact: for ``"l2"`` each block of scores is one
``addmm`` (``||m||^2 - 2 q.m``; ``||q||^2`` is added to the winners only, and only the winners get a
square root), for ``"cosine"`` one ``mm`` of unit vectors (``1 - q.m``). Query and memory rows are
processed in blocks so that one ``(queries, rows)`` score block stays within ``max_bytes`` whatever
N and M are, and that block buffer is reused. Ties go to the earlier memory row.

Exact pruning (``prune=True``, 1-NN on a memory of at least ``prune_min_rows`` rows):
:class:`BoundedIndex` skips blocks of memory rows whose low-rank bound shows they cannot beat a row
already found; the result is the brute-force one (the bound holds for any basis).

:func:`knn_distances` is the one-call form for a memory searched once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from vlad.errors import EmptyReferenceSetError, VladError

logger = logging.getLogger(__name__)

#: default bound on the ``(queries, memory rows)`` score block held at once
DEFAULT_MAX_BYTES = 64 * 2**20
METRICS = ("l2", "cosine")


class InvalidSearchError(VladError, ValueError):
    """A nearest-neighbour search asked with bad shapes, ``k`` or metric."""


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Row-wise squared L2 norms of ``(N, D)`` as ``(N,)`` (cache them for a fixed memory).

    Computed ``step`` rows at a time, so a large memory is never squared whole into a second tensor."""
    step = 4096
    if x.shape[0] <= step:
        return x.pow(2).sum(dim=1)
    out = x.new_empty(x.shape[0])
    for s in range(0, x.shape[0], step):
        torch.sum(x[s : s + step].pow(2), dim=1, out=out[s : s + step])
    return out


#: accepted values of the scorers' ``pruned_search`` and of :class:`KnnIndex`'s ``prune``
PRUNE_CHOICES = (True, False, "auto")


def resolve_prune(prune: bool | str, device: torch.device | str) -> bool:
    """Whether to search with the pruned :class:`BoundedIndex` on ``device``.

    ``"auto"`` prunes on the CPU only. Measured on one H200 (torch 2.11, random weights at real size,
    cuda-synchronised medians), the dense product beat the pruned search at every size tried: PatchCore
    with 200 references, batch 1: 4.95 ms dense against 16.6 ms pruned; AnomalyDINO with 8 references x 8
    rotations, batch 1: 7.0 ms against 41.9 ms. On 2 CPU cores the pruned search is 4-5x faster than
    dense on the same memories (``python -m vlad.bench patchcore``, ``... anomalydino``).

    Raises:
        InvalidSearchError: ``prune`` is not True, False or "auto".
    """
    if prune == "auto" and isinstance(prune, str):
        return torch.device(device).type == "cpu"
    if isinstance(prune, bool):
        return prune
    raise InvalidSearchError(f"pruned_search must be True (the exact pruned search), False (dense) or 'auto' "
                             f"(pruned on the CPU, dense on a GPU), got {prune!r} ({type(prune).__name__})")


class KnnIndex:
    """Exact k-nearest-neighbour search in a fixed memory.

    Args:
        memory: ``(M, D)`` float tensor, or a sequence of ``(M_i, D)`` blocks (searched in place; row
            ``j`` of the result indexes their concatenation).
        metric: ``"l2"`` (Euclidean distance) or ``"cosine"`` (``1 - cosine similarity``, in [0, 2]).
        normalized: ``"cosine"`` only: the memory rows (and later the queries) already have unit norm,
            so they are not normalised again (no copy of the memory).
        memory_sq_norms: ``"l2"`` only: precomputed :func:`squared_norms` of ``memory`` (one tensor).
        max_bytes: bound on the float32 score block held at once.
        prune: search with the exact pruned :class:`BoundedIndex` (1-NN on a memory of at least
            ``prune_min_rows`` rows; built on the first such search). Same result as brute force.
            ``"auto"`` (see :func:`resolve_prune`): pruned on the CPU, dense on a GPU.
        prune_min_rows: smallest memory worth pruning.

    Raises:
        InvalidSearchError: bad metric or shapes.
    """

    def __init__(
        self,
        memory: torch.Tensor | Sequence[torch.Tensor],
        metric: str = "l2",
        *,
        normalized: bool = False,
        memory_sq_norms: torch.Tensor | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        prune: bool | str = False,
        prune_min_rows: int = 4096,
    ) -> None:
        if metric not in METRICS:
            raise InvalidSearchError(f"metric must be one of {METRICS}, got {metric!r}")
        blocks = [memory] if isinstance(memory, torch.Tensor) else list(memory)
        if any(b.ndim != 2 for b in blocks) or len({b.shape[1] for b in blocks}) > 1:
            raise InvalidSearchError(
                f"expected a memory (M, D) or blocks (M_i, D) with one D, got shapes {[tuple(b.shape) for b in blocks]}"
            )
        self.metric = metric
        self.normalized = bool(normalized)
        self.max_bytes = int(max_bytes)
        self.dim = int(blocks[0].shape[1]) if blocks else 0
        blocks = [b if b.dtype == torch.float32 else b.float() for b in blocks if b.shape[0] > 0]
        if metric == "cosine" and not normalized:
            blocks = [torch.nn.functional.normalize(b, dim=1) for b in blocks]
        self.blocks = blocks
        self.size = int(sum(b.shape[0] for b in blocks))
        self.offsets = [0]
        for b in blocks:
            self.offsets.append(self.offsets[-1] + b.shape[0])
        if metric == "l2":
            if memory_sq_norms is not None and len(blocks) == 1:
                self.sq_norms = [memory_sq_norms.float()]
            else:
                self.sq_norms = [squared_norms(b) for b in blocks]
        else:
            self.sq_norms = [None] * len(blocks)
        device = blocks[0].device if blocks else torch.device("cpu")
        self.prune = resolve_prune(prune, device) and self.size >= int(prune_min_rows)
        self._bound: BoundedIndex | None = None

    # -- public ------------------------------------------------------------------------------------
    def search(
        self, queries: torch.Tensor, k: int = 1, chunk: int | None = None, rows: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest memory rows of each query.

        Args:
            queries: ``(N, D)`` float tensor on the memory's device.
            k: neighbours per query, ``1 <= k <= M``.
            chunk: queries per block; None picks the largest within ``max_bytes``.
            rows: memory rows per block (brute force only); None picks them within ``max_bytes``.

        Returns:
            ``(distances, indices)``, both ``(N, k)``, sorted by increasing distance; distances float32,
            indices int64 rows of the (concatenated) memory.

        Raises:
            EmptyReferenceSetError: the memory is empty.
            InvalidSearchError: bad shapes or ``k``.
        """
        if queries.ndim != 2 or (self.dim and queries.shape[1] != self.dim):
            raise InvalidSearchError(
                f"expected queries (N, D) with the same D as the memory (D = {self.dim}), got {tuple(queries.shape)}"
            )
        if self.size == 0:
            raise EmptyReferenceSetError(
                "the nearest-neighbour memory is empty (M = 0): add reference features before searching it"
            )
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.size:
            raise InvalidSearchError(f"k must be an integer between 1 and the memory size {self.size}, got {k!r}")
        n = queries.shape[0]
        if n == 0:
            return (torch.zeros((0, k), device=queries.device),
                    torch.zeros((0, k), dtype=torch.long, device=queries.device))
        queries = queries.float()
        if self.metric == "cosine" and not self.normalized:
            queries = torch.nn.functional.normalize(queries, dim=1)
        if k == 1 and self.prune:
            return self._pruned(queries, chunk)
        return self._dense(queries, k, chunk, rows)

    # -- brute force -------------------------------------------------------------------------------
    def _pieces(self, rows_cap: int):
        """``(offset, memory rows, their squared norms or None)`` pieces of at most ``rows_cap`` rows."""
        for b, sq, off in zip(self.blocks, self.sq_norms, self.offsets):
            for s in range(0, b.shape[0], rows_cap):
                yield off + s, b[s : s + rows_cap], None if sq is None else sq[s : s + rows_cap]

    def _dense(
        self, queries: torch.Tensor, k: int, chunk: int | None, rows: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = queries.shape[0]
        budget = max(1, self.max_bytes // 4)
        biggest = max(b.shape[0] for b in self.blocks)
        rows_cap = int(rows) if rows is not None else budget // min(n, 256)  # >= 256 queries per block if possible
        rows_cap = max(1, min(biggest, rows_cap))
        q_chunk = int(chunk) if chunk is not None else budget // rows_cap
        q_chunk = max(1, min(n, q_chunk))
        l2 = self.metric == "l2"
        buf = queries.new_empty(q_chunk * rows_cap)
        out_d = torch.empty((n, k), dtype=torch.float32, device=queries.device)
        out_i = torch.empty((n, k), dtype=torch.long, device=queries.device)
        for qs in range(0, n, q_chunk):
            q = queries[qs : qs + q_chunk]
            best_v = best_i = None
            for off, mem, sq in self._pieces(rows_cap):
                s = buf[: q.shape[0] * mem.shape[0]].view(q.shape[0], mem.shape[0])
                if l2:  # ||m||^2 - 2 q.m: ||q||^2 is the same for a row, added to the winners only
                    torch.addmm(sq[None], q, mem.T, beta=1.0, alpha=-2.0, out=s)
                else:  # similarity of unit vectors: nearest = largest
                    torch.mm(q, mem.T, out=s)
                kk = min(k, mem.shape[0])
                if kk == 1:
                    v, j = s.min(dim=1, keepdim=True) if l2 else s.max(dim=1, keepdim=True)
                else:
                    v, j = s.topk(kk, dim=1, largest=not l2)
                j = j + off
                if best_v is None:
                    best_v, best_i = v, j
                elif k == 1:
                    better = v < best_v if l2 else v > best_v  # strict: ties keep the earlier row
                    best_v, best_i = torch.where(better, v, best_v), torch.where(better, j, best_i)
                else:
                    cat_v, cat_i = torch.cat([best_v, v], 1), torch.cat([best_i, j], 1)
                    best_v, sel = cat_v.topk(min(k, cat_v.shape[1]), dim=1, largest=not l2)
                    best_i = cat_i.gather(1, sel)
            if l2:
                best_v = best_v.add_(squared_norms(q)[:, None]).clamp_min_(0.0).sqrt_()
            else:
                best_v = best_v.neg_().add_(1.0).clamp_(0.0, 2.0)
            out_d[qs : qs + q.shape[0]] = best_v
            out_i[qs : qs + q.shape[0]] = best_i
        return out_d, out_i

    # -- exact pruning -----------------------------------------------------------------------------
    def _pruned(self, queries: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bound is None:
            sq = self.sq_norms[0] if self.metric == "l2" and len(self.blocks) == 1 else None
            self._bound = BoundedIndex(self.blocks, self.metric, max_bytes=self.max_bytes, memory_sq_norms=sq)
        return self._bound.search(queries, chunk=chunk)


def knn_distances(
    queries: torch.Tensor,
    memory: torch.Tensor | Sequence[torch.Tensor],
    k: int = 1,
    metric: str = "l2",
    chunk: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    memory_sq_norms: torch.Tensor | None = None,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of each query in ``memory``: :meth:`KnnIndex.search` in one call.

    Args:
        queries: ``(N, D)`` float tensor.
        memory: ``(M, D)`` float tensor (or blocks) on the same device.
        k: neighbours per query (``1 <= k <= M``).
        metric: ``"l2"`` or ``"cosine"``.
        chunk: queries per block; None picks the largest within ``max_bytes``.
        max_bytes: bound on the score block held at once.
        memory_sq_norms: optional precomputed :func:`squared_norms` of ``memory`` (``"l2"`` only).
        normalized: ``"cosine"`` only: queries and memory already have unit rows.

    Returns:
        ``(distances, indices)``, both ``(N, k)``, sorted by increasing distance.

    Raises:
        EmptyReferenceSetError: the memory is empty.
        InvalidSearchError: bad shapes, ``k`` or ``metric``.
    """
    index = KnnIndex(memory, metric, normalized=normalized, memory_sq_norms=memory_sq_norms, max_bytes=max_bytes)
    return index.search(queries, k=k, chunk=chunk)


class BoundedIndex:
    """Exact 1-nearest-neighbour search (``"l2"`` or ``"cosine"``) that skips most of the memory, block by block.

    **The bound.** With the memory's mean ``mu``, an orthonormal basis ``P`` of ``rank`` directions (the
    principal axes of the memory about ``mu``) and, for any vector ``x``, ``a_x = P^T (x - mu)`` and
    ``rho_x = ||(x - mu) - P a_x||`` (the part outside ``span(P)``), Cauchy-Schwarz on that part gives

    ``q.m <= a_q.a_m + rho_q rho_m + q.mu + m.mu - ||mu||^2``,

    an upper bound on the similarity (``"cosine"``: ``q.m`` of unit rows) or on ``2 q.m - ||m||^2``
    (``"l2"``: the nearest row maximises it), which is one inner product of ``rank + 3``-dimensional
    augmented vectors instead of a ``D``-dimensional one. It holds for any orthonormal basis, so
    exactness never depends on how well the basis fits; only the speed does.

    **The search.** The memory rows are put in an order where each block of :attr:`BLOCK_ROWS` rows
    holds similar rows (a few k-means rounds on ``a_m``; the order is a permutation kept beside the
    memory, which is never copied). For each query the bound, with its first ``pass_rank`` directions
    only, is maximised over each block, tile by tile in cache-sized pieces (the ``(queries, rows)``
    bound matrix is never held), then

    1. the exact scores of the :attr:`FIRST_ROWS` rows of best bound in the query's best-bound block
       give a lower bound ``L`` on its best score;
    2. every block whose bound reaches ``L`` (with a float slack) is searched for that query: its
       rows whose full-rank bound reaches ``L`` are scored exactly; the others cannot hold its nearest row.

    Exact scores are the dense search's own arithmetic (:class:`KnnIndex`), and ties go to the earlier
    memory row. When pruning would not pay (the blocks to search exceed ``max_fraction`` of all) a
    chunk of queries falls back to the dense search.

    Measured (``python -m vlad.bench anomalydino`` / ``patchcore``, one thread each way counted): on
    AnomalyDINO's 65,536-patch memory (8 references x 8 rotations, DINOv2 ViT-S, 1,024 queries) the
    search scored 1.7% of the query-row pairs; on PatchCore's 15,680-row coreset (1,024 dims, 784 queries)
    2.7%. See the benchmarks for times.

    Args:
        memory: ``(M, D)`` float tensor, or a list of ``(M_i, D)`` blocks (never concatenated).
        metric: ``"l2"`` or ``"cosine"`` (rows and queries of unit norm, as :class:`KnnIndex` holds them).
        rank: basis size (clipped to ``D - 1``).
        max_fraction: the fallback threshold described above.
        fit_rows: at most this many memory rows (evenly spaced) estimate the basis (speed only).
        max_bytes: bound on the memory one chunk of queries uses (the dense fallback's block too).
        memory_sq_norms: optional precomputed squared norms of ``memory`` (``"l2"``).
        block_rows: memory rows per block (speed only); None: :attr:`BLOCK_ROWS`.
        pass_rank: directions of the block pass (speed only; at most ``rank``).
    """

    #: memory rows per block: the unit that is skipped or searched
    BLOCK_ROWS = 256
    #: target size of one ``(queries, rows)`` bound tile (cache-resident)
    TILE_BYTES = 4 * 2**20
    #: k-means rounds that order the rows (speed only)
    ORDER_ROUNDS = 4
    #: rows of best bound per query scored first for a lower bound (speed only)
    FIRST_ROWS = 4

    def __init__(
        self,
        memory: torch.Tensor | Sequence[torch.Tensor],
        metric: str = "l2",
        rank: int = 32,
        max_fraction: float = 0.5,
        fit_rows: int = 4096,
        max_bytes: int = DEFAULT_MAX_BYTES,
        memory_sq_norms: torch.Tensor | None = None,
        block_rows: int | None = None,
        pass_rank: int = 16,
    ) -> None:
        if metric not in METRICS:
            raise InvalidSearchError(f"metric must be one of {METRICS}, got {metric!r}")
        self.block_rows = int(block_rows or self.BLOCK_ROWS)
        blocks = [b.float() for b in ([memory] if isinstance(memory, torch.Tensor) else memory) if b.shape[0]]
        if not blocks:
            raise EmptyReferenceSetError("the nearest-neighbour memory is empty (M = 0): add reference features first")
        self.metric = metric
        self.blocks = blocks
        self.memory = blocks[0] if len(blocks) == 1 else blocks
        self.offsets = [0]  # first row of each source block in the concatenated memory
        for b in blocks:
            self.offsets.append(self.offsets[-1] + b.shape[0])
        self.max_fraction = float(max_fraction)
        self.max_bytes = int(max_bytes)
        m, d = self.offsets[-1], blocks[0].shape[1]
        self.size, self.dim = m, d
        if memory_sq_norms is not None and len(blocks) == 1:
            self.mem_sq = memory_sq_norms.float()
        else:
            self.mem_sq = torch.cat([squared_norms(b) for b in blocks])
        self.mean = sum(b.sum(dim=0) for b in blocks) / m
        self.mean_sq = float(self.mean @ self.mean)
        self.mem_sq_max = float(self.mem_sq.max())  # for the float slack of every search
        self.basis = self._fit_basis(blocks, rank, fit_rows)
        # the bound is on 2 q.m - ||m||^2 ("l2") or q.m ("cosine")
        self.alpha = alpha = 2.0 if metric == "l2" else 1.0
        augs = []
        for b, sq in zip(blocks, self.mem_sq.split([b.shape[0] for b in blocks])):
            a, rho = self._project(b)
            extra = alpha * (b @ self.mean)
            if metric == "l2":
                extra -= sq
            augs.append(torch.cat([a, rho[:, None], extra[:, None], torch.ones_like(rho)[:, None]], dim=1))
        # each source block is ordered on its own, so a search block lies inside one source block; its
        # last search block is padded with rows that bound nothing (a huge negative score)
        bs, r = self.block_rows, self.basis.shape[1]
        parts, src, valid, local, glob = [], [], [], [], []
        for k, (b, aug) in enumerate(zip(blocks, augs)):
            order = _block_order(aug[:, :r], bs, self.ORDER_ROUNDS)
            n_b = -(-b.shape[0] // bs)
            pad = n_b * bs - b.shape[0]
            filler = aug.new_zeros((pad, aug.shape[1]))
            filler[:, -2] = -1e30
            parts += [aug[order], filler]
            local += [order, order.new_zeros(pad)]
            glob += [order + self.offsets[k], order.new_zeros(pad)]
            src += [k] * n_b
            valid += [bs] * (n_b - 1) + [bs - pad]
        self.aug = torch.cat(parts).contiguous()  # (n_blocks * BLOCK_ROWS, rank + 3)
        self.n_blocks = len(src)
        self.block_source, self.block_valid = src, valid
        # for each position of that order: its row in its source block, and in the concatenated memory
        self.local_row, self.memory_row = torch.cat(local), torch.cat(glob)
        # the block pass bounds with the first pass_rank directions only (the rest joins rho): a looser
        # bound, but a pass over 32 + 3 columns measured 1.6x one over 16 + 3, and the rows of the blocks
        # it lets through are filtered with the full rank before they are scored
        self.pass_rank = max(1, min(int(pass_rank), r))
        self.aug_pass = self.aug if self.pass_rank == r else torch.cat(
            [*_narrow(self.aug[:, :r], self.aug[:, r], self.pass_rank), self.aug[:, r + 1 :]], dim=1).contiguous()
        self.sq_ordered = self.mem_sq[self.memory_row] if metric == "l2" else None
        self.stats = {"chunks": 0, "dense_chunks": 0, "queries": 0, "rows_scored": 0}

    @property
    def scored_fraction(self) -> float:
        """Share of the query-row pairs scored exactly over the searches so far (1.0 = as many as dense)."""
        return self.stats["rows_scored"] / max(1, self.stats["queries"] * self.size)

    def _fit_basis(self, blocks: list[torch.Tensor], rank: int, fit_rows: int) -> torch.Tensor:
        d = self.dim
        rank = max(1, min(int(rank), d - 1))
        step = max(1, self.size // max(1, int(fit_rows)))
        sample = torch.cat([b[::step] for b in blocks]) - self.mean
        if sample.shape[0] < d:  # few rows: their SVD is cheaper than a (D, D) eigendecomposition
            _, _, vh = torch.linalg.svd(sample.double(), full_matrices=False)
            vecs = vh[:rank].T
        else:
            _, vecs = torch.linalg.eigh((sample.T @ sample).double())
            vecs = vecs[:, -rank:].flip(1)
        # (D, r) orthonormal columns, the largest variance first; any such basis keeps the search exact
        return vecs.float().contiguous()

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_x, rho_x)`` of rows ``x`` (see the class docstring)."""
        centred = x - self.mean
        a = centred @ self.basis
        rho = (squared_norms(centred) - squared_norms(a)).clamp_min(0.0).sqrt()
        return a, rho

    def search(self, queries: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest neighbour of each query: ``(distances (N, 1), indices (N, 1))`` as :func:`knn_distances`.

        Args:
            queries: ``(N, D)`` float tensor (unit rows for ``"cosine"``).
            chunk: queries per chunk; None picks it from ``max_bytes`` (speed and memory only).
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidSearchError(f"expected queries (N, {self.dim}), got {tuple(queries.shape)}")
        queries = queries.float()
        n = queries.shape[0]
        if chunk is None:  # the per-block bounds of a chunk (4 bytes x blocks per query) within max_bytes
            chunk = max(256, self.max_bytes // (4 * self.n_blocks))
        out_d = torch.empty((n, 1), device=queries.device)
        out_i = torch.empty((n, 1), dtype=torch.long, device=queries.device)
        for s in range(0, n, chunk):
            q = queries[s : s + chunk]
            out_d[s : s + q.shape[0]], out_i[s : s + q.shape[0]] = self._search_chunk(q)
        return out_d, out_i

    # -- the steps -----------------------------------------------------------------------------------
    def _block_bounds(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n_blocks, Q)``: for each block and query, the largest bound on the score of the block's rows;
        and the queries' augmented vectors ``(Q, rank + 3)``."""
        a, rho = self._project(q)
        alpha = self.alpha
        const = alpha * (q @ self.mean - self.mean_sq)
        qa = torch.cat([alpha * a, alpha * rho[:, None], torch.ones_like(rho)[:, None], const[:, None]], dim=1)
        if self.pass_rank < a.shape[1]:
            a_p, rho_p = _narrow(a, rho, self.pass_rank)
            qp = torch.cat([alpha * a_p, alpha * rho_p, qa[:, -2:]], dim=1)
        else:
            qp = qa
        n, bs = q.shape[0], self.block_rows
        out = q.new_empty((self.n_blocks, n))
        q_cols = min(n, 256)
        tile_rows = max(bs, (self.TILE_BYTES // (4 * q_cols)) // bs * bs)
        buf = q.new_empty(q_cols * tile_rows)
        # (rows, queries) tiles: the maximum over a block's rows is then taken across whole rows of the
        # tile (contiguous runs of queries), which measured 20-50% faster here than within each query's row
        for s in range(0, n, q_cols):
            qt = qp[s : s + q_cols].T
            for t in range(0, self.aug_pass.shape[0], tile_rows):
                rows = self.aug_pass[t : t + tile_rows]
                u = buf[: rows.shape[0] * qt.shape[1]].view(rows.shape[0], qt.shape[1])
                torch.mm(rows, qt, out=u)
                torch.amax(u.view(-1, bs, qt.shape[1]), dim=1, out=out[t // bs : (t + rows.shape[0]) // bs, s : s + q_cols])
        return out, qa

    def _best(self, q: torch.Tensor, b: int, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Best exact score of each query in block ``b`` (or in its rows ``keep``, positions in the block;
        the dense search's arithmetic) and the memory row that has it (the earliest among equal scores)."""
        start = b * self.block_rows
        end = start + self.block_valid[b]
        local, idx = self.local_row[start:end], self.memory_row[start:end]
        if keep is not None:
            local, idx = local[keep], idx[keep]
        rows = self.blocks[self.block_source[b]][local]
        if self.metric == "l2":  # ||m||^2 - 2 q.m, smallest first, as KnnIndex computes it
            sq = self.sq_ordered[start:end]
            s = torch.addmm((sq if keep is None else sq[keep])[None], q, rows.T, beta=1.0, alpha=-2.0)
            v, j = s.min(dim=1)
            v = v.neg_()
        else:
            v, j = torch.mm(q, rows.T).max(dim=1)
        self.stats["rows_scored"] += q.shape[0] * idx.numel()
        return v, idx[j]

    def _search_chunk(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distances (n, 1), indices (n, 1))`` of one chunk of queries."""
        n, d = q.shape
        self.stats["chunks"] += 1
        self.stats["queries"] += n
        bound, qa = self._block_bounds(q)
        first = bound.argmax(dim=0)
        aug = self.aug.view(self.n_blocks, self.block_rows, -1)
        # 1. a lower bound on each query's best score: the exact scores of the FIRST_ROWS rows of best
        # bound in its best-bound block (queries sorted by that block, one split)
        order = torch.argsort(first)
        firsts, counts = torch.unique_consecutive(first[order], return_counts=True)
        found = []
        for b, qs, qas in zip(firsts.tolist(), q[order].split(counts.tolist()), qa[order].split(counts.tolist())):
            top = torch.mm(qas, aug[b].T).topk(min(self.FIRST_ROWS, self.block_valid[b]), dim=1).indices
            found.append(self._best(qs, b, top.reshape(-1).unique()))
        best, best_i = torch.empty_like(q[:, 0]), torch.empty_like(first)
        best[order], best_i[order] = torch.cat([v for v, _ in found]), torch.cat([i for _, i in found])
        # 2. every block that may beat that (float slack: both sides are rounded), that block included
        scale = 1.0 if self.metric == "cosine" else float(squared_norms(q).max()) + self.mem_sq_max
        floor = best - 1e-4 * scale - 1e-6 * best.abs()
        todo = bound >= floor
        pairs = todo.nonzero()  # (block, query), by block
        if pairs.shape[0] > self.max_fraction * n * self.n_blocks:
            self.stats["dense_chunks"] += 1
            self.stats["rows_scored"] += n * self.size
            return knn_distances(q, self.memory, k=1, metric=self.metric, normalized=self.metric == "cosine",
                                 memory_sq_norms=self.mem_sq, max_bytes=self.max_bytes)
        blocks, counts = torch.unique_consecutive(pairs[:, 0], return_counts=True)
        counts = counts.tolist()
        queries = pairs[:, 1]
        packed = torch.cat([q, qa, floor[:, None]], dim=1)[queries]  # one gather for all blocks
        found_q, found_v, found_i = [torch.arange(n, device=q.device)], [best], [best_i]
        for b, p, qs in zip(blocks.tolist(), packed.split(counts), queries.split(counts)):
            # only the rows whose own bound reaches some query's floor
            keep = (torch.mm(p[:, d:-1], aug[b].T) >= p[:, -1:]).any(dim=0).nonzero()[:, 0]
            if keep.numel():
                v, i = self._best(p[:, :d], b, keep)
                found_q.append(qs)
                found_v.append(v)
                found_i.append(i)
        # each query's largest score; among equal ones the earliest memory row (as the dense search)
        all_q, all_v, all_i = torch.cat(found_q), torch.cat(found_v), torch.cat(found_i)
        best = torch.full_like(best, -math.inf).scatter_reduce_(0, all_q, all_v, "amax")
        top = all_v == best[all_q]
        best_i = torch.full_like(best_i, self.size).scatter_reduce_(0, all_q[top], all_i[top], "amin")
        if self.metric == "l2":  # best = 2 q.m - ||m||^2; the distance as KnnIndex reports it
            dist = best.neg_().add_(squared_norms(q)).clamp_min_(0.0).sqrt_()
        else:
            dist = best.neg_().add_(1.0).clamp_(0.0, 2.0)
        return dist[:, None], best_i[:, None]


def _narrow(a: torch.Tensor, rho: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, rho)`` of the bound with only the first ``rank`` basis directions: the other coordinates of
    ``a`` join the outside part, ``rho' = sqrt(rho^2 + ||a[:, rank:]||^2)`` (as a column)."""
    rest = squared_norms(a[:, rank:]) if a.shape[1] > rank else torch.zeros_like(rho)
    return a[:, :rank], (rho.square() + rest).sqrt()[:, None]


def _block_order(x: torch.Tensor, block_rows: int, rounds: int, max_clusters: int = 512) -> torch.Tensor:
    """A permutation of the rows of ``x`` ``(M, r)`` in which each run of ``block_rows`` holds similar rows:
    rows sorted by their nearest k-means centre (one centre per block, at most ``max_clusters``; ``rounds``
    rounds from evenly spaced rows), each block's indices ascending (so the first of equal scores in a
    block is the earliest row). Speed only: any permutation keeps the search exact."""
    m = x.shape[0]
    k = max(1, min(max_clusters, -(-m // block_rows)))
    centres = x[torch.linspace(0, m - 1, k, device=x.device).long()].clone()
    assign = torch.empty(m, dtype=torch.long, device=x.device)
    step = max(1, (16 * 2**20) // (4 * k))
    for r in range(max(1, rounds)):
        half_sq = 0.5 * squared_norms(centres)
        for s in range(0, m, step):  # nearest centre = largest x.c - ||c||^2 / 2
            assign[s : s + step] = torch.addmm(half_sq[None], x[s : s + step], centres.T, beta=-1.0).argmax(dim=1)
        if r + 1 < rounds:
            counts = torch.bincount(assign, minlength=k)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            moved = counts > 0
            centres[moved] = sums[moved] / counts[moved, None]
    perm = torch.argsort(assign, stable=True)
    full = (m // block_rows) * block_rows
    head = perm[:full].view(-1, block_rows).sort(dim=1).values.reshape(-1)
    return torch.cat([head, perm[full:].sort().values])
