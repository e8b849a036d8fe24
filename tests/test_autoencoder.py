"""Tests of the convolutional autoencoder scorer (and the training helpers it shares)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import textured, with_defect

import vlad
from vlad.errors import EmptyReferenceSetError, NotFittedError
from vlad.scorers.autoencoder import aspect_size, augment_batch, jitter, ssim_map, train_loop
from vlad.scorers.scratch import (
    MapRule,
    apply_rule,
    auto_steps,
    crop_regions,
    fit_loop,
    optimizer_step,
    reference_stats,
    split_held_out,
    to_canvas,
)

PARAMS = dict(weights="tiny", image_size=64, train_steps=12, batch_size=4, random_state=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and the machine is shared
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fitted():
    return vlad.create_scorer("autoencoder", **PARAMS).fit([textured(i) for i in range(4)])


def test_training_loss_decreases(fitted):
    losses = fitted.loss_history_
    assert len(losses) == PARAMS["train_steps"] and not fitted.interrupted_
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])


def test_global_map_is_in_units_of_the_references_error():
    # "global": each error term divided by its mean over the references, so on the references themselves
    # the map averages about 1 + 1 (smoothing and resizing keep the mean up to borders)
    refs = [textured(i) for i in range(4)]
    scorer = vlad.create_scorer("autoencoder", **{**PARAMS, "normalize": "global", "error_terms": "ssim+l2"}).fit(refs)
    assert (scorer.stats_["global"] > 0).all()
    maps = scorer.predict(refs).anomaly_maps
    assert np.mean([m.mean() for m in maps]) == pytest.approx(2.0, rel=0.15)


def test_position_map_is_centred_on_the_references():
    # "position": each pixel's error minus the references' mean error there, over their spread: about 0
    refs = [textured(i) for i in range(4)]
    scorer = vlad.create_scorer("autoencoder", **{**PARAMS, "normalize": "position", "shift_tolerance": 0}).fit(refs)
    maps = scorer.predict(refs).anomaly_maps
    assert abs(np.mean([m.mean() for m in maps])) < 0.3


def test_predict_finite_maps_at_image_size(fitted):
    res = fitted.predict([textured(50), with_defect(textured(51)), textured(52, size=80)[:, :70]])
    assert res.image_scores.shape == (3,) and np.isfinite(res.image_scores).all()
    assert res.anomaly_maps[0].shape == (96, 96) and res.anomaly_maps[2].shape == (80, 70)
    assert all(np.isfinite(m).all() for m in res.anomaly_maps)


def test_save_load_identical(fitted, tmp_path):
    imgs = [textured(60), with_defect(textured(61))]
    before = fitted.predict(imgs)
    loaded = vlad.scorers.base.load_scorer(fitted.save(tmp_path / "ae"))
    after = loaded.predict(imgs)
    np.testing.assert_array_equal(before.image_scores, after.image_scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)
    assert loaded.loss_history_ == fitted.loss_history_
    assert all(torch.equal(loaded.stats_[k], fitted.stats_[k]) for k in fitted.stats_)


@pytest.mark.parametrize("name", ["autoencoder", "draem"])
def test_default_size_keeps_the_references_aspect_ratio(name, tmp_path):
    # tall references (like KolektorSDD's 203 x 512) must not be squashed into a square
    refs = [np.ascontiguousarray(textured(i, size=160)[:, :64]) for i in range(2)]
    params = {**PARAMS, "image_size": None, "train_steps": 2}
    scorer = vlad.create_scorer(name, **params).fit(refs)
    assert scorer.size_ == (192, 96)  # about 128**2 pixels, tall like the references
    loaded = vlad.scorers.base.load_scorer(scorer.save(tmp_path / name))
    assert loaded.size_ == (192, 96)
    res = loaded.predict([refs[0]])
    assert res.anomaly_maps[0].shape == (160, 64)


def test_aspect_size_rounds_to_multiples():
    square = [vlad.images.load_image(np.zeros((512, 512, 3), np.float32))]
    wide = [vlad.images.load_image(np.zeros((100, 300, 3), np.float32))]
    assert aspect_size(square, 256, 32) == (256, 256)
    assert aspect_size(wide, 256, 32) == (160, 448)


@pytest.mark.parametrize("name", ["autoencoder", "draem"])
def test_same_seed_gives_the_same_model(name):
    # the held-out split, the batches, the synthesis and the initialisation all follow random_state
    refs = [textured(i) for i in range(6)]
    params = {**PARAMS, "train_steps": 6}
    a, b = (vlad.create_scorer(name, **params).fit(refs) for _ in range(2))
    c = vlad.create_scorer(name, **{**params, "random_state": 1}).fit(refs)
    state_a, state_b, state_c = (s.model_.state_dict() for s in (a, b, c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    img = [with_defect(textured(70))]
    np.testing.assert_array_equal(a.predict(img).anomaly_maps[0], b.predict(img).anomaly_maps[0])


@pytest.mark.parametrize("name", ["autoencoder", "draem"])
def test_time_limit_is_respected(name):
    # a budget of 100000 steps under a 1.5 s cap: training stops on time and says so
    t0 = time.perf_counter()
    scorer = vlad.create_scorer(name, **{**PARAMS, "train_steps": 100_000, "time_limit": 1.5}).fit(
        [textured(i) for i in range(4)])
    assert time.perf_counter() - t0 < 15
    assert scorer.train_log_["stopped"] == "time" and scorer.train_log_["seconds"] < 3.0
    assert 0 < len(scorer.loss_history_) < 100_000


def test_budget_grows_with_the_references():
    assert auto_steps(16, 8) == 200  # the floor
    assert auto_steps(400, 8) == 1500 > auto_steps(200, 8) == 750
    assert auto_steps(10**6, 8) == 4000  # the ceiling


def test_fit_loop_time_cap_with_a_fake_clock():
    ticks = iter(range(10**6))
    log = fit_loop(lambda i: 1.0, 1000, "t", time_limit=5.0, clock=lambda: float(next(ticks)))
    assert log.stopped == "time" and len(log.losses) == 6  # clock read at start and once per step


def test_early_stopping_stops_and_keeps_the_best_weights():
    # the held-out loss is lowest after step 10, then rises: training stops `patience` evaluations later
    # and the weights of step 10 come back
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()

    def step(i):
        with torch.no_grad():
            model.weight += 1.0
        return 1.0

    log = fit_loop(step, 1000, "t", model=model, validate=lambda _: abs(model.weight.item() - 10.0),
                   eval_every=2, patience=3)
    assert log.stopped == "early" and log.best_step == 10
    assert len(log.losses) == 16  # evaluations at 12, 14, 16 without improvement
    assert model.weight.item() == 10.0


def test_held_out_split_follows_the_seed():
    train, held = split_held_out(20, 0.2, seed=3)
    assert len(held) == 4 and len(train) == 16 and not set(train) & set(held)
    assert np.array_equal(held, split_held_out(20, 0.2, seed=3)[1])
    assert len(split_held_out(3, 0.2, seed=3)[1]) == 0  # too few references to hold any out
    # 20% of 12 would be 2 parts, too few to choose on: from 12 references on at least 3 are held out
    assert [len(split_held_out(n, 0.2, seed=3)[1]) for n in (4, 8, 11, 12, 16)] == [1, 2, 2, 3, 3]
    assert len(split_held_out(40, 0.05, seed=3)[1]) == 3 and len(split_held_out(12, 0.0, seed=3)[1]) == 0


def test_a_diverged_loss_stops_training_before_it_reaches_the_weights():
    from vlad.errors import VladError

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer_step(opt, model(torch.ones(1, 2)).square().sum(), "FastFlow", 0.1) >= 0.0
    stepped = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, stepped))
    with pytest.raises(VladError, match=r"FastFlow: the training loss became nan \(diverged\); lower lr \(now 0.1\)"):
        optimizer_step(opt, model(torch.full((1, 2), float("nan"))).sum(), "FastFlow", 0.1)
    assert all(torch.equal(a, b) for a, b in zip(stepped, model.parameters()))


def test_letterbox_keeps_a_defect_at_the_edge_of_a_wide_image():
    # a 64 x 256 image with a thin defect in its last 4 columns on a 64 x 64 canvas: letterboxing scales
    # both axes alike and the cropped region ends exactly where the image ends
    img = np.full((64, 256, 3), 0.5, np.float32)
    img[20:40, 252:] = 1.0
    loaded = [vlad.images.load_image(img)]
    x, boxes = to_canvas(loaded, (64, 64), "letterbox")
    y0, x0, h, w = boxes[0]
    assert (h, w) == (16, 64) and y0 == 24 and x0 == 0
    region = x[0, 0, y0 : y0 + h, x0 : x0 + w]
    assert region[:, -1].max() > 0.8  # the defect is inside the region, at its right edge
    cropped = crop_regions(x[:, 0], boxes)[0]
    assert cropped.shape == (16, 64) and torch.equal(cropped, region)


def test_scorer_map_finds_a_defect_at_the_edge_of_a_wide_image():
    # references 64 x 128, a test image twice as wide (64 x 256, letterboxed at half scale) with a defect
    # against its right edge: the map covers the whole image and peaks at the defect
    refs = [np.ascontiguousarray(textured(i, size=128)[:64]) for i in range(4)]
    params = {**PARAMS, "image_size": (64, 128), "sigma": 1.0, "normalize": "global", "train_steps": 20}
    scorer = vlad.create_scorer("autoencoder", **params).fit(refs)
    wide = np.concatenate([textured(80, size=128)[:64], textured(81, size=128)[:64]], axis=1)  # 64 x 256
    wide[16:48, 232:] = [255, 30, 30]
    m = scorer.predict([wide]).anomaly_maps[0]
    assert m.shape == (64, 256)
    assert np.unravel_index(np.argmax(m), m.shape)[1] >= 224  # the peak is at the defect, by the edge


def test_position_normalisation_flattens_a_periodic_normal_texture():
    # raw errors with periodic stripes of high normal error (a texture the model cannot reproduce) and a
    # defect weaker than the stripes: "global" lets the stripes dominate, "position" removes them
    gen = torch.Generator().manual_seed(0)
    stripes = (torch.arange(64) % 8 < 2).float().view(1, 64).expand(64, 64) * 4.0

    def raw(n):
        return (stripes + 1.0 + 0.1 * torch.randn(n, 1, 64, 64, generator=gen)).clamp_min(0)

    stats = reference_stats(raw(16))
    normal, defect = raw(1), raw(1)
    defect[0, 0, 28:36, 28:36] += 2.0  # at a low-error column band, weaker than the stripes' 4.0
    rules = {n: MapRule(n, sigma=1.0, topk_fraction=0.01, terms=(0,)) for n in ("global", "position")}
    out = {n: apply_rule(torch.cat([normal, defect]), stats, r) for n, r in rules.items()}

    def stripe_corr(m):
        return float(torch.corrcoef(torch.stack([m.reshape(-1), stripes.reshape(-1)]))[0, 1])

    assert stripe_corr(out["global"][1][0]) > 0.9  # the normal map is the stripes
    assert abs(stripe_corr(out["position"][1][0])) < 0.2  # flattened: no trace of the period left
    assert out["position"][0][1] > 2 * out["position"][0][0]  # the defect stands out
    assert out["global"][0][1] < 1.3 * out["global"][0][0]  # under "global" the stripes hide it


def test_errors():
    with pytest.raises(EmptyReferenceSetError):
        vlad.create_scorer("autoencoder", **PARAMS).fit([])
    with pytest.raises(NotFittedError):
        vlad.create_scorer("autoencoder", **PARAMS).predict([textured(0)])
    with pytest.raises(ValueError, match="multiples of 32"):
        vlad.create_scorer("autoencoder", **{**PARAMS, "image_size": 70}).fit([textured(0)])
    with pytest.raises(ValueError, match="trained from scratch"):
        vlad.create_scorer("autoencoder", **{**PARAMS, "weights": "/some/path"}).fit([textured(0)])


def test_jitter_moves_and_relights_a_part_but_never_mirrors_it():
    # a bright square in the top-left quarter of every image: each view moves it a little, not across
    x = torch.full((64, 3, 64, 64), 0.2)
    x[:, :, 8:24, 8:24] = 0.9
    y = jitter(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, jitter(x, torch.Generator().manual_seed(0)))  # the generator decides everything
    moved = (y - x).abs().amax(dim=(1, 2, 3))
    assert (moved > 0.05).all()  # every image changed
    quarters = torch.stack([y[..., :32, :32], y[..., :32, 32:], y[..., 32:, :32], y[..., 32:, 32:]]).mean(dim=(2, 3, 4))
    assert (quarters.argmax(dim=0) == 0).all()  # the square stayed where it was: a mirror would move it
    means = y.mean(dim=(1, 2, 3))
    assert 0.01 < float(means.std()) / float(means.mean()) < 0.1  # lit differently, within the jitter (+-6%)
    # flips do mirror, "flip+jitter" applies both (flips first, from the same generator), False neither
    flipped = augment_batch(x, torch.Generator().manual_seed(0), "flip")
    assert (flipped.mean(dim=1)[:, 16, 16] < 0.5).any()
    both_gen = torch.Generator().manual_seed(0)
    both = augment_batch(x, both_gen, "flip+jitter")
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(both, jitter(augment_batch(x, gen, "flip"), gen))
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0), False), x)


def test_augment_default_is_jitter_and_bad_values_are_refused():
    ae = vlad.create_scorer("autoencoder", **PARAMS)
    assert ae.augment == "jitter"
    refs = [textured(i) for i in range(4)]
    plain = vlad.create_scorer("autoencoder", **{**PARAMS, "augment": False}).fit(refs)
    ae.fit(refs)
    trained, untouched = ae.model_.state_dict().values(), plain.model_.state_dict().values()
    assert not all(torch.equal(a, b) for a, b in zip(trained, untouched))
    with pytest.raises(vlad.InvalidParameterError, match="augment"):
        vlad.create_scorer("autoencoder", **{**PARAMS, "augment": "rotate"}).fit(refs)


def test_train_loop_keeps_progress_on_keyboard_interrupt():
    def step(i):
        if i == 3:
            raise KeyboardInterrupt
        return float(10 - i)

    losses, interrupted = train_loop(step, 10, "test")
    assert interrupted and losses == [10.0, 9.0, 8.0]


def test_ssim_map_identity_and_difference():
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim_map(x, x), torch.ones(2, 32, 32), atol=1e-5)
    y = x.clone()
    y[:, :, 10:20, 10:20] = 1 - y[:, :, 10:20, 10:20]
    s = ssim_map(x, y)
    assert s[:, 15, 15].max() < 0.5 and s[:, 0, 0].min() > 0.99


def test_shift_tolerance_forgives_a_misaligned_normal_part():
    # references with sharp error stripes; a normal test part shifted by 2 px: the same-pixel comparison
    # calls it anomalous, a +-4 px tolerance does not
    gen = torch.Generator().manual_seed(0)
    stripes = (torch.arange(64) % 16 < 2).float().view(1, 64).expand(64, 64) * 4.0
    stats = reference_stats(stripes + 1.0 + 0.1 * torch.randn(8, 1, 64, 64, generator=gen))
    shifted = torch.roll(stripes, 2, dims=1) + 1.0 + 0.1 * torch.randn(1, 1, 64, 64, generator=gen)
    strict, _ = apply_rule(shifted, stats, MapRule("position", 1.0, 0.01, (0,)))
    tolerant, _ = apply_rule(shifted, stats, MapRule("position", 1.0, 0.01, (0,), shift=4))
    assert strict[0] > 10 and tolerant[0] < 1
