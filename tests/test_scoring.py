"""`vlad score` end to end on temporary images (toy scorers and tiny twins; no network)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlad
from vlad.cli import main
from vlad.scorers.base import BaseScorer, FewShotMixin

from conftest import textured, with_defect


def _grid(images, size=32):
    return torch.cat([F.interpolate(torch.from_numpy(im.pixels).permute(2, 0, 1)[None], size=(size, size),
                                    mode="bilinear", align_corners=False) for im in images])


class ZeroS(BaseScorer):
    def __init__(self, object_name=None, prompts=None, weights="pretrained", device="cpu", batch_size=2):
        self.object_name = object_name
        self.prompts = prompts
        self.weights = weights
        self.device = device
        self.batch_size = batch_size

    def _fit(self, references):
        self.ok_ = True

    def _predict_batch(self, images):
        x = _grid(images)
        maps = (x - x.flatten(2).median(dim=2).values[..., None, None]).abs().sum(dim=1)
        return maps.flatten(1).max(dim=1).values, maps


class FewS(FewShotMixin, BaseScorer):
    requires_references = True


    def __init__(self, weights="pretrained", device="cpu", batch_size=4, patch=4):
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.patch = patch

    def _embed_references(self, images):
        return [f.flatten(1).T.contiguous() for f in F.avg_pool2d(_grid(images), self.patch)]

    def _fit(self, references):
        self.memory_chunks_ = self._embed_references(references)
        self.reference_names_ = [r.name for r in references]
        self._memory_changed()

    def _memory_changed(self):
        self.memory_ = torch.cat(self.memory_chunks_)

    def _predict_batch(self, images):
        f = F.avg_pool2d(_grid(images), self.patch)
        b, c, h, w = f.shape
        d = torch.cdist(f.flatten(2).transpose(1, 2).reshape(-1, c), self.memory_).min(dim=1).values
        d = d.reshape(b, h, w)
        return d.flatten(1).max(dim=1).values, d


for _name, _cls in (("zeros_s", ZeroS), ("fews_s", FewS)):
    if _name not in vlad.list_scorers():
        vlad.register_scorer(_name)(_cls)


@pytest.fixture
def folders(tmp_path):
    good, test = tmp_path / "good", tmp_path / "test"
    good.mkdir()
    test.mkdir()
    for i in range(4):
        Image.fromarray(textured(i)).save(good / f"g{i}.png")
    Image.fromarray(textured(10)).save(test / "ok.png")
    Image.fromarray(with_defect(textured(11))).save(test / "bad.png")
    Image.fromarray(textured(12, size=64)[:, :48]).save(test / "small.png")  # another size
    return good, test


def test_score_detector_end_to_end(folders, tmp_path, capsys):
    good, test = folders
    out = tmp_path / "out"
    code = main(["score", str(test), "--detector", "zeros_s+fews_s", "--refs", str(good), "--out", str(out),
                 "--object", "plate", "--device", "cpu", "--set", "fusion=max", "--set", "patch=8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bad.png" in printed and "anomalous" in printed and "score" in printed
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["file"].rsplit("/", 1)[-1] for r in rows] == ["bad.png", "ok.png", "small.png"]
    assert list(rows[0]) == ["file", "score", "label", "zeros_s", "fews_s", "error"]
    assert all(r["error"] == "" for r in rows)
    assert printed.splitlines()[-1] == "3 scored, 0 failed"
    labels = {r["file"].rsplit("/", 1)[-1]: r["label"] for r in rows}
    assert labels["bad.png"] == "anomalous" and labels["ok.png"] == "normal"
    summary = json.loads((out / "scores.json").read_text())
    assert summary["n_references"] == 4 and summary["active_scorers"] == ["zeros_s", "fews_s"]
    assert 0 < summary["image_threshold"] < 1
    for r in summary["results"]:
        overlay = np.asarray(Image.open(out / r["overlay"]))
        assert overlay.dtype == np.uint8 and overlay.ndim == 3
    assert np.asarray(Image.open(out / summary["results"][2]["overlay"])).shape == (64, 48, 3)


def test_score_refs_as_comma_separated_files_and_scorer(folders, capsys):
    good, test = folders
    refs = ",".join(str(p) for p in sorted(good.iterdir())[:2])
    assert main(["score", str(test / "ok.png"), "--scorer", "fews_s", "--refs", refs]) == 0
    assert "ok.png" in capsys.readouterr().out


def test_score_refs_as_several_files_as_a_shell_glob_gives_them(folders, capsys):
    good, test = folders
    refs = [str(p) for p in sorted(good.iterdir())[:2]]
    assert main(["score", str(test / "ok.png"), "--scorer", "fews_s", "--refs", *refs]) == 0
    assert "2 references" in capsys.readouterr().out


def test_score_zero_shot_without_refs(folders, capsys):
    _, test = folders
    assert main(["score", str(test), "--detector", "zeros_s+fews_s", "--device", "cpu"]) == 0
    assert "threshold 0.5000, 0 references" in capsys.readouterr().out


def test_score_errors(folders, tmp_path, capsys):
    good, test = folders
    assert main(["score", str(test), "--scorer", "fews_s"]) == 2
    assert "--refs" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert main(["score", str(test / "ok.png"), str(broken), "--detector", "zeros_s", "--fail-fast"]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["score", str(test / "ok.png"), str(broken), "--detector", "zeros_s"]) == 3  # scored the other
    assert "broken.png" in capsys.readouterr().out
    assert main(["score", str(test), "--detector", "zeros_s", "--set", "nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["score", str(test), "--detector", "fews_s", "--refs", str(good), "--prompts", "p.yaml"]) == 2
    assert "prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_score_real_default_detector_tiny(folders, tmp_path, capsys):
    """The default detector (winclip+maeday, anomalydino joining) with tiny twins."""
    pytest.importorskip("vlad.scorers.winclip")
    good, test = folders
    out = tmp_path / "o"
    code = main(["score", str(test / "bad.png"), str(test / "ok.png"), "--object", "plate", "--weights", "tiny",
                 "--device", "cpu", "--refs", ",".join(str(p) for p in sorted(good.iterdir())[:2]),
                 "--set", "n_masks=2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "scores.json").read_text())
    assert summary["active_scorers"] == ["winclip", "maeday", "anomalydino"]
