"""The predict path in torch on the scorer's device: the fused result equals the float64 recipe of
:mod:`vlad.detector.fusion` within 1e-5, the one-step resize + blur equals the two steps, and the
array-generic calibration gives the same numbers on numpy arrays and on tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlad
from vlad.detector.fusion import Normaliser, _median, fit_reference_normaliser, tier_weights
from vlad.ops import gaussian_blur, resize_blur, resize_maps

from conftest import textured, with_defect

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "src, dst, sigma",
    [((32, 32), (1024, 1024), 4.0), ((15, 15), (240, 240), 4.0), ((28, 20), (500, 203), 2.5),
     ((8, 8), (6, 9), 4.0),  # smaller than the kernel: replicate padding
     ((32, 32), (32, 32), 4.0), ((16, 16), (224, 224), 0.0), ((40, 30), (20, 15), 1.0)],
)
def test_resize_blur_equals_resize_then_blur(src, dst, sigma):
    maps = torch.rand(2, *src, generator=torch.Generator().manual_seed(0)) * 3 + 1
    want = gaussian_blur(resize_maps(maps, dst), sigma)
    got = resize_blur(maps, dst, sigma)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("kind", ["reference", "probability", "self"])
def test_calibration_on_tensors_equals_numpy_and_float64(kind):
    rng = np.random.default_rng(1)
    # values far from 0 with a small spread: float32 arithmetic would cancel badly if done naively
    maps = [(1000.0 + rng.normal(0, 60.0, (37, 41))).astype(np.float32) for _ in range(3)]
    maps[1][5:9, 5:9] += 900.0
    scores = np.array([m.max() for m in maps], dtype=np.float32)
    if kind == "reference":
        norm = fit_reference_normaliser(scores - 50.0, [m - 50.0 for m in maps])
    else:
        norm = Normaliser(kind=kind)
        if kind == "probability":
            maps = [m / 2000.0 for m in maps]
            scores = scores / 2000.0
    s_np, m_np = norm.transform(scores, maps)
    s_t, m_t = norm.transform_arrays(torch.from_numpy(scores), [torch.from_numpy(m) for m in maps])
    np.testing.assert_allclose(s_t.numpy(), s_np, rtol=1e-6, atol=1e-12)
    for a, b in zip(m_t, m_np):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-12)
    # against the recipe in float64
    for i, m in enumerate(maps):
        m64 = m.astype(np.float64)
        if kind == "probability":
            want_m, want_s = np.clip(m64, 0, 1), np.clip(float(scores[i]), 0, 1)
        else:
            if kind == "self":
                loc = float(np.median(m64))
                scale = max(float(np.median(np.abs(m64 - loc))) * 1.4826, 0.05 * abs(loc), 1e-6)
                iloc, iscale, z0i, z0p = loc, scale, norm.z0_image, norm.z0_pixel
                ploc, pscale = loc, scale
            else:
                iloc, iscale, ploc, pscale = norm.image_loc, norm.image_scale, norm.pixel_loc, norm.pixel_scale
                z0i, z0p = norm.z0_image, norm.z0_pixel
            want_m = _sigmoid64(((m64 - ploc) / pscale - z0p) / norm.temperature)
            want_s = _sigmoid64(((float(scores[i]) - iloc) / iscale - z0i) / norm.temperature)
        np.testing.assert_allclose(m_np[i], want_m, rtol=2e-6, atol=1e-30)
        np.testing.assert_allclose(s_np[i], want_s, rtol=2e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 1001])
def test_median_is_numpys(n):
    x = np.random.default_rng(n).normal(size=n).astype(np.float32)
    assert _median(x) == pytest.approx(float(np.median(x.astype(np.float64))), rel=0, abs=0)
    assert _median(torch.from_numpy(x)) == pytest.approx(float(np.median(x.astype(np.float64))), rel=0, abs=0)


def _recipe(det, images) -> tuple[np.ndarray, list[np.ndarray]]:
    """The fused scores and maps recomputed in float64 numpy from the raw results, by the module's
    documented recipe: each unit calibrated by its normaliser, units of a scorer averaged, scorers
    fused by the tier weights (rule "mean")."""
    _, raw = det.predict_with_raw(images)
    cal = det._calibrated()
    tiers = {n: t for n, t in det.tiers.items() if det.active_[n]}
    weights = tier_weights(tiers, len(det.references_), det.options["k0"])
    fused_s, fused_m = 0.0, [0.0] * len(images)
    for name, r in raw.items():
        parts = {p: c for p, c in r.components.items() if p in type(det.scorers[name]).part_scales}
        units = {f"{name}/{p}": c for p, c in parts.items()} or {name: r}
        unit_s, unit_m = 0.0, [0.0] * len(images)
        for unit, res in units.items():
            norm = cal.normalisers[unit]
            maps64 = [m.astype(np.float64) for m in res.map_list()]
            s64 = res.image_scores.astype(np.float64)
            if norm.kind == "probability":
                cs, cm = np.clip(s64, 0, 1), [np.clip(m, 0, 1) for m in maps64]
            else:
                cs, cm = np.empty_like(s64), []
                for i, m in enumerate(maps64):
                    if norm.kind == "self":
                        loc = float(np.median(m))
                        scale = max(float(np.median(np.abs(m - loc))) * 1.4826, 0.05 * abs(loc), 1e-6)
                        iloc = ploc = loc
                        iscale = pscale = scale
                    else:
                        iloc, iscale, ploc, pscale = norm.image_loc, norm.image_scale, norm.pixel_loc, norm.pixel_scale
                    cs[i] = _sigmoid64(((s64[i] - iloc) / iscale - norm.z0_image) / norm.temperature)
                    cm.append(_sigmoid64(((m - ploc) / pscale - norm.z0_pixel) / norm.temperature))
            unit_s = unit_s + cs / len(units)
            unit_m = [a + b / len(units) for a, b in zip(unit_m, cm)]
        fused_s = fused_s + weights[name] * unit_s
        fused_m = [a + weights[name] * b for a, b in zip(fused_m, unit_m)]
    return fused_s, fused_m


@pytest.mark.parametrize("n_refs", [0, 1, 3])
def test_detector_equals_the_float64_recipe(n_refs):
    """The torch predict path (float32, on the scorer's device) against the same recipe in float64."""
    det = vlad.create_detector("winclip+maeday+anomalydino" if n_refs else "winclip+maeday", weights="tiny",
                               random_state=0)
    det.fit([textured(s, 112) for s in range(n_refs)] or None)
    images = [textured(10, 112), with_defect(textured(11, 112)), textured(12, 150)[:, :130]]
    res = det.predict(images)
    want_s, want_m = _recipe(det, images)
    np.testing.assert_allclose(res.image_scores, want_s, rtol=1e-5, atol=1e-7)
    for got, want in zip(res.map_list(), want_m):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_long_call_is_scored_in_chunks_with_the_same_result(monkeypatch, tmp_path):
    """Many images: chunks of whole scorer batches, the next chunk read in the background; the result
    equals one call per image batch (same batches), failures keep their positions among the inputs."""
    from PIL import Image

    det = vlad.create_detector("patchcore", weights="tiny", random_state=0, batch_size=2).fit(
        [textured(s, 64) for s in range(2)])
    monkeypatch.setattr(type(det), "_chunk_size", lambda self: 4)
    paths = []
    for i in range(9):
        path = tmp_path / f"{i}.png"
        Image.fromarray(with_defect(textured(20 + i, 64), (10, 20, 10, 20)) if i % 3 == 0 else textured(20 + i, 64)).save(path)
        paths.append(path)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    calls = []
    real = type(det)._predict_loaded
    monkeypatch.setattr(type(det), "_predict_loaded", lambda self, loaded, failures=(): calls.append(len(loaded)) or real(self, loaded, failures))
    whole = [det._predict_working(paths[i : i + 2])[0] for i in range(0, 9, 2)]  # the scorer's own batches
    calls.clear()
    res = det.predict(paths)
    assert calls == [4, 4, 1]
    # the same batches through the models; vectorised float32 ops may round the last bit differently
    np.testing.assert_allclose(res.image_scores, np.concatenate([r.image_scores for r in whole]), rtol=1e-6)
    np.testing.assert_allclose(res.anomaly_maps, np.concatenate([r.anomaly_maps for r in whole]), rtol=1e-6, atol=1e-9)
    assert res.names == tuple(str(p) for p in paths)
    mixed = paths[:5] + [tmp_path / "bad.png"] + paths[5:]
    skipped = det.predict(mixed, on_error="skip")
    assert [f.index for f in skipped.failures] == [5] and len(skipped) == 9
    np.testing.assert_allclose(skipped.image_scores, res.image_scores, rtol=1e-6)
    with pytest.raises(vlad.errors.InvalidImageError, match="bad.png"):
        det.predict(mixed)


def test_chunks_are_whole_batches_and_musc_without_a_pool_is_not_chunked():
    det = vlad.create_detector("winclip+maeday", weights="tiny")
    det.scorers["winclip"].batch_size, det.scorers["maeday"].batch_size = 8, 3
    det.fit()
    assert det._chunk_size() % 24 == 0 and det._chunk_size() >= 32
    musc = vlad.create_detector("musc", weights="tiny").fit()
    assert musc._chunk_size() is None


def test_an_image_goes_to_a_device_once_per_detector_call(monkeypatch):
    """Several scorers read each image; on a GPU it is copied there once (``meta`` stands in for it)."""
    from vlad import ops

    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(a) or real_to(self, *a, **k))
    arr, other = textured(1, 32), textured(2, 32)
    meta = torch.device("meta")
    ops._as_float(arr, meta), ops._as_float(arr, meta)
    assert len(copies) == 2  # outside the block: a copy each time
    copies.clear()
    with ops.shared_device_copies():
        for _ in range(3):
            assert ops._as_float(arr, meta).device.type == "meta"
            ops._as_float(other, meta)
        assert len(copies) == 2  # one per image
    assert ops._device_copies.get() is None  # freed with the block
