"""Tests of the EfficientAD-S style scorer (tiny teacher twin, small PDN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import textured, with_defect

import vlad
from vlad.errors import EmptyReferenceSetError
from vlad.scorers.efficientad import PDNSmall, hard_feature_loss, pdn_grid

PARAMS = dict(weights="tiny", image_size=64, train_steps=10, batch_size=4, lr=1e-3, random_state=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted():
    return vlad.create_scorer("efficientad", **PARAMS).fit([textured(i) for i in range(4)])


def test_loss_decreases_and_quantiles_ordered(fitted):
    losses = fitted.loss_history_
    assert len(losses) == PARAMS["train_steps"] and np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])
    assert float(fitted.q_a_) < float(fitted.q_b_)


def test_predict_finite_maps_at_image_size(fitted):
    res = fitted.predict([textured(50), with_defect(textured(51)), textured(52, size=80)[:, :70]])
    assert res.image_scores.shape == (3,) and np.isfinite(res.image_scores).all()
    assert res.anomaly_maps[0].shape == (96, 96) and res.anomaly_maps[2].shape == (80, 70)
    assert all(np.isfinite(m).all() for m in res.anomaly_maps)


def test_save_load_identical(fitted, tmp_path):
    imgs = [textured(60), with_defect(textured(61))]
    before = fitted.predict(imgs)
    after = vlad.scorers.base.load_scorer(fitted.save(tmp_path / "ead")).predict(imgs)
    np.testing.assert_array_equal(before.image_scores, after.image_scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)


def test_pdn_grid_matches_network():
    assert pdn_grid(256) == 56
    for s in (64, 100):
        assert PDNSmall(8, width=4)(torch.zeros(1, 3, s, s)).shape[-1] == pdn_grid(s)


def test_hard_feature_loss_uses_only_hardest():
    t = torch.zeros(1, 1, 100, 10)
    s = torch.zeros(1, 1, 100, 10)
    s[0, 0, 0, 0] = 3.0  # one hard element out of 1000
    assert hard_feature_loss(t, s, 0.999) == pytest.approx(9.0)


def test_errors():
    with pytest.raises(EmptyReferenceSetError):
        vlad.create_scorer("efficientad", **PARAMS).fit(None)
    with pytest.raises(ValueError, match="too small"):
        vlad.create_scorer("efficientad", **{**PARAMS, "image_size": 16}).fit([textured(0)])
