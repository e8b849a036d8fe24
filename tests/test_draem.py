"""Tests of the DRAEM scorer (reduced width, Perlin-noise synthetic anomalies)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import textured, with_defect

import vlad
from vlad.errors import EmptyReferenceSetError
from vlad.scorers.draem import focal_loss

PARAMS = dict(weights="tiny", image_size=64, train_steps=12, batch_size=4, random_state=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted():
    return vlad.create_scorer("draem", **PARAMS).fit([textured(i) for i in range(4)])


def test_training_loss_decreases(fitted):
    losses = fitted.loss_history_
    assert len(losses) == PARAMS["train_steps"]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])


def test_predict_finite_maps_at_image_size(fitted):
    res = fitted.predict([textured(50), with_defect(textured(51)), textured(52, size=80)[:, :70]])
    assert res.image_scores.shape == (3,)
    assert res.anomaly_maps[1].shape == (96, 96) and res.anomaly_maps[2].shape == (80, 70)
    assert all(np.isfinite(m).all() for m in res.anomaly_maps)


def test_raw_maps_are_probabilities(fitted):
    raw, boxes = fitted.raw_error_maps([textured(53), textured(54, size=80)[:, :40]])
    assert raw.shape == (2, 1, 64, 64) and raw.min() >= 0.0 and raw.max() <= 1.0
    assert boxes[0] == (0, 0, 64, 64) and boxes[1] == (0, 16, 64, 32)  # the narrow image, letterboxed


def test_early_stopping_on_held_out_references():
    # with lr=0 the held-out loss cannot improve on its first evaluation (only batch-norm statistics move):
    # training stops one evaluation later, long before its budget, keeping the best held-out weights
    params = {**PARAMS, "train_steps": 200, "lr": 0.0, "patience": 1, "selection": "loss"}
    scorer = vlad.create_scorer("draem", **params).fit([textured(i) for i in range(8)])
    log = scorer.train_log_
    assert log["stopped"] == "early" and len(scorer.loss_history_) < 30
    best = min(v for _, v in log["val_losses"])
    assert dict(map(tuple, log["val_losses"]))[log["best_step"]] == best


def test_save_load_identical(fitted, tmp_path):
    imgs = [textured(60), with_defect(textured(61))]
    before = fitted.predict(imgs)
    after = vlad.scorers.base.load_scorer(fitted.save(tmp_path / "draem")).predict(imgs)
    np.testing.assert_array_equal(before.image_scores, after.image_scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)


def test_empty_references():
    with pytest.raises(EmptyReferenceSetError):
        vlad.create_scorer("draem", **PARAMS).fit(None)


def test_focal_loss_prefers_correct_segmentation():
    target = torch.zeros(1, 8, 8)
    target[0, 2:5, 2:5] = 1
    good = torch.stack([1 - target, target], dim=1) * 8 - 4
    assert focal_loss(good, target) < 0.01 < focal_loss(-good, target)
