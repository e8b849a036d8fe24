"""Benchmark evaluation on MVTec-layout data (``vlad eval``): per-category and macro-mean metrics.

For every category, shot count k and seed, a fresh scorer (or fused detector, for specs with ``+``)
is fitted on k normal images drawn from ``train/good`` with ``numpy.random.default_rng(seed)`` and
predicts the test split. Metrics come from :mod:`vlad.metrics`: image AUROC / AP / F1-max, and, when
the category has ground-truth masks, pixel AUROC / AP / F1-max and AUPRO (FPR <= 0.3). Maps are
returned at each test image's own resolution and masks are compared at that same resolution (loaded
with nearest-neighbour resizing only if a mask's size differs from its image).

Few-shot figures are reported as mean ± std (ddof=0) over seeds; the macro mean is the mean over
categories per seed (NaN categories, e.g. pixel metrics without masks, left out), then mean ± std
over seeds. A 0-shot or "all"-shot cell has no draw, so it runs once per category unless the scorer
takes a ``random_state`` (then each seed is also the scorer's ``random_state``).

>>> from vlad.evaluation import run_eval  # doctest: +SKIP
>>> res = run_eval("data/mpdd", scorer="patchcore", shots=[1, 4], seeds=3, weights="random")
>>> res["summary"]["1"]["mean"]["image_auroc"]["mean"]
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlad.data import Category, discover_categories, draw_references, load_mask
from vlad.errors import VladError
from vlad.metrics import IMAGE_METRICS, PIXEL_METRICS, evaluate
from vlad.progress import track

logger = logging.getLogger(__name__)

ALL_METRICS = IMAGE_METRICS + PIXEL_METRICS
_SHORT = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1",
    "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1max": "P-F1", "pixel_aupro": "AUPRO",
}
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


def _factory(spec: str) -> tuple[Callable[..., Any], bool]:
    """A constructor for ``spec`` and whether it is a fused detector."""
    if "+" in spec:
        import vlad

        return (lambda **kw: vlad.create_detector(spec, **kw)), True
    from vlad.registry import get_scorer_class

    cls = get_scorer_class(spec)  # raises UnknownScorerError with the list of names
    return cls, False


def _param_names(model: Any) -> set[str] | None:
    get_params = getattr(model, "get_params", None)
    if get_params is None:
        return None
    try:
        return set(get_params(deep=False))
    except TypeError:
        return set(get_params())


class _ModelBuilder:
    """Builds one fresh model per cell with the right weights/device/object_name/random_state."""

    def __init__(self, spec: str, params: dict[str, Any], weights: str | None, device: str | None):
        self.spec = spec
        self.factory, self.is_detector = _factory(spec)
        self.params = dict(params)
        self.extra = {k: v for k, v in (("weights", weights), ("device", device)) if v is not None}
        try:
            probe = self.factory(**self.params)
        except TypeError as exc:  # an unknown --set key
            raise VladError(f"cannot build {spec!r} with parameters {self.params}: {exc}; check the --set names "
                            f"against the scorer's parameters") from exc
        self.names = _param_names(probe)
        self.requires_references = bool(getattr(probe, "requires_references", False))
        self.seeded = self.names is not None and "random_state" in self.names and "random_state" not in self.params

    def accepts(self, key: str) -> bool:
        return self.names is None or key in self.names

    def build(self, object_name: str, seed: int) -> Any:
        kwargs = dict(self.params)
        for key, value in (*self.extra.items(), ("object_name", object_name)):
            if key not in kwargs and self.accepts(key):
                kwargs[key] = value
        if self.seeded:
            kwargs["random_state"] = seed
        return self.factory(**kwargs)


def _predict(model: Any, paths: Sequence[Path], desc: str) -> tuple[np.ndarray, list[np.ndarray]]:
    chunk = max(1, int(getattr(model, "batch_size", 8) or 8))
    groups = [list(paths[i : i + chunk]) for i in range(0, len(paths), chunk)]
    scores, maps = [], []
    for group in track(groups, desc, total=len(groups)):
        res = model.predict([str(p) for p in group])
        scores.append(np.asarray(res.image_scores, dtype=np.float64).reshape(-1))
        maps.extend(np.asarray(m, dtype=np.float32) for m in res.map_list())
    return np.concatenate(scores), maps


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
    vmin = float(min(m.min() for m in maps))
    vmax = float(max(m.max() for m in maps))
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
        summary[str(k)] = {"categories": per_cat, "mean": macro, "seeds": seeds}
    return summary


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
) -> dict[str, Any]:
    """Evaluate a scorer (or a ``"a+b"`` detector spec) on MVTec-layout data.

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
        params: more constructor parameters (``--set k=v``).
        out: folder for ``results.json`` and overlays (``overlays/<category>/<k>shot/``, first seed only).
        n_overlays: overlay panels per category and shot count.

    Returns:
        A JSON-able dict: ``runs`` (one entry per category/shots/seed with ``metrics``, ``fit_seconds``,
        ``predict_seconds_per_image``, ``references``), ``skipped`` (cells not run, with the reason),
        ``summary`` (per shot count: per-category and macro ``{"mean", "std", "n"}``) and the settings.

    Raises:
        DatasetLayoutError: the folder is not in MVTec layout.
        UnknownScorerError: the scorer name is not registered.
    """
    if int(seeds) < 1:
        raise VladError(f"--seeds must be at least 1, got {seeds}")
    shot_list = parse_shots(shots)
    params = dict(params or {})
    cats = discover_categories(data_dir, categories)
    builder = _ModelBuilder(scorer, params, weights, device)
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
                model = builder.build(cat.object_name, seed)
                t0 = time.perf_counter()
                model.fit([str(p) for p in refs] if refs else None)
                fit_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                scores, maps = _predict(model, cat.test_paths, f"{cat.name} {k}-shot seed {seed}")
                pred_s = (time.perf_counter() - t0) / max(1, cat.n_test)
                cur_masks = None
                if cat.has_masks:
                    if masks is None:
                        masks = [load_mask(p, m.shape) for p, m in zip(cat.mask_paths, maps)]
                    cur_masks = [g if g.shape == m.shape else load_mask(p, m.shape)
                                 for g, m, p in zip(masks, maps, cat.mask_paths)]
                t0 = time.perf_counter()
                metrics = evaluate(scores, cat.labels, maps if cur_masks is not None else None, cur_masks)
                metric_s = time.perf_counter() - t0
                runs.append({
                    "category": cat.name, "shots": k, "seed": seed, "metrics": metrics,
                    "fit_seconds": fit_s, "predict_seconds_per_image": pred_s, "metric_seconds": metric_s,
                    "n_test": cat.n_test, "n_anomalous": int(cat.labels.sum()), "n_references": len(refs),
                    "references": [p.name for p in refs],
                })
                logger.info("%s %s-shot seed %d: %s (fit %.2fs, %.3fs/img)", cat.name, k, seed,
                            {m: round(v, 4) for m, v in metrics.items()}, fit_s, pred_s)
                if out_dir is not None and seed == run_seeds[0] and n_overlays > 0:
                    folder = out_dir / "overlays" / cat.name.replace("/", "__") / f"{k}shot"
                    overlays[f"{cat.name}/{k}shot"] = _save_overlays(cat, scores, maps, cur_masks, folder, n_overlays)
                del maps, model
    results = {
        "scorer": scorer, "data_dir": str(data_dir), "weights": weights, "device": device,
        "params": params, "shots": shot_list, "seeds": int(seeds), "limit": limit,
        "categories": [c.name for c in cats],
        "has_masks": {c.name: c.has_masks for c in cats},
        "map_resolution": MAP_RESOLUTION_NOTE,
        "runs": runs, "skipped": skipped, "overlays": overlays,
        "summary": _summarise(runs, shot_list),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "results.json"
        path.write_text(json.dumps(_jsonable(results), indent=2))
        results["results_path"] = str(path)
    return results


def _jsonable(obj: Any) -> Any:
    """NaN -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(stat: dict[str, Any], scale: float = 100.0, digits: int = 1, with_std: bool = True) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None or math.isnan(mean):
        return "-"
    text = f"{mean * scale:.{digits}f}"
    if with_std and stat.get("n", 1) > 1:
        text += f"±{std * scale:.{digits}f}"
    return text


def format_table(results: dict[str, Any]) -> str:
    """The per-category and macro-mean table of :func:`run_eval` results, one block per shot count."""
    lines = []
    for k, block in results["summary"].items():
        n_seeds = len(block["seeds"])
        metrics = [m for m in ALL_METRICS if any(block["categories"][c][m]["n"] for c in block["categories"])]
        header = ["category", *[_SHORT[m] for m in metrics], "fit s", "s/img"]
        rows = []
        for name, stats in [*block["categories"].items(), ("mean", block["mean"])]:
            rows.append([name, *[_fmt(stats[m]) for m in metrics],
                         _fmt(stats["fit_seconds"], 1.0, 2, False),
                         _fmt(stats["predict_seconds_per_image"], 1.0, 3, False)])
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines.append(f"== {results['scorer']}  {k}-shot  ({n_seeds} seed{'s' if n_seeds > 1 else ''}; "
                     f"percent, mean±std over seeds; weights={results['weights']}) ==")
        for i, row in enumerate([header, *rows]):
            if i == len(rows):  # before the mean row
                lines.append("  ".join("-" * w for w in widths))
            lines.append("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in
                                   enumerate(zip(row, widths))))
        lines.append("")
    for s in results["skipped"]:
        lines.append(f"skipped: {s['category']} {s['shots']}-shot: {s['reason']}")
    lines.append(f"note: {results['map_resolution']}")
    no_mask = [c for c, has in results["has_masks"].items() if not has]
    if no_mask:
        lines.append(f"note: no masks (image metrics only): {', '.join(no_mask)}")
    return "\n".join(lines)


def main_eval(args) -> int:
    """``vlad eval``: run :func:`run_eval` from parsed CLI arguments, print the table, save results."""
    from vlad.cli import parse_params

    params = parse_params(getattr(args, "set", None))
    cats = [c.strip() for c in args.categories.split(",") if c.strip()] if getattr(args, "categories", None) else None
    results = run_eval(
        args.data_dir, scorer=args.scorer, shots=args.shots, seeds=args.seeds, categories=cats,
        limit=args.limit, weights=args.weights, device=args.device, params=params, out=args.out,
    )
    print(format_table(results))
    if "results_path" in results:
        n_png = sum(len(v) for v in results["overlays"].values())
        print(f"results: {results['results_path']}  ({n_png} overlay PNGs under {Path(args.out) / 'overlays'})")
    else:
        print("results not saved: pass --out DIR to write results.json and heatmap overlays")
    return 0
