"""End-to-end evaluation (vlad.evaluation.run_eval, `vlad eval`) and overlays (vlad.visualize)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlad
import vlad.cli
from test_data import make_mvtec
from vlad.evaluation import format_table, parse_shots, run_eval
from vlad.errors import VladError
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
    assert all(set(r["metrics"]) == {"image_auroc", "image_ap", "image_f1max"} for r in bottle)
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
