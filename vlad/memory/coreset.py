"""Greedy k-center coreset of PatchCore, fast and exact.

:func:`greedy_coreset` is the greedy k-center coreset of PatchCore (Roth et al., "Towards Total Recall in
Industrial Anomaly Detection", CVPR 2022, arXiv:2106.08265) as implemented by anomalib's ``KCenterGreedy``
(Sener & Savarese, arXiv:1708.00489): a random projection to ``projection_dim`` dimensions
(Johnson-Lindenstrauss), a seeded random start point, then repeatedly the point farthest from everything
selected so far. :func:`greedy_coreset_reference` is that loop written plainly; :func:`greedy_coreset`
selects the same indices in the same order (float32 near-ties aside) but much faster: greedy picks run on
a few thousand candidate points while they provably are the farthest (every other point's distance is
bounded by a stale upper bound), the picked centres are then applied to the other points in large matrix
products, and points already closer than the current level are left stale until the level reaches them
(details in its docstring).
"""

from __future__ import annotations

import logging
import math

import torch

from vlad.memory.knn import squared_norms

logger = logging.getLogger(__name__)


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
    n, d = features.shape
    if projection_dim is not None and 0 < projection_dim < d:
        # Gaussian Johnson-Lindenstrauss projection (scaled so distances are preserved in expectation),
        # in row blocks: a float16 feature stack is never copied whole to float32
        proj = (torch.randn(d, projection_dim, generator=gen) / math.sqrt(projection_dim)).to(features.device)
        x = torch.empty((n, projection_dim), dtype=torch.float32, device=features.device)
        step = 4096  # rows per float32 copy: 16 MB at D = 1024
        for s in range(0, n, step):
            torch.mm(features[s : s + step].float(), proj, out=x[s : s + step])
    else:
        x = features.float().contiguous()
    start = int(torch.randint(high=n, size=(1,), generator=gen).item())
    return x, start


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
    x, start = _projected(features, projection_dim, random_state)
    return torch.tensor(plain_greedy_steps(x, start, size), dtype=torch.long)


def plain_greedy_steps(x: torch.Tensor, start: int, steps: int) -> list[int]:
    """The plain greedy loop on (projected) features ``x`` ``(N, D)`` from row ``start``: one pass over
    every point per selected centre, ``steps`` selections (the start itself is not returned)."""
    min_d, idx, selected = None, start, []
    for _ in range(steps):
        d = torch.linalg.norm(x - x[idx], dim=1)
        min_d = d if min_d is None else torch.minimum(min_d, d)
        idx = int(torch.argmax(min_d).item())
        min_d[idx] = 0.0
        selected.append(idx)
    return selected


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
    # same distances; smaller norms -> less cancellation (in place unless x is the caller's tensor)
    mean = x.mean(dim=0, keepdim=True)
    x = x - mean if x.data_ptr() == features.data_ptr() else x.sub_(mean)
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
