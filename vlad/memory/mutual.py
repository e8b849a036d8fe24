"""Blocked image-to-image nearest-patch distances: the all-pairs search of mutual scoring (MuSc).

Mutual scoring needs, for every patch of every query image and for every image of a pool, the distance
to that pool image's nearest patch: ``N_q x P`` patches against ``N_p`` images of ``Q`` patches each, so
``N_q P N_p Q`` distances (``N^2 P^2`` when a batch is scored against itself). Held at once that is an
``N x N x P x P`` tensor (200 images of 1369 patches: 300 GB); here it never exists.

:func:`iter_image_nn_distances` walks query images in blocks and pool images in blocks. Each step is one
matrix product of unit rows (a ``(b_q P, b_p Q)`` similarity block, as :class:`vlad.memory.KnnIndex`
does for ``"cosine"``), reduced at once to the nearest patch of each pool image (a max over ``Q``),
and the block buffer is reused. A query block is handed to the caller as ``(b_q, P, N_p)`` nearest-patch
distances as soon as it is complete, so the caller reduces it (e.g. MuSc's mean of the lowest 30% over
images) before the next block is computed. Memory is bounded by ``max_bytes`` for the similarity block
plus ``b_q P N_p`` floats for the per-image minima, whatever N is.

Exactness: the distance between unit vectors is ``sqrt(2 - 2 cos)``, decreasing in the cosine, so the
nearest patch is the one of largest dot product; every dot product is computed once, by the same
matrix product whatever the block sizes, and only the winners are turned into distances. So the result
is the dense ``torch.cdist(...).min()`` computation up to float rounding of the products (tested against
one-pair-at-a-time ``cdist`` and across block sizes).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vlad.memory.knn import DEFAULT_MAX_BYTES, InvalidSearchError

#: query patches per similarity block that :func:`plan_blocks` aims at
QUERY_ROWS = 4096

__all__ = ["image_nn_distances", "iter_image_nn_distances", "plan_blocks"]


def plan_blocks(n_query: int, n_pool: int, p: int, q: int, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[int, int]:
    """Query and pool images per block so that a ``(b_q P, b_p Q)`` float32 similarity block fits in
    ``max_bytes`` (at least one image each).

    Tall blocks are preferred: about :data:`QUERY_ROWS` query patches per block (matrix products with
    few rows run well below the machine's peak), then as many pool images as the budget allows.
    Measured on 50 images of 256 patches x 384 dims (2 cores, loaded): 16 query x 8 pool images per
    block ran at 1.04-1.2x the dense matmul, 1 query x 50 pool images at 1.55-1.76x.

    Returns:
        ``(images per query block, images per pool block)``.
    """
    budget = max(1, int(max_bytes) // 4)
    b_query = max(1, min(n_query, -(-QUERY_ROWS // max(1, p))))
    b_pool = max(1, min(n_pool, budget // max(1, b_query * p * q)))
    if b_query * p * b_pool * q > budget:  # even one pool image is too wide: fewer query images
        b_query = max(1, min(b_query, budget // max(1, p * q)))
    return b_query, b_pool


def _check(queries: torch.Tensor, pool: torch.Tensor) -> None:
    if queries.ndim != 3 or pool.ndim != 3 or queries.shape[2] != pool.shape[2]:
        raise InvalidSearchError(
            f"expected query images (N_q, P, D) and pool images (N_p, Q, D) with one D, got "
            f"{tuple(queries.shape)} and {tuple(pool.shape)}"
        )
    if pool.shape[0] == 0 or pool.shape[1] == 0:
        raise InvalidSearchError("the pool of images to search is empty: add images to it first")


def iter_image_nn_distances(
    queries: torch.Tensor,
    pool: torch.Tensor,
    query_block: int | None = None,
    pool_block: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Distance of each query patch to the nearest patch of each pool image, one query block at a time.

    Args:
        queries: unit rows ``(N_q, P, D)`` (P patches per query image).
        pool: unit rows ``(N_p, Q, D)``, on the same device.
        query_block: query images per block (None: planned by :func:`plan_blocks`).
        pool_block: pool images per block (None: likewise).
        max_bytes: bound on the similarity block when planning.

    Yields:
        ``(start, d)``: ``d`` is ``(b, P, N_p)`` float32, ``d[a, i, j]`` the Euclidean distance of patch
        ``i`` of query image ``start + a`` to its nearest patch in pool image ``j``.

    Raises:
        InvalidSearchError: bad shapes or an empty pool.
    """
    _check(queries, pool)
    nq, p, d = queries.shape
    np_, q, _ = pool.shape
    auto_q, auto_p = plan_blocks(nq, np_, p, q, max_bytes)
    bq = max(1, min(nq, int(query_block) if query_block else auto_q))
    bp = max(1, min(np_, int(pool_block) if pool_block else auto_p))
    queries = queries.float()
    pool = pool.float()
    flat_pool = pool.reshape(np_ * q, d)
    buf = queries.new_empty(bq * p * bp * q)
    for qs in range(0, nq, bq):
        qb = queries[qs : qs + bq].reshape(-1, d)  # (b_q P, D)
        best = queries.new_empty((qb.shape[0], np_))
        for ps in range(0, np_, bp):
            pe = min(np_, ps + bp)
            mem = flat_pool[ps * q : pe * q]
            sim = buf[: qb.shape[0] * mem.shape[0]].view(qb.shape[0], mem.shape[0])
            torch.mm(qb, mem.T, out=sim)
            best[:, ps:pe] = sim.view(qb.shape[0], pe - ps, q).amax(dim=2)
        # ||a - b|| = sqrt(2 - 2 a.b) for unit rows (clamped against rounding)
        dist = best.mul_(-2.0).add_(2.0).clamp_(min=0.0).sqrt_()
        yield qs, dist.view(-1, p, np_)


def image_nn_distances(queries: torch.Tensor, pool: torch.Tensor, **kwargs) -> torch.Tensor:
    """All of :func:`iter_image_nn_distances` at once: ``(N_q, P, N_p)`` (for small sizes and tests)."""
    return torch.cat([d for _, d in iter_image_nn_distances(queries, pool, **kwargs)], dim=0)
