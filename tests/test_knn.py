"""vlad.memory.knn: the one exact nearest-neighbour search, against a brute-force torch.cdist reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlad.errors import EmptyReferenceSetError, VladError
from vlad.memory import BoundedIndex, InvalidSearchError, KnnIndex, knn_distances


def _brute(q: torch.Tensor, m: torch.Tensor, k: int, metric: str):
    """The reference: every distance in float64, then the k smallest."""
    q, m = q.double(), m.double()
    if metric == "cosine":
        d = 1.0 - F.normalize(q, dim=1) @ F.normalize(m, dim=1).T
    else:
        d = torch.cdist(q, m)
    return d.topk(k, dim=1, largest=False)


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("chunk,rows", [(None, None), (7, 13), (1, 1), (50, 1000)])
@pytest.mark.parametrize("as_blocks", [False, True])
def test_search_equals_brute_force(metric, k, chunk, rows, as_blocks):
    # odd sizes; block sizes that do not divide them; memory as one tensor or as uneven blocks
    q, m = _rand(101, 19, 0), _rand(93, 19, 1)
    memory = [m[:5], m[5:5], m[5:28], m[28:92], m[92:]] if as_blocks else m
    d, i = KnnIndex(memory, metric).search(q, k=k, chunk=chunk, rows=rows)
    ref = _brute(q, m, k, metric)
    assert d.shape == i.shape == (101, k) and d.dtype == torch.float32 and i.dtype == torch.long
    assert torch.equal(i, ref.indices)
    torch.testing.assert_close(d.double(), ref.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_small_byte_budget_gives_the_same_answer(metric):
    q, m = _rand(300, 48, 2), _rand(700, 48, 3)
    d, i = knn_distances(q, m, k=3, metric=metric, max_bytes=10_000)  # blocks of a few rows and queries
    ref = _brute(q, m, 3, metric)
    assert torch.equal(i, ref.indices)
    torch.testing.assert_close(d.double(), ref.values, atol=1e-5, rtol=1e-5)


def test_normalized_cosine_searches_the_blocks_in_place():
    blocks = [F.normalize(_rand(n, 16, n), dim=1) for n in (40, 9)]
    index = KnnIndex(blocks, "cosine", normalized=True)
    assert [b.data_ptr() for b in index.blocks] == [b.data_ptr() for b in blocks]  # memory held once
    q = F.normalize(_rand(25, 16, 7), dim=1)
    d, i = index.search(q)
    ref = _brute(q, torch.cat(blocks), 1, "cosine")
    assert torch.equal(i, ref.indices)
    torch.testing.assert_close(d.double(), ref.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("as_blocks", [False, True])
def test_pruned_search_is_exact_and_prunes(metric, as_blocks):
    g = torch.Generator().manual_seed(0)
    # low-rank memory with a little noise, queries near it: most rows can be pruned, and a wrong cut shows
    mem = torch.randn(3000, 12, generator=g) @ torch.randn(12, 96, generator=g)
    mem += 0.01 * torch.randn(3000, 96, generator=g)
    q = mem[torch.randint(0, 3000, (257,), generator=g)] + 0.3 * torch.randn(257, 96, generator=g)
    if metric == "cosine":
        mem, q = F.normalize(mem, dim=1), F.normalize(q, dim=1)
    memory = [mem[:1000], mem[1000:1001], mem[1001:2500], mem[2500:]] if as_blocks else mem
    index = KnnIndex(memory, metric, prune=True, prune_min_rows=100)
    d, i = index.search(q)
    ref = _brute(q, mem, 1, metric)
    assert torch.equal(i, ref.indices)
    torch.testing.assert_close(d.double(), ref.values, atol=1e-4, rtol=1e-4)
    assert index._bound.scored_fraction < 0.5


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("block_rows,chunk", [(16, None), (16, 5), (64, 1), (1000, None)])
def test_bounded_index_on_clustered_memory_of_odd_sized_sources(metric, block_rows, chunk):
    """Clusters spread over sources of sizes that do not divide into blocks (padded last blocks), many
    blocks, tiny query chunks: the same nearest rows as float64 brute force, with most pairs skipped."""
    g = torch.Generator().manual_seed(3)
    centres = 4 * torch.randn(40, 48, generator=g)
    mem = centres[torch.randint(0, 40, (2600,), generator=g)] + 0.3 * torch.randn(2600, 48, generator=g)
    q = centres[torch.randint(0, 40, (300,), generator=g)] + 0.3 * torch.randn(300, 48, generator=g)
    if metric == "cosine":
        mem, q = F.normalize(mem, dim=1), F.normalize(q, dim=1)
    sizes = [1, 999, 17, 1583]
    index = BoundedIndex(list(mem.split(sizes)), metric, rank=8, block_rows=block_rows)
    d, i = index.search(q, chunk=chunk)
    ref = _brute(q, mem, 1, metric)
    assert torch.equal(i, ref.indices)
    torch.testing.assert_close(d.double(), ref.values, atol=1e-4, rtol=1e-4)
    if block_rows < 1000:
        assert index.scored_fraction < 0.3 and index.stats["dense_chunks"] == 0


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("pass_rank", [4, 16, 64])
def test_block_pass_of_lower_rank_stays_exact(metric, pass_rank):
    """A memory spread over many more directions than the block pass uses: the pass's bound must carry
    the others (in rho), or it skips blocks that hold nearest rows. A pass_rank above rank is clipped."""
    g = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(64, 40, generator=g))[0].T  # 40 orthonormal directions in 64 dims
    mem = (torch.randn(3000, 40, generator=g) * torch.linspace(3.0, 0.5, 40)) @ basis
    mem += 0.05 * torch.randn(3000, 64, generator=g)
    q = mem[torch.randint(0, 3000, (200,), generator=g)] + 0.2 * torch.randn(200, 64, generator=g)
    if metric == "cosine":
        mem, q = F.normalize(mem, dim=1), F.normalize(q, dim=1)
    index = BoundedIndex([mem[:1234], mem[1234:]], metric, rank=32, pass_rank=pass_rank, block_rows=64)
    d, i = index.search(q)
    ref = _brute(q, mem, 1, metric)
    assert torch.equal(i, ref.indices)
    torch.testing.assert_close(d.double(), ref.values, atol=1e-4, rtol=1e-4)
    assert index.pass_rank == min(pass_rank, 32) and index.stats["dense_chunks"] == 0


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bounded_index_ties_go_to_the_earlier_row(metric):
    """Copies of the nearest row in other blocks and sources: the earliest copy wins, as in the dense search."""
    g = torch.Generator().manual_seed(4)
    mem = F.normalize(torch.randn(900, 24, generator=g), dim=1)
    target = mem[700].clone()
    for pos in (650, 120, 899):  # copies before and after row 700, in other blocks
        mem[pos] = target
    q = F.normalize(target[None] + 1e-3 * torch.randn(3, 24, generator=g), dim=1)
    dense = knn_distances(q, mem, metric=metric)[1]
    pruned = BoundedIndex([mem[:400], mem[400:]], metric, rank=4, block_rows=32).search(q)[1]
    assert torch.equal(pruned, dense) and pruned[:, 0].tolist() == [120, 120, 120]


def test_ties_go_to_the_earlier_memory_row():
    row = _rand(1, 8, 5)
    m = torch.cat([_rand(3, 8, 6) + 10, row, row, row])  # rows 3, 4, 5 identical
    for metric in ("l2", "cosine"):
        _, i = KnnIndex([m[:4], m[4:]], metric).search(row + 1e-3, rows=1)
        assert int(i[0, 0]) == 3


def test_inputs_of_other_float_types_give_float32_distances():
    q, m = _rand(10, 8, 8), _rand(20, 8, 9)
    d, i = knn_distances(q.double(), m.half())
    ref = _brute(q, m.half().float(), 1, "l2")
    assert d.dtype == torch.float32 and torch.equal(i, ref.indices)


def test_no_queries_gives_empty_results():
    d, i = knn_distances(torch.zeros(0, 8), _rand(5, 8, 0), k=2)
    assert d.shape == i.shape == (0, 2)


@pytest.mark.parametrize("memory", [torch.zeros(0, 8), [], [torch.zeros(0, 8)]])
def test_empty_memory_is_a_clear_vlad_error(memory):
    with pytest.raises(EmptyReferenceSetError, match="memory is empty.*add reference"):
        KnnIndex(memory).search(_rand(3, 8, 0))


def test_bad_requests_are_vlad_errors_saying_what_was_expected():
    q, m = _rand(4, 8, 0), _rand(6, 8, 1)
    for bad, pattern in [({"metric": "l1"}, "metric must be one of"), ({"k": 7}, "between 1 and the memory size 6"),
                         ({"k": 0}, "between 1"), ({"k": True}, "between 1")]:
        with pytest.raises(InvalidSearchError, match=pattern) as err:
            knn_distances(q, m, **bad)
        assert isinstance(err.value, VladError)
    with pytest.raises(InvalidSearchError, match="same D"):
        knn_distances(q, _rand(6, 9, 2))
    with pytest.raises(InvalidSearchError, match="one D"):
        KnnIndex([m, _rand(3, 9, 2)])


# -- the device-aware default: pruned on the CPU, dense on a GPU ----------------------------------------
def test_auto_prunes_on_the_cpu_only():
    from vlad.memory import resolve_prune

    assert resolve_prune("auto", "cpu") is True
    assert resolve_prune("auto", torch.device("cuda")) is False  # only the device's type is read
    assert resolve_prune(False, "cpu") is False and resolve_prune(True, "cuda") is True
    assert KnnIndex(_rand(5000, 8, 0), prune="auto").prune
    assert not KnnIndex(_rand(5000, 8, 0), prune=False).prune


@pytest.mark.parametrize("bad", ["fast", 1, None])
def test_bad_prune_values_are_refused(bad):
    with pytest.raises(InvalidSearchError, match="pruned_search must be True"):
        KnnIndex(_rand(10, 4, 0), prune=bad)


@pytest.mark.parametrize("name", ["patchcore", "anomalydino"])
def test_scorers_refuse_a_bad_pruned_search(name):
    import numpy as np

    import vlad

    with pytest.raises(VladError, match="pruned_search"):  # where it enters
        vlad.create_scorer(name, weights="tiny", pruned_search="yes")
    scorer = vlad.create_scorer(name, weights="tiny")
    scorer.pruned_search = "yes"  # assigned as an attribute: refused at fit
    with pytest.raises(VladError, match="pruned_search"):
        scorer.fit([np.full((64, 64, 3), 128, np.uint8)])
