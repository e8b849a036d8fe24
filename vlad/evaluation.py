"""Benchmark evaluation on MVTec-layout data (``vlad eval``): per-category and macro-mean metrics.

For every category, shot count k and seed, a fresh detector is built with
:func:`vlad.create_detector` (a single scorer name is a one-scorer detector; ``a+b`` fuses several),
fitted on k normal images drawn from ``train/good`` with ``numpy.random.default_rng(seed)`` (its
thresholds are calibrated on them, as in use) and predicts the test split. Metrics come from
:mod:`vlad.metrics`:

* **Ranking metrics** (of the scores and maps, no threshold): image AUROC / AP / F1-max and, when the
  category has ground-truth masks, pixel AUROC / AP / F1-max, AUPRO (FPR <= 0.3) and AUPRO.05
  (FPR <= 0.05, MVTec AD 2). For a single scorer they are computed on the scorer's own raw scores and
  maps (as before the detector existed: the detector's calibration is per image at 0 and 1 references
  and would change the ranking); for a fused spec on the fused scores and maps.
* **Decision metrics** (of the detector's own labels and masks, at its own thresholds): the image
  false-alarm rate (normal test images labelled anomalous), the miss rate (anomalous test images
  labelled normal), each with a Clopper-Pearson 95% interval, and SegF1 (MVTec AD 2: pixel F1 of the
  masks over all test pixels pooled, anomaly-free images included).

A detector with an unlabeled-tier scorer and no pool (``--scorer musc``) gets the whole test split in
one ``predict`` call: its images are scored against each other, the MuSc paper's setting.

Maps are returned at each test image's own resolution and masks are compared at that same resolution
(loaded with nearest-neighbour resizing only if a mask's size differs from its image).

Few-shot figures are reported as mean ± std (ddof=0) over seeds; the macro mean is the mean over
categories per seed (NaN categories, e.g. pixel metrics without masks, left out), then mean ± std
over seeds. A 0-shot or "all"-shot cell has no draw, so it runs once per category unless the scorer
takes a ``random_state`` (then each seed is also the scorer's ``random_state``).

>>> from vlad.evaluation import run_eval  # doctest: +SKIP
>>> res = run_eval("data/mpdd", scorer="patchcore", shots=[1, 4], seeds=3, weights="random")
>>> res["summary"]["1"]["mean"]["image_auroc"]["mean"]
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlad.data import Category, discover_categories, draw_references, load_mask
from vlad.errors import VladError
from vlad import rng
from vlad.metrics import (
    DECISION_METRICS,
    IMAGE_METRICS,
    PIXEL_METRICS,
    decision_metrics,
    evaluate,
    rate_with_ci,
)
from vlad.progress import track
from vlad.serialization import nan_to_none, write_json

logger = logging.getLogger(__name__)

RANKING_METRICS = IMAGE_METRICS + PIXEL_METRICS
ALL_METRICS = RANKING_METRICS + DECISION_METRICS
_SHORT = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1",
    "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1max": "P-F1", "pixel_aupro": "AUPRO",
    "pixel_aupro05": "AUPRO.05", "false_alarm_rate": "FAR", "miss_rate": "Miss", "seg_f1": "SegF1",
}
#: decision rates whose counts are pooled for a confidence interval in the summary
_RATES = {"false_alarm_rate": ("n_false_alarms", "n_normal"), "miss_rate": ("n_missed", "n_anomalous")}
MAP_RESOLUTION_NOTE = ("maps at each test image's own resolution; ground-truth masks compared at that "
                       "resolution (nearest-neighbour resize only where a mask's size differs)")


def parse_shots(text: str | int | Sequence[int | str]) -> list[int | str]:
    """``"0,1,2,4"`` -> ``[0, 1, 2, 4]``; ``"all"`` (alone or in the list) means every training image.

    Raises:
        VladError: a token is neither a non-negative integer nor ``all``.
    """
    tokens = [text] if isinstance(text, (int, str)) else list(text)
    out: list[int | str] = []
    for tok in tokens:
        for part in (str(tok).split(",") if isinstance(tok, str) else [tok]):
            part = str(part).strip().lower()
            if not part:
                continue
            if part == "all":
                value: int | str = "all"
            elif re.fullmatch(r"\d+", part):
                value = int(part)
            else:
                raise VladError(f"--shots expects comma-separated non-negative integers or 'all', got {part!r}")
            if value not in out:
                out.append(value)
    if not out:
        raise VladError(f"--shots is empty ({text!r}); e.g. --shots 0,1,2,4")
    return out


def build_detector(spec: str, options: dict[str, Any]) -> Any:
    """The one place ``vlad eval`` builds a model: ``vlad.create_detector(spec, **options)``.

    ``options`` are routed by :func:`vlad.create_detector`: detector options (e.g. ``image_threshold``,
    ``false_alarm_rate``), ``scorer_options`` and scorer parameters (``weights``, ``object_name``, ...).
    """
    from vlad.detector import create_detector

    return create_detector(spec, **options)


class _ModelBuilder:
    """Builds one fresh detector per cell with the right weights/device/object_name/random_state."""

    def __init__(self, spec: str, params: dict[str, Any], weights: str | None, device: str | None,
                 false_alarm_rate: float | None = None):
        self.spec = spec
        self.options = dict(params)
        if false_alarm_rate is not None:  # only then: older detectors do not know the option
            self.options["false_alarm_rate"] = false_alarm_rate
        self.shared = {k: v for k, v in (("weights", weights), ("device", device)) if v is not None}
        try:
            probe = build_detector(spec, self.options)
        except TypeError as exc:  # a scorer constructor refused a --set value
            raise VladError(f"cannot build {spec!r} with parameters {self.options}: {exc}; check the --set names "
                            f"against the scorer's parameters") from exc
        scorers = getattr(probe, "scorers", {})
        self.single = next(iter(scorers)) if len(scorers) == 1 else None
        self.requires_references = bool(getattr(probe, "requires_references", False))
        self.seeded = "random_state" not in self.options and any(
            "random_state" in s.get_params(deep=False) for s in scorers.values())

    def build(self, object_name: str, seed: int) -> Any:
        options = {**self.shared, "object_name": object_name, **self.options}  # --set values win
        if self.seeded:
            options["random_state"] = seed
        return build_detector(self.spec, options)


def _thresholds(model: Any) -> dict[str, float | None]:
    """The detector's image and pixel thresholds in use (reading them calibrates it)."""
    out = {}
    for key in ("image_threshold", "pixel_threshold"):
        value = getattr(model, key, None)
        out[key] = None if value is None else float(value)
    return out


class _Predictions:
    """One cell's test predictions: ranking ``scores``/``maps`` and the detector's ``labels``/``masks``."""

    def __init__(self) -> None:
        self.scores: list[np.ndarray] = []
        self.maps: list[np.ndarray] = []
        self.labels: list[np.ndarray] | None = []
        self.masks: list[np.ndarray] | None = []
        self.detector_seconds = 0.0

    def add(self, decided: Any, ranked: Any) -> None:
        self.scores.append(np.asarray(ranked.image_scores, dtype=np.float64).reshape(-1))
        self.maps.extend(np.asarray(m, dtype=np.float32) for m in ranked.map_list())
        if decided.labels is None or self.labels is None:
            self.labels = None
        else:
            self.labels.append(np.asarray(decided.labels, dtype=bool).reshape(-1))
        if decided.masks is None or self.masks is None:
            self.masks = None
        else:
            self.masks.extend(np.asarray(m, dtype=bool) for m in decided.masks)


def _predict(model: Any, ranking_scorer: str | None, paths: Sequence[Path], desc: str) -> _Predictions:
    """Predict ``paths`` with the detector (decisions) and, for a single-scorer spec, with its fitted
    scorer named ``ranking_scorer`` (its raw ranking scores and maps, from the same pass; None uses the
    detector's fused output)."""
    from vlad.images import load_images

    # an unlabeled-tier scorer without a pool (MuSc) scores the images of a call against each other: the
    # whole test split is one call, the paper's setting
    chunk = len(paths) if getattr(model, "batch_scoring", False) else max(1, int(getattr(model, "batch_size", 8) or 8))
    groups = [list(paths[i : i + chunk]) for i in range(0, len(paths), chunk)]
    out = _Predictions()
    for group in track(groups, desc, total=len(groups)):
        images = load_images([str(p) for p in group])
        t0 = time.perf_counter()
        decided, raw = model.predict_with_raw(images)
        out.detector_seconds += time.perf_counter() - t0
        out.add(decided, decided if ranking_scorer is None else raw[ranking_scorer])
    return out


def _decisions(pred: _Predictions, cat: Category, gt_masks: list[np.ndarray] | None) -> dict[str, Any]:
    """Decision metrics of one cell (empty with a warning when the model gives no labels)."""
    if pred.labels is None:
        logger.warning("%s: the model gives no labels; no false-alarm/miss rates", cat.name)
        return {}
    pred_masks = pred.masks if gt_masks is not None else None
    if pred_masks is not None:  # masks at the predicted masks' resolution (the same as the maps')
        gt_masks = [g if g.shape == m.shape else load_mask(p, m.shape)
                    for g, m, p in zip(gt_masks, pred_masks, cat.mask_paths)]
    return decision_metrics(np.concatenate(pred.labels), cat.labels, pred_masks, gt_masks)


def _overlay_indices(cat: Category, n: int) -> list[int]:
    """Up to ``n`` test images: mostly anomalous ones spread over the defect types, plus one good one."""
    if n <= 0:
        return []
    bad = np.flatnonzero(cat.labels == 1)
    good = np.flatnonzero(cat.labels == 0)
    n_good = min(len(good), 1 if len(bad) else n)
    n_bad = min(len(bad), n - n_good)
    pick = [int(good[i]) for i in np.round(np.linspace(0, len(good) - 1, n_good)).astype(int)] if n_good else []
    if n_bad:
        pick += [int(bad[i]) for i in np.unique(np.round(np.linspace(0, len(bad) - 1, n_bad)).astype(int))]
    return pick


def _save_overlays(cat: Category, scores, maps, masks, folder: Path, n: int) -> list[str]:
    from vlad.images import load_image
    from vlad.visualize import panel

    folder.mkdir(parents=True, exist_ok=True)
    vmin, vmax = _overlay_range(maps)
    written = []
    for i in _overlay_indices(cat, n):
        path = cat.test_paths[i]
        pixels = load_image(path).pixels
        title = f"{cat.defect_types[i]}/{path.name}  score {scores[i]:.4g}"
        mask = masks[i] if masks is not None else None
        out = folder / f"{i:04d}_{cat.defect_types[i]}_{path.stem}.png"
        panel(pixels, maps[i], mask, title=title, vmin=vmin, vmax=vmax).save(out)
        written.append(str(out))
    return written


def _overlay_range(maps, sample: int = 4096) -> tuple[float, float]:
    """The colour range shared by a category's overlays: from the median pixel of its test maps (the
    typical surface shows as the coldest colour, so a map whose values sit just under its maximum does
    not look hot everywhere) to their largest finite value. The median is taken on up to ``sample``
    evenly spaced pixels of each map."""
    typical, top = [], []
    for m in maps:
        flat = np.asarray(m, dtype=np.float32).reshape(-1)
        flat = flat[np.isfinite(flat)]
        if flat.size:
            typical.append(flat[np.linspace(0, flat.size - 1, min(sample, flat.size)).astype(np.int64)])
            top.append(float(flat.max()))
    if not top:
        return 0.0, 1.0
    lo, hi = float(np.median(np.concatenate(typical))), max(top)
    return lo, (hi if hi > lo else lo + 1e-6)


def _mean_std(values: Sequence[float]) -> dict[str, float | int]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def _summarise(runs: list[dict[str, Any]], shots: list[int | str]) -> dict[str, Any]:
    keys = [*ALL_METRICS, "fit_seconds", "predict_seconds_per_image"]
    summary: dict[str, Any] = {}
    for k in shots:
        cell_runs = [r for r in runs if r["shots"] == k]
        if not cell_runs:
            continue
        cats = list(dict.fromkeys(r["category"] for r in cell_runs))
        per_cat = {c: {m: _mean_std([r["metrics"].get(m, math.nan) if m in ALL_METRICS else r[m]
                                     for r in cell_runs if r["category"] == c]) for m in keys} for c in cats}
        seeds = sorted({r["seed"] for r in cell_runs})
        macro: dict[str, Any] = {}
        for m in keys:
            per_seed = []
            for s in seeds:
                vals = [r["metrics"].get(m, math.nan) if m in ALL_METRICS else r[m]
                        for r in cell_runs if r["seed"] == s]
                vals = [v for v in vals if not math.isnan(v)]
                if vals:
                    per_seed.append(float(np.mean(vals)))
            # single-run categories (0-shot, "all") contribute the same value to every seed
            macro[m] = _mean_std(per_seed)
        pooled = {c: _pooled_rates([r for r in cell_runs if r["category"] == c]) for c in cats}
        pooled["mean"] = _pooled_rates(cell_runs)
        summary[str(k)] = {"categories": per_cat, "mean": macro, "pooled": pooled, "seeds": seeds}
    return summary


def _pooled_rates(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """False-alarm and miss counts summed over ``runs`` with their Clopper-Pearson 95% interval (each
    seed's judgements counted as independent: narrower than the truth when reference draws differ)."""
    out = {}
    for rate, (count_key, n_key) in _RATES.items():
        count = sum(int(r.get("decisions", {}).get(count_key, 0)) for r in runs)
        n = sum(int(r.get("decisions", {}).get(n_key, 0)) for r in runs)
        value, low, high = rate_with_ci(count, n)
        out[rate] = {"count": count, "n": n, "rate": value, "low": low, "high": high}
    return out


def run_eval(
    data_dir: str | Path,
    scorer: str = "patchcore",
    shots: str | Sequence[int | str] = (0,),
    seeds: int = 1,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    weights: str | None = "pretrained",
    device: str | None = "auto",
    params: dict[str, Any] | None = None,
    out: str | Path | None = None,
    n_overlays: int = 4,
    false_alarm_rate: float | None = None,
) -> dict[str, Any]:
    """Evaluate a scorer (a one-scorer detector) or an ``"a+b"`` detector spec on MVTec-layout data.

    Args:
        data_dir: a dataset folder holding categories, or one category folder.
        scorer: a registered scorer name, or a detector spec containing ``+``.
        shots: reference counts, e.g. ``[0, 1, 4]`` or ``"0,1,all"``.
        seeds: reference draws per shot count (seed = 0 .. seeds-1).
        categories: subset of category names (default: all).
        limit: at most this many test images per category (evenly spread; for quick runs).
        weights: passed to the scorer as ``weights`` (``pretrained``, ``random``, ``tiny`` or a folder);
            None leaves the scorer's default.
        device: passed as ``device``; None leaves the scorer's default.
        params: more :func:`vlad.create_detector` options (``--set k=v``): scorer parameters, detector
            options (e.g. ``image_threshold``, ``pixel_threshold``) or ``scorer_options``.
        out: folder for ``results.json`` and overlays (``overlays/<category>/<k>shot/``, first seed only).
        n_overlays: overlay panels per category and shot count.
        false_alarm_rate: the detector's stated false-alarm rate, passed to :func:`vlad.create_detector`
            as ``false_alarm_rate`` (only when not None).

    Returns:
        A JSON-able dict: ``runs`` (one entry per category/shots/seed with ``metrics``, ``decisions``
        (counts, interval bounds and the thresholds in use), ``fit_seconds`` (fitting and calibration),
        ``predict_seconds_per_image`` (the detector's predict), ``references``), ``skipped`` (cells not
        run, with the reason), ``summary`` (per shot count: per-category and macro ``{"mean", "std",
        "n"}``, plus ``pooled`` decision counts with their intervals) and the settings.

    Raises:
        DatasetLayoutError: the folder is not in MVTec layout.
        UnknownScorerError: the scorer name is not registered.
    """
    if int(seeds) < 1:
        raise VladError(f"--seeds must be at least 1, got {seeds}")
    shot_list = parse_shots(shots)
    params = dict(params or {})
    cats = discover_categories(data_dir, categories)
    builder = _ModelBuilder(scorer, params, weights, device, false_alarm_rate)
    out_dir = Path(out) if out is not None else None
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    overlays: dict[str, list[str]] = {}
    for full_cat in cats:
        cat = full_cat.limited(limit)
        if limit is not None and (cat.labels.min() == cat.labels.max()):
            logger.warning("%s: the %d test images kept by --limit hold only one class; image metrics are NaN",
                           cat.name, cat.n_test)
        masks = None  # loaded once per category, at the resolution of the first run's maps
        if not cat.has_masks:
            logger.info("%s: no ground-truth masks; image-level metrics only", cat.name)
        for k in shot_list:
            if k == 0 and builder.requires_references:
                note = f"{scorer} requires reference images; 0-shot skipped"
                skipped.append({"category": cat.name, "shots": k, "reason": note})
                logger.warning("%s: %s", cat.name, note)
                continue
            n_train = len(cat.train_paths)
            if k != "all" and k > n_train or (k == "all" and n_train == 0):
                note = f"{k}-shot needs {k} train/good images, the category has {n_train}"
                skipped.append({"category": cat.name, "shots": k, "reason": note})
                logger.warning("%s: %s; skipped", cat.name, note)
                continue
            run_seeds = range(int(seeds)) if (k not in (0, "all") or builder.seeded) else range(1)
            for seed in run_seeds:
                refs = draw_references(cat, k, seed)
                # Random-weight backbones are drawn from torch's global generator, whose start is random in
                # every process: seeding it per cell makes a cell's figures repeatable run to run.
                with rng.seeded(seed):
                    model = builder.build(cat.object_name, seed)
                    t0 = time.perf_counter()
                    model.fit([str(p) for p in refs] if refs else None)
                    thresholds = _thresholds(model)  # calibration (leave-one-out on the references) is fitting
                    fit_s = time.perf_counter() - t0
                    ranking_scorer = builder.single  # rank by that scorer's own raw output
                    pred = _predict(model, ranking_scorer, cat.test_paths, f"{cat.name} {k}-shot seed {seed}")
                scores = np.concatenate(pred.scores)
                maps = pred.maps
                pred_s = pred.detector_seconds / max(1, cat.n_test)
                cur_masks = None
                if cat.has_masks:
                    if masks is None:
                        masks = [load_mask(p, m.shape) for p, m in zip(cat.mask_paths, maps)]
                    cur_masks = [g if g.shape == m.shape else load_mask(p, m.shape)
                                 for g, m, p in zip(masks, maps, cat.mask_paths)]
                t0 = time.perf_counter()
                metrics = evaluate(scores, cat.labels, maps if cur_masks is not None else None, cur_masks)
                decisions = _decisions(pred, cat, cur_masks)
                metrics.update({m: decisions[m] for m in DECISION_METRICS if m in decisions})
                metric_s = time.perf_counter() - t0
                runs.append({
                    "category": cat.name, "shots": k, "seed": seed, "metrics": metrics,
                    "decisions": {**{key: v for key, v in decisions.items() if key not in DECISION_METRICS},
                                  **thresholds},
                    "fit_seconds": fit_s, "predict_seconds_per_image": pred_s, "metric_seconds": metric_s,
                    "n_test": cat.n_test, "n_anomalous": int(cat.labels.sum()), "n_references": len(refs),
                    "references": [p.name for p in refs],
                })
                logger.info("%s %s-shot seed %d: %s (fit %.2fs, %.3fs/img)", cat.name, k, seed,
                            {m: round(v, 4) for m, v in metrics.items()}, fit_s, pred_s)
                if out_dir is not None and seed == run_seeds[0] and n_overlays > 0:
                    folder = out_dir / "overlays" / cat.name.replace("/", "__") / f"{k}shot"
                    overlays[f"{cat.name}/{k}shot"] = _save_overlays(cat, scores, maps, cur_masks, folder, n_overlays)
                del maps, model, pred, ranking_scorer
    results = {
        "scorer": scorer, "data_dir": str(data_dir), "weights": weights, "device": device,
        "params": params, "false_alarm_rate": false_alarm_rate, "shots": shot_list, "seeds": int(seeds), "limit": limit,
        "categories": [c.name for c in cats],
        "has_masks": {c.name: c.has_masks for c in cats},
        "map_resolution": MAP_RESOLUTION_NOTE,
        "runs": runs, "skipped": skipped, "overlays": overlays,
        "summary": _summarise(runs, shot_list),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "results.json"
        write_json(path, nan_to_none(results))
        results["results_path"] = str(path)
    return results


def _fmt(stat: dict[str, Any], scale: float = 100.0, digits: int = 1, with_std: bool = True) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None or math.isnan(mean):
        return "-"
    text = f"{mean * scale:.{digits}f}"
    if with_std and stat.get("n", 1) > 1:
        text += f"±{std * scale:.{digits}f}"
    return text


def _pooled_cell(stat: dict[str, Any] | None) -> str:
    if not stat or not stat["n"]:
        return "-"
    return f"{stat['count']}/{stat['n']} [{stat['low'] * 100:.1f}, {stat['high'] * 100:.1f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Aligned lines, a rule before the last (mean) row."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *rows]):
        if i == len(rows):  # before the mean row
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in
                               enumerate(zip(row, widths))))
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The per-category and macro-mean tables of :func:`run_eval` results, per shot count: the ranking
    metrics, then the decisions at the detector's own thresholds."""
    lines = []
    for k, block in results["summary"].items():
        n_seeds = len(block["seeds"])
        cats = block["categories"]
        named = [*cats.items(), ("mean", block["mean"])]
        metrics = [m for m in RANKING_METRICS if any(cats[c][m]["n"] for c in cats)]
        header = ["category", *[_SHORT[m] for m in metrics], "fit s", "s/img"]
        rows = [[name, *[_fmt(stats[m]) for m in metrics], _fmt(stats["fit_seconds"], 1.0, 2, False),
                 _fmt(stats["predict_seconds_per_image"], 1.0, 3, False)] for name, stats in named]
        lines.append(f"== {results['scorer']}  {k}-shot  ({n_seeds} seed{'s' if n_seeds > 1 else ''}; "
                     f"percent, mean±std over seeds; weights={results['weights']}) ==")
        lines.extend(_table(header, rows))
        if any(cats[c][m]["n"] for c in cats for m in DECISION_METRICS):
            pooled = block.get("pooled", {})
            header = ["category", "FAR", "FAR 95% CI", "Miss", "Miss 95% CI", "SegF1"]
            rows = [[name, _fmt(stats["false_alarm_rate"]),
                     _pooled_cell(pooled.get(name, {}).get("false_alarm_rate")), _fmt(stats["miss_rate"]),
                     _pooled_cell(pooled.get(name, {}).get("miss_rate")), _fmt(stats["seg_f1"])]
                    for name, stats in named]
            far = results.get("false_alarm_rate")
            lines.append(f"-- decisions at the detector's own thresholds"
                         f"{'' if far is None else f' (stated false-alarm rate {far:g})'}: FAR = normal "
                         "images flagged, Miss = anomalous images passed, SegF1 = pixel F1 of its masks --")
            lines.extend(_table(header, rows))
        lines.append("")
    lines.append("note: 95% CI = Clopper-Pearson on the counts (flagged/normal, passed/anomalous) pooled over "
                 "seeds, and over categories for the mean row")
    for s in results["skipped"]:
        lines.append(f"skipped: {s['category']} {s['shots']}-shot: {s['reason']}")
    lines.append(f"note: {results['map_resolution']}")
    no_mask = [c for c, has in results["has_masks"].items() if not has]
    if no_mask:
        lines.append(f"note: no masks (image metrics only): {', '.join(no_mask)}")
    return "\n".join(lines)
