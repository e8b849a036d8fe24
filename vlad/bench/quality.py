"""Detection quality of the scorers trained from scratch: each line's own choice on synthetic defects,
beside the real figure, and (``--loso``) the fixed rules of the leave-one-set-out protocol.

``python -m vlad.bench quality --data ../shared/data --scorers autoencoder,draem --shots 16,all --seeds 3``

For every scorer, data set (default ``ksdd``, ``mpdd``, ``mvtec_bottle``), shot count and seed, the scorer
is fitted once (``random_state`` = seed, references drawn as ``vlad eval`` draws them, ``time_limit`` 300 s
as the scorers' default) and its raw error maps of the test images are kept. **Self-tuned** (the main
table): each fit chose its own map rule and training length on synthetic defects of its held-out references
(:mod:`vlad.selftune`); the table reports I-AUROC, P-AUROC and AUPRO (``vlad.metrics.evaluate``, maps at
each test image's own resolution) of that rule, and beside them the chosen rule's image AUROC on the
synthetic defects (``synth``: what the line predicted), so a user can see how far synthetic validation can
be trusted. Nothing is chosen on any set's real defects.

**Leave one set out** (``--loso``): every candidate map rule (:class:`vlad.scorers.scratch.MapRule`) is
also applied to the same maps, so choosing among them costs no refit; for each set, the rule with the best
mean image AUROC over the *other* sets (both shot counts, all seeds) is chosen and only then evaluated on
that set. The tables print mean ± std over seeds and the fit time on this machine.

Training choices that need a refit (working size, budget, loss weights) can be put in the selection with
``--grid key=v1,v2`` (each value is one more fit per cell; chosen the same way, jointly with the rule).

``--varied N`` adds the aspect-ratio study: a set built at run time (in a temporary folder, never in the
repository) from random crops of ``ksdd`` of varied size and aspect ratio, anomalous crops always holding
their defect (often at an edge), scored with ``canvas=letterbox`` and ``canvas=stretch``.

``--turned`` adds, for every set, a twin built at run time in the cache folder (never in the repository):
each image turned by its own random angle and cut to the square inside it, masks with it -- a line whose
parts come at any orientation, which no one tuned on. The twins are rows of the main table; the
leave-one-set-out protocol uses the original sets only.

Cells are cached in ``--cache`` (raw maps as float16 ``.npz`` + JSON), so an interrupted run resumes and a
second run only recomputes the selection and the table.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlad.bench._util import add_device_option, use_device

logger = logging.getLogger("vlad.bench.quality")

DEFAULT_SETS = ("ksdd", "mpdd", "mvtec_bottle")
#: bumped when a cell's meaning changes (3: the scorers choose their own rule on synthetic defects; 4: DRAEM's
#: raw maps carry its reconstruction error beside the probability; 5: a training stretch needs 3 evaluations)
CELL_VERSION = 5


def _scorer_class(scorer: str) -> Any:
    from vlad.registry import get_scorer_class

    return get_scorer_class(scorer)


def term_names(scorer: str) -> tuple[str, ...]:
    """The names of the scorer's raw error terms (its ``TERMS``)."""
    return tuple(_scorer_class(scorer).TERMS)


def candidate_rules(scorer: str) -> list[Any]:
    """The map rules the protocol chooses among: the search space of the scorer's own selection at its
    defaults (its ``_candidates()``; the 0.1 rule, ``global s4 max``, is among them)."""
    return _scorer_class(scorer)()._candidates()


def _rule_key(rule: Any) -> str:
    key = f"{rule.normalize}|{rule.sigma:g}|{rule.topk_fraction:g}|{','.join(map(str, rule.terms))}"
    return key + (f"|{rule.shift}" if rule.shift else "")


def _cell_key(scorer: str, dataset: str, k: int | str, seed: int, params: dict[str, Any]) -> str:
    from vlad.bench._util import bench_device

    cell = {"scorer": scorer, "set": dataset, "k": k, "seed": seed, "params": params, "v": CELL_VERSION}
    if bench_device().type != "cpu":  # fitted on another device, another model (README, "Devices"): its own
        cell["device"] = str(bench_device())  # entry; CPU cells keep the keys they had before --device
    blob = json.dumps(cell, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _score_rules(scorer: str, raw: torch.Tensor, stats: dict[str, torch.Tensor], boxes, labels: np.ndarray,
                 only: set[str] | None = None) -> dict[str, float]:
    """Image AUROC of every candidate rule on one cell's raw maps (one smoothing per rule family)."""
    from vlad.metrics import auroc
    from vlad.scorers.scratch import _topk
    from vlad.selftune import rule_family_maps

    rules = [r for r in candidate_rules(scorer) if only is None or _rule_key(r) in only]
    out = {}
    for members, regions in rule_family_maps(raw, stats, rules, boxes):
        for i in members:
            scores = np.array([float(_topk(r.reshape(-1), rules[i].topk_fraction)) for r in regions])
            out[_rule_key(rules[i])] = float(auroc(scores, labels))
    return out


def run_cell(scorer: str, category: Any, k: int | str, seed: int, params: dict[str, Any], cache: Path,
             dataset: str) -> dict[str, Any]:
    """Fit one scorer on one reference draw, keep its raw test maps, score every candidate rule."""
    import vlad
    from vlad.bench._util import bench_device, clock
    from vlad.data import draw_references

    device = str(bench_device())
    key = _cell_key(scorer, dataset, k, seed, params)
    meta_path, raw_path = cache / f"{key}.json", cache / f"{key}.npz"
    if meta_path.exists() and raw_path.exists():
        record = json.loads(meta_path.read_text())
        missing = {_rule_key(r) for r in candidate_rules(scorer)} - set(record["rules"])
        if missing:  # candidates added after the cell was fitted: scored from its cached raw maps
            raw, stats = _load_raw(cache, key)
            record["rules"].update(_score_rules(scorer, raw, stats, [tuple(b) for b in record["boxes"]],
                                                np.asarray(category.labels), missing))
            meta_path.write_text(json.dumps(record))
        return record
    refs = draw_references(category, k, seed)
    model = vlad.create_scorer(scorer, weights="random", random_state=seed, device=device, **params)
    t0 = clock()
    model.fit([str(p) for p in refs])
    fit_s = clock() - t0
    t0 = clock()
    raws, boxes = [], []
    paths = [str(p) for p in category.test_paths]
    for i in range(0, len(paths), 16):
        r, b = model.raw_error_maps(paths[i : i + 16])
        raws.append(r)
        boxes.extend(b)
    raw = torch.cat(raws)
    pred_s = (clock() - t0) / max(1, len(paths))
    labels = np.asarray(category.labels)
    record = {
        "scorer": scorer, "set": dataset, "shots": k, "seed": seed, "params": params,
        "n_references": len(refs), "fit_seconds": fit_s, "raw_seconds_per_image": pred_s,
        "size": list(model.size_), "train_log": {k2: v for k2, v in model.train_log_.items() if k2 != "val_losses"},
        "steps_done": len(model.loss_history_), "boxes": [list(b) for b in boxes],
        "rules": _score_rules(scorer, raw, model.stats_, boxes, labels),
        "chosen_rule": model.map_rule_.as_meta(),
        "selection": model.selection_,
    }
    np.savez(raw_path, raw=raw.numpy().astype(np.float16),
             **{f"stats_{n}": v.numpy() for n, v in model.stats_.items()})
    meta_path.write_text(json.dumps(record))
    chosen = record["rules"].get(_rule_key(model.map_rule_), float("nan"))
    logger.info("%s %s %s-shot seed %d: fit %.1fs (%s after %d steps), I-AUROC %.3f (hindsight %.3f)", scorer,
                dataset, k, seed, fit_s, model.train_log_["stopped"], len(model.loss_history_), chosen,
                max(record["rules"].values()))
    return record


def cell_metrics(record: dict[str, Any], rule: Any, category: Any, cache: Path) -> dict[str, float]:
    """I-AUROC, P-AUROC and AUPRO (when masks exist) of one cached cell under ``rule`` (cached too)."""
    key = _cell_key(record["scorer"], record["set"], record["shots"], record["seed"], record["params"])
    done = cache / f"{key}.metrics.{hashlib.sha256(repr(rule).encode()).hexdigest()[:12]}.json"
    if done.exists():
        return json.loads(done.read_text())
    metrics = _cell_metrics(key, record, rule, category, cache)
    done.write_text(json.dumps(metrics))
    return metrics


def _cell_metrics(key: str, record: dict[str, Any], rule: Any, category: Any, cache: Path) -> dict[str, float]:
    from vlad.data import load_mask
    from vlad.images import load_image
    from vlad.metrics import evaluate
    from vlad.ops import resize_maps
    from vlad.scorers.scratch import apply_rule

    raw, stats = _load_raw(cache, key)
    boxes = [tuple(b) for b in record["boxes"]]
    scores, regions = apply_rule(raw, stats, rule, boxes)
    labels = np.asarray(category.labels)
    if not category.has_masks:
        return evaluate(scores.numpy(), labels)
    maps, masks = [], []
    for region, path, mask_path in zip(regions, category.test_paths, category.mask_paths):
        size = load_image(str(path)).size
        maps.append(resize_maps(region[None], size)[0].numpy())
        masks.append(load_mask(mask_path, size))
    return evaluate(scores.numpy(), labels, maps, masks)


def _load_raw(cache: Path, key: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with np.load(cache / f"{key}.npz") as z:
        raw = torch.from_numpy(z["raw"].astype(np.float32))
        stats = {n[len("stats_"):]: torch.from_numpy(z[n]) for n in z.files if n.startswith("stats_")}
    return raw, stats


def _parse_grid(items: Sequence[str]) -> list[dict[str, Any]]:
    axes = []
    for item in items:
        name, _, values = item.partition("=")
        axes.append([(name.strip(), _value(v)) for v in values.split(",") if v.strip()])
    return [dict(c) for c in itertools.product(*axes)] if axes else [{}]


def _value(text: str) -> Any:
    text = text.strip()
    if re.fullmatch(r"\d+x\d+", text):  # a size, e.g. image_size=320x128 -> (320, 128)
        return tuple(int(v) for v in text.split("x"))
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    return f"{np.mean(vals) * scale:.{digits}f}±{np.std(vals) * scale:.{digits}f}"


def leave_one_set_out(records: list[dict[str, Any]], scorer: str, sets: Sequence[str]) -> dict[str, tuple[dict, Any]]:
    """For each held-out set: the (training grid point, rule) with the best mean image AUROC on the
    other sets, over every shot count and seed."""
    rules = {_rule_key(r): r for r in candidate_rules(scorer)}
    grid = {json.dumps(r["grid"], sort_keys=True) for r in records}
    chosen = {}
    for held in sets:
        others = [r for r in records if r["set"] != held]
        best, best_value = None, -math.inf
        for g in sorted(grid):
            for key, rule in rules.items():
                vals = [r["rules"][key] for r in others if json.dumps(r["grid"], sort_keys=True) == g]
                value = float(np.nanmean(vals)) if vals else -math.inf
                if value > best_value + 1e-9:
                    best, best_value = (json.loads(g), rule), value
        chosen[held] = best
    return chosen


def make_turned_set(source: Path, out: Path, seed: int = 0) -> Path:
    """A twin of the category folder ``source`` written to ``out / source.name``: every image (train and test)
    turned by its own random angle (bicubic) and cut to the largest centred square inside the turned frame,
    so no filled corner shows; each mask turned with its image (nearest)."""
    from PIL import Image

    from vlad.data import load_category

    cat = load_category(source)
    rng = np.random.default_rng(seed)
    root = out / cat.root.name

    def turn(img: Any, angle: float, resample: Any) -> Any:
        w, h = img.size
        side = int(min(w, h) / math.sqrt(2))
        left, top = (w - side) // 2, (h - side) // 2
        return img.rotate(angle, resample=resample).crop((left, top, left + side, top + side))

    def write(src: Path, dst: Path, angle: float, resample: Any) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        turn(Image.open(src), angle, resample).save(dst.with_suffix(".png"))

    for p in cat.train_paths:
        write(p, root / "train/good" / p.name, float(rng.uniform(0, 360)), Image.Resampling.BICUBIC)
    for p, kind, mask in zip(cat.test_paths, cat.defect_types, cat.mask_paths):
        angle = float(rng.uniform(0, 360))
        write(p, root / "test" / kind / p.name, angle, Image.Resampling.BICUBIC)
        if mask is not None:
            write(mask, root / "ground_truth" / kind / f"{p.stem}_mask.png", angle, Image.Resampling.NEAREST)
    return root


def make_varied_set(source: Path, out: Path, n_train: int, seed: int = 0, n_good: int = 60) -> Path:
    """A ksdd-like category of random crops of varied size and aspect ratio, written to ``out``.

    ``n_train`` normal training crops, ``n_good`` normal test crops and every defect. Normal crops are random windows (40-100% of the height, 45-100% of the width); an anomalous crop is
    placed so that its defect's bounding box lies inside it, pushed against a random edge half the time.
    """
    from PIL import Image

    from vlad.data import load_category

    cat = load_category(source)
    rng = np.random.default_rng(seed)
    root = out / "commutator_crops"
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def crop_box(h, w, bbox=None):
        ch = int(rng.integers(int(0.4 * h), h + 1))
        cw = int(rng.integers(int(0.45 * w), w + 1))
        if bbox is None:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        y0, y1, x0, x1 = bbox
        ch, cw = max(ch, y1 - y0 + 1), max(cw, x1 - x0 + 1)
        lo_y, hi_y = max(0, y1 + 1 - ch), min(y0, h - ch)
        lo_x, hi_x = max(0, x1 + 1 - cw), min(x0, w - cw)
        if rng.random() < 0.5:  # defect at an edge of the crop
            top = hi_y if rng.random() < 0.5 else lo_y
            left = int(rng.integers(lo_x, hi_x + 1))
        else:
            top, left = int(rng.integers(lo_y, hi_y + 1)), int(rng.integers(lo_x, hi_x + 1))
        return top, left, ch, cw

    train = list(cat.train_paths)[: n_train]
    for p in train:
        img = np.asarray(Image.open(p))
        t, lft, ch, cw = crop_box(*img.shape[:2])
        Image.fromarray(img[t : t + ch, lft : lft + cw]).save(root / "train/good" / p.name)
    good = [i for i, label in enumerate(cat.labels) if not label]
    keep = set(good[:: max(1, len(good) // max(1, n_good))][:n_good]) | {i for i, lab in enumerate(cat.labels) if lab}
    for i, (p, label, mask_path) in enumerate(zip(cat.test_paths, cat.labels, cat.mask_paths)):
        if i not in keep:
            continue
        img = np.asarray(Image.open(p))
        h, w = img.shape[:2]
        if label and mask_path is not None:
            m = np.asarray(Image.open(mask_path).convert("L").resize((w, h), Image.Resampling.NEAREST)) > 0
            ys, xs = np.nonzero(m)
            t, lft, ch, cw = crop_box(h, w, (ys.min(), ys.max(), xs.min(), xs.max()))
            Image.fromarray(img[t : t + ch, lft : lft + cw]).save(root / "test/defect" / p.name)
            Image.fromarray((m[t : t + ch, lft : lft + cw] * 255).astype(np.uint8)).save(
                root / "ground_truth/defect" / f"{p.stem}_mask.png")
        elif not label:
            t, lft, ch, cw = crop_box(h, w)
            Image.fromarray(img[t : t + ch, lft : lft + cw]).save(root / "test/good" / p.name)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench quality", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="folder holding the sets (default ../shared/data)")
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS))
    parser.add_argument("--scorers", default="autoencoder,draem")
    parser.add_argument("--shots", default="16,all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="training time cap per fit, seconds (the scorers' time_limit; default 300, theirs)")
    parser.add_argument("--set", dest="params", action="append", default=[], metavar="KEY=VALUE",
                        help="fixed scorer parameter, e.g. --set image_size=128 (repeatable)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="training parameter chosen by the protocol too (one more fit per value)")
    parser.add_argument("--varied", type=int, default=0, metavar="N",
                        help="also run the aspect-ratio study on random ksdd crops with N train images (0 = skip)")
    parser.add_argument("--varied-seeds", type=int, default=2)
    parser.add_argument("--varied-scorers", default=None, help="scorers of the aspect-ratio study (default --scorers)")
    parser.add_argument("--turned", action="store_true",
                        help="also score a twin of every set with each image turned at random (built in the cache)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlad-bench-quality"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--loso", action="store_true",
                        help="also print the leave-one-set-out table of fixed rules (one rule per set, chosen on "
                             "the other sets' real defects), next to each line's own choice on synthetic ones")
    parser.add_argument("--cached-only", action="store_true",
                        help="fit nothing: report the cells already in the cache (say how many seeds each has)")
    parser.add_argument("--out", default=None, help="write the table and selections as JSON here")
    add_device_option(parser)
    args = parser.parse_args(argv)
    use_device(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("vlad").setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)

    from vlad.bench._util import machine_line
    from vlad.data import discover_categories
    from vlad.evaluation import parse_shots

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    sets = [s for s in args.sets.split(",") if s]
    shots = parse_shots(args.shots)
    fixed = {"time_limit": args.time_limit, **{k: _value(v) for k, v in (p.split("=", 1) for p in args.params)}}
    grid = _parse_grid(args.grid)
    cats = {s: discover_categories(Path(args.data) / s)[0] for s in sets}
    twins = _turned_twins(cats, cache) if args.turned else {}
    cats.update(twins)
    print(machine_line())
    report: dict[str, Any] = {"sets": sets, "shots": shots, "seeds": args.seeds, "fixed": fixed, "scorers": {}}
    scorers = [s for s in args.scorers.split(",") if s]
    all_records: dict[str, list[dict[str, Any]]] = {s: [] for s in scorers}
    # seed-major order: an interrupted run leaves whole seeds of every scorer, set and shot count
    for seed, dataset, k, g, scorer in itertools.product(range(args.seeds), [*sets, *twins], shots, grid, scorers):
        key = _cell_key(scorer, dataset, k, seed, {**fixed, **g})
        if args.cached_only and not (cache / f"{key}.json").exists():
            continue
        rec = run_cell(scorer, cats[dataset], k, seed, {**fixed, **g}, cache, dataset)
        all_records[scorer].append({**rec, "grid": g})
    for scorer in scorers:
        records = all_records[scorer]
        if records and all(r.get("selection") for r in records):
            report["scorers"][scorer] = {"self_tuned": _self_tuned_table(scorer, records, [*sets, *twins], shots,
                                                                         cats, cache, args.seeds)}
        if not args.loso:
            continue
        records = [r for r in records if r["set"] in sets]  # a twin would leak its original's real defects
        chosen = leave_one_set_out(records, scorer, sets)
        names = term_names(scorer)
        print(f"\n== {scorer}: leave-one-set-out (rule chosen on the other two sets; percent, mean±std over "
              f"{args.seeds} seeds; fit s = mean seconds per fit on this machine) ==")
        header = f"{'set':14s} {'shots':>5s} {'n':>2s} {'I-AUROC':>11s} {'P-AUROC':>11s} {'AUPRO':>11s} {'fit s':>7s} " \
                 f"{'steps':>6s}  stop / chosen on the other sets"
        print(header)
        rows = []
        for dataset in sets:
            g, rule = chosen[dataset]
            for k in shots:
                cell = [r for r in records if r["set"] == dataset and r["shots"] == k and r["grid"] == g]
                if not cell:
                    continue
                ms = [cell_metrics(r, rule, cats[dataset], cache) for r in cell]
                stops = sorted({r["train_log"]["stopped"] for r in cell})
                row = {"set": dataset, "shots": k, "rule": rule.label(names), "grid": g,
                       "metrics": {m: [x.get(m, math.nan) for x in ms] for m in ("image_auroc", "pixel_auroc", "pixel_aupro")},
                       "fit_seconds": [r["fit_seconds"] for r in cell], "steps": [r["steps_done"] for r in cell],
                       "stopped": stops}
                rows.append(row)
                print(f"{dataset:14s} {str(k):>5s} {len(cell):2d} {_ms(row['metrics']['image_auroc']):>11s} "
                      f"{_ms(row['metrics']['pixel_auroc']):>11s} {_ms(row['metrics']['pixel_aupro']):>11s} "
                      f"{np.mean(row['fit_seconds']):7.1f} {np.mean(row['steps']):6.0f}  {','.join(stops)} / "
                      f"{rule.label(names)}{' ' + json.dumps(g) if g else ''}")
        # the rules across sets: the 0.1 rule, each fold's choice, the best on each set
        print(f"-- {scorer}: image AUROC of map rules on every set (mean over shots and seeds) --")
        rule_keys = {_rule_key(r): r for r in candidate_rules(scorer)}
        show = ["global|4|0|0,1" if scorer == "autoencoder" else "global|4|0|0"]
        show += [_rule_key(chosen[s][1]) for s in sets]
        for s in sets:
            per = {key: np.mean([r["rules"][key] for r in records if r["set"] == s]) for key in rule_keys}
            show.append(max(per, key=per.get))
        overall = {key: np.mean([np.mean([r["rules"][key] for r in records if r["set"] == s]) for s in sets])
                   for key in rule_keys}
        best_all = max(overall, key=overall.get)
        show.append(best_all)
        print(f"  (best fixed rule on all {len(sets)} sets: {rule_keys[best_all].label(names)})")
        table_rules = {}
        for key in dict.fromkeys(show):
            vals = {s: float(np.mean([r["rules"][key] for r in records if r["set"] == s])) for s in sets}
            table_rules[rule_keys[key].label(names)] = vals
            print(f"  {rule_keys[key].label(names):28s} " + "  ".join(f"{s} {v * 100:5.1f}" for s, v in vals.items()))
        report["scorers"].setdefault(scorer, {}).update({"rows": rows, "rules": table_rules,
                                                        "best_on_all_sets": rule_keys[best_all].label(names)})
    if args.varied:
        report["varied"] = _varied(args, cats, fixed, cache)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


def _turned_twins(cats: dict[str, Any], cache: Path) -> dict[str, Any]:
    """``{"<set>_turned": category}``: each set's turned twin (:func:`make_turned_set`), built once in ``cache``."""
    from vlad.data import load_category

    twins = {}
    for name, cat in cats.items():
        folder = cache / "turned" / name
        if not (folder / "complete").exists():  # written last: an interrupted build is redone
            seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)  # the set's own angles, whatever else runs
            make_turned_set(cat.root, folder, seed=seed)
            (folder / "complete").touch()
        twins[f"{name}_turned"] = load_category(folder / cat.root.name)
    return twins


def _chosen_rule(record: dict[str, Any]) -> Any:
    """The map rule a cell's scorer used: its own choice on synthetic defects, or its parameters' rule."""
    from vlad.scorers.scratch import MapRule

    return MapRule.from_meta(record["chosen_rule"])


def _self_tuned_table(scorer: str, records: list[dict[str, Any]], sets: Sequence[str], shots: Sequence[Any],
                      cats: dict[str, Any], cache: Path, seeds: int) -> list[dict[str, Any]]:
    """Each cell scored with the rule its own line chose on synthetic defects (nothing chosen on real
    defects of any set), the synthetic prediction beside the real figure, and the ceiling of the choice:
    the candidate rule with the best real image AUROC at the same kept weights, picked in hindsight."""
    names = term_names(scorer)
    print(f"\n== {scorer}: each line's own choice on synthetic defects of its references (percent, mean±std "
          f"over {seeds} seeds; synth = the chosen rule's image AUROC on the synthetic defects, a prediction; "
          f"hindsight = the best candidate's real image AUROC at the same weights, a ceiling of the choice) ==")
    width = max(14, *(len(s) for s in sets))  # a turned twin's name is longer than the sets'
    print(f"{'set':{width}s} {'shots':>5s} {'n':>2s} {'I-AUROC':>11s} {'synth':>11s} {'hindsight':>11s} "
          f"{'P-AUROC':>11s} {'AUPRO':>11s} {'fit s':>7s} {'steps':>6s}  stop / rules chosen")
    key_of = {rule.label(names): _rule_key(rule) for rule in candidate_rules(scorer)}
    rows = []
    for dataset in sets:
        for k in shots:
            cell = [r for r in records if r["set"] == dataset and r["shots"] == k]
            if not cell:
                continue
            rules = [_chosen_rule(r) for r in cell]
            ms = [cell_metrics(r, rule, cats[dataset], cache) for r, rule in zip(cell, rules)]
            synth = [r["selection"]["candidates"][0]["image_auroc"] / 100 for r in cell]
            hindsight = [_hindsight(r, key_of) for r in cell]
            stops = sorted({r["train_log"]["stopped"] for r in cell})
            row = {"set": dataset, "shots": k, "rules": [rule.label(names) for rule in rules],
                   "metrics": {m: [x.get(m, math.nan) for x in ms] for m in ("image_auroc", "pixel_auroc", "pixel_aupro")},
                   "synthetic_image_auroc": synth, "hindsight_image_auroc": hindsight,
                   "fit_seconds": [r["fit_seconds"] for r in cell],
                   "steps": [r["steps_done"] for r in cell], "stopped": stops, "seeds": [r["seed"] for r in cell]}
            rows.append(row)
            print(f"{dataset:{width}s} {str(k):>5s} {len(cell):2d} {_ms(row['metrics']['image_auroc']):>11s} "
                  f"{_ms(synth):>11s} "
                  f"{_ms(hindsight):>11s} {_ms(row['metrics']['pixel_auroc']):>11s} "
                  f"{_ms(row['metrics']['pixel_aupro']):>11s} "
                  f"{np.mean(row['fit_seconds']):7.1f} {np.mean(row['steps']):6.0f}  {','.join(stops)} / "
                  f"{'; '.join(dict.fromkeys(row['rules']))}")
    return rows


def _hindsight(record: dict[str, Any], key_of: dict[str, str]) -> float:
    """The best real image AUROC among the rules the cell's line chose from (its own candidates: fewer than
    the protocol's where a ``--set`` fixed part of the rule)."""
    own = [key_of.get(c["rule"]) for c in record["selection"]["candidates"]]
    return max((record["rules"][k] for k in own if k in record["rules"]), default=math.nan)


def _varied(args: Any, cats: dict[str, Any], fixed: dict[str, Any], cache: Path) -> dict[str, Any]:
    """The aspect-ratio study on random ksdd crops: letterbox versus stretch, each fit with its own rule."""
    from vlad.data import load_category

    source = Path(args.data) / "ksdd" / "commutator"
    folder = cache / "varied"
    root = folder / "commutator_crops"
    if not root.exists():
        make_varied_set(source, folder, args.varied)
    cat = load_category(root)
    out = {}
    print(f"\n== aspect-ratio study: {len(cat.train_paths)} train / {cat.n_test} test random ksdd crops of varied "
          f"size ({min(16, len(cat.train_paths))}-shot, {args.varied_seeds} seeds; default map rules) ==")
    for scorer in [s for s in (args.varied_scorers or args.scorers).split(",") if s]:
        for canvas in ("letterbox", "stretch"):
            recs = [run_cell(scorer, cat, min(16, len(cat.train_paths)), seed, {**fixed, "canvas": canvas}, cache, "ksdd_crops")
                    for seed in range(args.varied_seeds)]
            ms = [cell_metrics(r, _chosen_rule(r), cat, cache) for r in recs]
            vals = {m: [x[m] for x in ms] for m in ("image_auroc", "pixel_auroc", "pixel_aupro")}
            out[f"{scorer}/{canvas}"] = vals
            print(f"  {scorer:12s} {canvas:10s} I-AUROC {_ms(vals['image_auroc'])}  P-AUROC "
                  f"{_ms(vals['pixel_auroc'])}  AUPRO {_ms(vals['pixel_aupro'])}  fit "
                  f"{np.mean([r['fit_seconds'] for r in recs]):.1f}s")
    return out
