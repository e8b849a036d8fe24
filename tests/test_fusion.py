"""Normalisation, fusion rules and tier weights (pure numpy, no models)."""

from __future__ import annotations

import numpy as np
import pytest

from vlad import AnomalyResult, VladError
from vlad.detector.fusion import (
    Normaliser,
    fit_reference_normaliser,
    fuse_arrays,
    fuse_results,
    prior_normaliser,
    tier_weights,
)


def _maps(rng, n, shape=(16, 16), scale=1.0, offset=0.0):
    return [offset + scale * np.abs(rng.normal(size=shape)) for _ in range(n)]


def test_reference_normaliser_is_scale_and_shift_invariant():
    rng = np.random.default_rng(0)
    scores = rng.normal(5.0, 0.5, size=8)
    maps = _maps(rng, 8)
    test_s = np.array([5.0, 9.0])
    test_m = _maps(np.random.default_rng(1), 2)
    a = fit_reference_normaliser(scores, maps)
    b = fit_reference_normaliser(scores * 100 + 7, [m * 100 + 7 for m in maps])
    sa, ma = a.transform(test_s, test_m)
    sb, mb = b.transform(test_s * 100 + 7, [m * 100 + 7 for m in test_m])
    np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ma[0], mb[0], rtol=1e-5, atol=1e-6)
    assert sa[0] < 0.2 and sa[1] > 0.9  # a normal score is low, one 8 sigma out is high
    assert ((sa >= 0) & (sa <= 1)).all()


def test_reference_normaliser_statistics():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 100.0])  # one outlier
    maps = [np.arange(100, dtype=float).reshape(10, 10)] * 5
    robust = fit_reference_normaliser(scores, maps, method="robust")
    assert robust.image_loc == pytest.approx(3.0)
    assert robust.image_scale == pytest.approx(1.4826)
    z = fit_reference_normaliser(scores, maps, method="zscore")
    assert z.image_loc == pytest.approx(22.0)
    assert z.image_scale == pytest.approx(np.std(scores, ddof=1))
    # pixel: median 49.5, the 0.999 quantile maps to the boundary 0.5
    q = np.quantile(np.tile(np.arange(100.0), 5), 0.999)
    assert robust.pixel_loc == pytest.approx(49.5)
    _, m = robust.transform([3.0], [np.array([[q, 49.5]])])
    assert m[0][0, 0] == pytest.approx(0.5, abs=1e-4)
    assert m[0][0, 1] < 0.06


def test_reference_normaliser_floors_zero_spread_and_needs_two():
    n = fit_reference_normaliser(np.array([2.0, 2.0, 2.0]), [np.full((4, 4), 2.0)] * 3)
    assert n.image_scale >= 0.05 * 2.0 and n.pixel_scale > 0
    s, _ = n.transform([2.0, 10.0], [np.full((4, 4), 2.0)] * 2)
    assert np.isfinite(s).all() and s[1] > s[0]
    with pytest.raises(VladError, match="at least 2"):
        fit_reference_normaliser(np.array([1.0]), [np.zeros((4, 4))])
    with pytest.raises(VladError, match="method"):
        fit_reference_normaliser(np.array([1.0, 2.0]), [np.zeros((4, 4))] * 2, method="minmax")


def test_priors():
    p = prior_normaliser("probability")
    assert p.kind == "probability"
    s, m = p.transform([0.3, 1.2], [np.full((4, 4), 0.7), np.full((4, 4), -1.0)])
    np.testing.assert_allclose(s, [0.3, 1.0])
    assert m[0].max() == pytest.approx(0.7) and m[1].max() == 0.0
    self_prior = prior_normaliser("score")
    assert self_prior.kind == "self"
    rng = np.random.default_rng(0)
    flat = np.abs(rng.normal(size=(32, 32)))
    spot = flat.copy()
    spot[10:14, 10:14] += 20.0
    s, m = self_prior.transform([flat.max(), spot.max()], [flat, spot])
    assert s[0] < 0.5 < s[1]
    assert m[1][11, 11] > 0.9 and np.median(m[1]) < 0.05
    # "self" is invariant to the units of the map
    s2, _ = self_prior.transform([flat.max() * 1000, spot.max() * 1000], [flat * 1000, spot * 1000])
    np.testing.assert_allclose(s, s2, rtol=1e-5)


def test_normaliser_dict_roundtrip_and_validation():
    n = fit_reference_normaliser(np.array([1.0, 2.0, 4.0]), [np.ones((4, 4)) * i for i in range(3)])
    assert Normaliser.from_dict(n.to_dict()) == n
    with pytest.raises(VladError, match="unexpected"):
        Normaliser.from_dict({**n.to_dict(), "__reduce__": "os.system"})
    with pytest.raises(VladError, match="finite number"):
        Normaliser.from_dict({**n.to_dict(), "image_loc": "1; rm -rf /"})
    with pytest.raises(VladError, match="kind"):
        Normaliser.from_dict({**n.to_dict(), "kind": "eval"})


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("mean", (0.25 * 0.2 + 0.75 * 0.8)),
        ("max", 0.8),
        ("harmonic", 1.0 / (0.25 / 0.2 + 0.75 / 0.8)),
    ],
)
def test_fusion_rules(rule, expected):
    out = fuse_arrays([np.array([0.2, 0.2]), np.array([0.8, 0.8])], [1.0, 3.0], rule)
    np.testing.assert_allclose(out, [expected, expected], rtol=1e-6)


def test_fusion_rules_edge_cases():
    # zero weight leaves a scorer out even of "max"
    out = fuse_arrays([np.array([0.9]), np.array([0.1])], [0.0, 1.0], "max")
    assert out[0] == pytest.approx(0.1)
    # harmonic mean is pulled to a confident zero, without dividing by zero
    out = fuse_arrays([np.array([0.0]), np.array([1.0])], [1.0, 1.0], "harmonic")
    assert 0.0 <= out[0] < 1e-5
    with pytest.raises(VladError, match="fusion rule"):
        fuse_arrays([np.zeros(2)], [1.0], "median")
    with pytest.raises(VladError, match="not all 0"):
        fuse_arrays([np.zeros(2)], [0.0], "mean")


def test_fuse_results_mixed_sizes_and_components():
    sizes = [(8, 12), (10, 6)]
    a = AnomalyResult([0.2, 0.4], [np.full(s, 0.2) for s in sizes], names=("x", "y"))
    b = AnomalyResult([0.6, 0.8], [np.full(s, 0.6) for s in sizes], names=("x", "y"))
    fused = fuse_results({"a": a, "b": b}, {"a": 0.5, "b": 0.5}, "mean")
    assert isinstance(fused.anomaly_maps, list)
    assert [m.shape for m in fused.anomaly_maps] == sizes
    np.testing.assert_allclose(fused.image_scores, [0.4, 0.6], rtol=1e-6)
    np.testing.assert_allclose(fused.anomaly_maps[1], 0.4, rtol=1e-6)
    assert set(fused.components) == {"a", "b"} and fused.names == ("x", "y")
    c = AnomalyResult([0.1, 0.1], [np.zeros((8, 12)), np.zeros((5, 5))])
    with pytest.raises(VladError, match="different sizes"):
        fuse_results({"a": a, "c": c}, {"a": 1.0, "c": 1.0})


def test_tier_weights_shift_with_references():
    tiers = {"winclip": "zero", "maeday": "zero", "anomalydino": "few"}
    w0 = tier_weights(tiers, 0)
    assert w0["anomalydino"] == 0 and w0["winclip"] == pytest.approx(0.5)
    w1 = tier_weights(tiers, 1, k0=2.0)
    assert w1["anomalydino"] == pytest.approx(1 / 3) and w1["maeday"] == pytest.approx(1 / 3)
    w4 = tier_weights(tiers, 4, k0=2.0)
    assert w4["anomalydino"] == pytest.approx(2 / 3)
    few = [tier_weights(tiers, k)["anomalydino"] for k in (0, 1, 2, 4, 8, 64)]
    assert few == sorted(few) and few[-1] > 0.95
    for w in (w0, w1, w4):
        assert sum(w.values()) == pytest.approx(1.0)
    # user weights inside a tier, configurable k0
    w = tier_weights(tiers, 2, k0=1.0, fusion_weights={"winclip": 3.0})
    assert w["anomalydino"] == pytest.approx(2 / 3)
    assert w["winclip"] == pytest.approx(0.75 / 3) and w["maeday"] == pytest.approx(0.25 / 3)
    # a tier without members gives its weight away
    assert tier_weights({"anomalydino": "few"}, 1) == {"anomalydino": 1.0}
    assert tier_weights({"winclip": "zero"}, 10) == {"winclip": 1.0}
    with pytest.raises(VladError, match="k0"):
        tier_weights(tiers, 1, k0=0)
