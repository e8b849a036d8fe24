"""Tests of vlad.synthesis: CutPaste, CutPaste-Scar and DRAEM's Perlin-noise texture blending."""

from __future__ import annotations

import numpy as np
import pytest

from vlad.synthesis import cutpaste, cutpaste_scar, perlin_blend, perlin_mask, perlin_noise, synthesize

KINDS = ["perlin", "cutpaste", "scar"]


def _image(h=64, w=48, seed=0):
    return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_given_seed(kind):
    img = _image()
    a1, m1 = synthesize(img, np.random.default_rng(7), kind)
    a2, m2 = synthesize(img, np.random.default_rng(7), kind)
    a3, m3 = synthesize(img, np.random.default_rng(8), kind)
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)
    assert not (np.array_equal(a1, a3) and np.array_equal(m1, m3))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(64, 48), (37, 91), (128, 96)])
def test_masks_non_empty_and_within_bounds(kind, shape):
    img = _image(*shape)
    for seed in range(5):
        aug, mask = synthesize(img, np.random.default_rng(seed), kind)
        assert aug.shape == img.shape and aug.dtype == np.float32
        assert mask.shape == shape and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() > 0 and mask.mean() < 1.0
        assert 0.0 <= aug.min() and aug.max() <= 1.0
        # outside the mask the image is untouched
        assert np.array_equal(aug[mask == 0], img[mask == 0])


def test_perlin_blend_changes_masked_pixels_and_uses_beta():
    img = np.full((64, 64, 3), 0.5, np.float32)
    tex = np.zeros((32, 32, 3), np.float32)
    aug, mask = perlin_blend(img, np.random.default_rng(0), texture=tex, augment=False, beta_range=(0.1, 0.2))
    inside = aug[mask == 1]
    # aug = (1 - beta) * 0 + beta * 0.5 with beta in [0.1, 0.2)
    assert np.all(inside >= 0.05 - 1e-6) and np.all(inside < 0.1 + 1e-6)


def test_perlin_noise_range_and_shape():
    n = perlin_noise((50, 70), (4, 8), np.random.default_rng(0))
    assert n.shape == (50, 70) and np.isfinite(n).all() and np.abs(n).max() <= 1.0
    m = perlin_mask((50, 70), np.random.default_rng(0))
    assert m.shape == (50, 70) and m.any()


def test_cutpaste_area_range():
    img = _image(100, 100)
    _, mask = cutpaste(img, np.random.default_rng(0), area_ratio=(0.1, 0.1001), colour_jitter=0)
    assert abs(mask.mean() - 0.1) < 0.02
    _, scar = cutpaste_scar(img, np.random.default_rng(0))
    assert 0 < scar.sum() < 0.05 * scar.size


def test_bad_inputs():
    with pytest.raises(ValueError, match="H, W, 3"):
        cutpaste(np.zeros((10, 10)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="float"):
        cutpaste(np.zeros((10, 10, 3), np.uint8), np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        perlin_blend(_image(), 3)
    with pytest.raises(ValueError, match="unknown synthesis"):
        synthesize(_image(), np.random.default_rng(0), "nope")
