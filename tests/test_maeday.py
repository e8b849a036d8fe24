"""MAEDAY (zero-shot MAE reconstruction error): masks, aggregation, determinism, sizes, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlad
from tests.conftest import textured, with_defect
from vlad.scorers.maeday import interpolate_grid_pos, stratified_masks


@pytest.fixture(scope="module")
def fitted():
    return vlad.create_scorer("maeday", weights="tiny", sigma=0.0, batch_size=4, n_masks=8).fit()


def _fake_reconstruct(scorer, wrong):
    """A stand-in for the MAE: reconstructs the target exactly, except where ``wrong(pixels, hidden)`` says.

    ``wrong`` returns a pixel-space offset ``(M, L, p*p*3)`` added to the true [0, 1] patches.
    """
    model = scorer.model_
    mean = torch.tensor(scorer.preprocess_.mean)
    std = torch.tensor(scorer.preprocess_.std)

    def reconstruct(pixels, noise):
        n_keep = scorer.n_patches_ - scorer.n_hidden_
        hidden = torch.ones_like(noise)
        hidden.scatter_(1, torch.argsort(noise, dim=1)[:, :n_keep], 0.0)
        target = model.patchify(pixels)  # normalised, channel last
        truth = (target.reshape(*target.shape[:2], -1, 3) * std + mean).reshape(target.shape)
        recon = truth + wrong(truth, hidden)
        logits = ((recon.reshape(*recon.shape[:2], -1, 3) - mean) / std).reshape(recon.shape)
        if scorer.norm_pix_:  # a norm_pix_loss model predicts per-patch normalised pixels
            mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            logits = (logits - mu) / (var + 1e-6) ** 0.5
        return logits, hidden

    return reconstruct


def test_masks_hide_every_patch_balanced(fitted):
    masks = fitted.masks_  # (N, L) True = hidden
    assert masks.shape == (8, fitted.n_patches_)
    per_mask = masks.sum(1)
    assert torch.all(per_mask == fitted.n_hidden_)
    assert fitted.n_hidden_ == fitted.n_patches_ - int(fitted.n_patches_ * 0.25)
    per_patch = masks.sum(0)
    assert per_patch.min() >= 1
    assert per_patch.max() - per_patch.min() <= 1  # stratified: 8 * 0.75 = 6 each
    assert torch.all(stratified_masks(32, 16, 12, torch.Generator().manual_seed(0)).sum(0) == 24)
    # also on a grid where the counts do not divide evenly
    m = stratified_masks(5, 196, 147, torch.Generator().manual_seed(3))
    assert m.sum(0).min() >= 1 and m.sum(0).max() - m.sum(0).min() <= 1 and torch.all(m.sum(1) == 147)


def test_too_few_masks_is_a_clear_error():
    with pytest.raises(ValueError, match="n_masks >= 2"):
        vlad.create_scorer("maeday", weights="tiny", n_masks=1).fit()
    with pytest.raises(ValueError, match="score must be one of"):
        vlad.create_scorer("maeday", weights="tiny", score="mean").fit()
    with pytest.raises(ValueError, match="needs a masked autoencoder"):
        vlad.create_scorer("maeday", backbone="tiny-dino", weights="tiny").fit()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vlad.create_scorer("maeday", weights="tiny", image_size=70).fit()


def test_not_fitted_error():
    with pytest.raises(vlad.NotFittedError):
        vlad.create_scorer("maeday", weights="tiny").predict([textured(0)])


def test_maps_vary_finite_and_mixed_sizes(fitted):
    imgs = [textured(0), with_defect(textured(1)), textured(2, size=50), textured(3)[:80, :64]]
    res = fitted.predict(imgs)
    maps = res.map_list()
    assert [m.shape for m in maps] == [(96, 96), (96, 96), (50, 50), (80, 64)]
    assert res.image_scores.shape == (4,) and np.all(np.isfinite(res.image_scores))
    for m in maps:
        assert np.all(np.isfinite(m)) and m.min() >= 0 and m.std() > 0


def test_deterministic_and_independent_of_chunking(fitted):
    imgs = [textured(0), with_defect(textured(1))]
    a = fitted.predict(imgs)
    other = vlad.create_scorer("maeday", weights="tiny", sigma=0.0, n_masks=8, mask_batch=3, batch_size=2).fit()
    b = other.predict(imgs)
    np.testing.assert_allclose(a.anomaly_maps, b.anomaly_maps, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.image_scores, b.image_scores, rtol=1e-5)
    seeded = vlad.create_scorer("maeday", weights="tiny", sigma=0.0, n_masks=8, random_state=1).fit()
    assert not torch.equal(seeded.masks_, fitted.masks_)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_error_localised_where_reconstruction_fails(norm_pix):
    scorer = vlad.create_scorer("maeday", weights="tiny", sigma=0.0, n_masks=8).fit()
    scorer.norm_pix_ = norm_pix
    bad_patch = 6  # row 1, column 2 of the 4x4 grid at 64 px

    def wrong(truth, hidden):
        off = torch.zeros_like(truth)
        off[:, bad_patch] = 0.1
        return off

    scorer._reconstruct = _fake_reconstruct(scorer, wrong)
    img = textured(5, size=64)  # values in ~[0.2, 0.8]: no clamping
    res = scorer.predict([img])
    amap = res.anomaly_maps[0]
    region = np.zeros_like(amap, dtype=bool)
    region[16:32, 32:48] = True
    np.testing.assert_allclose(amap[region], 0.01, rtol=1e-3)  # squared error of 0.1 in pixel space
    assert np.abs(amap[~region]).max() < 1e-6
    assert res.image_scores[0] == pytest.approx(0.01, rel=1e-3)


def test_errors_only_counted_where_hidden():
    scorer = vlad.create_scorer("maeday", weights="tiny", sigma=0.0, n_masks=8).fit()
    # garbage on every visible patch, perfect on hidden ones: MAEDAY must see nothing
    scorer._reconstruct = _fake_reconstruct(scorer, lambda truth, hidden: 0.5 * (1 - hidden)[..., None])
    res = scorer.predict([textured(6, size=64), textured(7, size=64)])
    assert np.abs(res.anomaly_maps).max() < 1e-6
    # the same error in every mask: the mean over the masks hiding each patch is that error
    scorer._reconstruct = _fake_reconstruct(scorer, lambda truth, hidden: torch.full_like(truth, 0.1))
    res = scorer.predict([textured(6, size=64)])
    np.testing.assert_allclose(res.anomaly_maps, 0.01, rtol=1e-3)


def test_defect_scores_higher_with_a_plausible_reconstruction():
    """A reconstruction that is the image smoothed (what an MAE inpaints on smooth texture) flags a square."""
    scorer = vlad.create_scorer("maeday", weights="tiny", sigma=1.0, n_masks=8).fit()
    model = scorer.model_
    mean = torch.tensor(scorer.preprocess_.mean).view(1, 3, 1, 1)
    std = torch.tensor(scorer.preprocess_.std).view(1, 3, 1, 1)

    def reconstruct(pixels, noise):
        n_keep = scorer.n_patches_ - scorer.n_hidden_
        hidden = torch.ones_like(noise)
        hidden.scatter_(1, torch.argsort(noise, dim=1)[:, :n_keep], 0.0)
        smooth = torch.full_like(pixels, 0.5)  # "normal" appearance: mid-grey
        return model.patchify((smooth - mean) / std), hidden

    scorer._reconstruct = reconstruct
    flat = np.full((64, 64, 3), 128, np.uint8)
    res = scorer.predict([flat, with_defect(flat, box=(8, 24, 40, 56))])
    assert res.image_scores[1] > res.image_scores[0] + 0.1
    amap = res.anomaly_maps[1]
    y, x = np.unravel_index(np.argmax(amap), amap.shape)
    assert 8 <= y < 24 and 40 <= x < 56


def test_other_image_size_and_topk():
    scorer = vlad.create_scorer("maeday", weights="tiny", image_size=96, score="topk", topk=0.05, n_masks=8).fit()
    assert scorer.grid_ == 6 and scorer.model_.decoder.decoder_pos_embed.shape[1] == 37
    res = scorer.predict([textured(0, size=120)])
    assert res.anomaly_maps.shape == (1, 120, 120) and np.isfinite(res.image_scores).all()
    # our 2-D resampling of the decoder's embeddings matches transformers' 2-D one of the encoder's
    emb = scorer.model_.vit.embeddings
    ours = interpolate_grid_pos(emb.position_embeddings, 4, 6)
    theirs = emb.interpolate_pos_encoding(torch.zeros(1, 37, emb.position_embeddings.shape[-1]), 96, 96)
    torch.testing.assert_close(ours, theirs)
    # with the decoder's grid already right, transformers' 1-D resampling must leave it unchanged
    dec = scorer.model_.decoder
    torch.testing.assert_close(dec.interpolate_pos_encoding(torch.zeros(1, 37, 32)), dec.decoder_pos_embed)


def test_save_load_round_trip(fitted, tmp_path):
    imgs = [textured(8), with_defect(textured(9))]
    before = fitted.predict(imgs)
    fitted.save(tmp_path / "m")
    loaded = type(fitted).load(tmp_path / "m")
    assert type(loaded) is type(fitted) and loaded.get_params() == fitted.get_params()
    assert torch.equal(loaded.masks_, fitted.masks_)
    after = loaded.predict(imgs)
    np.testing.assert_allclose(after.anomaly_maps, before.anomaly_maps, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(after.image_scores, before.image_scores, rtol=1e-5)


def test_tile_mode_keeps_resolution_and_stitches():
    scorer = vlad.create_scorer("maeday", weights="tiny", sigma=0.0, n_masks=8, large_images="tile").fit()
    model = scorer.model_
    mean = torch.tensor(scorer.preprocess_.mean).view(1, 3, 1, 1)
    std = torch.tensor(scorer.preprocess_.std).view(1, 3, 1, 1)

    def reconstruct(pixels, noise):  # inpaints mid-grey everywhere: only the defect differs
        n_keep = scorer.n_patches_ - scorer.n_hidden_
        hidden = torch.ones_like(noise)
        hidden.scatter_(1, torch.argsort(noise, dim=1)[:, :n_keep], 0.0)
        return model.patchify((torch.full_like(pixels, 128 / 255) - mean) / std), hidden

    scorer._reconstruct = reconstruct
    flat = np.full((64, 160, 3), 128, np.uint8)  # 3 overlapping 64 px tiles at x = 0, 48, 96
    defect = with_defect(flat, box=(40, 44, 100, 110))  # 4x10 px, where two tiles overlap, full resolution
    res = scorer.predict([flat, defect])
    assert res.anomaly_maps.shape == (2, 64, 160)
    assert np.abs(res.anomaly_maps[0]).max() < 1e-6
    amap = res.anomaly_maps[1]
    hot = amap > 1e-6
    assert hot[40:44, 100:110].all() and not hot[:, :90].any() and not hot[:, 120:].any()
    # the error survives stitching unchanged (same value in both tiles covering it: mean, not sum)
    expected = np.mean((np.array([255, 30, 30]) / 255 - 128 / 255) ** 2)
    assert res.image_scores[1] == pytest.approx(expected, rel=1e-3)
