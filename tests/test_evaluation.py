"""End-to-end evaluation (vlad.evaluation.run_eval, `vlad eval`) and overlays (vlad.visualize)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import make_mvtec

import vlad
import vlad.cli
from vlad.errors import VladError
from vlad.evaluation import format_table, parse_shots, run_eval
from vlad.scorers.base import BaseScorer
from vlad.visualize import colorize, overlay, panel


@vlad.register_scorer("test_pixelstat")
class PixelStat(BaseScorer):
    """Per-pixel distance to the references' mean colour (0.5 grey when zero-shot); score = map max."""

    def __init__(self, weights="pretrained", device="cpu", batch_size=2, object_name=None, random_state=0,
                 invert=False):
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.object_name = object_name
        self.random_state = random_state
        self.invert = invert

    def _fit(self, references):
        if references is None:
            self.mean_ = torch.full((3,), 0.5)
        else:
            self.mean_ = torch.tensor(np.stack([r.pixels.reshape(-1, 3).mean(0) for r in references]).mean(0))
        self.seen_object_name_ = self.object_name

    def _predict_batch(self, images):
        maps = torch.stack([(torch.from_numpy(im.pixels) - self.mean_).norm(dim=-1) for im in images])
        scores = maps.flatten(1).amax(1)
        if self.invert:
            return -scores, -maps
        return scores, maps


@vlad.register_scorer("test_needs_refs")
class NeedsRefs(PixelStat):
    requires_references = True


@vlad.register_scorer("test_global_rng")
class GlobalRng(PixelStat):
    """Draws its reference colour from torch's global generator, as a random-weight backbone does."""

    def _fit(self, references):
        self.mean_ = torch.rand(3)
        self.seen_object_name_ = self.object_name


@pytest.fixture
def dataset(tmp_path):
    make_mvtec(tmp_path / "set", "metal_plate", n_train=4, n_good=3, n_bad=3)
    make_mvtec(tmp_path / "set", "bottle", n_train=4, n_good=2, n_bad=2, masks=False)
    return tmp_path / "set"


def test_parse_shots():
    assert parse_shots("0,1, 2,4") == [0, 1, 2, 4]
    assert parse_shots("all") == ["all"] and parse_shots("1,all") == [1, "all"]
    with pytest.raises(VladError, match="non-negative integers"):
        parse_shots("1,x")


def test_run_eval_end_to_end(dataset, tmp_path):
    res = run_eval(dataset, scorer="test_pixelstat", shots="0,2", seeds=2, weights="tiny", device="cpu",
                   out=tmp_path / "out")
    runs = res["runs"]
    # 0-shot runs once per category... unless the scorer takes random_state (this one does): 2 seeds
    assert {(r["category"], r["shots"], r["seed"]) for r in runs} == {
        (c, k, s) for c in ("bottle", "metal_plate") for k in (0, 2) for s in (0, 1)}
    mp = [r for r in runs if r["category"] == "metal_plate"]
    for r in mp:
        # the bright defect is far from the mean colour: perfect detection and localisation
        assert r["metrics"]["image_auroc"] == 1.0
        assert r["metrics"]["pixel_auroc"] > 0.99 and r["metrics"]["pixel_aupro"] > 0.9
    bottle = [r for r in runs if r["category"] == "bottle"]
    # no masks: image metrics and the image decisions only
    assert all(set(r["metrics"]) == {"image_auroc", "image_ap", "image_f1max", "false_alarm_rate", "miss_rate"}
               for r in bottle)
    two = [r for r in mp if r["shots"] == 2]
    assert all(r["n_references"] == 2 for r in two) and two[0]["references"] != [] and two[0]["fit_seconds"] >= 0
    summ = res["summary"]["2"]
    assert summ["categories"]["metal_plate"]["image_auroc"] == {"mean": 1.0, "std": 0.0, "n": 2}
    assert summ["mean"]["pixel_aupro"]["n"] == 2  # macro mean over seeds, pixel metrics from metal_plate only
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["summary"]["2"]["mean"]["image_auroc"]["mean"] == pytest.approx(summ["mean"]["image_auroc"]["mean"])
    pngs = sorted((tmp_path / "out" / "overlays" / "metal_plate" / "2shot").glob("*.png"))
    assert len(pngs) == 4
    with Image.open(pngs[-1]) as im:
        assert im.size[0] == 3 * 64 + 2 * 4  # image | map | mask
    with Image.open(next((tmp_path / "out" / "overlays" / "bottle" / "0shot").glob("*.png"))) as im:
        assert im.size[0] == 2 * 64 + 4  # no mask tile
    table = format_table(res)
    assert "metal_plate" in table and "AUPRO" in table and "100.0±0.0" in table


def test_overlay_colours_start_at_the_typical_pixel():
    from vlad.evaluation import _overlay_range

    # a z-scored map: most pixels near 1, a few far below, one defect at 5, a NaN from a hostile file
    rng = np.random.default_rng(0)
    maps = [1.0 + 0.1 * rng.standard_normal((32, 32)) for _ in range(3)]
    maps[0][:2] = -6.0
    maps[1][5, 5] = 5.0
    maps[2][0, 0] = np.nan
    lo, hi = _overlay_range(maps)
    assert 0.9 < lo < 1.1 and hi == pytest.approx(5.0)  # not -6: the typical surface is the coldest colour
    assert _overlay_range([np.full((4, 4), np.nan)]) == (0.0, 1.0)
    lo, hi = _overlay_range([np.zeros((4, 4))])
    assert lo == 0.0 and hi > lo


def test_run_eval_is_honest_about_bad_maps(dataset):
    # an inverted scorer must score badly: the evaluation really uses the predictions
    res = run_eval(dataset, scorer="test_pixelstat", shots=[1], categories=["metal_plate"], weights="tiny",
                   params={"invert": True})
    assert res["runs"][0]["metrics"]["image_auroc"] == 0.0
    assert res["runs"][0]["metrics"]["pixel_auroc"] < 0.2


def test_object_name_and_weights_passed(dataset, monkeypatch):
    seen = []
    orig = PixelStat._fit

    def spy(self, refs):
        seen.append((self.object_name, self.weights, self.device, self.random_state))
        return orig(self, refs)

    monkeypatch.setattr(PixelStat, "_fit", spy)
    run_eval(dataset / "metal_plate", scorer="test_pixelstat", shots="1", seeds=2, weights="tiny", device="cpu")
    assert seen == [("metal plate", "tiny", "cpu", 0), ("metal plate", "tiny", "cpu", 1)]


def test_requires_references_skips_zero_shot_and_too_many_shots(dataset):
    res = run_eval(dataset, scorer="test_needs_refs", shots="0,1,9", weights="tiny", categories=["bottle"])
    assert [r["shots"] for r in res["runs"]] == [1]
    reasons = [s["reason"] for s in res["skipped"]]
    assert any("requires reference images" in r for r in reasons)
    assert any("9-shot" in r for r in reasons)
    assert "skipped" in format_table(res)


def test_detector_spec_uses_create_detector(dataset):
    res = run_eval(dataset, scorer="test_pixelstat+test_needs_refs", shots="0,2", categories=["metal_plate"],
                   weights="tiny", device="cpu")
    assert [r["shots"] for r in res["runs"]] == [0, 2]
    assert all(r["metrics"]["image_auroc"] == 1.0 for r in res["runs"])


def test_cli_eval(dataset, tmp_path, capsys):
    code = vlad.cli.main(["eval", str(dataset), "--scorer", "test_pixelstat", "--shots", "0,1", "--seeds", "1",
                          "--weights", "tiny", "--device", "cpu", "--limit", "4", "--categories", "metal_plate",
                          "--out", str(tmp_path / "o"), "--set", "batch_size=3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "metal_plate" in out and "1-shot" in out and "results.json" in out
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["params"] == {"batch_size": 3} and saved["runs"][0]["n_test"] == 4
    code = vlad.cli.main(["eval", str(tmp_path / "nothing"), "--scorer", "test_pixelstat"])
    assert code == 2
    assert "no such folder" in capsys.readouterr().err
    code = vlad.cli.main(["eval", str(dataset), "--scorer", "test_pixelstat", "--set", "n_maskz=3"])
    assert code == 2
    assert "n_maskz" in capsys.readouterr().err


def test_colorize_overlay_panel():
    amap = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    rgb = colorize(amap)
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    assert tuple(rgb[0, 0]) == (0, 0, 128) and tuple(rgb[-1, -1]) == (128, 0, 0)  # jet: dark blue -> dark red
    assert (colorize(amap, vmin=0.0, vmax=2.0)[-1, -1] != rgb[-1, -1]).any()  # fixed range respected
    flat = colorize(np.full((8, 8), 3.0))  # constant map: no division by zero
    assert flat.shape == (8, 8, 3)
    image = np.full((48, 64, 3), 0.5, np.float32)
    blend = overlay(image, amap, alpha=0.0)
    assert blend.dtype == np.uint8 and np.all(blend == 128)
    assert np.array_equal(overlay(image, amap, alpha=1.0), rgb)
    assert overlay(image, amap[::2, ::2]).shape == (48, 64, 3)  # map resized to the image
    mask = amap > 0.5
    p = panel(image, amap, mask, title="x")
    assert p.size == (3 * 64 + 8, 48 + 16)
    assert panel(image, amap).size == (2 * 64 + 4, 48)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        colorize(np.zeros((2, 3, 4)))


def _box_pixels() -> int:
    from test_data import BOX

    return (BOX[1] - BOX[0]) * (BOX[3] - BOX[2])


def test_eval_reports_the_detectors_decisions(dataset):
    res = run_eval(dataset, scorer="test_pixelstat", shots="0,2", categories=["metal_plate"], weights="tiny",
                   device="cpu")
    for r in res["runs"]:
        m, d = r["metrics"], r["decisions"]
        assert set(m) >= {"pixel_aupro05", "false_alarm_rate", "miss_rate", "seg_f1"}
        assert all(0.0 <= m[key] <= 1.0 for key in ("pixel_aupro05", "false_alarm_rate", "miss_rate", "seg_f1"))
        assert (d["n_normal"], d["n_anomalous"]) == (3, 3)
        assert m["false_alarm_rate"] == d["n_false_alarms"] / 3 and m["miss_rate"] == d["n_missed"] / 3
        assert d["false_alarm_rate_low"] <= m["false_alarm_rate"] <= d["false_alarm_rate_high"]
        assert d["image_threshold"] is not None and d["pixel_threshold"] is not None
    pooled = res["summary"]["2"]["pooled"]["metal_plate"]["false_alarm_rate"]
    assert pooled["n"] == 3 and 0.0 <= pooled["low"] <= pooled["high"] <= 1.0
    table = format_table(res)
    for column in ("AUPRO.05", "FAR", "FAR 95% CI", "Miss", "SegF1"):
        assert column in table


@pytest.mark.parametrize("flag_all", [True, False])
def test_far_and_miss_follow_the_detectors_thresholds(dataset, flag_all):
    # image threshold 0 flags every image (calibrated scores are > 0), 1 flags none (they are <= 1);
    # pixel threshold 1 marks no pixel (SegF1 0), 0 marks every pixel: SegF1 = 2G / (2G + (P - G)).
    image_t, pixel_t = (0.0, 1.0) if flag_all else (1.0, 0.0)
    res = run_eval(dataset, scorer="test_pixelstat", shots="2", categories=["metal_plate"], weights="tiny",
                   device="cpu", params={"image_threshold": image_t, "pixel_threshold": pixel_t})
    (run,) = res["runs"]
    m = run["metrics"]
    assert (m["false_alarm_rate"], m["miss_rate"]) == ((1.0, 0.0) if flag_all else (0.0, 1.0))
    assert run["decisions"]["image_threshold"] == image_t
    g, p = 3 * _box_pixels(), 6 * 64 * 64  # 3 defect images with one box each; 6 test images of 64x64
    assert m["seg_f1"] == (0.0 if flag_all else pytest.approx(2 * g / (2 * g + p - g)))
    # the ranking metrics do not depend on the thresholds
    assert m["image_auroc"] == 1.0 and m["pixel_aupro05"] > 0.9


def test_false_alarm_rate_reaches_create_detector_only_when_given(dataset, monkeypatch):
    import vlad.detector

    seen = []
    real = vlad.detector.create_detector

    def spy(spec, **options):
        seen.append(options.get("false_alarm_rate", "absent"))
        options.pop("false_alarm_rate", None)  # not a detector option yet
        return real(spec, **options)

    monkeypatch.setattr(vlad.detector, "create_detector", spy)
    run_eval(dataset, scorer="test_pixelstat", shots="1", categories=["metal_plate"], weights="tiny")
    assert seen and set(seen) == {"absent"}
    seen.clear()
    res = run_eval(dataset, scorer="test_pixelstat", shots="1", categories=["metal_plate"], weights="tiny",
                   false_alarm_rate=0.1)
    assert seen and set(seen) == {0.1}
    assert res["false_alarm_rate"] == 0.1 and "stated false-alarm rate 0.1" in format_table(res)


def test_single_scorer_ranking_uses_the_raw_scorer(dataset):
    # At 1 reference the detector judges each image against its own map ("self" prior), which changes
    # the ranking (here image AP 0.38 instead of 0.5); the ranking metrics of a single scorer stay the
    # scorer's own, as before eval went through the detector.
    from vlad.data import discover_categories, load_mask
    from vlad.metrics import evaluate

    res = run_eval(dataset, scorer="test_pixelstat", shots="1", categories=["metal_plate"], weights="tiny",
                   params={"invert": True})
    (run,) = res["runs"]
    (cat,) = discover_categories(dataset, ["metal_plate"])
    raw = PixelStat(weights="tiny", invert=True).fit(None).predict([str(p) for p in cat.test_paths])
    masks = [load_mask(p, m.shape) for p, m in zip(cat.mask_paths, raw.map_list())]
    expected = evaluate(raw.image_scores, cat.labels, raw.map_list(), masks)
    assert {k: run["metrics"][k] for k in expected} == pytest.approx(expected, abs=1e-9)


def test_cells_are_repeatable_with_global_rng_draws(dataset):
    # torch's global generator starts at a random state in every process; each cell seeds it
    kwargs = {"scorer": "test_global_rng", "shots": "0", "categories": ["metal_plate"], "weights": "tiny"}
    torch.rand(5)  # whatever ran before must not matter
    first = run_eval(dataset, **kwargs)["runs"][0]["metrics"]
    torch.rand(7)
    second = run_eval(dataset, **kwargs)["runs"][0]["metrics"]
    assert first == second
