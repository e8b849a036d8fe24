"""Tests of the DRAEM scorer (reduced width, Perlin-noise synthetic anomalies)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import textured, with_defect

import vlad
from vlad.errors import EmptyReferenceSetError, InvalidParameterError
from vlad.scorers.autoencoder import AutoEncoder
from vlad.scorers.draem import DRAEM, focal_loss
from vlad.scorers.scratch import to_canvas

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


def test_raw_maps_are_the_probability_and_the_reconstruction_error(fitted):
    images = [textured(53), textured(54, size=80)[:, :40]]
    raw, boxes = fitted.raw_error_maps(images)
    assert fitted.TERMS == ("prob", "ssim", "l2") and raw.shape == (2, 3, 64, 64)
    assert raw[:, 0].min() >= 0.0 and raw[:, 0].max() <= 1.0
    assert boxes[0] == (0, 0, 64, 64) and boxes[1] == (0, 16, 64, 32)  # the narrow image, letterboxed
    # terms 1 and 2 are the reconstructive network's error, as the autoencoder measures its own
    x, _ = to_canvas(vlad.images.load_images(images), fitted.size_)
    with torch.inference_mode():
        dssim, sq = AutoEncoder._error_terms(x, fitted.model_.reconstructive(x))
    torch.testing.assert_close(raw[:, 1], dssim, rtol=1e-4, atol=1e-5)  # batch of 2 vs one at a time
    torch.testing.assert_close(raw[:, 2], sq, rtol=1e-4, atol=1e-5)
    assert sq.max() > 0


@pytest.fixture(scope="module")
def eight():
    return [textured(i) for i in range(8)]


def test_the_line_chooses_which_maps_it_scores(eight):
    # None searches the probability, the reconstruction error and both; a given value is the only choice
    searched = vlad.create_scorer("draem", **PARAMS).fit(eight)
    assert {c.terms for c in searched._candidates()} == {(0,), (1, 2), (0, 1, 2)}
    assert searched.map_rule_.terms in {(0,), (1, 2), (0, 1, 2)}
    assert {r.split()[-1] for r in (c["rule"] for c in searched.selection_report().candidates)} == {
        "prob", "ssim+l2", "prob+ssim+l2"}
    # how long it trains is judged by the probability's candidates alone (DRAEM.JUDGED_TERMS)
    assert all(label.endswith(" prob") for _, _, label in searched.selection_report().curve)
    for name, terms in DRAEM.TERM_CHOICES.items():
        fixed = vlad.create_scorer("draem", **PARAMS, error_terms=name).fit(eight)
        assert fixed.map_rule_.terms == terms and {c.terms for c in fixed._candidates()} == {terms}
    # without a selection (too few references) the paper's map, or the one given
    assert vlad.create_scorer("draem", **PARAMS).fit(eight[:3]).map_rule_.terms == (0,)
    assert vlad.create_scorer("draem", **PARAMS, error_terms="ssim+l2").fit(eight[:3]).map_rule_.terms == (1, 2)


def test_no_weights_are_kept_from_the_first_part_of_the_budget(eight, monkeypatch):
    # DRAEM.MIN_KEPT_FRACTION reaches the training loop: with all of the budget excluded but its end, the
    # weights kept and the rule's step are the last evaluation's, whatever the earlier ones scored
    monkeypatch.setattr(DRAEM, "MIN_KEPT_FRACTION", 1.0)
    scorer = vlad.create_scorer("draem", **{**PARAMS, "train_steps": 30}).fit(eight)
    assert scorer.train_log_["best_step"] == 30 and scorer.selection_report().step == 30
    assert len(scorer.selection_report().curve) > 1


@pytest.mark.parametrize("bad", ["ssim", "l2", "prob+l2", "", 3])
def test_bad_error_terms_are_refused(bad):
    with pytest.raises(InvalidParameterError, match="error_terms"):
        vlad.create_scorer("draem", **PARAMS, error_terms=bad)


def test_a_draem_saved_with_the_probability_alone_still_loads(fitted, tmp_path):
    # before the reconstruction error was a candidate, a DRAEM saved the statistics of one raw map: it
    # loads and scores as it did (its rule uses the probability alone)
    import json

    from safetensors.torch import load_file, save_file

    from vlad.serialization import sha256_file

    scorer = vlad.create_scorer("draem", **PARAMS, error_terms="prob").fit([textured(i) for i in range(4)])
    imgs = [textured(62), with_defect(textured(63))]
    before = scorer.predict(imgs)
    folder = scorer.save(tmp_path / "draem")
    files = list(folder.glob("*.safetensors"))
    assert len(files) == 1
    tensors = load_file(files[0])
    save_file({k: (v[:1].contiguous() if k in ("stats.mean", "stats.var", "stats.global") else v)
               for k, v in tensors.items()}, files[0])
    config = json.loads((folder / "config.json").read_text())
    config["sha256"][files[0].name] = sha256_file(files[0])  # as that older vlad recorded its own file
    (folder / "config.json").write_text(json.dumps(config))
    loaded = vlad.scorers.base.load_scorer(folder)
    assert loaded.stats_["mean"].shape[0] == 1
    np.testing.assert_array_equal(loaded.predict(imgs).image_scores, before.image_scores)


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
