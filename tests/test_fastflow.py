"""FastFlow (vlad.scorers.fastflow): 2D normalizing flows on CNN features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlad
from conftest import textured, with_defect

PARAMS = dict(weights="tiny", epochs=6, batch_size=8, flow_steps=2, hidden_ratio=0.5)


@pytest.fixture(scope="module")
def refs():
    return [textured(i) for i in range(4)]


@pytest.fixture(scope="module")
def fitted(refs):
    return vlad.create_scorer("fastflow", **PARAMS).fit(refs)


def test_maps_at_image_size_and_defect_scores_higher(fitted):
    odd = textured(7, size=80)[:, :72]
    res = fitted.predict([textured(50), textured(51), with_defect(textured(100)), odd])
    assert res.anomaly_maps[0].shape == (96, 96) and res.anomaly_maps[3].shape == (80, 72)
    assert all(np.isfinite(m).all() and m.std() > 0 for m in res.anomaly_maps)
    assert res.image_scores[2] > res.image_scores[[0, 1, 3]].max()


def test_training_reduces_the_loss(fitted):
    hist = fitted.loss_history_
    assert len(hist) == 6 and hist[-1] < hist[0] - 0.1
    assert fitted.epochs_ == 6


def test_automatic_epoch_budget(refs):
    scorer = vlad.create_scorer("fastflow", weights="tiny", flow_steps=1, image_steps=6).fit(refs[:3])
    assert scorer.epochs_ == 2 and len(scorer.loss_history_) == 2


def test_deterministic_given_random_state(refs, fitted):
    images = [textured(80), with_defect(textured(81))]
    again = vlad.create_scorer("fastflow", **PARAMS).fit(refs).predict(images)
    np.testing.assert_array_equal(fitted.predict(images).anomaly_maps, again.anomaly_maps)
    other = vlad.create_scorer("fastflow", **PARAMS, random_state=1).fit(refs).predict(images)
    assert not np.allclose(other.anomaly_maps, again.anomaly_maps)


def test_save_load_identical(fitted, tmp_path):
    images = [textured(70), with_defect(textured(71))]
    before = fitted.predict(images)
    loaded = vlad.scorers.base.load_scorer(fitted.save(tmp_path / "fastflow"))
    after = loaded.predict(images)
    np.testing.assert_array_equal(before.image_scores, after.image_scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)
    assert loaded.loss_history_ == fitted.loss_history_


def test_interrupt_keeps_trained_head(refs, monkeypatch):
    calls = {"n": 0}
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # one step per epoch here: interrupt during the second epoch
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    scorer = vlad.create_scorer("fastflow", **PARAMS).fit(refs[:2])
    assert scorer.interrupted_ and len(scorer.loss_history_) == 1
    assert np.isfinite(scorer.predict(refs[:1]).image_scores).all()
    calls["n"] = 1  # the next step is the first of the fit: nothing learned -> a clear error
    with pytest.raises(vlad.VladError, match="interrupted before the first epoch"):
        vlad.create_scorer("fastflow", **PARAMS).fit(refs[:2])


def test_errors(refs):
    with pytest.raises(vlad.EmptyReferenceSetError):
        vlad.create_scorer("fastflow", weights="tiny").fit([])
    with pytest.raises(vlad.NotFittedError):
        vlad.create_scorer("fastflow", weights="tiny").predict(refs[:1])
