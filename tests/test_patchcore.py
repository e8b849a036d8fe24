"""PatchCore through the public API, with the tiny CNN twin and synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import textured, with_defect

import vlad
from vlad.errors import EmptyReferenceSetError, NotFittedError


def _scorer(**kw):
    return vlad.create_scorer("patchcore", weights="tiny", **kw)


@pytest.fixture(scope="module")
def goods():
    return [textured(i) for i in range(4)]


@pytest.fixture(scope="module")
def fitted(goods):
    return _scorer(coreset_ratio=0.5).fit(goods)


def _same(a, b):
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    for ma, mb in zip(a.anomaly_maps, b.anomaly_maps, strict=True):
        np.testing.assert_array_equal(ma, mb)


def test_defect_is_found_and_scores_higher(fitted):
    bad = with_defect(textured(100))  # defect at rows 30:50, cols 60:80
    res = fitted.predict([textured(50), textured(51), bad])
    assert res.image_scores[2] > 2 * res.image_scores[:2].max()
    m = res.anomaly_maps[2]
    assert m.shape == (96, 96)
    y, x = np.unravel_index(int(m.argmax()), m.shape)
    assert 30 <= y < 50 and 60 <= x < 80
    assert fitted.memory_.shape == (128, 1024)  # 4 refs x 8x8 patches x 0.5, embed_dim 1024


def test_maps_at_each_images_own_size(fitted):
    res = fitted.predict([textured(7, size=80), textured(8, size=120)])
    assert [m.shape for m in res.anomaly_maps] == [(80, 80), (120, 120)]


def test_incremental_equals_batch_with_full_memory(goods):
    # batch_size=1: the CNN's float rounding depends on the forward's batch size, not our bank logic
    batch = _scorer(coreset_ratio=1.0, batch_size=1).fit(goods)
    inc = _scorer(coreset_ratio=1.0, batch_size=1).fit(goods[:1]).add_references(goods[1:3])
    inc.add_references(goods[3:])
    assert torch.equal(batch.memory_, inc.memory_)
    torch.testing.assert_close(_scorer(coreset_ratio=1.0).fit(goods).memory_, inc.memory_, rtol=1e-4, atol=1e-5)
    assert inc.list_references() == batch.list_references() and inc.n_references_ == 4
    probe = [with_defect(textured(100)), textured(9)]
    _same(batch.predict(probe), inc.predict(probe))


def test_remove_reference_restores_previous_memory(goods):
    s = _scorer(coreset_ratio=0.5).fit(goods[:3])
    probe = [with_defect(textured(100)), textured(9)]
    before, mem = s.predict(probe), s.memory_.clone()
    s.add_references([textured(60), textured(61)])
    assert s.memory_.shape[0] > mem.shape[0]
    s.remove_reference(4).remove_reference(3)
    assert torch.equal(s.memory_, mem) and s.n_references_ == 3
    _same(before, s.predict(probe))
    for _ in range(3):
        s.remove_reference(0)
    with pytest.raises(EmptyReferenceSetError, match="add_references"):
        s.predict(probe)


def test_save_load_predicts_identically(fitted, tmp_path):
    probe = [with_defect(textured(100)), textured(9, size=70)]
    fitted.save(tmp_path / "pc")
    loaded = vlad.load_scorer(tmp_path / "pc") if hasattr(vlad, "load_scorer") else type(fitted).load(tmp_path / "pc")
    assert loaded.list_references() == fitted.list_references()
    _same(fitted.predict(probe), loaded.predict(probe))


def test_leave_one_out_equals_refit_without_that_reference(goods):
    s = _scorer(coreset_ratio=1.0, batch_size=1).fit(goods)
    loo = s.leave_one_out_scores()
    assert loo.shape == (4,)
    for r in (0, 3):
        others = _scorer(coreset_ratio=1.0, batch_size=1).fit([g for i, g in enumerate(goods) if i != r])
        z = others._embed(s._load_references([goods[r]]))  # the same queries predict() uses
        d = torch.cdist(z.reshape(-1, z.shape[-1]), others.memory_).min(1).values
        assert loo[r] <= d.max().item() + 1e-5  # the reweighting factor is in (0, 1]
        expected = others._predict_batch(s._load_references([goods[r]]))[0]
        np.testing.assert_allclose(loo[r], expected.item(), rtol=1e-6)


def test_reweighting_lowers_the_plain_max(goods):
    bad = [with_defect(textured(100))]
    plain = _scorer(coreset_ratio=1.0, num_neighbors=1).fit(goods).predict(bad).image_scores
    weighted = _scorer(coreset_ratio=1.0, num_neighbors=9).fit(goods).predict(bad).image_scores
    assert 0 < weighted[0] < plain[0]


def test_errors():
    with pytest.raises(EmptyReferenceSetError):
        _scorer().fit()
    with pytest.raises(EmptyReferenceSetError):
        _scorer().fit([])
    with pytest.raises(NotFittedError):
        _scorer().predict([textured(0)])
    with pytest.raises(NotFittedError):
        _scorer().add_references([textured(0)])
    with pytest.raises(ValueError, match="coreset_ratio"):
        _scorer(coreset_ratio=0).fit([textured(0)])


def test_pruned_index_search_matches_dense(fitted, monkeypatch):
    probe = [with_defect(textured(100)), textured(9)]
    dense = fitted.predict(probe)
    monkeypatch.setattr(type(fitted), "_INDEX_MIN_ROWS", 0)
    monkeypatch.setattr(fitted, "pruned_search", True)
    fitted._index = None
    pruned = fitted.predict(probe)
    assert fitted._index is not None
    np.testing.assert_allclose(pruned.image_scores, dense.image_scores, rtol=1e-5)
    for a, b in zip(pruned.anomaly_maps, dense.anomaly_maps, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    fitted._index = None


@pytest.mark.parametrize("c,size", [(512, 1024), (2048, 1024), (1024, 1024), (96, 64), (64, 160)])
def test_channel_pooling_equals_adaptive_average_pooling_bit_for_bit(c, size):
    from vlad.scorers.patchcore import pool_channels

    x = torch.randn(37, c, generator=torch.Generator().manual_seed(c)).relu()
    assert torch.equal(pool_channels(x, size), F.adaptive_avg_pool1d(x[:, None], size)[:, 0])
