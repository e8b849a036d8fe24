"""Self-tuning on synthetic defects: a scorer trained from scratch chooses, for its own line, how its error
maps become a map and a score, and how long it trains, by how well each choice separates synthetic
defects pasted into good images it did not train on.

No single map rule suits every line (a texture wants its errors normalised per position, a part that moves
does not; a thin crack wants the map's maximum, a stain the mean of its top pixels), and the line's real
defects are not known when it is set up. What is known are its good images. So at ``fit``:

1. A share of the references is held out of training (``validation_fraction``). Each held-out image and a
   few jittered views of it (:func:`vlad.detector.views.reference_views`: moved, turned and lit a little
   differently, as other good parts are) form the *clean* validation images; every clean image also gets
   a copy with one synthetic defect (:func:`vlad.synthesis.defect`: a moved patch, a blob of re-styled
   texture or a thin crack, at three sizes and three strengths, cycled so that every kind, size and
   strength is present) whose mask is known. While the candidates are ranked, the reference statistics
   they normalise by come from other references than these, as at test time a test image is never in
   them: from the training references, or with 8 or more held out, from the other half of those
   (:func:`validation_split`).
2. Every few training steps the scorer's raw error maps of these images are turned into scores by every
   candidate :class:`~vlad.scorers.scratch.MapRule` (normalisation, smoothing, score pooling, error
   terms: those the user did not fix), and each candidate gets an image AUROC (defective copies against
   clean images) and a pixel AUROC (defect pixels against all others). The candidates are ranked by
   ``image AUROC + PIXEL_WEIGHT x pixel AUROC``.
3. Training is judged by the best candidate's figure averaged over the last ``SMOOTHING`` evaluations,
   those not yet made counting at chance (a single lucky evaluation of a barely trained model does not
   win); a scorer may judge it by the candidates of some of its error terms only (``JUDGED_TERMS``:
   DRAEM's probability map, which needs the training, and not its reconstruction error, which separates
   defects almost untrained), and may weigh the pixel AUROC differently there (``JUDGE_PIXEL_WEIGHT``:
   the autoencoder judges by the image AUROC alone, as its error's pixel AUROC keeps rising with sharper
   reconstructions whether or not its image scores separate better), and may judge its first evaluations
   as they are (``FIRST_EVALUATIONS_AT_CHANCE = False``: the autoencoder, whose barely trained model is a
   fair detector, a local-variance filter, where a barely trained discriminator is a lucky one), and may
   keep no weights from the first part of its budget (``MIN_KEPT_FRACTION``: DRAEM, whose discriminative
   network is a random filter until it has learnt, one that synthetic defects' sharp edges can reward
   three evaluations in a row). It keeps the weights at the end of the best such stretch and stops when
   ``patience`` evaluations in a row have not beaten it by ``MIN_DELTA``, never before ``MIN_FRACTION``
   of the budget: the held-out loss of a handful of images is too noisy a yardstick, a separation
   measured on dozens of images with and without defects is the one that matters.
4. The best candidate at the kept weights becomes the scorer's map rule. What was chosen, every
   candidate's figures there, the curve over training and the synthetic settings are saved with the
   model: :class:`SelectionReport`, through the scorer's ``selection_report()``.

The synthetic figures are a prediction, not a measurement of real defects: ``python -m vlad.bench
quality`` prints both side by side. This module is the one mechanism every trained scorer uses: it
needs a function from canvas images to raw error maps, the images the reference statistics come from,
and the candidate rules. The autoencoder and DRAEM use it by default; the scorers with a pretrained
backbone (STPM, EfficientAD, FastFlow, and PaDiM, which trains nothing: :func:`select_once`) keep their
paper's map unless given ``selection="synthetic"`` -- their quality depends on pretrained weights this
project cannot measure on its own machines, so their default is not changed blind.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from vlad.images import LoadedImage
from vlad.metrics import auroc
from vlad.scorers.scratch import (MIN_HELD_OUT_FOR_STATS, MapRule, TrainLog, _topk, apply_rule, fit_loop, reference_stats,
                                  split_held_out)
from vlad.synthesis import DEFECT_KINDS, defect

#: weight of the pixel AUROC next to the image AUROC in a candidate's rank
PIXEL_WEIGHT = 0.25
#: an evaluation must beat the best so far by this much to count as an improvement
MIN_DELTA = 0.004
#: training never stops early before this share of its budget
MIN_FRACTION = 0.5
#: the weights evaluated and kept are an exponential moving average of the trained ones, with this decay
#: (a time constant of about 20 steps): a few references make step-to-step weights swing
EMA_DECAY = 0.95
#: evaluations averaged into the figure training is judged by: one lucky evaluation of a barely trained
#: model must not win, a stretch of good ones may
SMOOTHING = 3
#: evaluations over a training budget (each ranks every candidate on the validation images)
EVALUATIONS = 16
#: at most this many held-out references carry synthetic defects, and this many give the statistics
#: while ranking (the cost of an evaluation stays bounded with hundreds of references)
MAX_BASES = 16
MAX_STATS = 32
#: negatives sampled for the pixel AUROC (all defect pixels are kept)
MAX_NEGATIVE_PIXELS = 40_000


#: the rank key of a candidate that separates nothing (image and pixel AUROC 0.5)
CHANCE_KEY = 0.5 * (1.0 + PIXEL_WEIGHT)


def smoothed(keys: Sequence[float], chance: float | None = CHANCE_KEY) -> float:
    """The figure training is judged by after the evaluations ``keys``: the mean of the last ``SMOOTHING``,
    where evaluations not yet made count at ``chance`` (the key of a candidate that separates nothing) --
    so the first evaluation or two of a barely trained model, however lucky, are not a stretch of good ones
    and their weights are not kept over a later stretch that is as good. ``chance=None``: the mean of the
    evaluations made (for a scorer whose barely trained model is a fair detector, not a lucky one)."""
    last = list(keys[-SMOOTHING:])
    pad = [] if chance is None else [chance] * (SMOOTHING - len(last))
    return float(np.mean(last + pad))


@dataclass(frozen=True)
class SyntheticSettings:
    """How the synthetic validation images are made (saved with the model)."""

    kinds: tuple[str, ...] = DEFECT_KINDS
    #: defect sizes, as a share of the image's area
    areas: tuple[float, ...] = (0.003, 0.015, 0.06)
    #: defect strengths (opacity of a patch or blob, intensity change of a crack), in (0, 1]
    strengths: tuple[float, ...] = (0.35, 0.7, 1.0)
    #: jittered views per held-out image are chosen so that there are at least this many clean images
    min_clean: int = 24
    #: ... but at most this many images per held-out reference (itself included)
    max_views: int = 8

    def as_meta(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class ValidationSet:
    """Clean canvas images ``(N, 3, H, W)``, their defective copies, the defects' masks ``(N, H, W)`` and
    each image's region on the canvas."""

    clean: torch.Tensor
    defective: torch.Tensor
    masks: torch.Tensor
    boxes: list[tuple[int, int, int, int]]
    defects: list[dict]  # kind, area, strength of each defective copy

    def __len__(self) -> int:
        return int(self.clean.shape[0])


def make_validation_set(held: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], seed: int,
                        settings: SyntheticSettings = SyntheticSettings(),
                        textures: torch.Tensor | None = None) -> ValidationSet:
    """Clean views of the held-out canvas images ``held`` ``(n, 3, H, W)`` and a defective copy of each.

    Defects are drawn inside each image's own region (``boxes``: ``(y0, x0, h, w)`` on the canvas, the
    rest is letterbox padding). ``textures`` (canvas images) feed the blob defects; None uses the image.
    The result depends only on the inputs and ``seed``.
    """
    from vlad.detector.views import reference_views

    n = int(held.shape[0])
    if n == 0:
        raise ValueError("no held-out references to build a validation set from")
    per_image = max(1, min(settings.max_views, math.ceil(settings.min_clean / n)))
    rng = np.random.default_rng(seed)
    plan = list(itertools.product(settings.kinds, settings.areas, settings.strengths))
    order = rng.permutation(len(plan))
    clean, bad, masks, out_boxes, info = [], [], [], [], []
    j = 0
    for i in range(n):
        base = held[i].permute(1, 2, 0).contiguous().numpy().astype(np.float32)
        views = [base]
        if per_image > 1:
            views += [v.pixels for v in reference_views(LoadedImage(base, f"held{i}"), per_image - 1, seed + 101 * i)]
        y0, x0, h, w = boxes[i]
        for view in views:
            kind, area, strength = plan[int(order[j % len(plan)])]
            j += 1
            region = np.ascontiguousarray(view[y0 : y0 + h, x0 : x0 + w])
            texture = None
            if textures is not None and len(textures) and kind == "perlin":
                texture = textures[int(rng.integers(0, len(textures)))].permute(1, 2, 0).numpy()
            aug, mask = defect(region, rng, kind, area, strength, texture=texture)
            full, full_mask = view.copy(), np.zeros(view.shape[:2], np.float32)
            full[y0 : y0 + h, x0 : x0 + w] = aug
            full_mask[y0 : y0 + h, x0 : x0 + w] = mask
            clean.append(torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1))
            bad.append(torch.from_numpy(full).permute(2, 0, 1))
            masks.append(torch.from_numpy(full_mask > 0.5))
            out_boxes.append(tuple(boxes[i]))
            info.append({"kind": kind, "area": area, "strength": strength})
    return ValidationSet(torch.stack(clean).float(), torch.stack(bad).float(), torch.stack(masks), out_boxes, info)


@dataclass
class Candidate:
    """One map rule's figures on the synthetic validation set."""

    rule: MapRule
    image_auroc: float
    pixel_auroc: float

    @property
    def rank_key(self) -> float:
        """What candidates are ranked by (higher is better)."""
        return self.key(PIXEL_WEIGHT)

    def key(self, pixel_weight: float) -> float:
        """``image AUROC + pixel_weight x pixel AUROC``, a figure that could not be measured counting at 0.5."""
        ia = 0.5 if math.isnan(self.image_auroc) else self.image_auroc
        pa = 0.5 if math.isnan(self.pixel_auroc) else self.pixel_auroc
        return ia + pixel_weight * pa


def candidate_rules(normalize: Sequence[tuple[str, int]], terms: Sequence[tuple[int, ...]],
                    sigmas: Sequence[float], topks: Sequence[float]) -> list[MapRule]:
    """Every combination of the given choices (``normalize``: ``(mode, shift)`` pairs)."""
    return [MapRule(norm, float(s), float(t), tuple(te), shift=int(shift))
            for (norm, shift), te, s, t in itertools.product(normalize, terms, sigmas, topks)]


def rank_rules(raw_clean: torch.Tensor, raw_defective: torch.Tensor, masks: torch.Tensor,
               boxes: Sequence[tuple[int, int, int, int]], stats: dict[str, torch.Tensor],
               rules: Sequence[MapRule]) -> list[Candidate]:
    """Image and pixel AUROC of every rule on one validation pass, best first (ties: the earlier rule)."""
    raw = torch.cat([raw_clean, raw_defective]).float()
    n = raw_clean.shape[0]
    labels = np.r_[np.zeros(n, bool), np.ones(raw_defective.shape[0], bool)]
    all_boxes = list(boxes) * 2
    pix_labels = np.concatenate([np.zeros(h * w, bool) for _, _, h, w in boxes]
                                + [m[y0:y0 + h, x0:x0 + w].reshape(-1).numpy()
                                   for m, (y0, x0, h, w) in zip(masks, boxes)])
    pick = _pixel_sample(pix_labels)
    out: list[Candidate | None] = [None] * len(rules)
    for members, regions in rule_family_maps(raw, stats, rules, all_boxes):
        flat = torch.cat([r.reshape(-1) for r in regions]).numpy()
        pixel = auroc(flat[pick], pix_labels[pick]) if pix_labels.any() else math.nan
        for i in members:
            scores = np.array([float(_topk(r.reshape(-1), rules[i].topk_fraction)) for r in regions])
            out[i] = Candidate(rules[i], auroc(scores, labels), pixel)
    ranked = sorted(range(len(rules)), key=lambda i: -out[i].rank_key)  # stable: ties keep the given order
    return [out[i] for i in ranked]


def rule_family_maps(raw: torch.Tensor, stats: dict[str, torch.Tensor], rules: Sequence[MapRule],
                     boxes: Sequence[tuple[int, int, int, int]]):
    """``(indices into rules, maps cut to their regions)`` for each family of rules that differ only in
    their pooling (``topk_fraction``): the normalisation and smoothing are computed once per family."""
    families: dict[tuple, list[int]] = {}
    for i, rule in enumerate(rules):
        families.setdefault((rule.normalize, rule.shift, rule.terms, rule.sigma, rule.stats_sigma, rule.floor), []).append(i)
    for members in families.values():
        yield members, apply_rule(raw, stats, rules[members[0]], boxes)[1]


def _pixel_sample(labels: np.ndarray) -> np.ndarray:
    """Indices: every positive pixel and an evenly spaced subset of at most MAX_NEGATIVE_PIXELS negatives."""
    pos = np.flatnonzero(labels)
    neg = np.flatnonzero(~labels)
    if neg.size > MAX_NEGATIVE_PIXELS:
        neg = neg[np.linspace(0, neg.size - 1, MAX_NEGATIVE_PIXELS).astype(np.int64)]
    return np.sort(np.r_[pos, neg])


@dataclass
class SelectionReport:
    """What a scorer chose on synthetic defects of its own references, and why.

    ``rule``: the chosen map rule's label; ``step``: the training step whose weights were kept;
    ``candidates``: every candidate at that step, best first (rule, image and pixel AUROC in percent);
    ``curve``: ``(step, best figure, best rule)`` at each evaluation, among the candidates that judge
    training, by the figure training is judged by (the rank key, or for a scorer with its own
    ``JUDGE_PIXEL_WEIGHT``, image AUROC plus that weight times the pixel AUROC); ``settings``: how the
    synthetic defects were made; ``n_clean`` / ``n_defective``: validation images; ``n_held_out``:
    references held out of training to make them.
    """

    rule: str
    step: int | None
    candidates: list[dict]
    curve: list[list]
    settings: dict
    n_held_out: int
    n_clean: int
    n_defective: int
    stopped: str = "budget"
    fixed: dict = field(default_factory=dict)

    @property
    def predicted_image_auroc(self) -> float:
        """The chosen rule's image AUROC on the synthetic defects (percent): a prediction, not a measurement."""
        return float(self.candidates[0]["image_auroc"]) if self.candidates else math.nan

    def as_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> SelectionReport:
        return cls(**meta)

    def describe(self, top: int = 8) -> str:
        """A few lines: what was chosen, on what, and the best candidates."""
        lines = [f"map rule {self.rule!r} at training step {self.step} ({self.stopped}), chosen on "
                 f"{self.n_defective} synthetic defects pasted into {self.n_clean} clean views of "
                 f"{self.n_held_out} held-out references",
                 f"{'rule':32s} {'image AUROC':>11s} {'pixel AUROC':>11s}"]
        for c in self.candidates[:top]:
            lines.append(f"{c['rule']:32s} {c['image_auroc']:11.1f} {c['pixel_auroc']:11.1f}")
        if self.fixed:
            lines.append("fixed by the user: " + ", ".join(f"{k}={v}" for k, v in self.fixed.items()))
        return "\n".join(lines)


class SelfTuner:
    """Evaluates the candidate rules on a validation set during training (see the module docstring).

    Args:
        raw: canvas images ``(B, 3, H, W)`` -> raw error maps ``(B, T, H, W)`` with the current model.
        stats_images: canvas images the reference statistics come from.
        validation: the synthetic validation set.
        rules: the candidates.
        term_names: names of the raw maps' terms (for labels).
        judged_terms: training is judged by the best candidate that uses only these terms (None: any);
            the rule is still chosen among every candidate at the kept weights.
        judge_pixel_weight: the weight of the pixel AUROC in the figure training is judged by
            (``image AUROC + judge_pixel_weight x pixel AUROC``); the rule is still chosen by the rank key.
        first_at_chance: while fewer than ``SMOOTHING`` evaluations are made, the missing ones count at
            chance (:func:`smoothed`); False: the first evaluations are judged as they are.
    """

    def __init__(self, raw: Callable[[torch.Tensor], torch.Tensor], stats_images: torch.Tensor,
                 validation: ValidationSet, rules: Sequence[MapRule], term_names: Sequence[str] | None = None,
                 judged_terms: Sequence[int] | None = None, judge_pixel_weight: float = PIXEL_WEIGHT,
                 first_at_chance: bool = True):
        if not rules:
            raise ValueError("no candidate map rules")
        self.raw, self.stats_images, self.validation = raw, stats_images, validation
        self.rules, self.term_names = list(rules), term_names
        judged = set(judged_terms) if judged_terms is not None else None
        self.judged = {r for r in self.rules if judged is None or set(r.terms) <= judged} or set(self.rules)
        self.judge_pixel_weight = float(judge_pixel_weight)
        self.first_at_chance = bool(first_at_chance)
        self.history: dict[int, list[Candidate]] = {}
        self.curve: list[list] = []

    def evaluate(self, step: int) -> float:
        """Rank every candidate with the current model; returns the smoothed figure training is judged by
        (higher is better)."""
        stats = reference_stats(self.raw(self.stats_images))
        v = self.validation
        ranked = rank_rules(self.raw(v.clean), self.raw(v.defective), v.masks, v.boxes, stats, self.rules)
        self.history[int(step)] = ranked
        w = self.judge_pixel_weight
        best = max((c for c in ranked if c.rule in self.judged), key=lambda c: c.key(w))  # ties: the first
        self.curve.append([int(step), round(best.key(w), 5), best.rule.label(self.term_names)])
        chance = 0.5 * (1.0 + w) if self.first_at_chance else None
        return smoothed([c[1] for c in self.curve], chance)

    def report(self, step: int | None, settings: SyntheticSettings, n_held_out: int, stopped: str,
               fixed: dict | None = None) -> tuple[MapRule, SelectionReport]:
        """The chosen rule at ``step`` (the kept weights; the last evaluation if None) and the report."""
        if not self.history:
            raise ValueError("no evaluation was made")
        step = step if step in self.history else max(self.history)
        ranked = self.history[step]
        cands = [{"rule": c.rule.label(self.term_names), "image_auroc": round(100 * c.image_auroc, 2),
                  "pixel_auroc": round(100 * c.pixel_auroc, 2)} for c in ranked]
        return ranked[0].rule, SelectionReport(
            rule=cands[0]["rule"], step=step, candidates=cands, curve=self.curve, settings=settings.as_meta(),
            n_held_out=int(n_held_out), n_clean=len(self.validation), n_defective=len(self.validation),
            stopped=stopped, fixed=dict(fixed or {}))


# -- what a trained scorer declares, and the shared fit-time step ---------------------------------------
#: the choices searched for each map-rule parameter the user leaves at None
NORMALIZE_CHOICES = (("position", 0), ("position", 4), ("global", 0))
SIGMA_CHOICES = (2.0, 4.0, 8.0)
TOPK_CHOICES = (0.0, 0.01, 0.05)
SELECTION_MODES = ("synthetic", "loss")
#: share of the references held out to make synthetic defects from, for scorers without a
#: ``validation_fraction`` parameter (those with a pretrained backbone)
VALIDATION_FRACTION = 0.2


def rules_for(normalize: str | None, shift: int | None, sigma: float | None, topk: float | None,
              terms: Sequence[tuple[int, ...]]) -> list[MapRule]:
    """The candidate rules left open by the user's fixed values (None = search that parameter)."""
    if normalize is None:
        norms = [(n, s) for n, s in NORMALIZE_CHOICES if shift is None or n == "global" or s == shift]
        norms = list(dict.fromkeys(norms if shift is None else [*norms, ("position", int(shift))]))
    elif normalize == "position":
        norms = [("position", s) for s in ((0, 4) if shift is None else (int(shift),))]
    else:
        norms = [(normalize, 0 if shift is None else int(shift))]
    sigmas = SIGMA_CHOICES if sigma is None else (float(sigma),)
    topks = TOPK_CHOICES if topk is None else (float(topk),)
    return [r.check() for r in candidate_rules(norms, terms, sigmas, topks)]


def fixed_rule(normalize: str | None, shift: int | None, sigma: float | None, topk: float | None,
               terms: tuple[int, ...], fallback: MapRule) -> MapRule:
    """The rule used without a selection: the user's values, the scorer's ``fallback`` for the rest."""
    return MapRule(fallback.normalize if normalize is None else normalize,
                   fallback.sigma if sigma is None else float(sigma),
                   fallback.topk_fraction if topk is None else float(topk), tuple(terms),
                   shift=fallback.shift if shift is None else int(shift)).check()


def train_and_select(scorer, step: Callable[[int], float], n_steps: int, desc: str, *, data: torch.Tensor,
                     boxes: Sequence[tuple[int, int, int, int]], train_idx: np.ndarray, held_idx: np.ndarray,
                     loss_validate: Callable[[int], float] | None, log, model: torch.nn.Module | None = None) -> TrainLog:
    """Train a scorer and choose its map rule: the one fit-time step every trained scorer shares.

    ``scorer`` (a :class:`SelfTuned`, whose class attributes say how its training is judged) provides
    ``_raw(canvas) -> raw maps``, ``_candidates()``, ``_map_rule()`` (the rule
    without a selection; None = the scorer's own map), ``TERMS`` and the parameters ``selection`` and
    ``random_state`` (``patience``, ``time_limit`` and ``validation_fraction`` where it has them);
    ``model`` (default ``scorer.model_``) is the network being trained. With ``selection="synthetic"``
    and references held out, training stops and the rule is chosen on synthetic defects (module
    docstring); otherwise ``loss_validate`` (a held-out loss, or None) drives early stopping and the rule
    is ``_map_rule()``. Sets ``map_rule_``, ``selection_``, ``selection_note_`` and ``stats_`` (statistics
    of the held-out references when at least ``MIN_HELD_OUT_FOR_STATS`` are held out, else of all).
    """
    model = scorer.model_ if model is None else model
    tuner, extra, note = None, {}, None
    if scorer.selection == "synthetic" and len(held_idx):
        tuner, bases, settings = _start_tuner(scorer, data, boxes, train_idx, held_idx)
        validate = lambda i: -tuner.evaluate(i)  # noqa: E731  (fit_loop minimises)
        extra = {"min_delta": MIN_DELTA, "min_steps": int(MIN_FRACTION * n_steps), "ema": EMA_DECAY,
                 "min_kept_step": int(float(scorer.MIN_KEPT_FRACTION) * n_steps)}
    else:
        validate = loss_validate if len(held_idx) else None
        note = no_selection_note(scorer, len(data))
    scorer._frozen_memo = {}  # the validation images' frozen-network outputs, computed once (SelfTuned._frozen)
    try:
        train_log = fit_loop(step, n_steps, desc, model=model, validate=validate,
                             eval_every=max(5, n_steps // (EVALUATIONS if tuner is not None else 25)),
                             patience=int(getattr(scorer, "patience", 5)),
                             time_limit=getattr(scorer, "time_limit", None), log=log, **extra)
    finally:
        del scorer._frozen_memo
    model.eval()
    if tuner is not None and not tuner.history:  # interrupted before the first evaluation
        tuner, note = None, "training stopped before the first evaluation on synthetic defects"
    if tuner is not None:
        _choose(scorer, tuner, train_log.best_step, train_log.stopped, bases, settings, desc, log)
    else:
        scorer.map_rule_, scorer.selection_ = scorer._map_rule(), None
    scorer.selection_note_ = note
    stats_from = data[torch.from_numpy(np.asarray(held_idx, dtype=np.int64))] \
        if len(held_idx) >= MIN_HELD_OUT_FOR_STATS else data
    scorer.stats_ = reference_stats(scorer._raw(stats_from))
    return train_log


def select_once(scorer, desc: str, *, data: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]],
                train_idx: np.ndarray, held_idx: np.ndarray, log) -> None:
    """Choose the map rule of a scorer that is not trained (e.g. PaDiM): its model is fitted on
    ``train_idx`` when this is called, and the candidates are ranked once on synthetic defects of the
    held-out references. Sets ``map_rule_``, ``selection_`` and ``selection_note_``; the caller refits on
    every reference and computes ``stats_`` afterwards."""
    if scorer.selection == "synthetic" and len(held_idx):
        tuner, bases, settings = _start_tuner(scorer, data, boxes, train_idx, held_idx)
        with torch.no_grad():
            tuner.evaluate(0)
        _choose(scorer, tuner, 0, "no training", bases, settings, desc, log)
        scorer.selection_note_ = None
    else:
        scorer.map_rule_, scorer.selection_ = scorer._map_rule(), None
        scorer.selection_note_ = no_selection_note(scorer, len(data))


def _start_tuner(scorer, data: torch.Tensor, boxes, train_idx: np.ndarray, held_idx: np.ndarray):
    """The synthetic validation set of the held-out references and a tuner ranking the scorer's candidates."""
    seed = 0 if scorer.random_state is None else int(scorer.random_state)
    hold = torch.from_numpy(np.asarray(held_idx, dtype=np.int64))
    train = torch.from_numpy(np.asarray(train_idx, dtype=np.int64))
    settings = SyntheticSettings()
    bases, tuner_stats = validation_split(data, hold, train)
    validation = make_validation_set(data[bases], [tuple(boxes[i]) for i in bases.tolist()], seed + 31, settings,
                                     textures=data[train])
    tuner = SelfTuner(scorer._raw, tuner_stats, validation, scorer._candidates(), scorer.TERMS, scorer.JUDGED_TERMS,
                      scorer.JUDGE_PIXEL_WEIGHT, scorer.FIRST_EVALUATIONS_AT_CHANCE)
    return tuner, bases, settings


def _choose(scorer, tuner: SelfTuner, step, stopped: str, bases, settings: SyntheticSettings, desc: str, log) -> None:
    fixed = {k: getattr(scorer, k) for k in getattr(scorer, "RULE_PARAMS", RULE_PARAMS) if getattr(scorer, k, None) is not None}
    scorer.map_rule_, report = tuner.report(step, settings, len(bases), stopped, fixed)
    scorer.selection_ = report.as_meta()
    log.info("%s: map rule %s chosen on synthetic defects (image AUROC %.1f, pixel %.1f) at step %s", desc,
             report.rule, report.candidates[0]["image_auroc"], report.candidates[0]["pixel_auroc"], report.step)


def no_selection_note(scorer, n_references: int) -> str:
    """Why nothing was chosen on synthetic defects (for ``selection_report()``'s error)."""
    own = ("the map rule is the user's values with the scorer's defaults" if scorer._map_rule() is not None
           else "the scorer keeps its paper's map")
    if scorer.selection == "synthetic":
        why = ("validation_fraction=0 holds none out" if not getattr(scorer, "validation_fraction", VALIDATION_FRACTION)
               else f"{n_references} references: fewer than 4, so none could be held out")
        return f"{why} to make synthetic defects from; {own}"
    return f"selection={scorer.selection!r}: {own}"


def validation_split(data: torch.Tensor, held: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bases, stats images)``: the held-out references the synthetic defects go into, and the images
    the reference statistics come from while the rules are ranked -- never the same images, as at test
    time (a test image is never in the statistics). With ``MIN_HELD_OUT_FOR_STATS`` or more held out
    (the statistics then come from held-out references), half of them (at most ``MAX_BASES``) are bases
    and the other half (at most ``MAX_STATS``) the statistics; with fewer, all of them are bases and the
    statistics come from the training references."""
    if len(held) >= MIN_HELD_OUT_FOR_STATS:
        half = len(held) // 2
        return held[:half][:MAX_BASES], data[held[half:][:MAX_STATS]]
    return held[:MAX_BASES], data[train[:MAX_STATS]]


#: the scorer parameters that fix a part of the map rule (None = searched)
RULE_PARAMS = ("error_terms", "normalize", "sigma", "topk_fraction", "shift_tolerance")


class SelfTuned:
    """Mixin of the scorers that choose their map rule on synthetic defects: the report, the prediction
    through the chosen rule and their saving, and how a scorer's training is judged (the class attributes
    below, which a scorer overrides; see the module docstring, step 3)."""

    #: training is judged by the candidates that use only these error terms (None: every candidate)
    JUDGED_TERMS: tuple[int, ...] | None = None
    #: the weight of the pixel AUROC in the figure training is judged by
    JUDGE_PIXEL_WEIGHT: float = PIXEL_WEIGHT
    #: evaluations not yet made count at chance while fewer than SMOOTHING are made
    FIRST_EVALUATIONS_AT_CHANCE: bool = True
    #: no weights from this share of the training budget are kept
    MIN_KEPT_FRACTION: float = 0.0

    def selection_report(self) -> SelectionReport:
        """What this scorer chose at ``fit`` on synthetic defects, with every candidate's figures.

        Raises:
            NotFittedError: not fitted.
            SelectionUnavailableError: nothing was chosen (``selection="loss"``, or fewer than 4
                references); the message says why.
        """
        from vlad.errors import SelectionUnavailableError

        self._check_fitted()
        if getattr(self, "selection_", None) is None:
            why = getattr(self, "selection_note_", None) or "it was fitted by a vlad older than 0.3"
            held = " and validation_fraction > 0" if hasattr(self, "validation_fraction") else ""
            raise SelectionUnavailableError(f"this {type(self).__name__} chose no map rule on synthetic defects: {why}. "
                                            f"Fit it on 4 or more references with selection='synthetic'{held} "
                                            "for one")
        return SelectionReport.from_meta(self.selection_)

    def _terms(self) -> list[tuple[int, ...]]:
        """The error-term choices, as indices into ``TERMS``: the one the user's ``error_terms`` names
        (a key of the scorer's ``TERM_CHOICES``), or every one searched when it is None."""
        from vlad.errors import InvalidParameterError

        choices = self.TERM_CHOICES
        if self.error_terms is None:
            return list(choices.values())
        if self.error_terms not in choices:
            raise InvalidParameterError(f"error_terms must be one of {', '.join(map(repr, choices))} or None, "
                                        f"got {self.error_terms!r}")
        return [choices[self.error_terms]]

    def _frozen(self, x: torch.Tensor, start: int, compute: Callable[[], object]):
        """``compute()``: the output of a frozen network (a pretrained teacher or backbone) for the batch
        of canvas images ``x`` starting at ``start`` -- during training, remembered for the same ``x``,
        since the validation images come back at every evaluation and only the trained part changes."""
        memo = getattr(self, "_frozen_memo", None)
        if memo is None:
            return compute()
        key = (id(x), int(start))
        hit = memo.get(key)
        if hit is None or hit[0] is not x:  # the memo holds x, so its id is never another tensor's
            hit = memo[key] = (x, compute())
        return hit[1]

    def _held_out_canvas(self, references: list[LoadedImage]):
        """``(canvas, boxes, train_idx, held_idx)``: the references on the canvas and the split of them that
        ``selection="synthetic"`` trains on and makes synthetic defects from (scorers with a pretrained
        backbone: :data:`VALIDATION_FRACTION`)."""
        canvas, boxes = self._canvas(references)
        return (canvas, boxes, *split_held_out(len(canvas), VALIDATION_FRACTION, self.random_state))

    def _train_selected(self, step: Callable[[int], float], n_steps: int, desc: str, model: torch.nn.Module, log, *,
                        canvas: torch.Tensor, boxes, train_idx: np.ndarray, held_idx: np.ndarray) -> None:
        """:func:`train_and_select` for a scorer with a pretrained backbone, whose trained part is ``model``
        and which judges training on synthetic defects only; sets ``loss_history_`` and ``interrupted_``."""
        train_log = train_and_select(self, step, n_steps, desc, data=canvas, boxes=boxes, train_idx=train_idx,
                                     held_idx=held_idx, loss_validate=None, log=log, model=model)
        self.loss_history_, self.interrupted_ = train_log.losses, train_log.stopped == "interrupted"

    def _rule_predict(self, images: list[LoadedImage]):
        """Scores and maps of ``images`` through the chosen map rule (``_canvas``, ``_raw``, ``stats_``)."""
        from vlad.scorers.scratch import stack_or_list

        x, boxes = self._canvas(images)
        scores, maps = apply_rule(self._raw(x), self.stats_, self.map_rule_, boxes)
        return scores, stack_or_list(maps)

    def _selection_meta(self) -> dict:
        rule = getattr(self, "map_rule_", None)
        return {"map_rule": None if rule is None else rule.as_meta(),
                "selection": self.selection_, "selection_note": self.selection_note_}

    def _restore_selection(self, meta: dict) -> None:
        rule = meta.get("map_rule")
        if rule is not None:  # saved models before 0.3 carry no rule: theirs follows from their parameters
            self.map_rule_ = MapRule.from_meta(rule)
        self.selection_ = meta.get("selection")
        self.selection_note_ = meta.get("selection_note")

    def _save_stats(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` with the reference statistics of the chosen rule added (as ``stats.*``), if any."""
        if getattr(self, "map_rule_", None) is not None:
            tensors.update({f"stats.{k}": v for k, v in self.stats_.items()})
        return tensors

    def _load_stats(self, tensors: dict[str, torch.Tensor]) -> None:
        self.stats_ = {k[len("stats."):]: v.cpu() for k, v in tensors.items() if k.startswith("stats.")}


def stretched_canvas(images: Sequence[LoadedImage], size: int | tuple[int, int], interpolation: str = "bilinear"):
    """Images resized to ``size`` in [0, 1] and their regions (the whole canvas): the canvas of the scorers
    with a pretrained backbone, whose inputs are the backbone's normalisation of it (:func:`normalized`)."""
    from vlad.ops import to_batch

    x = to_batch(images, size, None, None, "cpu", interpolation)
    return x, [(0, 0, int(x.shape[-2]), int(x.shape[-1]))] * int(x.shape[0])


def normalized(x: torch.Tensor, preprocess, device) -> torch.Tensor:
    """Canvas images in [0, 1] normalised with a backbone's mean and std, on ``device``."""
    m = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
    sd = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)
    return (x.to(device) - m) / sd

