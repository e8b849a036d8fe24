"""The scorer contract, checked on every registered scorer (like scikit-learn's ``check_estimator``).

Each scorer is built with ``weights="tiny"`` (random-init twins) and a small budget. The checks:

* unlabeled-tier scorers (MuSc) score images against each other or an unlabeled pool (the references
  given to ``fit`` join it): one image with no pool is refused;
* ``__init__`` stores its parameters and nothing else (``get_params`` round-trips, ``sklearn.clone``);
* ``predict``/``save`` before ``fit`` raise :class:`vlad.NotFittedError`; ``fit`` returns ``self``;
  scorers that need references raise :class:`vlad.EmptyReferenceSetError` when fitted without any;
* ``predict`` gives float32 scores ``(B,)`` and finite maps at each input's own size, also for two
  different sizes in one call, independent of the other images in the batch;
* two instances with the same parameters and seed give identical results; save -> :func:`vlad.load`
  gives the same scores and maps;
* detection: a synthetic defect made with :mod:`vlad.synthesis` on a held-out normal texture scores above
  every normal test image, and each map's arg-max lies inside the defect mask (up to a margin, see
  :data:`MARGIN_PX`).

The images are the smooth striped textures of ``conftest.textured`` at 96 x 96 pixels: the tiny random
networks have no learned notion of "normal", so the test only asks what any working method must do on a
regular texture: tell a clearly different texture pasted into it from more of the same pattern.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import textured
from scipy.ndimage import binary_erosion, distance_transform_edt, label
from sklearn.base import clone

import vlad
from vlad import synthesis
from vlad.registry import get_scorer_class

#: Every registered scorer, except the toy ones other test modules register (whether those are registered
#: yet depends on the order in which pytest imports the modules).
SCORERS = [name for name in vlad.list_scorers()
           if not get_scorer_class(name).__module__.split(".")[-1].startswith("test_")]

#: Cheap settings per built-in scorer (all with ``weights="tiny"``): small training budgets, small
#: sizes. Only parameters the scorer's ``__init__`` accepts (checked by ``test_settings_are_parameters``).
SETTINGS: dict[str, dict] = {
    "anomalydino": dict(rotations=1, image_size=112),
    "autoencoder": dict(image_size=64, train_steps=12, batch_size=4),
    "draem": dict(image_size=64, train_steps=100, batch_size=4),
    "efficientad": dict(image_size=96, train_steps=10, batch_size=4, lr=1e-3),
    "fastflow": dict(epochs=6, batch_size=8, flow_steps=2),
    "maeday": dict(n_masks=8, batch_size=4),
    "musc": dict(backbone="vit_small_patch14_dinov2.lvd142m", image_size=112),
    "padim": dict(),
    "patchcore": dict(),
    "patchsvdd": dict(epochs=6, hidden_dim=64, out_dim=16, image_size=96),
    "spade": dict(),
    "stpm": dict(train_steps=20, batch_size=4, image_size=128),
    "winclip": dict(object_name="gear", batch_size=4),
}

#: Even smaller budgets for the checks that fit twice and ask nothing of the result's quality
#: (determinism, empty references).
QUICK: dict[str, dict] = {
    "autoencoder": dict(train_steps=3),
    "draem": dict(train_steps=3),
    "efficientad": dict(train_steps=3),
    "fastflow": dict(epochs=1),
    "patchsvdd": dict(epochs=1),
    "stpm": dict(train_steps=3),
}

#: How far (pixels, on the 96-pixel test images) a map's arg-max may lie outside the defect mask. The maps
#: come from feature grids of 8-16 pixel cells, upsampled bilinearly and smoothed (Gaussian, sigma 4 px):
#: a defect that covers only part of a cell lights up the whole cell, whose centre can be up to half a
#: 16-pixel cell (8 px) outside the mask. A map peak in the wrong place is much farther off than that.
MARGIN_PX = 8.0

#: Defects stay this far from the image border: the networks' border cells see zero padding, and the
#: maps' border cells are stretched to the edge by upsampling, so a defect touching the border tests those
#: artefacts more than the scorer.
BORDER_PX = 8

N_REFERENCES = 4
IMAGE_SIZE = 96


def settings(name: str, quick: bool = False) -> dict:
    """Keyword arguments for ``create_scorer(name, ...)``."""
    params = {"weights": "tiny", **SETTINGS.get(name, {})}
    if quick:
        params.update(QUICK.get(name, {}))
    return params


# -- images ------------------------------------------------------------------------------------------------
def references() -> list[np.ndarray]:
    return [textured(i) for i in range(N_REFERENCES)]


def normal_test_images() -> list[np.ndarray]:
    return [textured(i) for i in range(20, 24)]


def _checkerboard(size: int) -> np.ndarray:
    """A texture unlike the references: a red/green 4-pixel checkerboard, float (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size]
    chk = ((yy // 4 + xx // 4) % 2).astype(np.float32)
    return np.stack([chk, 1 - chk, np.full_like(chk, 0.2)], axis=-1)


@functools.lru_cache(maxsize=None)
def synthetic_defect(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A held-out normal texture with a DRAEM-style Perlin-masked defect: ``(uint8 image, bool mask)``.

    The checkerboard is blended in at opacity 0.8-1 (``beta`` < 0.2), so the defect is plainly visible.
    The noise has 1-2 cells per axis (large smooth blobs). Masks are redrawn (deterministically, from the
    same generator) until they are one connected blob covering 2-12% of the image and at least 5 pixels
    thick somewhere: a single-pixel sliver is not a fair test of a map whose cells are 8-16 pixels wide,
    and scattered specks would let a misplaced map peak land on one of them by chance.
    """
    img = textured(200 + seed, IMAGE_SIZE).astype(np.float32) / 255
    rng = np.random.default_rng(seed)
    for _ in range(200):
        aug, mask = synthesis.perlin_blend(img, rng, texture=_checkerboard(IMAGE_SIZE), beta_range=(0.0, 0.2),
                                           min_scale=0, max_scale=2, augment=False)
        mask = mask > 0
        inside = not (mask[:BORDER_PX].any() or mask[-BORDER_PX:].any() or mask[:, :BORDER_PX].any()
                      or mask[:, -BORDER_PX:].any())
        if (inside and 0.02 <= mask.mean() <= 0.12 and label(mask)[1] == 1
                and binary_erosion(mask, iterations=2).any()):
            return (aug * 255).round().astype(np.uint8), mask
    raise AssertionError("no suitable defect mask drawn; change the seed")


DEFECT_SEEDS = (0, 1, 2)


# -- fitted scorers, one per name for the whole session ----------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


_FITTED: dict[str, object] = {}


def fitted(name: str):
    """The scorer ``name`` fitted on the references (cached: tests must not change it)."""
    if name not in _FITTED:
        _FITTED[name] = vlad.create_scorer(name, **settings(name)).fit(references())
    return _FITTED[name]


def assert_same(a, b, rtol=0.0, atol=0.0):
    np.testing.assert_allclose(a.image_scores, b.image_scores, rtol=rtol, atol=atol)
    assert len(a.map_list()) == len(b.map_list())
    for ma, mb in zip(a.map_list(), b.map_list()):
        assert ma.shape == mb.shape
        np.testing.assert_allclose(ma, mb, rtol=rtol, atol=atol)


# -- the checks --------------------------------------------------------------------------------------------
def test_settings_are_parameters():
    assert set(SETTINGS) <= set(SCORERS), "SETTINGS names a scorer that is not registered"
    assert len(SCORERS) >= 12  # the built-ins are all here
    for name, params in {**SETTINGS, **QUICK}.items():
        accepted = set(get_scorer_class(name)._get_param_names())
        assert set(params) <= accepted, f"{name} does not accept {set(params) - accepted}"


@pytest.mark.parametrize("name", SCORERS)
def test_init_stores_parameters_only(name):
    params = settings(name)
    scorer = vlad.create_scorer(name, **params)
    got = scorer.get_params(deep=False)
    assert {k: got[k] for k in params} == params
    # scikit-learn's rule: __init__ sets exactly its parameters, each unchanged, and nothing fitted
    assert set(vars(scorer)) == set(got), f"{name}.__init__ sets attributes besides its parameters"
    assert not [k for k in vars(scorer) if k.endswith("_")]
    twin = clone(scorer)
    assert type(twin) is type(scorer) and twin is not scorer
    assert twin.get_params(deep=False) == got
    assert vlad.create_scorer(name, **got).get_params(deep=False) == got


@pytest.mark.parametrize("name", SCORERS)
def test_not_fitted_error(name, tmp_path):
    scorer = vlad.create_scorer(name, **settings(name))
    with pytest.raises(vlad.NotFittedError):
        scorer.predict([textured(0)])
    with pytest.raises(vlad.NotFittedError):
        scorer.save(tmp_path / "unfitted")
    if hasattr(scorer, "add_references"):  # few-shot scorers grow a fitted memory
        with pytest.raises(vlad.NotFittedError):
            scorer.add_references([textured(0)])


@pytest.mark.parametrize("name", SCORERS)
def test_fit_returns_self_and_empty_references(name):
    scorer = vlad.create_scorer(name, **settings(name, quick=True))
    if scorer.requires_references:
        for empty in (None, []):
            with pytest.raises(vlad.EmptyReferenceSetError):
                vlad.create_scorer(name, **settings(name, quick=True)).fit(empty)
        assert scorer.fit(references()[:2]) is scorer
    elif scorer.tier == "unlabeled":  # fits without images; scores images against each other or a pool
        assert scorer.fit() is scorer
        with pytest.raises(vlad.VladError, match="at least 2"):
            scorer.predict([textured(30)])
        res = scorer.predict([textured(30), textured(31)])
        assert res.image_scores.shape == (2,) and np.isfinite(res.image_scores).all()
    else:  # zero-shot: fits without images and predicts
        assert scorer.fit() is scorer
        res = scorer.predict([textured(30)])
        assert res.image_scores.shape == (1,) and np.isfinite(res.image_scores).all()
        assert np.isfinite(res.anomaly_maps[0]).all()


@pytest.mark.parametrize("name", SCORERS)
def test_predict_shapes_dtypes_and_finite(name):
    scorer = fitted(name)
    square, oblong = textured(40), textured(41, size=80)[:, :70]
    res = scorer.predict([square, oblong, synthetic_defect(0)[0]])
    assert res.image_scores.dtype == np.float32 and res.image_scores.shape == (3,)
    assert [m.shape for m in res.map_list()] == [(96, 96), (80, 70), (96, 96)]
    assert all(m.dtype == np.float32 for m in res.map_list())
    assert np.isfinite(res.image_scores).all() and all(np.isfinite(m).all() for m in res.map_list())
    # each image's result does not depend on the others in its call (float rounding of batched
    # convolutions may differ: a loose tolerance)
    alone = scorer.predict([oblong])
    np.testing.assert_allclose(alone.image_scores[0], res.image_scores[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(alone.map_list()[0], res.map_list()[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SCORERS)
def test_same_seed_same_results(name):
    a = vlad.create_scorer(name, **settings(name, quick=True)).fit(references())
    b = vlad.create_scorer(name, **settings(name, quick=True)).fit(references())
    probe = [textured(42), synthetic_defect(1)[0]]
    first = a.predict(probe)
    assert_same(first, b.predict(probe))
    assert_same(first, a.predict(probe))  # and predicting again changes nothing


@pytest.mark.parametrize("name", SCORERS)
def test_save_load_round_trip(name, tmp_path):
    scorer = fitted(name)
    probe = [textured(43), textured(44, size=80)[:, :70], synthetic_defect(2)[0]]
    before = scorer.predict(probe)
    loaded = vlad.load(scorer.save(tmp_path / name))
    assert type(loaded) is type(scorer)
    assert loaded.get_params(deep=False) == scorer.get_params(deep=False)
    assert_same(before, loaded.predict(probe), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", SCORERS)
def test_detects_and_localises_a_synthetic_defect(name):
    scorer = fitted(name)
    normals = normal_test_images()
    defects = [synthetic_defect(s) for s in DEFECT_SEEDS]
    res = scorer.predict(normals + [img for img, _ in defects])
    normal_max = res.image_scores[: len(normals)].max()
    maps = res.map_list()[len(normals):]
    for seed, (_, mask), score, amap in zip(DEFECT_SEEDS, defects, res.image_scores[len(normals):], maps):
        assert score > normal_max, f"{name}: defect {seed} scores {score:.4g} <= normal max {normal_max:.4g}"
        y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
        off = distance_transform_edt(~mask)[y, x]  # 0 inside the mask, else pixels to the nearest mask pixel
        assert off <= MARGIN_PX, f"{name}: defect {seed}: map peak at {(y, x)} lies {off:.1f} px outside the mask"


def test_load_restores_tuple_parameters(tmp_path):
    scorer = vlad.create_scorer("padim", weights="tiny").fit(references()[:1])
    assert isinstance(scorer.layers, tuple)
    loaded = vlad.load(scorer.save(tmp_path / "padim"))
    assert loaded.get_params(deep=False) == scorer.get_params(deep=False)


@pytest.mark.parametrize("name", SCORERS)
def test_declared_capabilities(name):
    """Capabilities are declared class attributes the detector and the app read, and they agree with
    what the scorer does."""
    from vlad.scorers.base import OUTPUT_SCALES, TIERS, FewShotMixin

    cls = get_scorer_class(name)
    assert cls.tier in TIERS and cls.output_scale in OUTPUT_SCALES
    assert cls.tier == "few" if cls.requires_references else cls.tier in ("zero", "unlabeled")
    assert cls.incremental == issubclass(cls, FewShotMixin)
    if cls.incremental:
        for method in ("add_references", "remove_reference", "without_reference", "list_references"):
            assert callable(getattr(cls, method))
    assert set(cls.part_scales.values()) <= set(OUTPUT_SCALES)
    assert not hasattr(cls, "few_shot")  # the old, unused flag is gone
