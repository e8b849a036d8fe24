"""AnomalyDINO scorer (tiny DINOv2 twin, synthetic images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlad
from vlad.errors import EmptyReferenceSetError, VladError
from vlad.scorers import anomalydino as ad

from conftest import textured, with_defect


def make(**kw):
    params = {"weights": "tiny", "rotations": 1}
    params.update(kw)
    return vlad.create_scorer("anomalydino", **params)


def test_reference_against_itself_gives_zero_map(good_images):
    s = make(rotations=8).fit(good_images)
    res = s.predict(good_images[:2])
    assert res.anomaly_maps.shape == (2, 96, 96)
    assert float(np.abs(res.anomaly_maps).max()) < 1e-4
    assert float(res.image_scores.max()) < 1e-4
    # and a different normal image is not at zero
    assert float(s.predict([textured(77)]).image_scores[0]) > 1e-3


def test_defect_scores_higher_and_map_peaks_in_defect(good_images, defect_image):
    # the tiny random twin is discriminative enough on this synthetic defect (no injected features needed)
    s = make(rotations=4).fit(good_images)
    res = s.predict([textured(50), textured(51), defect_image])
    assert res.image_scores[2] > 5 * res.image_scores[:2].max()
    m = res.anomaly_maps[2]
    y, x = np.unravel_index(m.argmax(), m.shape)
    assert 30 <= y < 50 and 60 <= x < 80  # the box of with_defect


def test_nn_search_matches_brute_force_over_blocks():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=1)
    blocks = [torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1) for n in (5, 23, 64)]
    full = torch.cat(blocks)
    expected = 1 - (q @ full.T).max(dim=1).values
    for rows in (3, 7, 4096):
        for qrows in (5, 2048):
            got = ad.nn_cosine_distance(q, blocks, block_rows=rows, query_rows=qrows)
            torch.testing.assert_close(got, expected.clamp_min(0))
    with pytest.raises(EmptyReferenceSetError):
        ad.nn_cosine_distance(q, [])


def test_score_is_mean_of_top_one_percent():
    d = torch.arange(1000, dtype=torch.float32)
    assert float(ad.mean_top_fraction(d, 0.01)) == pytest.approx(np.mean(np.arange(990, 1000)))
    assert float(ad.mean_top_fraction(torch.tensor([0.1, 0.5, 0.2]), 0.01)) == pytest.approx(0.5)


def test_incremental_equals_batch_fit(good_images, defect_image):
    tests = [defect_image, textured(60)]
    batch = make(rotations=2).fit(good_images).predict(tests)
    inc = make(rotations=2).fit(good_images[:1])
    inc.add_references(good_images[1:3]).add_references(good_images[3:])
    res = inc.predict(tests)
    assert inc.n_references_ == 4 and len(inc.list_references()) == 4
    np.testing.assert_allclose(res.image_scores, batch.image_scores, atol=1e-6)
    np.testing.assert_allclose(res.anomaly_maps, batch.anomaly_maps, atol=1e-6)


def test_remove_reference_restores_previous_state(good_images, defect_image):
    tests = [defect_image, textured(61)]
    s = make().fit(good_images[:3])
    before = s.predict(tests)
    n_mem = s.n_memory_
    s.add_references([textured(200)])
    changed = s.predict(tests)
    assert not np.allclose(changed.anomaly_maps, before.anomaly_maps)
    s.remove_reference(3)
    after = s.predict(tests)
    assert s.n_memory_ == n_mem and s.n_references_ == 3
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    np.testing.assert_array_equal(after.anomaly_maps, before.anomaly_maps)
    s.remove_reference(s.list_references()[0])
    assert s.n_references_ == 2


def _rings(size: int = 96) -> np.ndarray:
    """Concentric rings: unchanged by a 90-degree rotation about the centre."""
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    img = 0.5 + 0.4 * np.sin(np.sqrt(xx**2 + yy**2) / 2)
    return (np.repeat(img[..., None], 3, axis=2) * 255).astype(np.uint8)


def test_leave_one_out_excludes_all_rotations_of_the_reference(good_images):
    refs = [_rings(), good_images[1], good_images[2]]
    s = make(rotations=4).fit(refs)
    loo = s.leave_one_out_scores()
    # the rings' own 90-degree rotation would match them exactly: it must be excluded too
    assert loo.shape == (3,) and (loo > 1e-3).all()
    # equals scoring reference 0 against a scorer fitted on the others (all their rotations)
    other = make(rotations=4).fit(refs[1:])
    assert loo[0] == pytest.approx(float(other.predict([refs[0]]).image_scores[0]), abs=1e-6)
    # a duplicate reference: its rotation-0 twin is in the others' memory -> ~0
    s.add_references([refs[0]])
    assert s.leave_one_out_scores()[0] < 1e-4
    with pytest.raises(VladError, match="at least 2"):
        make().fit(good_images[:1]).leave_one_out_scores()


def test_save_load_identical_predictions(tmp_path, good_images, defect_image):
    s = make(rotations=2, masking="auto").fit(good_images)
    s.remove_reference(1)
    expected = s.predict([defect_image, textured(62, 80)])
    s.save(tmp_path / "ad")
    loaded = vlad.scorers.base.load_scorer(tmp_path / "ad")
    got = loaded.predict([defect_image, textured(62, 80)])
    assert loaded.list_references() == s.list_references()
    np.testing.assert_array_equal(got.image_scores, expected.image_scores)
    for a, b in zip(got.map_list(), expected.map_list()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loaded.leave_one_out_scores(), s.leave_one_out_scores(), atol=0)


def test_mixed_sizes_and_aspect_ratios(good_images):
    s = make(batch_size=8).fit(good_images)
    wide = np.concatenate([textured(70), textured(71)], axis=1)  # 96 x 192
    tall = textured(72, 150)[:, :75]  # 150 x 75
    imgs = [wide, textured(73), tall]
    res = s.predict(imgs)
    assert [m.shape for m in res.map_list()] == [(96, 192), (96, 96), (150, 75)]
    for i, img in enumerate(imgs):  # grouping by shape == one image at a time
        single = s.predict([img])
        assert res.image_scores[i] == pytest.approx(float(single.image_scores[0]), abs=1e-5)
        np.testing.assert_allclose(res.map_list()[i], single.map_list()[0], atol=1e-5)
    assert ad.resized_shape((96, 192), 448, 14) == (448, 896)
    assert ad.resized_shape((900, 1000), 448, 14) == (448, 504)


def test_empty_references_raise(good_images):
    with pytest.raises(EmptyReferenceSetError):
        make().fit([])
    with pytest.raises(EmptyReferenceSetError):
        make().fit(None)
    s = make().fit(good_images[:1])
    s.remove_reference(0)
    with pytest.raises(EmptyReferenceSetError, match="add_references"):
        s.predict([good_images[0]])


def test_bad_parameters_are_explained(good_images):
    with pytest.raises(VladError, match="masking"):
        make(masking="yes").fit(good_images[:1])
    with pytest.raises(VladError, match="rotations"):
        make(rotations=0).fit(good_images[:1])
    with pytest.raises(vlad.NotFittedError):
        make().predict(good_images[:1])


def _blob_tokens(grid=(10, 10), d=8, seed=0, sign=1.0):
    """Tokens of a centred 'object' (4x4 patches) on a background; returns (tokens, bool truth)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    truth = torch.zeros(h, w, dtype=torch.bool)
    truth[3:7, 3:7] = True
    direction = torch.zeros(d)
    direction[0] = 40.0 * sign
    toks = torch.randn(h * w, d, generator=g) * 0.5
    toks[truth.reshape(-1)] += direction
    return toks, truth.reshape(-1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_foreground_mask_finds_centred_object_either_sign(sign):
    toks, truth = _blob_tokens(sign=sign)
    mask = ad.foreground_mask(toks, (10, 10), threshold=10.0)
    assert mask[truth].all()  # object kept
    m = mask.reshape(10, 10)
    # dilation + closing with 3x3 enlarges the 4x4 block to 6x6 and nothing else
    assert m.sum() == 36 and m[2:8, 2:8].all()
    stats = ad.mask_statistics(mask, (10, 10))
    assert ad.masking_plausible(stats[None])
    assert not ad.masking_plausible(torch.tensor([[1.0, 0.0]]))  # texture: everything foreground
    assert not ad.masking_plausible(torch.tensor([[0.0, 1.0]]))  # nothing found


def test_masking_zeroes_background_patches(monkeypatch, good_images, defect_image):
    plain = make().fit(good_images).predict([defect_image])
    # inject a mask keeping only the left half of the 4x4 patch grid (the defect is on the right)
    def left_half(tokens, grid, threshold=10.0, **kw):
        m = torch.zeros(grid, dtype=torch.bool)
        m[:, : grid[1] // 2] = True
        return m.reshape(-1)

    monkeypatch.setattr(ad, "foreground_mask", left_half)
    masked = make(masking=True).fit(good_images).predict([defect_image])
    off = make(masking=False).fit(good_images).predict([defect_image])
    np.testing.assert_array_equal(off.anomaly_maps, plain.anomaly_maps)
    assert masked.anomaly_maps[0][:, 60:].max() < 0.5 * plain.anomaly_maps[0][:, 60:].max()
    assert masked.image_scores[0] < plain.image_scores[0]
    # "auto" turns masking off on these textures (tiny-twin tokens never pass the threshold)
    auto = make(masking="auto").fit(good_images)
    assert auto.masking_active_ is False


def test_rotation_by_90_degrees_is_exact():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = ad.rotate_batch(x, [0.0, 90.0])
    assert out.shape == (4, 3, 6, 6)
    torch.testing.assert_close(out[0], x[0])
    r = out[1]
    assert torch.allclose(r, torch.rot90(x[0], 1, (1, 2)), atol=1e-4) or torch.allclose(
        r, torch.rot90(x[0], -1, (1, 2)), atol=1e-4
    )


def test_coreset_bounds_memory_and_round_trips(tmp_path, good_images, defect_image):
    s = make(rotations=4, coreset_per_reference=20).fit(good_images)
    assert [c.shape[0] for c in s.memory_chunks_] == [20] * 4
    res = s.predict([defect_image])
    assert np.isfinite(res.image_scores).all()
    assert s.leave_one_out_scores().shape == (4,)
    s.save(tmp_path / "c")
    loaded = vlad.scorers.base.load_scorer(tmp_path / "c")
    np.testing.assert_array_equal(loaded.predict([defect_image]).anomaly_maps, res.anomaly_maps)
    np.testing.assert_allclose(loaded.leave_one_out_scores(), s.leave_one_out_scores())
