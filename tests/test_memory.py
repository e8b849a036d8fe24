"""vlad.memory: exact chunked kNN against brute force, fast greedy coreset against the plain loop."""

from __future__ import annotations

import pytest
import torch

from vlad.memory import (
    BoundedIndex,
    coreset_size,
    greedy_coreset,
    greedy_coreset_reference,
    knn_distances,
)
from vlad.memory.coreset import _projected


def _data(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("max_bytes", [60_000, 10**9])  # tiny budget forces chunks over queries and memory
def test_knn_l2_matches_cdist(k, max_bytes):
    q, m = torch.randn(300, 48), torch.randn(700, 48)
    d, i = knn_distances(q, m, k=k, max_bytes=max_bytes)
    ref = torch.cdist(q.double(), m.double()).topk(k, dim=1, largest=False)
    assert d.shape == i.shape == (300, k)
    torch.testing.assert_close(d.double(), ref.values, atol=1e-4, rtol=1e-4)
    assert torch.equal(i, ref.indices)


def test_knn_cosine_and_precomputed_norms():
    q, m = torch.randn(50, 16), torch.randn(90, 16)
    d, i = knn_distances(q, m, k=3, metric="cosine", chunk=7)
    sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(m, dim=1).T
    ref = (1 - sim).topk(3, dim=1, largest=False)
    torch.testing.assert_close(d, ref.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(i, ref.indices)
    d2, _ = knn_distances(q, m, memory_sq_norms=m.pow(2).sum(1))
    torch.testing.assert_close(d2[:, 0], torch.cdist(q, m).min(1).values, atol=1e-4, rtol=1e-4)


def test_knn_bad_input_says_what_was_expected():
    q, m = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="metric"):
        knn_distances(q, m, metric="l1")
    with pytest.raises(ValueError, match="memory size 6"):
        knn_distances(q, m, k=7)
    with pytest.raises(ValueError, match="same D"):
        knn_distances(q, torch.randn(6, 9))
    with pytest.raises(ValueError, match="empty"):
        knn_distances(q, torch.randn(0, 8))


@pytest.mark.parametrize("seed,block_size", [(1, 128), (2, 1024), (1, 37)])
def test_coreset_selects_the_same_sequence_as_the_plain_loop(seed, block_size):
    f = _data(1500, 160, seed)
    ref = greedy_coreset_reference(f, ratio=0.1, random_state=seed)
    fast = greedy_coreset(f, ratio=0.1, random_state=seed, block_size=block_size)
    assert fast.tolist() == ref.tolist()


def test_coreset_is_greedy_farthest_point_in_float64():
    # independent check of every step (no reliance on the reference loop): each selected point is
    # (up to float32 rounding) the farthest from the start point and the previously selected ones
    f = _data(2000, 64, 5)
    sel = greedy_coreset(f, n_select=100, projection_dim=32, random_state=3, block_size=256)
    x, start = _projected(f, 32, 3)
    x = x.double()
    min_d = torch.linalg.norm(x - x[start], dim=1)
    for idx in sel.tolist():
        assert min_d[idx] >= min_d.max() * (1 - 1e-5)
        min_d = torch.minimum(min_d, torch.linalg.norm(x - x[idx], dim=1))
    assert len(set(sel.tolist())) == 100


def test_coreset_size_rules():
    f = torch.randn(50, 8)
    assert greedy_coreset(f, ratio=1.0).tolist() == list(range(50))
    assert coreset_size(1000, ratio=0.1) == 100 and coreset_size(5, ratio=0.01) == 1
    assert greedy_coreset(f, n_select=7).shape == (7,)
    with pytest.raises(ValueError, match="exactly one"):
        greedy_coreset(f)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        greedy_coreset(f, ratio=1.5)
    # the selection depends on the seed, and is reproducible with it
    assert torch.equal(greedy_coreset(f, n_select=10, random_state=4), greedy_coreset(f, n_select=10, random_state=4))


@pytest.mark.parametrize("structured,chunk", [(True, 1), (True, 64), (False, 64)])
def test_bounded_index_is_exact(structured, chunk):
    g = torch.Generator().manual_seed(0)
    if structured:  # low-rank memory, queries near it: most rows pruned
        mem = torch.randn(3000, 16, generator=g) @ torch.randn(16, 128, generator=g)
        mem += 0.01 * torch.randn(3000, 128, generator=g)  # the bound is tight: a wrong cut shows
        q = mem[torch.randint(0, 3000, (400,), generator=g)] + 0.5 * torch.randn(400, 128, generator=g)
    else:  # isotropic: nothing can be pruned, dense fallback
        mem, q = torch.randn(1500, 128, generator=g), torch.randn(200, 128, generator=g)
    index = BoundedIndex(mem, rank=16)
    d, i = index.search(q, chunk=chunk)
    ref = torch.cdist(q.double(), mem.double()).min(dim=1)
    assert torch.equal(i[:, 0], ref.indices)
    torch.testing.assert_close(d[:, 0].double(), ref.values, atol=1e-4, rtol=1e-4)
    assert (index.scored_fraction < 0.2) == structured


@pytest.mark.parametrize("candidates,max_batch", [(8, 4), (32, 2048), (200, 16)])
@pytest.mark.parametrize("clustered", [False, True])
def test_coreset_small_candidate_sets_and_lazy_freezing_keep_the_sequence(candidates, max_batch, clustered):
    # few candidates per round and N >> 4 * candidates: exercises the frozen points, the level lowering
    # and the round boundaries, on isotropic and on clustered (mixture of Gaussians) features
    g = torch.Generator().manual_seed(7)
    if clustered:
        centres = 4.0 * torch.randn(20, 96, generator=g)
        f = centres[torch.randint(0, 20, (4000,), generator=g)] + torch.randn(4000, 96, generator=g)
    else:
        f = torch.randn(4000, 96, generator=g)
    ref = greedy_coreset_reference(f, n_select=300, projection_dim=48, random_state=2)
    fast = greedy_coreset(
        f, n_select=300, projection_dim=48, random_state=2, candidates=candidates, max_batch=max_batch
    )
    assert fast.tolist() == ref.tolist()


def test_coreset_duplicate_points_ties_still_greedy():
    # exact ties (duplicated rows) reach the fallback; every pick must still be a farthest point
    base = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    f = base.repeat(30, 1)  # 1200 rows, 40 distinct points
    sel = greedy_coreset(f, n_select=60, projection_dim=None, random_state=1, candidates=8)
    x, start = _projected(f, None, 1)
    x = x.double()
    min_d = torch.linalg.norm(x - x[start], dim=1)
    for idx in sel.tolist():
        assert min_d[idx] >= min_d.max() * (1 - 1e-5) - 1e-6
        min_d = torch.minimum(min_d, torch.linalg.norm(x - x[idx], dim=1))
    assert len(set(sel.tolist())) == 60
    assert len({tuple(f[i].tolist()) for i in sel[:39].tolist()}) == 39  # the distinct points come first


def test_coreset_restores_the_thread_count():
    before = torch.get_num_threads()
    greedy_coreset(torch.randn(300, 8), n_select=10)
    assert torch.get_num_threads() == before
