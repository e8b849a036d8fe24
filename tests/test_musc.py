"""MuSc (vlad.scorers.musc) and the blocked mutual search (vlad.memory.mutual).

Fidelity is checked against naive one-pair-at-a-time implementations written from the reference code's
description (``cdist`` per image pair, unfold + adaptive average pooling for LNAMD, min-max then MMO
loops for RsCIN); the blocked search must not depend on block sizes; results must not depend on the
batch order; on textured normal images with synthetic defects the defective ones rank first and their
maps peak inside the defects; a new image scored against a pool gets the map it gets inside the batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import textured, with_defect
from scipy.ndimage import distance_transform_edt
from test_contract import MARGIN_PX, synthetic_defect

import vlad
from vlad.memory.knn import InvalidSearchError
from vlad.memory.mutual import (
    TF32_COSINE_ERROR,
    image_nn_distances,
    iter_image_nn_distances,
    lowest_mean_distances,
    plan_blocks,
    round_to_tf32,
)
from vlad.scorers.musc import (
    InsufficientBatchError,
    MuSc,
    default_layers,
    layer_norm_tokens,
    lnamd,
    lowest_count,
    mutual_patch_scores,
    rscin,
)
from vlad.errors import InvalidParameterError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(backbone="vit_small_patch14_dinov2.lvd142m", weights="tiny", image_size=112)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# -- naive references ---------------------------------------------------------------------------------
def naive_msm(z: torch.Tensor, fraction: float = 0.3) -> torch.Tensor:
    """The reference's slow path: for each image, cdist to each other image, min, lowest-k mean."""
    n = z.shape[0]
    out = []
    for i in range(n):
        per_image = [torch.cdist(z[i].double(), z[j].double()).min(dim=1).values for j in range(n) if j != i]
        d = torch.stack(per_image, dim=1)  # (P, N - 1)
        k = max(1, int((n - 1) * fraction))
        out.append(d.sort(dim=1).values[:, :k].mean(dim=1))
    return torch.stack(out).float()


def naive_lnamd(tokens: torch.Tensor, grid, r: int) -> torch.Tensor:
    """The reference's LNAMD: zero-padded unfold of r x r, flatten (C, r, r), adaptive_avg_pool1d to C."""
    b, p, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    u = F.unfold(x, kernel_size=r, padding=(r - 1) // 2)  # (B, C r r, P)
    u = u.reshape(b, d, r, r, p).permute(0, 4, 1, 2, 3).reshape(b * p, 1, d * r * r)
    pooled = F.adaptive_avg_pool1d(u, d).reshape(b, p, d)
    return F.normalize(pooled, dim=-1)


def naive_rscin(scores: np.ndarray, emb: np.ndarray, windows=(1, 2, 3)) -> np.ndarray:
    """The reference's RsCIN: min-max normalisation, then MMO with explicit loops."""
    s = (scores - scores.min()) / (scores.max() - scores.min())
    w = emb @ emb.T
    n = len(s)
    outs = []
    for k in windows:
        res = np.zeros(n)
        for i in range(n):
            order = [i] + [j for j in np.argsort(-w[i], kind="stable") if j != i]
            keep = order[:k]
            res[i] = sum(w[i, j] * s[j] for j in keep) / sum(w[i, j] for j in keep)
        outs.append(res)
    return np.mean(outs, axis=0)


# -- the blocked search ---------------------------------------------------------------------------------
def test_image_nn_distances_equal_pairwise_cdist():
    q, pool = unit(3, 5, 8, seed=1), unit(4, 6, 8, seed=2)
    got = image_nn_distances(q, pool)
    for a in range(3):
        for j in range(4):
            want = torch.cdist(q[a], pool[j]).min(dim=1).values
            torch.testing.assert_close(got[a, :, j], want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("blocks", [(1, 1), (2, 3), (3, 1), (7, 7), (None, None)])
def test_mutual_scores_equal_naive_for_any_block_size(blocks):
    z = unit(7, 9, 16, seed=3)
    want = naive_msm(z)
    got = mutual_patch_scores(z, 0.3, query_block=blocks[0], pool_block=blocks[1])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_memory_bound_plans_small_blocks_and_gives_the_same_result():
    z = unit(6, 10, 8, seed=4)
    assert plan_blocks(6, 6, 10, 10, max_bytes=4 * 100) == (1, 1)
    starts = [s for s, _ in iter_image_nn_distances(z, z, max_bytes=4 * 100)]
    assert starts == list(range(6))  # one query image per block under a 400-byte bound
    torch.testing.assert_close(mutual_patch_scores(z, max_bytes=4 * 100), mutual_patch_scores(z), rtol=0, atol=1e-6)


@pytest.mark.parametrize("max_bytes", [4 * 7 * 7, 4 * 14 * 14, 4 * 21 * 21, 64 * 2**20])
def test_each_pair_of_images_once_equals_the_naive_search(max_bytes):
    # blocks of 1, 2, 3 and all 9 images (7 patches each): the table's row and column maxima
    z = unit(9, 7, 16, seed=11)
    want = naive_msm(z)
    got = lowest_mean_distances(z, z, lowest_count(8, 0.3), exclude_self=True, max_bytes=max_bytes)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    walked = lowest_mean_distances(z, z, lowest_count(8, 0.3), exclude_self=True, max_bytes=max_bytes,
                                   table_max_bytes=0)  # the table does not fit: the one-sided walk
    torch.testing.assert_close(walked, got, rtol=0, atol=2e-6)


def _clear_nearest_patches(z: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether every query patch's nearest patch in every pool image wins by more than TF32 can blur."""
    sims = torch.einsum("ipd,jqd->ipjq", z.double(), pool.double())
    top2 = sims.topk(2, dim=3).values
    return bool((top2[..., 0] - top2[..., 1] > 2 * TF32_COSINE_ERROR).all())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tf32_candidates_keep_exact_float32_distances(device):
    g = torch.Generator().manual_seed(12)  # aligned parts: patch a of every image near one prototype
    parts = torch.randn(1, 10, 32, generator=g)
    z = F.normalize(parts + 0.3 * torch.randn(8, 10, 32, generator=g), dim=-1).to(device)
    pool = F.normalize(parts + 0.3 * torch.randn(5, 10, 32, generator=g), dim=-1).flip(1).to(device)
    assert _clear_nearest_patches(z, z)  # the fixture's premise: TF32 picks the same patches
    k = lowest_count(7, 0.3)
    exact = lowest_mean_distances(z, z, k, exclude_self=True, precision="fp32")
    fast = lowest_mean_distances(z, z, k, exclude_self=True, precision="tf32")
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-6)
    walked = lowest_mean_distances(z, z, k, exclude_self=True, precision="tf32", table_max_bytes=0)
    torch.testing.assert_close(walked, exact, rtol=0, atol=1e-6)
    assert _clear_nearest_patches(z, pool)  # other images of the same parts, listed in another order
    torch.testing.assert_close(lowest_mean_distances(z, pool, 2, precision="tf32"),
                               lowest_mean_distances(z, pool, 2, precision="fp32"), rtol=0, atol=1e-6)
    # the candidates alone (TF32 similarities turned into distances) are further off: the recomputation counts
    rounded = round_to_tf32(z.cpu())
    assert (rounded != z.cpu()).any()
    sims = torch.einsum("ipd,jqd->ipjq", rounded, rounded).amax(dim=3)
    sims[torch.arange(8), :, torch.arange(8)] = -float("inf")
    candidate = (2 - 2 * sims.topk(k, dim=2).values).clamp(min=0).sqrt().mean(dim=2)
    assert (candidate - exact.cpu()).abs().max() > 1e-5


def test_tf32_candidates_among_near_ties_stay_within_the_bound():
    base = unit(6, 9, 24, seed=14)
    z = F.normalize(base.repeat(1, 2, 1) + 1e-4 * torch.randn(6, 18, 24, generator=torch.Generator().manual_seed(15)),
                    dim=-1)  # every patch has a twin 1e-4 away: TF32 cannot tell which is nearer
    exact = lowest_mean_distances(z, z, 2, exclude_self=True, precision="fp32")
    fast = lowest_mean_distances(z, z, 2, exclude_self=True, precision="tf32")
    # a kept distance is to a patch at most 2 x TF32_COSINE_ERROR less similar than the nearest
    worst = (torch.sqrt(exact**2 + 4 * TF32_COSINE_ERROR) - exact).max()
    assert (fast - exact).abs().max() <= worst
    assert (fast >= exact - 1e-6).all()  # never nearer than the nearest


def test_search_precision_auto_is_exact_on_the_cpu_and_bad_values_are_refused():
    z = unit(5, 6, 8, seed=16)
    auto = lowest_mean_distances(z, z, 1, exclude_self=True, precision="auto")
    assert torch.equal(auto, lowest_mean_distances(z, z, 1, exclude_self=True, precision="fp32"))
    with pytest.raises(InvalidSearchError, match="'auto'"):
        lowest_mean_distances(z, z, 1, exclude_self=True, precision="fp16")
    for bad_k in (5, 0, None, 2.5, True):
        with pytest.raises(InvalidSearchError, match="between 1 and 4"):
            lowest_mean_distances(z, z, bad_k, exclude_self=True)
    with pytest.raises(InvalidSearchError, match="against itself"):
        lowest_mean_distances(z, z[:3], 1, exclude_self=True)


def test_lowest_fraction_counts_at_least_one_image():
    assert lowest_count(1, 0.3) == 1 and lowest_count(3, 0.3) == 1 and lowest_count(199, 0.3) == 59
    z = unit(2, 4, 8, seed=5)  # two images: each scored against the other alone
    d = torch.cdist(z[0], z[1])
    torch.testing.assert_close(mutual_patch_scores(z)[0], d.min(dim=1).values, rtol=0, atol=2e-6)


def test_lnamd_equals_the_reference_unfold_and_pooling():
    t = layer_norm_tokens(torch.randn(2, 20, 12, generator=torch.Generator().manual_seed(6)))
    for r in (1, 3, 5):
        torch.testing.assert_close(lnamd(t, (4, 5), r), naive_lnamd(t, (4, 5), r), rtol=0, atol=1e-6)


def test_rscin_equals_the_reference_up_to_its_min_max_map():
    rng = np.random.default_rng(7)
    scores = rng.random(9) + 1.0
    emb = F.normalize(torch.rand(9, 5, generator=torch.Generator().manual_seed(7)), dim=1)  # similarities >= 0
    got = rscin(torch.tensor(scores), emb).double().numpy()
    want = naive_rscin(scores, emb.double().numpy())
    np.testing.assert_allclose((got - scores.min()) / (scores.max() - scores.min()), want, atol=1e-6)


def test_rscin_against_a_pool_equals_the_batch_row():
    scores, emb = torch.rand(6).double(), F.normalize(torch.rand(6, 4), dim=1)
    batch = rscin(scores, emb)
    alone = rscin(scores[:1], emb[:1], others=(scores[1:], emb[1:]))
    torch.testing.assert_close(alone[0], batch[0], rtol=0, atol=1e-6)


def test_default_layers_are_the_papers_positions():
    assert default_layers(24) == (5, 11, 17, 23)
    assert default_layers(12) == (2, 5, 8, 11)
    assert default_layers(2) == (0, 1)


# -- the scorer ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scorer():
    return MuSc(**TINY).fit()


def normals(n=10):
    return [textured(100 + i) for i in range(n)]


def test_whole_pipeline_equals_naive_composition(scorer):
    imgs = normals(5)
    tokens, emb = scorer.embed(imgs)
    maps = []
    for r in scorer.degrees:
        for t in tokens:
            maps.append(naive_msm(naive_lnamd(t, scorer.grid_, r)))
    patch = torch.stack(maps).mean(0)
    raw = patch.amax(1)
    res = scorer.score_batch(imgs)
    torch.testing.assert_close(res.patch_scores.reshape(5, -1), patch, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.raw_scores, raw, rtol=0, atol=1e-5)
    want = naive_rscin(raw.double().numpy(), emb.double().numpy())
    got = res.scores.double().numpy()
    np.testing.assert_allclose((got - got.min()) / (got.max() - got.min()), (want - want.min()) / (want.max() - want.min()),
                               atol=1e-4)


def test_batch_order_does_not_matter(scorer):
    imgs = normals(6) + [synthetic_defect(0)[0]]
    perm = [3, 6, 0, 5, 1, 4, 2]
    a = scorer.predict(imgs)
    b = scorer.predict([imgs[i] for i in perm])
    np.testing.assert_allclose(b.image_scores, a.image_scores[perm], rtol=1e-5, atol=1e-6)
    for j, i in enumerate(perm):
        np.testing.assert_allclose(b.map_list()[j], a.map_list()[i], rtol=1e-5, atol=1e-6)


def test_defective_images_rank_first_and_maps_peak_inside():
    s = MuSc(**TINY).fit()
    defects = [synthetic_defect(seed) for seed in (0, 1, 2)]
    imgs = normals(12)
    batch = imgs[:4] + [defects[0][0]] + imgs[4:8] + [defects[1][0]] + imgs[8:] + [defects[2][0]]
    where = [4, 9, 14]
    res = s.predict(batch)
    top = set(np.argsort(-res.image_scores)[:3].tolist())
    assert top == set(where), f"defects at {where}, top 3 scores at {sorted(top)}: {res.image_scores}"
    for i, (_, mask) in zip(where, defects):
        amap = res.map_list()[i]
        y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
        assert distance_transform_edt(~mask)[y, x] <= MARGIN_PX


def test_new_image_against_the_pool_equals_scoring_it_inside_the_batch():
    s = MuSc(**TINY).fit()
    pool = normals(7)
    new = synthetic_defect(1)[0]
    inside = s.score_batch(pool + [new])
    s.add_unlabeled(pool)
    alone = s.score_against_pool([new])
    torch.testing.assert_close(alone.patch_scores[0], inside.patch_scores[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone.raw_scores[0], inside.raw_scores[-1], rtol=0, atol=1e-5)
    # predict uses the pool, image by image: the same map whatever else is in the call
    both = s.predict([textured(300), new])
    np.testing.assert_allclose(both.map_list()[1], s.predict([new]).map_list()[0], rtol=1e-5, atol=1e-6)


def test_pool_cap_drops_the_oldest_first():
    s = MuSc(**TINY, pool_size=4).fit()
    s.add_unlabeled(normals(3))
    s.add_unlabeled([textured(500), textured(501)])
    assert len(s.list_unlabeled()) == 4
    assert [t.shape[0] for t in s.pool_tokens_] == [4] * len(s.pool_tokens_)
    kept = s.pool_embeddings_.clone()
    fresh = MuSc(**TINY).fit().add_unlabeled(normals(3)[1:] + [textured(500), textured(501)])
    torch.testing.assert_close(kept, fresh.pool_embeddings_)
    assert s.pool_scores().shape == (4,)


def test_one_image_without_a_pool_is_refused_with_the_fix(scorer):
    with pytest.raises(InsufficientBatchError, match="add_unlabeled"):
        scorer.predict([textured(1)])
    assert isinstance(InsufficientBatchError("x"), vlad.VladError)
    with pytest.raises(InsufficientBatchError):
        MuSc(**TINY).fit().pool_result()


@pytest.mark.parametrize("bad", [dict(degrees=(2,)), dict(lowest_fraction=0.0), dict(rscin_windows=(0,)),
                                 dict(pool_size=1), dict(layers=(0, 9)), dict(search_precision="bf16"),
                                 dict(search_precision=None)])
def test_bad_parameters_are_refused_at_fit(bad):
    with pytest.raises(vlad.VladError):
        MuSc(**{**TINY, **bad}).fit()


def test_clip_backbone_at_another_size_resizes_positional_embedding():
    s = MuSc(weights="tiny", image_size=128).fit()  # the paper's CLIP family, tiny twin (96 px native)
    assert s.grid_ == (8, 8)
    res = s.predict([textured(1), textured(2), synthetic_defect(0)[0]])
    assert res.image_scores.shape == (3,) and np.isfinite(res.image_scores).all()


def test_save_load_keeps_the_pool(tmp_path):
    s = MuSc(**TINY).fit().add_unlabeled(normals(4))
    probe = [synthetic_defect(2)[0]]
    loaded = vlad.load(s.save(tmp_path / "musc"))
    assert loaded.list_unlabeled() == s.list_unlabeled()
    np.testing.assert_allclose(loaded.predict(probe).image_scores, s.predict(probe).image_scores, rtol=1e-6)


# -- the unlabeled tier in the detector -------------------------------------------------------------------
from vlad.detector.calibration import conformal_threshold, pool_threshold  # noqa: E402
from vlad.detector.fusion import tier_weights  # noqa: E402

DET_OPTIONS = dict(weights="tiny", scorer_options={"musc": dict(backbone="vit_small_patch14_dinov2.lvd142m", image_size=112),
                                                   "anomalydino": dict(rotations=1, image_size=112)})


def test_tier_weights_put_the_unlabeled_tier_between_the_others():
    three = {"w": "zero", "m": "unlabeled", "a": "few"}
    w = tier_weights(three, n_references=2, k0=2.0, n_unlabeled=10, u0=10.0)
    assert w == pytest.approx({"a": 0.5, "m": 0.25, "w": 0.25})
    assert sum(tier_weights(three, 0, n_unlabeled=0).values()) == pytest.approx(1.0)
    assert tier_weights({"m": "unlabeled"}, 0, n_unlabeled=0) == {"m": 1.0}  # alone it takes everything
    more = tier_weights({"w": "zero", "m": "unlabeled"}, 0, n_unlabeled=90, u0=10.0)
    assert more["m"] == pytest.approx(0.9)  # a larger pool weighs more
    assert tier_weights({"w": "zero", "a": "few"}, 4) == pytest.approx({"w": 1 / 3, "a": 2 / 3})  # as before


def test_pool_threshold_is_at_least_the_conformal_threshold_of_the_good_images_whichever_they_are():
    rng = np.random.default_rng(0)
    for u in (20, 40, 100, 333):
        scores = rng.normal(size=u)
        t, rule, bound = pool_threshold(scores, 0.05, 0.05)
        assert rule == "pool-assumption" and bound <= 0.0526
        m = int(np.floor(0.05 * u))
        for _ in range(50):  # any m images may be the defective ones
            good = np.delete(scores, rng.choice(u, size=m, replace=False))
            assert t >= conformal_threshold(good, 0.05)[0]
    assert pool_threshold(np.arange(100.0), 0.05, 0.05)[0] == 96.0  # m = 5, k = ceil(96 * 0.95) = 92 -> 97th


@pytest.fixture(scope="module")
def pool_detector():
    det = vlad.create_detector("musc+anomalydino", **DET_OPTIONS).fit()
    assert det.batch_scoring  # no pool yet: a call's images are scored against each other
    det.add_unlabeled(normals(24)[:11] + [synthetic_defect(0)[0]] + normals(24)[11:])
    return det


def test_detector_thresholds_from_the_pool_say_they_rest_on_an_assumption(pool_detector):
    det = pool_detector
    assert not det.batch_scoring and len(det.list_unlabeled()) == 25
    info = det.threshold_info()
    assert info.rule == "pool-assumption" and info.n_pool == 25 and info.pool_defect_rate == 0.05
    assert "at most 5%" in info.assumption
    assert "an assumption, not a guarantee" in info.describe()


def test_bootstrap_picks_the_most_normal_pool_images_and_says_why():
    det = vlad.create_detector("musc+anomalydino", **DET_OPTIONS).fit()
    pool = normals(12)[:5] + [synthetic_defect(0)[0]] + normals(12)[5:]
    det.add_unlabeled(pool)
    scores = det.pool_scores()
    assert int(np.argmax(scores)) == 5  # the defective image is the least like the others
    report = det.bootstrap_references(3)
    assert report.picked == [int(i) for i in np.argsort(scores, kind="stable")[:3]] and 5 not in report.picked
    assert report.scores == pytest.approx(scores.tolist())
    assert "remove_reference" in report.describe()
    assert len(det.list_references()) == 3 and det.active_["anomalydino"]
    # picks never calibrate: the thresholds still come from the (rest of the) pool, under the assumption
    info = det.threshold_info()
    assert info.rule == "pool-assumption" and info.n_pool == len(pool) - 3
    det.remove_reference(0)  # a person vetoes a pick
    assert len(det.list_references()) == 2
    res = det.predict([textured(300), synthetic_defect(1)[0]])
    assert res.image_scores[1] > res.image_scores[0]


def test_add_unlabeled_needs_an_unlabeled_scorer():
    det = vlad.create_detector("anomalydino", weights="tiny", rotations=1).fit([textured(1), textured(2)])
    with pytest.raises(vlad.VladError, match="musc"):
        det.add_unlabeled([textured(3)])


def test_cli_score_with_an_unlabeled_pool_and_bootstrap(tmp_path, capsys):
    from PIL import Image

    from vlad.cli import main

    pool, new = tmp_path / "pool", tmp_path / "new"
    pool.mkdir()
    new.mkdir()
    for i, img in enumerate(normals(8)):
        Image.fromarray(img).save(pool / f"p{i}.png")
    Image.fromarray(textured(300)).save(new / "good.png")
    Image.fromarray(synthetic_defect(1)[0]).save(new / "bad.png")
    code = main(["score", str(new), "--detector", "musc+anomalydino", "--weights", "tiny", "--set",
                 "backbone=vit_small_patch14_dinov2.lvd142m", "--set", "image_size=112", "--set", "rotations=1",
                 "--unlabeled", str(pool), "--bootstrap", "2", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "unlabeled pool: 8 images" in out and "picked the 2 of 8" in out and "ASSUMING" in out
    import json

    summary = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert summary["thresholds"]["rule"] == "pool-assumption" and summary["n_unlabeled"] == 8
    assert main(["score", str(new), "--scorer", "padim", "--weights", "tiny", "--unlabeled", str(pool)]) == 2


def test_app_pool_panel_adds_unlabeled_images_and_picks_references(tmp_path):
    from PIL import Image

    from vlad.app import session as app

    assert "musc" in app.live_scorers()["unlabeled"]
    sess, msg = app.build_detector(["musc", "anomalydino"], "plate", "tiny", "cpu")
    assert sess.detector is not None, msg
    for name, params in (("musc", TINY), ("anomalydino", dict(rotations=1, image_size=112))):
        sess.detector.scorers[name].set_params(**{k: v for k, v in params.items() if k != "weights"})
    sess.detector.fit()
    files = []
    for i, img in enumerate(normals(6)):
        files.append(str(tmp_path / f"p{i}.png"))
        Image.fromarray(img).save(files[-1])
    sess, msg = app.add_unlabeled(sess, files)
    assert "pool: 6" in msg and "assumption" in msg
    sess, refs, msg = app.bootstrap_references(sess, 2)
    assert len(refs) == 2 and "picked the 2 of 6" in msg
    sess, msg = app.add_unlabeled(app.DemoSession(), files)  # no detector: a status line, no traceback
    assert msg.startswith("⚠️")


def test_the_detector_scores_a_whole_call_together_and_musc_never_tiles():
    """The detector asks scorers for working-resolution maps: MuSc must still score all images of the call
    against each other (not in batches of batch_size), and a shared tile_size skips it."""
    imgs = [textured(i, size=64) for i in range(5)] + [with_defect(textured(9, size=64), box=(20, 36, 20, 36))]
    scorer = vlad.create_scorer("musc", weights="tiny", batch_size=2, device="cpu").fit()
    whole = scorer.predict(imgs)
    working = scorer.predict_working(imgs)
    np.testing.assert_allclose(working.image_scores, whole.image_scores, rtol=1e-6)
    det = vlad.create_detector("musc+patchcore", weights="tiny", device="cpu", tile_size=32)
    assert det.scorers["musc"].tile_size is None and det.scorers["patchcore"].tile_size == 32
    with pytest.raises(InvalidParameterError, match="cannot score tiles"):
        vlad.create_scorer("musc", weights="tiny", tile_size=32).fit()


def test_a_batch_without_references_calibrates_itself_under_the_pool_assumption():
    # alpha 0.2 (with 12 images at 5%, the rule's threshold is the batch's largest score: nothing flagged)
    det = vlad.create_detector("musc+anomalydino", false_alarm_rate=0.2, **DET_OPTIONS).fit()
    batch = normals(12)[:11] + [synthetic_defect(0)[0]]
    res = det.predict(batch)
    info = det.threshold_info()
    assert (info.rule, info.path, info.n_pool) == ("pool-assumption", "this-batch", 12)
    assert "the 12 images scored together in the last call" in info.describe()
    assert "not a guarantee" in info.describe()
    assert res.labels is not None and res.labels[-1] and res.labels.sum() == 1  # the odd one out is flagged
    assert float(res.image_scores[-1]) > det.image_threshold >= float(np.sort(res.image_scores)[0])
    # a small batch cannot: back to the prior, and the sentence says so
    det.predict(batch[:4])
    assert det.threshold_info().rule == "prior"
