"""Registry, AnomalyResult and the BaseScorer contract, through a minimal registered scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vlad
from vlad.registry import get_scorer_class
from vlad.scorers.base import BaseScorer


@vlad.register_scorer("test-brightness")
class Brightness(BaseScorer):
    """Scores each pixel by its distance from the references' mean brightness."""

    requires_references = True

    def __init__(self, size: int = 32, device: str = "cpu", batch_size: int = 2):
        self.size = size
        self.device = device
        self.batch_size = batch_size

    def _fit(self, references):
        self.mean_ = float(np.mean([r.pixels.mean() for r in references]))

    def _predict_batch(self, images):
        from vlad.ops import to_batch

        x = to_batch(images, self.size, None, None).mean(1)
        maps = (x - self.mean_).abs()
        return maps.flatten(1).amax(1), maps

    def _get_state(self):
        return {"mean": torch.tensor([self.mean_])}, {"note": "ok"}

    def _set_state(self, tensors, meta):
        self.mean_ = float(tensors["mean"][0])


def test_registry():
    assert {"patchcore", "winclip", "maeday", "anomalydino", "test-brightness"} <= set(vlad.list_scorers())
    with pytest.raises(vlad.UnknownScorerError, match="available: .*patchcore"):
        vlad.create_scorer("nope")
    with pytest.raises(ValueError, match="already registered"):
        vlad.register_scorer("patchcore")(Brightness)


def test_scorer_contract_and_sizes(good_images, defect_image):
    s = vlad.create_scorer("test-brightness", size=16)
    assert s.get_params() == {"size": 16, "device": "cpu", "batch_size": 2, "tile_size": None, "tile_overlap": None}
    with pytest.raises(vlad.NotFittedError):
        s.predict(defect_image)
    with pytest.raises(vlad.EmptyReferenceSetError):
        s.fit([])
    assert s.fit(good_images) is s
    res = s.predict([defect_image, defect_image[:50, :70], good_images[0]])
    assert isinstance(res.anomaly_maps, list) and [m.shape for m in res.anomaly_maps] == [(96, 96), (50, 70), (96, 96)]
    assert res.image_scores.shape == (3,) and res.image_scores.dtype == np.float32
    same = s.predict([good_images[0], good_images[1]])
    assert same.anomaly_maps.shape == (2, 96, 96)
    labelled = same.with_thresholds(0.0, 0.0)
    assert labelled.labels.dtype == bool and labelled.masks.shape == (2, 96, 96)


def test_save_load_round_trip(tmp_path, good_images, defect_image):
    s = vlad.create_scorer("test-brightness").fit(good_images)
    s.save(tmp_path / "m")
    loaded = vlad.scorers.base.load_scorer(tmp_path / "m")
    assert type(loaded) is Brightness and loaded.get_params() == s.get_params()
    np.testing.assert_array_equal(loaded.predict(defect_image).anomaly_maps, s.predict(defect_image).anomaly_maps)


def test_a_directly_built_scorer_saves_under_its_registered_name(tmp_path, good_images, monkeypatch):
    from vlad.scorers.patchcore import PatchCore

    # a fresh process: the built-in class was never looked up by name, so it carries no name yet
    monkeypatch.setattr(PatchCore, "scorer_name", "")
    s = PatchCore(weights="tiny", image_size=64).fit(good_images)
    folder = s.save(tmp_path / "pc")
    assert json.loads((folder / "config.json").read_text())["scorer"] == "patchcore"
    assert type(vlad.load(folder)) is PatchCore


def test_an_unregistered_scorer_is_refused_at_save_not_at_load(tmp_path, good_images):
    class Unnamed(Brightness):  # a subclass does not borrow its parent's name: it would load as the parent
        pass

    s = Unnamed().fit(good_images)
    with pytest.raises(vlad.UnknownScorerError, match="Unnamed is not a registered scorer.*register_scorer"):
        s.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_bad_arguments_to_the_public_helpers_are_vlad_errors():
    from vlad import metrics, visualize

    cases = [
        lambda: vlad.AnomalyResult(np.array([1.0, 2.0]), np.zeros((1, 4, 4))),
        lambda: metrics.auroc([0.1, float("nan")], [0, 1]),
        lambda: metrics.auroc([0.1, 0.2], [0, 2]),
        lambda: metrics.aupro([np.zeros((4, 4))], [np.zeros((4, 4)), np.zeros((4, 4))]),
        lambda: metrics.rate_with_ci(5, 3),
        lambda: visualize.colorize(np.zeros((4, 4)), cmap="nope"),
        lambda: visualize.overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4)), alpha=2.0),
        lambda: vlad.register_scorer("patchcore")(Brightness),
    ]
    for make in cases:
        with pytest.raises(vlad.InvalidArgumentError) as info:
            make()
        assert isinstance(info.value, (vlad.VladError, ValueError))  # old `except ValueError` still holds


def test_result_concatenate_and_validation():
    a = vlad.AnomalyResult(np.array([1.0]), np.zeros((1, 4, 4)))
    b = vlad.AnomalyResult(np.array([2.0]), [np.zeros((5, 5))])
    c = vlad.AnomalyResult.concatenate([a, b])
    assert c.image_scores.tolist() == [1.0, 2.0] and isinstance(c.anomaly_maps, list)
    with pytest.raises(ValueError, match="2 image scores but 1"):
        vlad.AnomalyResult(np.array([1.0, 2.0]), np.zeros((1, 4, 4)))


def test_parameter_protocol_without_scikit_learn():
    """get_params / set_params / repr / clone behave as scikit-learn's, and a misspelt name is a clear error."""
    from sklearn.base import clone

    s = vlad.create_scorer("test-brightness", size=16)
    assert repr(s) == "Brightness(size=16)"  # only what differs from the defaults
    assert s.set_params(batch_size=4) is s and s.batch_size == 4
    with pytest.raises(vlad.InvalidParameterError, match="no parameter 'sise'; did you mean 'size'"):
        s.set_params(sise=8)
    assert s.size == 16  # nothing set on error

    class Holder(vlad.scorers.base.BaseScorer):
        def __init__(self, inner=None, scale=1.0):
            self.inner = inner
            self.scale = scale

    h = Holder(inner=vlad.create_scorer("test-brightness"))
    assert h.get_params()["inner__size"] == h.inner.size
    h.set_params(inner__size=8, scale=2.0)
    assert h.inner.size == 8 and h.scale == 2.0
    twin = clone(h)
    assert twin.inner is not h.inner and twin.inner.size == 8 and twin.scale == 2.0


_SIZED = [n for n in vlad.list_scorers()
          if "image_size" in get_scorer_class(n)._get_param_names() and not n.startswith("toy")]


@pytest.mark.parametrize("name", _SIZED)
@pytest.mark.parametrize("bad", [60000, 8, 224.0, "224", True, (224, 60000), (224,)])
def test_an_absurd_image_size_is_refused_at_fit(name, bad):
    from vlad.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=r"image_size must be None, a whole number of pixels"):
        vlad.create_scorer(name, weights="tiny", image_size=bad).fit()


def test_an_edited_saved_image_size_is_refused_on_load(tmp_path, good_images):
    """A saved config edited to image_size=60000 used to load, then ask torch for tens of gigabytes."""
    import json

    from vlad.errors import InvalidParameterError

    folder = vlad.create_scorer("patchcore", weights="tiny", image_size=64).fit(good_images[:2]).save(tmp_path / "pc")
    config = json.loads((folder / "config.json").read_text())
    config["params"]["image_size"] = 60000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidParameterError, match=r"config.json: image_size of 'patchcore' must be.*60000"):
        vlad.load(folder)
