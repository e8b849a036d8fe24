"""Self-tuning on synthetic defects (vlad.selftune): the validation set, the ranking of map rules, and the
autoencoder and DRAEM choosing their rule and training length through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import textured, with_defect

import vlad
from vlad import selftune as st
from vlad import synthesis
from vlad.errors import InvalidParameterError, SelectionUnavailableError
from vlad.scorers.scratch import MapRule, fit_loop, reference_stats

PARAMS = dict(weights="tiny", image_size=64, train_steps=20, batch_size=4, random_state=0, time_limit=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster on a shared box


def _canvas(n: int, size: int = 64) -> torch.Tensor:
    return torch.stack([torch.from_numpy(textured(i, size=size).astype(np.float32) / 255).permute(2, 0, 1)
                        for i in range(n)])


# -- synthesis -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", synthesis.DEFECT_KINDS)
def test_defect_kinds_change_the_image_inside_their_mask(kind):
    img = textured(3, size=96).astype(np.float32) / 255
    out, mask = synthesis.defect(img, np.random.default_rng(0), kind, area=0.02, strength=1.0)
    assert out.shape == img.shape and mask.shape == img.shape[:2] and mask.any()
    changed = np.abs(out - img).max(axis=2) > 1e-3
    assert changed[mask > 0].mean() > 0.5  # the defect is where its mask says
    assert changed[mask == 0].mean() < 0.05
    again, mask2 = synthesis.defect(img, np.random.default_rng(0), kind, area=0.02, strength=1.0)
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(mask, mask2)


def test_defect_size_and_strength_follow_the_request():
    img = np.full((128, 128, 3), 0.5, np.float32)
    small = synthesis.defect(img, np.random.default_rng(1), "perlin", area=0.003)[1].mean()
    large = synthesis.defect(img, np.random.default_rng(1), "perlin", area=0.06)[1].mean()
    assert small < 0.01 < 0.02 < large < 0.12
    weak, m = synthesis.crack(img, np.random.default_rng(2), strength=0.2)
    strong, m2 = synthesis.crack(img, np.random.default_rng(2), strength=0.45)
    assert np.abs(weak - img).max() == pytest.approx(0.2, abs=1e-5)
    assert np.abs(strong - img).max() == pytest.approx(0.45, abs=1e-5)
    with pytest.raises(ValueError, match="strength"):
        synthesis.defect(img, np.random.default_rng(0), "crack", strength=0.0)
    with pytest.raises(ValueError, match="unknown defect kind"):
        synthesis.defect(img, np.random.default_rng(0), "dent")


# -- validation set and ranking ----------------------------------------------------------------------------
def test_validation_set_is_reproducible_and_covers_every_kind():
    held = _canvas(3)
    boxes = [(8, 0, 48, 64)] * 3  # letterboxed: the image fills rows 8..56
    a = st.make_validation_set(held, boxes, seed=5)
    b = st.make_validation_set(held, boxes, seed=5)
    assert len(a) == 3 * 8  # ceil(24 / 3) views per held-out image
    torch.testing.assert_close(a.defective, b.defective)
    assert {d["kind"] for d in a.defects} == set(synthesis.DEFECT_KINDS)
    assert all(m.any() for m in a.masks)
    assert not a.masks[:, :8].any() and not a.masks[:, 56:].any()  # never in the letterbox padding
    torch.testing.assert_close(a.clean[0], held[0])  # the held-out image itself is the first clean view
    c = st.make_validation_set(held, boxes, seed=6)
    assert not torch.equal(a.defective, c.defective)


def test_rank_rules_prefers_the_rule_that_separates():
    # raw maps: term 0 lights up on the defect, term 1 is noise; the rule on term 0 must rank first
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(10, 32, 32, dtype=torch.bool)
    masks[:, 10:14, 10:14] = True
    clean = torch.rand(10, 2, 32, 32, generator=gen)
    bad = torch.rand(10, 2, 32, 32, generator=gen)
    bad[:, 0] += 3.0 * masks
    stats = reference_stats(torch.rand(6, 2, 32, 32, generator=gen))
    rules = [MapRule("global", 2.0, 0.0, (1,)), MapRule("global", 2.0, 0.0, (0,))]
    ranked = st.rank_rules(clean, bad, masks, [(0, 0, 32, 32)] * 10, stats, rules)
    assert ranked[0].rule.terms == (0,)
    assert ranked[0].image_auroc == 1.0 and ranked[0].pixel_auroc > 0.95
    assert 0.2 < ranked[1].image_auroc < 0.8


def test_training_is_judged_by_the_judged_terms_and_the_rule_chosen_among_all():
    # term 1 separates the defects, term 0 does not: the curve training is judged by follows term 0's best
    # candidate, the chosen rule is term 1's (DRAEM: the probability judges, the reconstruction may win)
    held = _canvas(4)
    validation = st.make_validation_set(held, [(0, 0, 64, 64)] * 4, seed=1)
    bad_ids = {id(validation.defective)}

    def raw(x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(x.shape[0]))
        noise = torch.rand(x.shape[0], 1, 64, 64, generator=gen)
        signal = (validation.masks[:, None].float() * 5.0 if id(x) in bad_ids else torch.zeros_like(noise))
        return torch.cat([noise, noise + signal], dim=1)

    rules = [MapRule("global", 2.0, 0.0, (0,)), MapRule("global", 2.0, 0.0, (1,))]
    judged = st.SelfTuner(raw, _canvas(3), validation, rules, ("a", "b"), judged_terms=(0,))
    judged.evaluate(10)
    assert judged.curve[0][2] == "global s2 max a" and judged.curve[0][1] < 1.0
    rule, report = judged.report(10, st.SyntheticSettings(), 4, "budget")
    assert rule.terms == (1,) and report.rule == "global s2 max b"
    free = st.SelfTuner(raw, _canvas(3), validation, rules, ("a", "b"))
    free.evaluate(10)
    assert free.curve[0][2] == "global s2 max b" and free.curve[0][1] > judged.curve[0][1]
    # judged terms that no candidate uses alone (the user fixed the terms): every candidate judges
    only_b = st.SelfTuner(raw, _canvas(3), validation, rules[1:], ("a", "b"), judged_terms=(0,))
    only_b.evaluate(10)
    assert only_b.curve[0][2] == "global s2 max b"


def test_one_lucky_first_evaluation_is_not_a_stretch():
    # the first evaluation separates the defects (a lucky barely trained model), then a later stretch of
    # three does as well: training is judged by the stretch, so the later weights are kept
    held = _canvas(4)
    validation = st.make_validation_set(held, [(0, 0, 64, 64)] * 4, seed=1)
    separating = iter([True, False, False, True, True, True])
    state = {}

    def raw(x: torch.Tensor) -> torch.Tensor:
        if x is validation.clean:  # one evaluation: stats images, clean, then defective images
            state["now"] = next(separating)
        noise = torch.rand(x.shape[0], 1, 64, 64, generator=torch.Generator().manual_seed(int(x.shape[0])))
        if x is validation.defective and state["now"]:
            return noise + validation.masks[:, None].float() * 5.0
        return noise

    tuner = st.SelfTuner(raw, _canvas(3), validation, [MapRule("global", 2.0, 0.0, (0,))], ("a",))
    figures = [-tuner.evaluate(step) for step in (10, 20, 30, 40, 50, 60)]
    keys = [key for _, key, _ in tuner.curve]
    assert keys[0] == keys[3] == keys[5] > keys[1] + 0.2  # a separation of 1.25 against about chance
    assert figures[0] == pytest.approx(-(keys[0] + 2 * st.CHANCE_KEY) / 3)  # the two not made count at chance
    assert figures[5] == pytest.approx(-keys[5]) and figures[5] < min(figures[:5])
    assert st.smoothed([0.9]) < st.smoothed([0.9, 0.9, 0.9]) == pytest.approx(0.9)


def test_training_can_be_judged_by_the_image_auroc_alone():
    # the autoencoder judges how long to train by the synthetic image AUROC alone (JUDGE_PIXEL_WEIGHT = 0):
    # the curve carries the best candidate by that figure; evaluations not yet made count at 0.5, or not at
    # all where the first evaluations are judged as they are
    held = _canvas(4)
    validation = st.make_validation_set(held, [(0, 0, 64, 64)] * 4, seed=1)

    def raw(x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(x.shape[0]))
        noise = torch.rand(x.shape[0], 2, 64, 64, generator=gen)
        if x is validation.defective:  # term a: the whole image brighter; term b: the defect, faintly
            noise[:, 0] += 0.3
            noise[:, 1] += 1.0 * validation.masks.float()
        return noise

    rules = [MapRule("global", 2.0, k, (t,)) for t in (0, 1) for k in (0.0, 0.05)]
    by_image = st.SelfTuner(raw, _canvas(3), validation, rules, ("a", "b"), judge_pixel_weight=0.0)
    figure = by_image.evaluate(10)
    ranked = by_image.history[10]
    best = max(ranked, key=lambda c: c.image_auroc)
    assert by_image.curve[0][1] == pytest.approx(best.image_auroc, abs=1e-5)
    assert by_image.curve[0][2] == best.rule.label(("a", "b"))
    assert figure == pytest.approx((best.image_auroc + 2 * 0.5) / 3, abs=1e-5)
    by_rank = st.SelfTuner(raw, _canvas(3), validation, rules, ("a", "b"))
    by_rank.evaluate(10)
    assert by_rank.curve[0][1] == pytest.approx(by_rank.history[10][0].rank_key, abs=1e-5)
    # the two figures disagree on which candidate is best here, so the test tells them apart
    assert by_rank.curve[0][2] != by_image.curve[0][2]
    # first evaluations judged as they are (the autoencoder: FIRST_EVALUATIONS_AT_CHANCE = False)
    as_is = st.SelfTuner(raw, _canvas(3), validation, rules, ("a", "b"), judge_pixel_weight=0.0,
                         first_at_chance=False)
    judged_as_is = as_is.evaluate(10)
    assert judged_as_is == pytest.approx(best.image_auroc, abs=1e-5) and judged_as_is > figure
    assert st.smoothed([0.9, 0.7], None) == pytest.approx(0.8)
    from vlad.scorers.autoencoder import AutoEncoder
    from vlad.scorers.draem import DRAEM

    assert AutoEncoder.FIRST_EVALUATIONS_AT_CHANCE is False
    assert DRAEM.FIRST_EVALUATIONS_AT_CHANCE is True


def test_rules_for_keeps_what_the_user_fixed():
    all_rules = st.rules_for(None, None, None, None, [(0,)])
    assert len(all_rules) == 3 * 3 * 3
    fixed = st.rules_for("position", None, 4.0, None, [(0,)])
    assert {r.normalize for r in fixed} == {"position"} and {r.sigma for r in fixed} == {4.0}
    assert {r.shift for r in fixed} == {0, 4}
    assert len(st.rules_for("global", 0, 2.0, 0.0, [(0,)])) == 1


# -- the scorers -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refs():
    return [textured(i) for i in range(8)]


@pytest.mark.parametrize("name", ["autoencoder", "draem"])
def test_scorer_chooses_its_rule_and_reports_it(name, refs, tmp_path):
    scorer = vlad.create_scorer(name, **PARAMS).fit(refs)
    report = scorer.selection_report()
    assert report.rule == scorer.map_rule_.label(scorer.TERMS)
    assert report.n_held_out == 2 and report.n_clean == report.n_defective == 2 * 8
    assert len(report.candidates) == len(scorer._candidates())
    keys = [c["image_auroc"] + st.PIXEL_WEIGHT * c["pixel_auroc"] for c in report.candidates]
    assert all(a >= b - 0.01 for a, b in zip(keys, keys[1:]))  # best first (figures rounded to 0.01)
    assert report.step in [s for s, *_ in report.curve]
    if name == "autoencoder":  # its training is judged by the image AUROC alone (JUDGE_PIXEL_WEIGHT = 0)
        judged_at = {s: key for s, key, _ in report.curve}[report.step]
        assert judged_at == pytest.approx(max(c["image_auroc"] for c in report.candidates) / 100, abs=1e-4)
    assert "held-out references" in report.describe()
    # saved and loaded: the same rule, report and scores
    imgs = [textured(40), with_defect(textured(41))]
    loaded = vlad.load(scorer.save(tmp_path / name))
    assert loaded.map_rule_ == scorer.map_rule_
    assert loaded.selection_report() == report
    np.testing.assert_array_equal(loaded.predict(imgs).image_scores, scorer.predict(imgs).image_scores)


def test_fixed_parameters_are_kept_and_reported(refs):
    scorer = vlad.create_scorer("autoencoder", **PARAMS, normalize="position", sigma=4.0).fit(refs)
    assert scorer.map_rule_.normalize == "position" and scorer.map_rule_.sigma == 4.0
    report = scorer.selection_report()
    assert report.fixed == {"normalize": "position", "sigma": 4.0}
    assert all(c["rule"].startswith("position") and " s4 " in c["rule"] for c in report.candidates)


def test_same_seed_same_choice(refs):
    a = vlad.create_scorer("autoencoder", **PARAMS).fit(refs)
    b = vlad.create_scorer("autoencoder", **PARAMS).fit(refs)
    assert a.selection_report() == b.selection_report()
    for (k, v), w in zip(a.model_.state_dict().items(), b.model_.state_dict().values()):
        assert torch.equal(v, w), k


def test_no_selection_says_why(refs):
    few = vlad.create_scorer("autoencoder", **PARAMS).fit(refs[:3])
    with pytest.raises(SelectionUnavailableError, match="fewer than 4"):
        few.selection_report()
    assert few.map_rule_ == MapRule("global", 2.0, 0.05, (0,))  # the fallback
    none_held = vlad.create_scorer("autoencoder", **PARAMS, validation_fraction=0.0).fit(refs)
    with pytest.raises(SelectionUnavailableError, match="validation_fraction=0 holds none out"):
        none_held.selection_report()
    by_loss = vlad.create_scorer("draem", **PARAMS, selection="loss").fit(refs)
    with pytest.raises(SelectionUnavailableError, match="selection='loss'"):
        by_loss.selection_report()
    with pytest.raises(InvalidParameterError, match="selection"):
        vlad.create_scorer("autoencoder", selection="auroc")


def _peaked_training(**kwargs):
    """``fit_loop`` over 200 steps of a model whose weight is the step count, judged every 5 steps by a
    separation that peaks at step 10 (``patience=3``, ``min_delta=0.5``): the log and the steps evaluated."""
    model = torch.nn.Linear(1, 1)
    seen = []

    def step(i: int) -> float:
        with torch.no_grad():
            model.weight.fill_(float(i + 1))
        return 0.0

    def validate(i: int) -> float:
        seen.append(i)
        return abs(i - 10)

    log = fit_loop(step, 200, "t", model=model, validate=validate, eval_every=5, patience=3, min_delta=0.5,
                   **kwargs)
    return log, model.weight.item(), seen


def test_training_stops_on_the_synthetic_separation_not_before_the_minimum():
    # the best weights are those of step 10, and training stops after `patience` worse evaluations,
    # never before min_steps
    log, weight, seen = _peaked_training(min_steps=50)
    assert log.best_step == 10 and weight == 10.0
    assert log.stopped == "early" and max(seen) == 50


def test_weights_from_before_the_minimum_kept_step_are_never_kept():
    # with no weights kept before step 50 (DRAEM keeps none from the first quarter of its budget): the best
    # eligible evaluation (step 50) is kept, the evaluations before it do not count against the patience,
    # and training stops `patience` evaluations later
    log, weight, seen = _peaked_training(min_kept_step=50)
    assert seen[0] == 5 and log.best_step == 50 and weight == 50.0
    assert log.stopped == "early" and max(seen) == 65
    from vlad.scorers.autoencoder import AutoEncoder
    from vlad.scorers.draem import DRAEM

    assert DRAEM.MIN_KEPT_FRACTION == 0.25 and AutoEncoder.MIN_KEPT_FRACTION == 0.0


def test_score_command_says_what_the_line_chose(tmp_path, capsys):
    from PIL import Image

    from vlad.cli import main

    refs, inputs = tmp_path / "refs", tmp_path / "in"
    refs.mkdir()
    inputs.mkdir()
    for i in range(8):
        Image.fromarray(textured(i, size=64)).save(refs / f"r{i}.png")
    Image.fromarray(with_defect(textured(30, size=64), (20, 30, 20, 30))).save(inputs / "a.png")
    code = main(["score", str(inputs), "--scorer", "autoencoder", "--refs", str(refs), "--weights", "tiny",
                 "--device", "cpu", "--set", "train_steps=10", "--set", "image_size=64"])
    out = capsys.readouterr().out
    assert code == 0
    assert "autoencoder: map rule '" in out and "synthetic defects of" in out and "not a measurement" in out
    assert "training steps chosen" in out
    # a scorer with a backbone, asked to choose: PaDiM trains nothing, so no steps are claimed
    code = main(["score", str(inputs), "--scorer", "padim", "--refs", str(refs), "--weights", "tiny",
                 "--device", "cpu", "--set", "selection=synthetic", "--set", "image_size=64"])
    out = capsys.readouterr().out
    assert code == 0
    assert "padim: map rule '" in out and "training steps" not in out


def test_interrupted_before_any_evaluation_keeps_the_fallback_rule(refs, monkeypatch):
    # Ctrl-C at the first step: the model trained so far is kept, the rule is the fallback, and the
    # report says why nothing was chosen (no crash in the middle of fit)
    from vlad.scorers import scratch

    real = scratch.track

    def interrupted(iterable, *args, **kwargs):
        for i in real(iterable, *args, **kwargs):
            if i == 1:
                raise KeyboardInterrupt
            yield i

    monkeypatch.setattr(scratch, "track", interrupted)
    scorer = vlad.create_scorer("autoencoder", **PARAMS).fit(refs)
    assert scorer.interrupted_ and scorer.map_rule_ == MapRule("global", 2.0, 0.05, (0,))
    with pytest.raises(SelectionUnavailableError, match="before the first evaluation"):
        scorer.selection_report()


# -- the scorers with a pretrained backbone: the same mechanism, opt-in ------------------------------------
BACKBONE_PARAMS = {
    "stpm": dict(train_steps=20),
    "efficientad": dict(train_steps=20, layers=(2, 3)),
    "fastflow": dict(image_steps=60),
    "padim": dict(),
}


@pytest.mark.parametrize("name", sorted(BACKBONE_PARAMS))
def test_backbone_scorer_chooses_on_synthetic_defects_when_asked(name, refs, tmp_path):
    base = dict(weights="tiny", image_size=64, batch_size=4, random_state=0, **BACKBONE_PARAMS[name])
    paper = vlad.create_scorer(name, **base).fit(refs)
    assert paper.map_rule_ is None  # the default: the paper's map, untouched
    with pytest.raises(SelectionUnavailableError, match="selection=None"):
        paper.selection_report()
    scorer = vlad.create_scorer(name, **base, selection="synthetic").fit(refs)
    report = scorer.selection_report()
    assert report.rule == scorer.map_rule_.label(scorer.TERMS)
    assert report.n_held_out == 2 and report.n_defective == 16
    assert len(report.candidates) == len(scorer._candidates()) > 1
    assert report.fixed == {}  # sigma & co. describe the paper's map; with a selection everything is searched
    imgs = [textured(40), with_defect(textured(41))]
    res = scorer.predict(imgs)
    assert np.isfinite(res.image_scores).all() and np.asarray(res.anomaly_maps).shape == (2, 96, 96)
    loaded = vlad.load(scorer.save(tmp_path / name))
    assert loaded.map_rule_ == scorer.map_rule_ and loaded.selection_report() == report
    np.testing.assert_allclose(loaded.predict(imgs).image_scores, res.image_scores, rtol=1e-6, atol=1e-6)
    again = vlad.create_scorer(name, **base, selection="synthetic").fit(refs)
    assert again.selection_report() == report  # the same seed, the same choice
    few = vlad.create_scorer(name, **base, selection="synthetic").fit(refs[:3])
    assert few.map_rule_ is None  # nothing to hold out: the paper's map
    with pytest.raises(SelectionUnavailableError, match="fewer than 4"):
        few.selection_report()
    with pytest.raises(InvalidParameterError, match="selection"):
        vlad.create_scorer(name, selection="loss")


def test_backbone_selection_finds_a_planted_defect(refs):
    # the selected rule is used at predict: an image with a large bright square scores above clean ones
    scorer = vlad.create_scorer("padim", weights="tiny", image_size=64, random_state=0, selection="synthetic").fit(refs)
    clean = scorer.predict([textured(50), textured(51)]).image_scores
    bad = scorer.predict([with_defect(textured(52))]).image_scores
    assert bad[0] > clean.max()


def test_a_chosen_rule_is_not_exported_as_the_paper_map(refs):
    from vlad.errors import ExportError
    from vlad.export.graphs import build_graph

    scorer = vlad.create_scorer("padim", weights="tiny", image_size=64, random_state=0, selection="synthetic").fit(refs)
    with pytest.raises(ExportError, match="selection=None"):
        build_graph("padim", scorer)


def test_frozen_outputs_are_remembered_only_while_training(refs, monkeypatch):
    # the teacher's outputs for the validation images are computed once per fit, and give the same choice
    base = dict(weights="tiny", image_size=64, batch_size=4, random_state=0, train_steps=20, selection="synthetic")
    calls = []
    original = st.SelfTuned._frozen

    def counting(self, x, start, compute):
        calls.append(getattr(self, "_frozen_memo", None) is not None)
        return original(self, x, start, compute)

    remembered = vlad.create_scorer("stpm", **base).fit(refs)
    monkeypatch.setattr(st.SelfTuned, "_frozen", lambda self, x, start, compute: compute())
    recomputed = vlad.create_scorer("stpm", **base).fit(refs)
    assert remembered.selection_report() == recomputed.selection_report()
    monkeypatch.setattr(st.SelfTuned, "_frozen", counting)
    scorer = vlad.create_scorer("stpm", **base).fit(refs)
    assert any(calls) and not hasattr(scorer, "_frozen_memo")  # forgotten once fitted
    calls.clear()
    scorer.predict([textured(60)])
    assert calls == [False]
