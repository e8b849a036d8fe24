"""The tiered detector: spec parsing and option routing, tiers, calibration, thresholds, save/load.

Most tests use two small scorers defined here (a zero-shot one and a few-shot one, real BaseScorer
subclasses); the last ones use the real scorers with tiny twins when they are available.
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlad
from vlad import EmptyReferenceSetError, NotFittedError, UnknownScorerError, VladError
from vlad.errors import IntegrityError, InvalidImageError, InvalidParameterError
from vlad.serialization import sha256_file
from vlad.scorers.base import BaseScorer, FewShotMixin

from conftest import textured, with_defect, write_bad_files


def _grid(images, size=32):
    return torch.cat([F.interpolate(torch.from_numpy(im.pixels).permute(2, 0, 1)[None], size=(size, size),
                                    mode="bilinear", align_corners=False) for im in images])


class ToyZero(BaseScorer):
    """Zero-shot: distance of each pixel's colour from the image's median colour."""

    def __init__(self, object_name=None, weights="pretrained", device="cpu", batch_size=8, gain=1.0):
        self.object_name = object_name
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.gain = gain

    def _fit(self, references):
        self.fitted_gain_ = float(self.gain)

    def _predict_batch(self, images):
        x = _grid(images)
        med = x.flatten(2).median(dim=2).values[..., None, None]
        maps = (x - med).abs().sum(dim=1) * self.fitted_gain_ * 10.0  # its own, arbitrary units
        return maps.flatten(1).max(dim=1).values, maps

    def _get_state(self):
        return {}, {"gain": self.fitted_gain_}

    def _set_state(self, tensors, meta):
        self.fitted_gain_ = float(meta["gain"])


class ToyFew(FewShotMixin, BaseScorer):
    """Few-shot: 1-NN L2 distance of 4x4 patch colours to a memory of reference patches."""

    requires_references = True


    def __init__(self, weights="pretrained", device="cpu", batch_size=8, patch=4):
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.patch = patch

    def _embed_references(self, images):
        feats = F.avg_pool2d(_grid(images), self.patch)  # (B, 3, h, w)
        return [f.flatten(1).T.contiguous() for f in feats]

    def _fit(self, references):
        self.memory_chunks_, self.reference_names_ = [], []
        with torch.inference_mode():
            self.memory_chunks_.extend(self._embed_references(references))
        self.reference_names_.extend(r.name for r in references)
        self._memory_changed()

    def _memory_changed(self):
        self.memory_ = torch.cat(self.memory_chunks_) if self.memory_chunks_ else torch.empty(0, 3)

    def _predict_batch(self, images):
        feats = F.avg_pool2d(_grid(images), self.patch)
        b, c, h, w = feats.shape
        q = feats.flatten(2).transpose(1, 2).reshape(-1, c)
        d = torch.cdist(q, self.memory_).min(dim=1).values.reshape(b, h, w)
        return d.flatten(1).max(dim=1).values, d

    def leave_one_out_scores(self):
        out = []
        for i in range(len(self.memory_chunks_)):
            others = torch.cat([c for j, c in enumerate(self.memory_chunks_) if j != i])
            out.append(float(torch.cdist(self.memory_chunks_[i], others).min(dim=1).values.max()))
        return np.array(out)

    def _get_state(self):
        return {f"m{i}": c for i, c in enumerate(self.memory_chunks_)}, {"names": list(self.reference_names_)}

    def _set_state(self, tensors, meta):
        self.memory_chunks_ = [tensors[f"m{i}"] for i in range(len(meta["names"]))]
        self.reference_names_ = list(meta["names"])
        self._memory_changed()


for _name, _cls in (("toyzero_d", ToyZero), ("toyfew_d", ToyFew)):
    if _name not in vlad.list_scorers():
        vlad.register_scorer(_name)(_cls)

SPEC = "toyzero_d+toyfew_d"


def _refs(n, start=0):
    return [textured(start + i) for i in range(n)]


# -- construction ------------------------------------------------------------------------------
def test_spec_and_option_routing():
    det = vlad.create_detector(SPEC, object_name="plate", weights="tiny", batch_size=2,
                               scorer_options={"toyfew_d": {"patch": 8}}, fusion="max", k0=4.0)
    z, f = det.scorers["toyzero_d"], det.scorers["toyfew_d"]
    assert z.object_name == "plate" and not hasattr(f, "object_name")  # routed only where accepted
    assert z.weights == f.weights == "tiny" and z.batch_size == f.batch_size == 2
    assert f.patch == 8 and det.options["fusion"] == "max" and det.options["k0"] == 4.0
    assert det.tiers == {"toyzero_d": "zero", "toyfew_d": "few"}
    with pytest.raises(VladError, match="accepted by no scorer"):
        vlad.create_detector(SPEC, n_maskz=3)
    with pytest.raises(VladError, match="no parameter"):
        vlad.create_detector(SPEC, scorer_options={"toyfew_d": {"gain": 2}})
    with pytest.raises(VladError, match="not in the spec"):
        vlad.create_detector(SPEC, scorer_options={"maeday": {}})
    with pytest.raises(UnknownScorerError, match="nosuch"):
        vlad.create_detector("toyzero_d+nosuch")
    with pytest.raises(VladError, match="twice"):
        vlad.create_detector("toyzero_d+toyzero_d")
    with pytest.raises(VladError, match="fusion"):
        vlad.create_detector(SPEC, fusion="median")


def test_default_spec():
    from vlad.detector import DEFAULT_SPEC, parse_spec

    assert parse_spec(None) == DEFAULT_SPEC.split("+") == ["winclip", "maeday", "anomalydino"]


# -- tiers and references -----------------------------------------------------------------------
def test_zero_references_zero_shot_only(defect_image):
    det = vlad.create_detector(SPEC)
    with pytest.raises(NotFittedError):
        det.predict([defect_image])
    det.fit()
    assert det.active_ == {"toyzero_d": True, "toyfew_d": False}
    res = det.predict([textured(50), defect_image])
    assert set(res.components) == {"toyzero_d"}
    assert det.image_threshold == 0.5 and det.pixel_threshold == 0.5  # documented zero-shot defaults
    assert det.normalisers["toyzero_d"].kind == "self"
    assert res.labels is not None and res.masks is not None
    assert res.image_scores[1] > res.image_scores[0]
    assert ((res.image_scores >= 0) & (res.image_scores <= 1)).all()


def test_few_shot_only_needs_references():
    det = vlad.create_detector("toyfew_d")
    with pytest.raises(EmptyReferenceSetError, match="zero-shot scorer"):
        det.fit()
    det.fit(_refs(3))
    assert det.active_ == {"toyfew_d": True}


def test_one_reference_joins_few_shot_calibrated_on_its_views(defect_image):
    det = vlad.create_detector(SPEC).fit()
    det.add_references([textured(1)])
    assert det.active_["toyfew_d"] and det.list_references() == ["<array>"]
    assert det.fusion_weights["toyfew_d"] == pytest.approx(1 / 3)  # k / (k + k0), k0 = 2
    # leave-one-out is impossible with 1 reference: its jittered views calibrate instead
    assert {n.kind for n in det.normalisers.values()} == {"reference"}
    assert det.threshold_info().rule == "views-assumption"
    prior = vlad.create_detector(SPEC, reference_views=0).fit([textured(1)])
    assert {n.kind for n in prior.normalisers.values()} == {"self"} and prior.image_threshold == 0.5
    res = det.predict([textured(60), defect_image])
    assert set(res.components) == {"toyzero_d", "toyfew_d"}
    assert res.image_scores[1] > res.image_scores[0]


def test_many_references_calibrate_and_threshold(defect_image):
    det = vlad.create_detector(SPEC).fit(_refs(5))
    norms = det.normalisers
    assert all(n.kind == "reference" and n.n_samples == 5 for n in norms.values())
    loo = det.reference_scores()
    assert loo.shape == (5,)
    # 5 references cannot guarantee 5%: the largest leave-one-out score, guaranteeing 1/6, is in force
    assert det.image_threshold == pytest.approx(float(loo.max()), rel=1e-6)
    info = det.threshold_info()
    assert (info.rule, info.path, info.n_calibration) == ("best-available", "leave-one-out", 5)
    assert info.guaranteed_rate == pytest.approx(1 / 6) and info.references_needed == 14
    assert info.describe() == ("5 references: the lowest false-alarm rate that can be guaranteed is 17%; "
                               "add 14 more for 5%")
    assert 0 < det.pixel_threshold < 1
    res = det.predict([textured(70), textured(71), defect_image])
    assert res.labels.tolist() == [False, False, True]
    assert res.masks[2][40, 70] and not res.masks[2][5, 5]  # inside / outside the defect box
    # components are each scorer's calibrated result
    for comp in res.components.values():
        assert ((comp.image_scores >= 0) & (comp.image_scores <= 1)).all()


def test_leave_one_out_really_leaves_one_out():
    det = vlad.create_detector("toyfew_d").fit(_refs(4))
    few = det.scorers["toyfew_d"]
    before = few.predict([textured(80)]).image_scores
    # in-sample scores of the references would be exactly 0 (each is in memory): LOO ones are not
    assert det.normalisers["toyfew_d"].image_loc > 0
    np.testing.assert_allclose(det.normalisers["toyfew_d"].image_loc,
                               np.median(few.leave_one_out_scores()), rtol=1e-5)
    assert len(few.memory_chunks_) == 4 and few.memory_.shape[0] == 4 * 64  # original untouched
    np.testing.assert_array_equal(few.predict([textured(80)]).image_scores, before)


def test_calibration_subset_and_recalibration_on_change():
    det = vlad.create_detector(SPEC, calibration_refs=3).fit(_refs(7))
    assert det.normalisers["toyfew_d"].n_samples == 3
    det.add_references(_refs(2, start=20))
    assert len(det.list_references()) == 9 and len(det.scorers["toyfew_d"].reference_names_) == 9
    assert det.fusion_weights["toyfew_d"] == pytest.approx(9 / 11)
    det.remove_reference(0)
    assert len(det.scorers["toyfew_d"].reference_names_) == 8 and len(det.list_references()) == 8
    with pytest.raises(VladError, match="out of range"):
        det.remove_reference(99)


def test_check_references_flags_a_defective_one():
    det = vlad.create_detector(SPEC).fit([*_refs(5), with_defect(textured(9))])
    assert det.check_references() == {"toyfew_d": ["<array>"]}
    det.remove_reference(5)
    assert det.check_references() == {"toyfew_d": []}
    for bad in (float("nan"), "3", -1.0, 0, True):  # NaN would flag nothing, in silence
        with pytest.raises(vlad.InvalidParameterError,
                           match=r"check_references: z_threshold must be a number > 0, got .*robust standard deviations"):
            det.check_references(bad)
        with pytest.raises(vlad.InvalidParameterError, match="z_threshold"):
            det.scorers["toyfew_d"].check_references(bad)


def test_remove_last_reference_few_shot_goes_idle():
    det = vlad.create_detector(SPEC).fit([textured(1)])
    det.remove_reference(0)
    assert det.active_ == {"toyzero_d": True, "toyfew_d": False}
    det.predict([textured(2)])


def test_set_thresholds():
    det = vlad.create_detector(SPEC).fit(_refs(4))
    derived = det.image_threshold
    det.set_thresholds(image=0.99, pixel=0.0)
    res = det.predict([textured(90)])
    assert not res.labels[0] and res.masks.all()
    det.set_thresholds(image="auto")
    assert det.image_threshold == derived and det.pixel_threshold == 0.0
    with pytest.raises(VladError, match="finite number"):
        det.set_thresholds(pixel="high")


@pytest.mark.parametrize("rule", ["mean", "max", "harmonic"])
def test_fusion_rule_applied(rule):
    det = vlad.create_detector(SPEC, fusion=rule).fit(_refs(3))
    res = det.predict([textured(33)])
    comps = [res.components[n].image_scores[0] for n in ("toyzero_d", "toyfew_d")]
    w = det.fusion_weights
    if rule == "max":
        assert res.image_scores[0] == pytest.approx(max(comps))
    elif rule == "mean":
        assert res.image_scores[0] == pytest.approx(w["toyzero_d"] * comps[0] + w["toyfew_d"] * comps[1], rel=1e-5)
    else:
        assert res.image_scores[0] == pytest.approx(1 / (w["toyzero_d"] / comps[0] + w["toyfew_d"] / comps[1]), rel=1e-5)


def test_mixed_sizes_give_maps_at_each_size():
    det = vlad.create_detector(SPEC).fit(_refs(2))
    res = det.predict([textured(1, size=64), textured(2, size=96)[:80]])
    assert [m.shape for m in res.map_list()] == [(64, 64), (80, 96)]
    assert [m.shape for m in res.masks] == [(64, 64), (80, 96)]


def test_predict_on_error_skip_scores_the_readable_and_lists_the_rest(tmp_path, defect_image):
    from PIL import Image

    det = vlad.create_detector(SPEC).fit(_refs(4))
    Image.fromarray(textured(40)).save(tmp_path / "00.png")
    Image.fromarray(defect_image).save(tmp_path / "04_defect.png")
    expected = write_bad_files(tmp_path)  # 03_..., 05_..., 07_..., 09_... (11_... unless root)
    paths = [str(p) for p in sorted(tmp_path.iterdir())]
    good = [str(tmp_path / "00.png"), str(tmp_path / "04_defect.png")]
    with pytest.raises(InvalidImageError, match="03_truncated.png"):
        det.predict(paths)  # the default: the first unreadable file raises
    res = det.predict(paths, on_error="skip")
    alone = det.predict(good)
    assert len(res) == 2 and res.names == tuple(good)
    np.testing.assert_allclose(res.image_scores, alone.image_scores, rtol=1e-6)
    assert res.labels.tolist() == alone.labels.tolist() and res.masks.shape == alone.masks.shape
    assert [f.index for f in res.failures] == [i for i, p in enumerate(paths) if p not in good]
    for f in res.failures:
        assert f.name == paths[f.index] and f.error.startswith(f"{f.name}: {expected[f.name.rsplit('/', 1)[-1]]}")
    assert alone.failures == ()
    # joined batches number the failures among all the inputs; a batch with no readable image adds none
    both = vlad.AnomalyResult.concatenate([det.predict(paths[:1], on_error="skip"),
                                           det.predict(paths[1:2], on_error="skip"),
                                           det.predict(paths[2:], on_error="skip")])
    assert len(both) == 2 and [f.index for f in both.failures] == [f.index for f in res.failures]
    nothing = det.predict(paths[1:2], on_error="skip")
    assert len(nothing) == 0 and nothing.labels.shape == (0,) and [f.index for f in nothing.failures] == [0]
    assert det.predict([textured(1), np.zeros((2, 2))], on_error="skip").failures[0].error.startswith("<array>: ")
    for bad in ("ignore", None, True):
        with pytest.raises(InvalidParameterError, match="'raise'.*'skip'"):
            det.predict(good, on_error=bad)


# -- save / load --------------------------------------------------------------------------------
def test_save_load_identity(tmp_path, defect_image):
    det = vlad.create_detector(SPEC, fusion="harmonic", scorer_options={"toyzero_d": {"gain": 2.0}}).fit(_refs(4))
    det.set_thresholds(pixel=0.7)
    imgs = [textured(44), defect_image]
    before = det.predict(imgs)
    det.save(tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == [
        "detector.json", "references.safetensors", "toyfew_d", "toyzero_d"]
    loaded = vlad.load(tmp_path / "det")
    after = loaded.predict(imgs)
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    np.testing.assert_array_equal(after.anomaly_maps, before.anomaly_maps)
    np.testing.assert_array_equal(after.labels, before.labels)
    np.testing.assert_array_equal(after.masks, before.masks)
    assert loaded.image_threshold == det.image_threshold and loaded.pixel_threshold == 0.7
    assert loaded.options["fusion"] == "harmonic" and loaded.scorers["toyzero_d"].gain == 2.0
    assert loaded.list_references() == det.list_references()
    # recalibrating from the saved references gives the same normalisers
    loaded.recalibrate()
    assert loaded.normalisers == det.normalisers
    # and it keeps learning
    loaded.add_references([textured(30)])
    assert len(loaded.scorers["toyfew_d"].reference_names_) == 5


def test_save_load_zero_shot_keeps_idle_few_shot(tmp_path):
    det = vlad.create_detector(SPEC, scorer_options={"toyfew_d": {"patch": 8}}).fit()
    det.save(tmp_path / "zs")
    loaded = vlad.load(tmp_path / "zs")
    assert loaded.active_ == {"toyzero_d": True, "toyfew_d": False}
    assert loaded.scorers["toyfew_d"].patch == 8
    np.testing.assert_array_equal(loaded.predict([textured(3)]).image_scores, det.predict([textured(3)]).image_scores)
    loaded.add_references([textured(4)])
    assert loaded.active_["toyfew_d"]


def test_load_scorer_folder(tmp_path):
    few = vlad.create_scorer("toyfew_d").fit(_refs(2))
    few.save(tmp_path / "s")
    loaded = vlad.load(tmp_path / "s")
    assert type(loaded).__name__ == "ToyFew" and loaded.list_references() == few.list_references()
    with pytest.raises(VladError, match="neither"):
        vlad.load(tmp_path)
    _edit(tmp_path / "s" / "config.json", lambda d: d.update(scorer="os.system"))
    with pytest.raises(UnknownScorerError, match="os.system"):
        vlad.load(tmp_path / "s")
    (tmp_path / "s" / "config.json").write_bytes(pickle.dumps(print))
    with pytest.raises(VladError, match="not valid JSON"):
        vlad.load(tmp_path / "s")


@pytest.fixture
def saved(tmp_path):
    det = vlad.create_detector(SPEC).fit(_refs(3))
    return det.save(tmp_path / "det")


def _edit(path, fn):
    """Edit a saved JSON file and, like a forger would, update the checksum its parent folder records,
    so that the checks behind the checksums are exercised too."""
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))
    if path.name == "config.json" and (path.parent.parent / "detector.json").exists():
        _rehash(path.parent.parent / "detector.json", f"{path.parent.name}/config.json")


def _rehash(json_path, entry):
    doc = json.loads(json_path.read_text())
    doc["sha256"][entry] = sha256_file(json_path.parent / entry)
    json_path.write_text(json.dumps(doc))
    if json_path.name == "config.json" and (json_path.parent.parent / "detector.json").exists():
        _rehash(json_path.parent.parent / "detector.json", f"{json_path.parent.name}/config.json")


def test_reject_pickle_renamed(saved):
    (saved / "detector.json").write_bytes(pickle.dumps({"spec": "toyzero_d"}))
    with pytest.raises(VladError, match="not valid JSON"):
        vlad.load(saved)


def test_reject_pickle_as_state(saved):
    (saved / "toyfew_d" / "state.safetensors").write_bytes(pickle.dumps(np.zeros(3)))
    with pytest.raises(IntegrityError, match="changed after it was saved"):
        vlad.load(saved)
    _rehash(saved / "toyfew_d" / "config.json", "state.safetensors")  # a forger who updates the checksums
    with pytest.raises(VladError, match="not a readable safetensors"):
        vlad.load(saved)


def test_reject_code_scorer_names(saved):
    _edit(saved / "detector.json", lambda d: d["scorers"].update({"os.system": {"active": False, "tier": "zero"}}))
    with pytest.raises(UnknownScorerError, match="os.system"):
        vlad.load(saved)


def test_reject_code_scorer_name_in_scorer_config(saved):
    _edit(saved / "toyzero_d" / "config.json", lambda d: d.update(scorer="os:system"))
    with pytest.raises(UnknownScorerError, match="os:system"):
        vlad.load(saved)
    _edit(saved / "toyzero_d" / "config.json", lambda d: d.update(scorer="toyfew_d"))
    with pytest.raises(VladError, match="expected 'toyzero_d'"):
        vlad.load(saved)
    _edit(saved / "toyzero_d" / "config.json", lambda d: d.update(scorer="toyzero_d"))
    shutil.rmtree(saved / "toyfew_d")
    with pytest.raises(VladError, match="missing"):
        vlad.load(saved)


@pytest.mark.parametrize("where", ["options", "params", "normaliser", "top"])
def test_reject_reduce_payloads(saved, where):
    payload = {"__reduce__": ["os.system", ["echo pwned"]]}
    if where == "params":
        _edit(saved / "toyzero_d" / "config.json", lambda d: d["params"].update(gain=payload))
    elif where == "options":
        _edit(saved / "detector.json", lambda d: d["options"].update(fusion_weights=payload))
    elif where == "normaliser":
        _edit(saved / "detector.json", lambda d: d["calibration"]["normalisers"]["toyfew_d"].update(payload))
    else:
        _edit(saved / "detector.json", lambda d: d.update(payload))
    with pytest.raises(VladError, match="__reduce__"):
        vlad.load(saved)


def test_reject_unexpected_keys_and_types(saved):
    _edit(saved / "toyzero_d" / "config.json", lambda d: d["params"].update(exec="print(1)"))
    with pytest.raises(VladError, match=r"no parameter\(s\) \['exec'\]"):
        vlad.load(saved)


def test_reject_bad_thresholds(saved):
    _edit(saved / "detector.json", lambda d: d["thresholds"].update(image_override="0.5"))
    with pytest.raises(VladError, match="image_override"):
        vlad.load(saved)


# -- the real scorers, tiny twins ---------------------------------------------------------------
@pytest.mark.slow
def test_real_scorers_tiny_tiered(tmp_path, defect_image):
    pytest.importorskip("vlad.scorers.anomalydino")
    pytest.importorskip("vlad.scorers.maeday")
    det = vlad.create_detector("maeday+anomalydino", weights="tiny", device="cpu", random_state=0,
                               object_name="plate", scorer_options={"maeday": {"n_masks": 2}})
    assert det.scorers["maeday"].n_masks == 2 and det.tiers == {"maeday": "zero", "anomalydino": "few"}
    det.fit()
    imgs = [textured(50), defect_image]
    zero = det.predict(imgs)
    assert set(zero.components) == {"maeday"} and zero.labels is not None
    det.add_references(_refs(3))
    dino = det.scorers["anomalydino"]
    before = dino.predict(imgs).image_scores
    res = det.predict(imgs)  # calibrates: leave-one-out copies of anomalydino
    assert all(n.kind == "reference" for n in det.normalisers.values())
    assert len(dino.ref_info_) == len(dino.memory_chunks_) == 3  # the original is untouched
    np.testing.assert_array_equal(dino.predict(imgs).image_scores, before)
    np.testing.assert_allclose(det.normalisers["anomalydino"].image_loc, np.median(dino.leave_one_out_scores()),
                               rtol=1e-4)
    assert res.image_scores[1] > res.image_scores[0]
    det.save(tmp_path / "d")
    again = vlad.load(tmp_path / "d").predict(imgs)
    np.testing.assert_array_equal(again.image_scores, res.image_scores)
    np.testing.assert_array_equal(again.anomaly_maps, res.anomaly_maps)
