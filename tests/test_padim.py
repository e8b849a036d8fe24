"""PaDiM (vlad.scorers.padim): fit/predict, Mahalanobis fidelity, persistence, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlad
from conftest import textured, with_defect
from vlad.features import aligned_features


@pytest.fixture(scope="module")
def refs():
    return [textured(i) for i in range(5)]


@pytest.fixture(scope="module")
def fitted(refs):
    return vlad.create_scorer("padim", weights="tiny").fit(refs)


def test_maps_at_image_size_and_defect_scores_higher(fitted):
    odd = textured(7, size=80)[:, :72]  # (80, 72): maps come back at each image's own size
    res = fitted.predict([textured(50), textured(51), with_defect(textured(100)), odd])
    assert res.anomaly_maps[0].shape == (96, 96) and res.anomaly_maps[3].shape == (80, 72)
    assert all(np.isfinite(m).all() and m.std() > 0 for m in res.anomaly_maps)
    assert res.image_scores[2] > 1.5 * res.image_scores[[0, 1, 3]].max()
    defect_map = res.anomaly_maps[2]
    assert defect_map[30:50, 60:80].mean() > defect_map[:20, :20].mean()


def _naive_distances(scorer, images):
    """Mahalanobis distances with an explicitly inverted covariance per position: (B, h, w)."""
    from vlad.images import load_images
    from vlad.ops import preprocess_batch

    def feats(imgs):
        x = preprocess_batch(load_images(imgs), scorer.backbone_.spec.preprocess, size=scorer.size_)
        with torch.no_grad():
            f = aligned_features(list(scorer.backbone_.model(x)), 0, "nearest")[:, scorer.channel_index_]
        return f.double()

    ref = feats(scorer._refs_for_test)
    n, d, h, w = ref.shape
    x = ref.flatten(2).permute(2, 0, 1)  # (P, n, d)
    mean = x.mean(1, keepdim=True)
    cov = (x - mean).transpose(1, 2) @ (x - mean) / (n - 1) + scorer.epsilon * torch.eye(d, dtype=x.dtype)
    prec = torch.from_numpy(np.linalg.inv(cov.numpy()))  # an independent (LAPACK via numpy) inverse
    v = feats(images).flatten(2).permute(2, 0, 1) - mean  # (P, B, d)
    d2 = torch.einsum("pbi,pij,pbj->pb", v, prec, v)
    return d2.sqrt().T.reshape(-1, h, w)


@pytest.mark.parametrize("n_features", [None, 3])  # 4 refs: low-rank path (d=100 > n) and full path (d=3)
def test_distances_match_naive_inverse(refs, n_features):
    scorer = vlad.create_scorer("padim", weights="tiny", n_features=n_features).fit(refs[:4])
    assert scorer.low_rank_ == (n_features is None)
    scorer._refs_for_test = refs[:4]
    tests = [textured(60), with_defect(textured(61))]
    expected = _naive_distances(scorer, tests)
    from vlad.images import load_images
    from vlad.ops import preprocess_batch

    x = preprocess_batch(load_images(tests), scorer.backbone_.spec.preprocess, size=scorer.size_)
    with torch.no_grad():
        got = scorer.mahalanobis(scorer._features(list(scorer.backbone_.model(x)))).double()
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=1e-3)


def test_channel_subset_is_seeded(refs):
    a = vlad.create_scorer("padim", weights="tiny", n_features=50, random_state=1).fit(refs[:2])
    b = vlad.create_scorer("padim", weights="tiny", n_features=50, random_state=1).fit(refs[:2])
    c = vlad.create_scorer("padim", weights="tiny", n_features=50, random_state=2).fit(refs[:2])
    assert torch.equal(a.channel_index_, b.channel_index_)
    assert not torch.equal(a.channel_index_, c.channel_index_)


def test_save_load_identical(fitted, tmp_path):
    images = [textured(70), with_defect(textured(71))]
    before = fitted.predict(images)
    loaded = vlad.scorers.base.load_scorer(fitted.save(tmp_path / "padim"))
    after = loaded.predict(images)
    np.testing.assert_array_equal(before.image_scores, after.image_scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)


def test_errors(refs):
    with pytest.raises(vlad.EmptyReferenceSetError):
        vlad.create_scorer("padim", weights="tiny").fit([])
    with pytest.raises(vlad.NotFittedError):
        vlad.create_scorer("padim", weights="tiny").predict(refs[:1])
    with pytest.raises(vlad.VladError, match="n_features"):
        vlad.create_scorer("padim", weights="tiny", n_features=10_000).fit(refs[:1])
    with pytest.raises(vlad.VladError, match="layers"):
        vlad.create_scorer("padim", weights="tiny", layers=(3, 1)).fit(refs[:1])
