"""Tests of the STPM student-teacher scorer (tiny teacher twin)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import textured, with_defect

import vlad
from vlad.errors import EmptyReferenceSetError

PARAMS = dict(weights="tiny", train_steps=8, batch_size=4, lr=0.05, random_state=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted():
    return vlad.create_scorer("stpm", **PARAMS).fit([textured(i) for i in range(4)])


def test_student_is_not_the_teacher_and_loss_decreases(fitted):
    t = dict(fitted.teacher_.model.named_parameters())
    s = dict(fitted.student_.named_parameters())
    assert any(not torch.equal(t[k], s[k]) for k in t)
    assert all(not p.requires_grad for p in fitted.teacher_.model.parameters())
    losses = fitted.loss_history_
    assert len(losses) == PARAMS["train_steps"] and losses[-1] < 0.95 * losses[0]


def test_predict_finite_maps_at_image_size(fitted):
    res = fitted.predict([textured(50), with_defect(textured(51)), textured(52, size=80)[:, :70]])
    assert res.image_scores.shape == (3,) and np.isfinite(res.image_scores).all()
    assert res.anomaly_maps[0].shape == (96, 96) and res.anomaly_maps[2].shape == (80, 70)
    assert all(np.isfinite(m).all() and m.min() >= 0 for m in res.anomaly_maps)


def test_save_load_identical(fitted, tmp_path):
    imgs = [textured(60), with_defect(textured(61))]
    before = fitted.predict(imgs)
    after = vlad.scorers.base.load_scorer(fitted.save(tmp_path / "stpm")).predict(imgs)
    np.testing.assert_array_equal(before.image_scores, after.image_scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)


def test_errors():
    with pytest.raises(EmptyReferenceSetError):
        vlad.create_scorer("stpm", **PARAMS).fit([])
    with pytest.raises(ValueError, match="layers"):
        vlad.create_scorer("stpm", **{**PARAMS, "layers": (0, 5)}).fit([textured(0)])
