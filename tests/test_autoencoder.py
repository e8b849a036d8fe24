"""Tests of the convolutional autoencoder scorer (and the training helpers it shares)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import textured, with_defect

import vlad
from vlad.errors import EmptyReferenceSetError, NotFittedError
from vlad.scorers.autoencoder import aspect_size, ssim_map, train_loop

PARAMS = dict(weights="tiny", image_size=64, train_steps=12, batch_size=4, random_state=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and the machine is shared
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fitted():
    return vlad.create_scorer("autoencoder", **PARAMS).fit([textured(i) for i in range(4)])


def test_training_loss_decreases(fitted):
    losses = fitted.loss_history_
    assert len(losses) == PARAMS["train_steps"] and not fitted.interrupted_
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])


def test_map_is_in_units_of_the_references_error(fitted):
    # each of the two error terms is divided by its mean over the references, so on the references
    # themselves the map averages about 1 + 1 (smoothing and resizing keep the mean up to borders)
    assert all(v > 0 for v in fitted.error_scale_)
    maps = fitted.predict([textured(i) for i in range(4)]).anomaly_maps
    assert np.mean([m.mean() for m in maps]) == pytest.approx(2.0, rel=0.15)


def test_predict_finite_maps_at_image_size(fitted):
    res = fitted.predict([textured(50), with_defect(textured(51)), textured(52, size=80)[:, :70]])
    assert res.image_scores.shape == (3,) and np.isfinite(res.image_scores).all()
    assert res.anomaly_maps[0].shape == (96, 96) and res.anomaly_maps[2].shape == (80, 70)
    assert all(np.isfinite(m).all() for m in res.anomaly_maps)


def test_save_load_identical(fitted, tmp_path):
    imgs = [textured(60), with_defect(textured(61))]
    before = fitted.predict(imgs)
    loaded = vlad.scorers.base.load_scorer(fitted.save(tmp_path / "ae"))
    after = loaded.predict(imgs)
    np.testing.assert_array_equal(before.image_scores, after.image_scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)
    assert loaded.loss_history_ == fitted.loss_history_
    assert loaded.error_scale_ == fitted.error_scale_


@pytest.mark.parametrize("name", ["autoencoder", "draem"])
def test_default_size_keeps_the_references_aspect_ratio(name, tmp_path):
    # tall references (like KolektorSDD's 203 x 512) must not be squashed into a square
    refs = [np.ascontiguousarray(textured(i, size=160)[:, :64]) for i in range(2)]
    params = {**PARAMS, "image_size": None, "train_steps": 2}
    scorer = vlad.create_scorer(name, **params).fit(refs)
    assert scorer.size_ == (416, 160)
    loaded = vlad.scorers.base.load_scorer(scorer.save(tmp_path / name))
    assert loaded.size_ == (416, 160)
    res = loaded.predict([refs[0]])
    assert res.anomaly_maps[0].shape == (160, 64)


def test_aspect_size_rounds_to_multiples():
    square = [vlad.images.load_image(np.zeros((512, 512, 3), np.float32))]
    wide = [vlad.images.load_image(np.zeros((100, 300, 3), np.float32))]
    assert aspect_size(square, 256, 32) == (256, 256)
    assert aspect_size(wide, 256, 32) == (160, 448)


def test_seeded_training_is_deterministic(fitted):
    again = vlad.create_scorer("autoencoder", **PARAMS).fit([textured(i) for i in range(4)])
    assert again.loss_history_ == fitted.loss_history_


def test_errors():
    with pytest.raises(EmptyReferenceSetError):
        vlad.create_scorer("autoencoder", **PARAMS).fit([])
    with pytest.raises(NotFittedError):
        vlad.create_scorer("autoencoder", **PARAMS).predict([textured(0)])
    with pytest.raises(ValueError, match="multiples of 32"):
        vlad.create_scorer("autoencoder", **{**PARAMS, "image_size": 70}).fit([textured(0)])
    with pytest.raises(ValueError, match="trained from scratch"):
        vlad.create_scorer("autoencoder", **{**PARAMS, "weights": "/some/path"}).fit([textured(0)])


def test_train_loop_keeps_progress_on_keyboard_interrupt():
    def step(i):
        if i == 3:
            raise KeyboardInterrupt
        return float(10 - i)

    losses, interrupted = train_loop(step, 10, "test")
    assert interrupted and losses == [10.0, 9.0, 8.0]


def test_ssim_map_identity_and_difference():
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim_map(x, x), torch.ones(2, 32, 32), atol=1e-5)
    y = x.clone()
    y[:, :, 10:20, 10:20] = 1 - y[:, :, 10:20, 10:20]
    s = ssim_map(x, y)
    assert s[:, 15, 15].max() < 0.5 and s[:, 0, 0].min() > 0.99
