"""Decisions a line worker can trust: thresholds with a stated false-alarm rate, what each guarantee
rests on, non-finite results refused, tampered saved models refused, leave-one-out state kept whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlad
from vlad.detector.calibration import conformal_threshold, held_out_indices, references_for_rate
from vlad.errors import IntegrityError, InvalidParameterError, NonFiniteScoreError, VladError
from vlad.scorers.base import BaseScorer
from vlad.types import AnomalyResult

from conftest import textured, with_defect
from test_detector import SPEC, _refs  # registers the toy scorers


def _grid(images, size=32):
    return torch.cat([F.interpolate(torch.from_numpy(im.pixels).permute(2, 0, 1)[None], size=(size, size),
                                    mode="bilinear", align_corners=False) for im in images])


class ToyTrained(BaseScorer):
    """Trained on its references (not incremental): distance of each pixel from the references' mean."""

    requires_references = True

    def __init__(self, device="cpu", batch_size=8):
        self.device = device
        self.batch_size = batch_size

    def _fit(self, references):
        self.mean_ = _grid(references).mean(dim=0)
        self.trained_on_ = [r.name for r in references]

    def _predict_batch(self, images):
        d = (_grid(images) - self.mean_).abs().sum(dim=1)
        return d.flatten(1).amax(dim=1), d


class ToyNaN(BaseScorer):
    """A broken scorer: NaN wherever the image is bright."""

    def __init__(self, device="cpu", batch_size=8):
        self.device = device
        self.batch_size = batch_size

    def _fit(self, references):
        self.ready_ = True

    def _predict_batch(self, images):
        x = _grid(images).mean(dim=1)
        m = torch.where(x > 0.9, torch.tensor(float("nan")), x)
        return m.flatten(1).amax(dim=1), m


class ToyInf(ToyNaN):
    """A broken scorer: +infinity wherever the image is bright (a calibrated sigmoid would make it 1)."""

    def _predict_batch(self, images):
        x = _grid(images).mean(dim=1)
        m = torch.where(x > 0.9, torch.tensor(float("inf")), x)
        return m.flatten(1).amax(dim=1), m


for _name, _cls in (("toytrained_c", ToyTrained), ("toynan_c", ToyNaN), ("toyinf_c", ToyInf)):
    if _name not in vlad.list_scorers():
        vlad.register_scorer(_name)(_cls)


# -- the rule ----------------------------------------------------------------------------------
def test_conformal_threshold_by_hand():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    # n = 5, alpha = 0.2: k = ceil(6 * 0.8) = 5 -> the 5th smallest, bound (6 - 5) / 6
    assert conformal_threshold(values, 0.2) == (5.0, "conformal", pytest.approx(1 / 6))
    # alpha = 0.4: k = ceil(6 * 0.6) = 4 -> 4.0, bound 2/6
    assert conformal_threshold(values, 0.4) == (4.0, "conformal", pytest.approx(2 / 6))
    # alpha = 0.05 needs 19 values: the largest, guaranteeing only 1/6
    assert conformal_threshold(values, 0.05) == (5.0, "best-available", pytest.approx(1 / 6))
    assert references_for_rate(0.05) == 19 and references_for_rate(0.2) == 4 and references_for_rate(0.01) == 99
    values = np.arange(1.0, 20.0)  # n = 19 = exactly enough for 5%: k = ceil(20 * 0.95) = 19
    assert conformal_threshold(values, 0.05) == (19.0, "conformal", pytest.approx(1 / 20))
    values = np.arange(1.0, 40.0)  # n = 39: k = ceil(40 * 0.95) = 38
    assert conformal_threshold(values, 0.05)[0] == 38.0
    with pytest.raises(VladError, match="NaN"):
        conformal_threshold([1.0, float("nan")], 0.1)


@pytest.mark.parametrize("n, alpha", [(19, 0.05), (40, 0.05), (9, 0.2), (30, 0.2)])
def test_measured_false_alarm_rate_within_alpha(n, alpha):
    """Over many draws of n exchangeable normal scores, the share of new normal scores above the
    threshold stays within alpha (plus binomial noise); a quantile-plus-margin rule would not."""
    rng = np.random.default_rng(0)
    draws, new = 4000, 50
    rates = []
    for _ in range(draws):
        thr, rule, bound = conformal_threshold(rng.gamma(2.0, size=n), alpha)
        assert rule == "conformal" and bound <= alpha
        rates.append(float((rng.gamma(2.0, size=new) > thr).mean()))
    mean = float(np.mean(rates))
    noise = 3 * np.sqrt(alpha * (1 - alpha) / (draws * new)) * 3  # draws are correlated within a threshold
    assert mean <= alpha + noise
    assert mean >= alpha / 3  # not trivially conservative either


def test_held_out_indices():
    assert held_out_indices(1, 0.25) == held_out_indices(3, 0.25) == []  # fewer than 2 left to train on
    assert held_out_indices(4, 0.25) == [0, 3] and held_out_indices(8, 0.25) == [0, 7]
    assert len(held_out_indices(32, 0.25)) == 8 and len(set(held_out_indices(32, 0.25))) == 8


# -- the detector's decisions --------------------------------------------------------------------
def test_threshold_info_in_plain_words():
    det = vlad.create_detector(SPEC).fit(_refs(4))
    info = det.threshold_info()
    assert info.describe() == ("4 references: the lowest false-alarm rate that can be guaranteed is 20%; "
                               "add 15 more for 5%")
    det.set_thresholds(false_alarm_rate=0.2)
    info = det.threshold_info()
    assert info.rule == "conformal" and info.references_needed == 0
    assert info.describe() == "4 references: at most 20% of good parts will be flagged (asked for 20%)"
    det.set_thresholds(image=0.9)
    assert det.threshold_info().rule == "override" and det.threshold_info().guaranteed_rate is None
    zero = vlad.create_detector(SPEC).fit()
    assert zero.threshold_info().rule == "prior" and zero.image_threshold == 0.5
    assert "no guaranteed false-alarm rate" in zero.threshold_info().describe()
    with pytest.raises(InvalidParameterError, match="false_alarm_rate"):
        vlad.create_detector(SPEC, false_alarm_rate=5)


def test_enough_references_guarantee_the_rate(defect_image):
    det = vlad.create_detector("toyfew_d", false_alarm_rate=0.1).fit(_refs(12))
    info = det.threshold_info()
    # n = 12, alpha = 0.1: k = ceil(13 * 0.9) = 12 -> the largest; bound 1/13 <= 0.1
    assert info.rule == "conformal" and info.guaranteed_rate == pytest.approx(1 / 13)
    loo = det.reference_scores()
    assert det.image_threshold == pytest.approx(float(np.sort(loo)[11]))
    res = det.predict([textured(200), defect_image])
    assert res.labels[1] and res.masks[1].any()


def test_trained_scorer_is_calibrated_on_held_out_references():
    refs = _refs(8)
    det = vlad.create_detector("toyzero_d+toytrained_c").fit(refs)
    trained = det.scorers["toytrained_c"]
    held = det._calibrated().held_out
    assert held == [0, 7] and len(trained.trained_on_) == 6  # never trained on what calibrates it
    info = det.threshold_info()
    assert info.path == "held-out" and info.n_calibration == 2
    assert "2 of them held out" in info.describe()
    # in-sample scores would be lower than held-out ones: the held-out calibration is not fooled by them
    in_sample = trained.predict([refs[1], refs[2]]).image_scores
    held_out = trained.predict([refs[0], refs[7]]).image_scores
    assert held_out.min() > in_sample.min()
    det.add_references(_refs(4, start=30))
    assert len(det.scorers["toytrained_c"].trained_on_) == 12 - 3


def test_nan_is_refused_never_labelled_normal():
    bright = np.full((40, 40, 3), 250, np.uint8)
    scorer = vlad.create_scorer("toynan_c").fit()
    with pytest.raises(NonFiniteScoreError, match=r"toynan_c.*\['<array>'\]"):
        scorer.predict([textured(1), bright])
    det = vlad.create_detector("toyzero_d+toynan_c").fit()
    with pytest.raises(NonFiniteScoreError):
        det.predict([bright])
    det = vlad.create_detector("toyzero_d+toyinf_c").fit(_refs(3))  # reference calibration: sigmoid(inf) = 1
    with pytest.raises(NonFiniteScoreError, match="toyinf_c"):
        det.predict([textured(1), bright])
    # and a NaN reaching a threshold anyway counts as anomalous
    res = AnomalyResult(np.array([np.nan, 0.1]), np.zeros((2, 2, 2))).with_thresholds(0.5, 0.5)
    assert res.labels.tolist() == [True, False]


# -- saved detectors ------------------------------------------------------------------------------
def _saved(tmp_path):
    det = vlad.create_detector(SPEC).fit(_refs(3))
    return det, det.save(tmp_path / "det")


def test_tampered_state_is_refused(tmp_path):
    det, folder = _saved(tmp_path)
    state = folder / "toyfew_d" / "state.safetensors"
    raw = bytearray(state.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = b"\xff" * (len(raw) - header)  # every tensor byte 0xFF: NaN floats, header intact
    state.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="changed after it was saved"):
        vlad.load(folder)


def test_one_flipped_bit_is_refused(tmp_path):
    det, folder = _saved(tmp_path)
    refs = folder / "references.safetensors"
    raw = bytearray(refs.read_bytes())
    raw[-5] ^= 0x01
    refs.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="references.safetensors"):
        vlad.load(folder)


def test_ambiguous_folder_is_refused(tmp_path):
    det, folder = _saved(tmp_path)
    vlad.create_scorer("toyfew_d").fit(_refs(2)).save(folder)  # a scorer saved over the detector's folder
    with pytest.raises(VladError, match="ambiguous"):
        vlad.load(folder)


def test_remove_reference_rejects_odd_keys():
    det = vlad.create_detector(SPEC).fit(_refs(3))
    for bad in (0.5, None, True):
        with pytest.raises(InvalidParameterError, match="index"):
            det.remove_reference(bad)
        with pytest.raises(InvalidParameterError, match="index"):
            det.scorers["toyfew_d"].remove_reference(bad)


# -- real scorers on tiny twins --------------------------------------------------------------------
@pytest.mark.slow
def test_anomalydino_leave_one_out_then_remove_keeps_state(tmp_path):
    """The reported repro: calibrating (leave-one-out copies) and then removing a reference used to
    empty ``ref_info_`` while memory remained, and saving failed."""
    det = vlad.create_detector("anomalydino", weights="tiny", scorer_options={"anomalydino": {"rotations": 2}})
    det.fit(_refs(4))
    det.predict([textured(9)])  # calibrates
    det.remove_reference(0)
    dino = det.scorers["anomalydino"]
    assert len(dino.ref_info_) == len(dino.memory_chunks_) == 3
    loo = dino.leave_one_out_scores()
    assert loo.shape == (3,) and np.isfinite(loo).all() and (loo > 0).all()
    before = det.predict([textured(9), with_defect(textured(10))])
    again = vlad.load(det.save(tmp_path / "d")).predict([textured(9), with_defect(textured(10))])
    np.testing.assert_array_equal(again.image_scores, before.image_scores)
    # the leave-one-out view leaves the scorer as it was
    view = dino.without_reference(1)
    assert len(view.ref_info_) == 2 and len(dino.ref_info_) == 3
    assert all(a["block"] is b for a, b in zip(dino.ref_info_, dino.memory_chunks_))


@pytest.mark.slow
def test_winclip_plus_calibrated_part_by_part():
    """WinCLIP+ is a zero-shot probability plus a few-shot distance: each part gets its own calibration
    (at k = 0 the probability as is; at k = 1 both from the reference's views, or with the views off the
    probability as is and the distance by the self prior; from k = 2: from the references)."""
    det = vlad.create_detector("winclip", weights="tiny", object_name="plate").fit()
    assert {n: z.kind for n, z in det.normalisers.items()} == {"winclip": "probability"}
    det.add_references(_refs(1))
    assert {n: z.kind for n, z in det.normalisers.items()} == {
        "winclip/zero_shot": "reference", "winclip/few_shot": "reference"}
    no_views = vlad.create_detector("winclip", weights="tiny", object_name="plate", reference_views=0).fit(_refs(1))
    assert {n: z.kind for n, z in no_views.normalisers.items()} == {
        "winclip/zero_shot": "probability", "winclip/few_shot": "self"}
    res = det.predict([textured(5)])
    comp = res.components["winclip"]
    assert set(comp.components) == {"zero_shot", "few_shot"}
    np.testing.assert_allclose(comp.image_scores, (comp.components["zero_shot"].image_scores
                                                   + comp.components["few_shot"].image_scores) / 2, rtol=1e-5)
    det.add_references(_refs(2, start=10))
    assert {z.kind for z in det.normalisers.values()} == {"reference"}
    json.dumps(det._calibrated().to_dict())  # saved as plain JSON


# -- one reference: its views stand in for other good parts --------------------------------------
def test_one_reference_calibrates_on_its_views_and_says_it_is_an_assumption(defect_image):
    det = vlad.create_detector(SPEC, false_alarm_rate=0.2).fit(_refs(1))
    info = det.threshold_info()
    assert (info.rule, info.path, info.n_references, info.n_calibration) == ("views-assumption",
                                                                          "reference-views", 1, 8)
    assert info.guaranteed_rate == pytest.approx(1 / 9) and info.references_needed == 3
    words = info.describe()
    assert "ASSUMING" in words and "8 jittered views" in words and "not a guarantee" in words
    assert "add 3 more good images" in words
    cal = det._calibrated()
    assert det.image_threshold == pytest.approx(max(cal.reference_scores))  # 8 views, alpha 0.2: the largest
    # a prior would judge each map against itself and flag every good part; the views do not
    res = det.predict([textured(200 + i) for i in range(6)] + [defect_image])
    assert res.labels[-1] and not res.labels[:-1].all()
    # the views are reproducible, and 0 views keeps the prior
    again = vlad.create_detector(SPEC, false_alarm_rate=0.2).fit(_refs(1))
    assert again.image_threshold == det.image_threshold
    prior = vlad.create_detector(SPEC, reference_views=0).fit(_refs(1))
    assert prior.threshold_info().rule == "prior"
    with pytest.raises(InvalidParameterError, match="reference_views"):
        vlad.create_detector(SPEC, reference_views=1)
    # a second reference brings the conformal rule back
    det.add_references(_refs(1, start=40))
    assert det.threshold_info().rule in ("conformal", "best-available")


def test_views_are_jittered_copies_of_the_reference():
    from vlad.detector.views import reference_views
    from vlad.images import LoadedImage

    ref = LoadedImage(textured(5, size=64), "ref.png")
    views = reference_views(ref, 4, seed=0)
    assert [v.name for v in views] == [f"ref.png#view{i}" for i in range(4)]
    assert all(v.data.shape == ref.data.shape and v.data.dtype == np.uint8 for v in views)
    diffs = [float(np.abs(v.pixels - ref.pixels).mean()) for v in views]
    assert all(0.0 < d < 0.15 for d in diffs)  # moved a little, not replaced
    assert all(np.array_equal(a.data, b.data) for a, b in zip(views, reference_views(ref, 4, seed=0)))
