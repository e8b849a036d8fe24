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

:func:`lowest_mean_distances` is what MuSc needs from all this: for each query patch, the mean of its
``k`` smallest nearest-patch distances over the pool images. Two things make it cheaper than the plain
walk, without changing what it computes:

* **Each pair of images once.** A batch scored against itself (``exclude_self=True``) needs image ``i``'s
  patches against image ``j`` and ``j``'s against ``i``: one similarity block gives both (its row maxima
  and its column maxima), so half the products are skipped. This builds the ``(N, P, N)`` table of
  nearest-patch similarities (200 images of 1369 patches: 219 MB), so it is used while that table fits
  in :data:`TABLE_MAX_BYTES`; larger batches take the walk above.
* **A TF32 candidate pass** (``precision="tf32"``, the ``"auto"`` choice on a GPU): the products that
  only pick each nearest patch run on TF32 tensor cores (inputs rounded to 10 mantissa bits, float32
  sums), and the distances that are kept (the ``k`` nearest images of each query patch) are recomputed
  exactly in float32 from the chosen patches. A kept distance is then an exact float32 distance to a
  patch whose similarity is within twice the TF32 product error of the nearest one: at most
  :data:`TF32_COSINE_ERROR` x 2 in cosine for unit rows of any dimension (Cauchy-Schwarz on the input
  rounding; float32 sums add less than ``D x 2^-24``), and far less in practice, since rounding errors of
  a long dot product mostly cancel. On the CPU, where TF32 does not exist, the same rounding is emulated
  (for tests: it is not faster there), and ``"auto"`` keeps the exact float32 search.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch

from vlad.memory.knn import DEFAULT_MAX_BYTES, InvalidSearchError

#: query patches per similarity block that :func:`plan_blocks` aims at
QUERY_ROWS = 4096
#: largest ``(N, P, N)`` nearest-patch table (with its patch indices under TF32) that the each-pair-once
#: search of a batch against itself builds (the paper's 200 images of 1369 patches: 219 MB, 438 MB with
#: indices); above it :func:`lowest_mean_distances` walks query blocks, whose memory does not grow as N^2
TABLE_MAX_BYTES = 2**29
#: on the CPU, patches per side of a block of the each-pair-once search (smaller blocks waste less on the
#: diagonal blocks, which are computed whole). Measured on 2 cores, N = 200 images of 256 patches x 384
#: dims: blocks of 4 images (1024 rows) 7.0 s, of 16 images (the 64 MB budget) 7.8 s; at 1369 patches
#: one image and two per block were within the noise. On a GPU the blocks fill ``max_bytes``
PAIR_ROWS_CPU = 1024
#: accepted values of ``precision`` (and of MuSc's ``search_precision``)
SEARCH_PRECISIONS = ("auto", "fp32", "tf32")
#: bound on the cosine error of one TF32 product of unit rows: each input rounded to 10 mantissa bits
#: (relative error 2^-11), so ``|a.b - a'.b'| <= (2 u + u^2) |a| |b|``, plus float32 sums (``D 2^-24``,
#: 6e-5 at D = 1024, included for D up to 4096)
TF32_COSINE_ERROR = 2 * 2.0**-11 + 2.0**-22 + 4096 * 2.0**-24

__all__ = [
    "SEARCH_PRECISIONS",
    "TABLE_MAX_BYTES",
    "image_nn_distances",
    "iter_image_nn_distances",
    "lowest_mean_distances",
    "plan_blocks",
    "resolve_search_precision",
]


def resolve_search_precision(precision: str, device: torch.device | str) -> str:
    """``"fp32"`` or ``"tf32"``: ``"auto"`` is the TF32 candidate pass on a GPU, exact float32 elsewhere.

    Raises:
        InvalidSearchError: ``precision`` is not one of :data:`SEARCH_PRECISIONS`.
    """
    if not isinstance(precision, str) or precision not in SEARCH_PRECISIONS:
        raise InvalidSearchError(
            f"search_precision must be 'auto' (TF32 candidates on a GPU, float32 on the CPU), 'fp32' (every "
            f"product in float32) or 'tf32' (TF32 candidates, kept distances in float32), got {precision!r}"
        )
    if precision == "auto":
        return "tf32" if torch.device(device).type == "cuda" else "fp32"
    return precision


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``x`` rounded to TF32's 10 mantissa bits (to nearest): what a TF32 tensor core
    reads, so a float32 product of rounded inputs is a TF32 product (used where TF32 does not exist)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@contextlib.contextmanager
def _tf32_products(on: bool, device: torch.device):
    """Float32 matrix products inside the block on TF32 tensor cores (``on``) or in full float32 (not
    ``on``), whatever the process-wide setting is; CUDA only, the setting restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(on)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


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
    for qs, best, _ in _iter_nearest(queries, pool, query_block, pool_block, max_bytes, tf32=False):
        yield qs, _distances(best)


def _distances(sims: torch.Tensor) -> torch.Tensor:
    """``||a - b|| = sqrt(2 - 2 a.b)`` for unit rows, in place (clamped against rounding)."""
    return sims.mul_(-2.0).add_(2.0).clamp_(min=0.0).sqrt_()


def _iter_nearest(
    queries: torch.Tensor, pool: torch.Tensor, query_block: int | None, pool_block: int | None, max_bytes: int,
    tf32: bool,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Nearest-patch similarities ``(b, P, N_p)`` of each query block, with the nearest patches' indices
    ``(b, P, N_p)`` (int32) under ``tf32`` (whose similarities are then the TF32 ones)."""
    _check(queries, pool)
    nq, p, d = queries.shape
    np_, q, _ = pool.shape
    auto_q, auto_p = plan_blocks(nq, np_, p, q, max_bytes)
    bq = max(1, min(nq, int(query_block) if query_block else auto_q))
    bp = max(1, min(np_, int(pool_block) if pool_block else auto_p))
    queries = _candidate_rows(queries.float(), tf32)
    flat_pool = _candidate_rows(pool.float(), tf32).reshape(np_ * q, d)
    buf = queries.new_empty(bq * p * bp * q)
    for qs in range(0, nq, bq):
        qb = queries[qs : qs + bq].reshape(-1, d)  # (b_q P, D)
        best = queries.new_empty((qb.shape[0], np_))
        where = torch.empty((qb.shape[0], np_), dtype=torch.int32, device=qb.device) if tf32 else None
        for ps in range(0, np_, bp):
            pe = min(np_, ps + bp)
            mem = flat_pool[ps * q : pe * q]
            sim = buf[: qb.shape[0] * mem.shape[0]].view(qb.shape[0], mem.shape[0])
            with _tf32_products(tf32, qb.device):
                torch.mm(qb, mem.T, out=sim)
            best[:, ps:pe], index = _nearest(sim.view(qb.shape[0], pe - ps, q), 2, tf32)
            if index is not None:
                where[:, ps:pe] = index
        yield qs, best.view(-1, p, np_), None if where is None else where.view(-1, p, np_)


def _nearest(sim: torch.Tensor, dim: int, with_index: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Largest similarity along ``dim``, and where it is when ``with_index`` (the TF32 candidates)."""
    if with_index:
        values, index = sim.max(dim=dim)
        return values, index
    return sim.amax(dim=dim), None


def _candidate_rows(x: torch.Tensor, tf32: bool) -> torch.Tensor:
    """The rows the candidate products read: TF32-rounded copies where no tensor core rounds them."""
    return round_to_tf32(x) if tf32 and x.device.type != "cuda" else x


def _table_bytes(n: int, p: int, tf32: bool) -> int:
    """Bytes of the each-pair-once table of a batch of ``n`` images of ``p`` patches."""
    return n * p * n * (8 if tf32 else 4)


def _nearest_table(features: torch.Tensor, max_bytes: int, tf32: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every image of a batch against every other, each pair of images once.

    One ``(b P, b P)`` similarity block of image blocks ``I <= J`` gives ``I``'s patches against ``J``'s
    images (its maxima over each row's ``P`` columns of one image) and ``J``'s patches against ``I``'s
    images (its maxima down each column), so the products of ``J`` against ``I`` are never computed.

    Returns:
        ``(sims, where)``: ``sims[i, a, j]`` the similarity of patch ``a`` of image ``i`` to its nearest
        patch of image ``j`` (the diagonal ``j = i`` included, to be masked by the caller); ``where`` the
        indices of those patches (int32) under ``tf32``, else None.
    """
    n, p, d = features.shape
    b = max(1, min(n, math.isqrt(max(1, int(max_bytes) // 4)) // max(1, p)))
    if features.device.type == "cpu":
        b = min(b, max(1, -(-PAIR_ROWS_CPU // max(1, p))))
    rows = _candidate_rows(features.float(), tf32).reshape(n * p, d)
    sims = rows.new_empty((n, p, n))
    where = torch.empty((n, p, n), dtype=torch.int32, device=rows.device) if tf32 else None
    buf = rows.new_empty((b * p) ** 2)
    for i0 in range(0, n, b):
        i1 = min(n, i0 + b)
        a = rows[i0 * p : i1 * p]
        for j0 in range(i0, n, b):
            j1 = min(n, j0 + b)
            bi, bj = i1 - i0, j1 - j0
            sim = buf[: bi * p * bj * p].view(bi * p, bj * p)
            with _tf32_products(tf32, rows.device):
                torch.mm(a, rows[j0 * p : j1 * p].T, out=sim)
            # I's patches against each image of J (maxima along rows) ...
            values, index = _nearest(sim.view(bi * p, bj, p), 2, tf32)
            sims[i0:i1, :, j0:j1] = values.view(bi, p, bj)
            if index is not None:
                where[i0:i1, :, j0:j1] = index.view(bi, p, bj)
            # ... and J's patches against each image of I (maxima down the columns)
            values, index = _nearest(sim.view(bi, p, bj * p), 1, tf32)
            sims[j0:j1, :, i0:i1] = values.view(bi, bj, p).permute(1, 2, 0)
            if index is not None:
                where[j0:j1, :, i0:i1] = index.view(bi, bj, p).permute(1, 2, 0)
    return sims, where


def _exact_similarities(queries: torch.Tensor, pool: torch.Tensor, images: torch.Tensor, patches: torch.Tensor,
                        max_bytes: int) -> torch.Tensor:
    """Float32 similarities of query patches to chosen pool patches.

    Args:
        queries: ``(b, P, D)`` unit rows.
        pool: ``(N_p, Q, D)`` unit rows.
        images, patches: ``(b, P, k)``: for each query patch, ``k`` pool images and one patch of each.

    Returns:
        ``(b, P, k)`` float32 dot products, computed in float32 whatever the process's TF32 setting.
    """
    b, p, d = queries.shape
    k = images.shape[2]
    flat_pool = pool.float().reshape(-1, d)
    rows = queries.float().reshape(b * p, 1, d)
    chosen = (images.long() * pool.shape[1] + patches.long()).reshape(b * p, k)
    out = rows.new_empty((b * p, k, 1))
    step = max(1, int(max_bytes) // (4 * k * d))  # the gathered rows within max_bytes
    with _tf32_products(False, rows.device):
        for s in range(0, b * p, step):
            picked = flat_pool[chosen[s : s + step]]  # (rows, k, D)
            torch.bmm(picked, rows[s : s + step].transpose(1, 2), out=out[s : s + step])
    return out.view(b, p, k)


def lowest_mean_distances(
    queries: torch.Tensor,
    pool: torch.Tensor,
    k: int,
    exclude_self: bool = False,
    query_block: int | None = None,
    pool_block: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    precision: str = "fp32",
    table_max_bytes: int = TABLE_MAX_BYTES,
) -> torch.Tensor:
    """For each query patch, the mean of its ``k`` smallest nearest-patch distances over the pool images
    (MuSc's mutual score).

    Args:
        queries: unit rows ``(N_q, P, D)``.
        pool: unit rows ``(N_p, Q, D)`` on the same device; with ``exclude_self`` the same images as
            ``queries`` (a batch scored against itself: image ``i`` is not one of its own pool images).
        k: how many of the per-image distances are averaged (at most ``N_p``, ``N_p - 1`` with
            ``exclude_self``).
        query_block, pool_block: images per block of the one-sided walk (:func:`iter_image_nn_distances`);
            giving either takes that walk. The result does not depend on them.
        max_bytes: bound on each similarity block.
        precision: ``"fp32"`` (every product in float32), ``"tf32"`` (TF32 candidates, kept distances in
            float32; see the module's text) or ``"auto"`` (:func:`resolve_search_precision`).
        table_max_bytes: largest table of the each-pair-once search (``exclude_self`` only).

    Returns:
        ``(N_q, P)`` float32.

    Raises:
        InvalidSearchError: bad shapes, an empty pool, a bad ``k`` or ``precision``.
    """
    _check(queries, pool)
    tf32 = resolve_search_precision(precision, queries.device) == "tf32"
    n_q, p, _ = queries.shape
    n_p = pool.shape[0]
    if exclude_self and (n_p != n_q or pool.shape[1] != p):
        raise InvalidSearchError(f"exclude_self scores a batch against itself, but got {n_q} query images "
                                 f"and {n_p} pool images of another shape ({tuple(pool.shape)})")
    available = n_p - 1 if exclude_self else n_p
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= available:
        raise InvalidSearchError(f"k must be between 1 and {available} (the pool images each query patch is "
                                 f"compared with), got {k!r}")
    out = queries.new_empty((n_q, p), dtype=torch.float32)
    once = (exclude_self and query_block is None and pool_block is None
            and _table_bytes(n_q, p, tf32) <= table_max_bytes)
    if once:
        sims, where = _nearest_table(queries, max_bytes, tf32)
        chunk = max(1, -(-QUERY_ROWS // max(1, p)))
        blocks = ((s, sims[s : s + chunk], None if where is None else where[s : s + chunk])
                  for s in range(0, n_q, chunk))
    else:
        blocks = _iter_nearest(queries, pool, query_block, pool_block, max_bytes, tf32)
    for start, best, where in blocks:
        b = best.shape[0]
        if exclude_self:
            rows = torch.arange(b, device=best.device)
            best[rows, :, start + rows] = -float("inf")  # an image is not scored against itself
        top = best.topk(int(k), dim=2)  # the k nearest images (largest similarities)
        kept = top.values
        if where is not None:  # the kept distances, exactly, from the chosen patches
            kept = _exact_similarities(queries[start : start + b], pool, top.indices,
                                       where.gather(2, top.indices), max_bytes)
        out[start : start + b] = _distances(kept).mean(dim=2)
    return out


def image_nn_distances(queries: torch.Tensor, pool: torch.Tensor, **kwargs) -> torch.Tensor:
    """All of :func:`iter_image_nn_distances` at once: ``(N_q, P, N_p)`` (for small sizes and tests)."""
    return torch.cat([d for _, d in iter_image_nn_distances(queries, pool, **kwargs)], dim=0)
