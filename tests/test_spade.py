"""SPADE (vlad.scorers.spade): image kNN + pixel kNN within the nearest references."""

from __future__ import annotations

import numpy as np
import pytest

import vlad
from conftest import textured, with_defect


@pytest.fixture(scope="module")
def refs():
    return [textured(i) for i in range(4)]


@pytest.fixture(scope="module")
def fitted(refs):
    return vlad.create_scorer("spade", weights="tiny").fit(refs)  # k=50 capped at the 4 references


def test_maps_at_image_size_and_defect_scores_higher(fitted):
    odd = textured(7, size=80)[:, :72]
    res = fitted.predict([textured(50), textured(51), with_defect(textured(100)), odd])
    assert res.anomaly_maps[0].shape == (96, 96) and res.anomaly_maps[3].shape == (80, 72)
    assert all(np.isfinite(m).all() and m.std() > 0 for m in res.anomaly_maps)
    assert res.image_scores[2] > res.image_scores[[0, 1, 3]].max()
    defect_map = res.anomaly_maps[2]
    assert defect_map[30:50, 60:80].mean() > 2 * defect_map[:20, :20].mean()


def test_a_reference_scores_zero_with_one_neighbour(refs):
    """k=1: a reference's nearest image is itself, and every patch finds itself: score 0, map 0."""
    scorer = vlad.create_scorer("spade", weights="tiny", k=1, sigma=0).fit(refs)
    res = scorer.predict([refs[2], textured(60)])
    assert res.image_scores[0] < 1e-3 < res.image_scores[1]
    assert np.abs(res.anomaly_maps[0]).max() < 1e-2 < res.anomaly_maps[1].max()


def test_save_load_identical(fitted, tmp_path):
    images = [textured(70), with_defect(textured(71))]
    before = fitted.predict(images)
    after = vlad.scorers.base.load_scorer(fitted.save(tmp_path / "spade")).predict(images)
    np.testing.assert_array_equal(before.image_scores, after.image_scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)


def test_errors(refs):
    with pytest.raises(vlad.EmptyReferenceSetError):
        vlad.create_scorer("spade", weights="tiny").fit(None)
    with pytest.raises(vlad.NotFittedError):
        vlad.create_scorer("spade", weights="tiny").predict(refs[:1])
    with pytest.raises(vlad.VladError, match="k"):
        vlad.create_scorer("spade", weights="tiny", k=0).fit(refs[:1])
