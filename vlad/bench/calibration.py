"""Do the thresholds keep the false-alarm rate the user states? ``python -m vlad.bench calibration``.

For each setting (set, detector spec, k references, seeded draw) the detector is fitted on k images
drawn from ``train/good``; its normal test images (``test/good``: never seen, so held-out normals) give
the **measured false-alarm rate** (share flagged anomalous) and its defect images the **miss rate**
(share labelled normal), at each stated rate alpha. The rule in force and its bound come from
``Detector.threshold_info()``. Rates are pooled over the draws with a 95% Clopper-Pearson interval;
``within`` checks the bound in force (alpha itself under rule ``conformal``; ``1/(n+1)`` under
``best-available``, when the references are too few for alpha): the mean measured rate is at most the
bound plus twice the noise expected if the bound held exactly (each draw's rate is Beta-distributed
around the bound, since the threshold itself comes from a random draw of n references, plus the
binomial noise of the test images). At k = 1 the rule in force is ``views-assumption`` (the reference's
jittered views stand in for other good parts): no bound is claimed, the row shows what rate it gives.
The Clopper-Pearson interval is of
the pooled test images alone.

Distribution-free, so random weights are fine: the guarantee does not depend on how good the scorer
is (the miss rates do: with random weights they say nothing about detection quality).

To fit in the hour, each draw's backbone features are computed once per image and reused as the
references grow (:func:`feature_cache`: the same numbers the scorer would compute again; the scores
are unchanged, only the repeated backbone passes are skipped). This benchmark measures decisions, not
speed.

Default plan (about an hour on a quiet 2-core machine):
- patchcore on ksdd and mpdd, k in {1, 2, 4, 8, 16, 32} x 5 draws;
- anomalydino on ksdd and mpdd, k in {1, 2, 4, 8} x 3 draws;
- autoencoder on ksdd and mpdd, k in {1, 8, 32} x 3 draws, a short budget (``--ae-steps`` 30 steps at
  ``--ae-size`` 128 px: the guarantee is distribution-free, so it need not detect well to be tested);
- the default detector on mpdd, k in {0, 1, 4, 16} x 2 draws, MAEDAY at 8 masks, at most 60 test
  images (40 good + 20 defective).

``--parts first-image`` (not in the default plan; about 25 minutes): k = 1 only, the default detector,
PatchCore and AnomalyDINO on each of ``--first-image-sets``, 2 draws, 40 good + 20 defective test images:
what the one-reference rule gives across kinds of part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from vlad.bench._util import add_device_option, bench_device, clock, machine_line, use_device

logger = logging.getLogger(__name__)

ALPHAS = (0.05, 0.2)


def _index(out, i):
    if isinstance(out, torch.Tensor):
        return out[i]
    if isinstance(out, tuple):
        return tuple(_index(o, i) for o in out)
    if isinstance(out, list):
        return out[i]
    if isinstance(out, dict):
        return {k: _index(v, i) for k, v in out.items()}
    raise TypeError(type(out))


def _stack(items):
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(items) if all(t.shape == first.shape for t in items) else list(items)
    if isinstance(first, tuple):
        return tuple(_stack([it[j] for it in items]) for j in range(len(first)))
    if isinstance(first, dict):
        return {k: _stack([it[k] for it in items]) for k in first}
    raise TypeError(type(first))


@contextmanager
def feature_cache(cache: dict):
    """Memoise the per-image backbone work of PatchCore, WinCLIP, AnomalyDINO and MAEDAY in ``cache``,
    keyed by a fingerprint of the backbone's weights and the image content, for the duration of the
    block (draws whose random backbones are equal share the entries; different ones never do)."""
    from vlad.scorers.anomalydino import AnomalyDINO
    from vlad.scorers.maeday import MAEDAY
    from vlad.scorers.patchcore import PatchCore
    from vlad.scorers.winclip import WinCLIP

    prints: dict = {}  # id(backbone) -> (backbone, fingerprint); holding it keeps the id from being reused

    def module_of(scorer):
        for attr in ("backbone_", "model_", "mae_"):
            obj = getattr(scorer, attr, None)
            if obj is not None:
                return getattr(obj, "model", obj)
        raise AttributeError(f"{type(scorer).__name__}: no backbone module found to key the cache on")

    def fingerprint(bb) -> str:
        if id(bb) not in prints:
            h = hashlib.sha1()
            for t in list(bb.state_dict().values()):
                h.update(t.detach().float().cpu().numpy().tobytes()[:4096])
            prints[id(bb)] = (bb, h.hexdigest())
        return prints[id(bb)][1]

    def key_of(scorer, arr, extra=()):
        data = np.ascontiguousarray(arr)
        return (fingerprint(module_of(scorer)), type(scorer).__name__, data.shape,
                hashlib.sha1(data.tobytes()).hexdigest(), *extra)

    def per_image(orig):
        def wrapped(self, images):
            extra = (getattr(self, "input_size_", None), getattr(self, "image_size_", None))
            keys = [key_of(self, im.pixels, extra) for im in images]
            missing = [i for i, k in enumerate(keys) if k not in cache]
            if missing:
                out = orig(self, [images[i] for i in missing])
                for j, i in enumerate(missing):
                    cache[keys[i]] = _index(out, j)
            return _stack([cache[k] for k in keys])
        return wrapped

    def per_row(orig):
        def wrapped(self, x):
            keys = [key_of(self, x[i].cpu().numpy()) for i in range(x.shape[0])]
            missing = [i for i, k in enumerate(keys) if k not in cache]
            if missing:
                out = orig(self, x[missing])
                for j, i in enumerate(missing):
                    cache[keys[i]] = out[j]
            return torch.stack([cache[k] for k in keys])
        return wrapped

    patches = [(PatchCore, "_embed", per_image), (WinCLIP, "_features", per_image),
               (AnomalyDINO, "_tokens", per_row), (MAEDAY, "_predict_batch", per_image)]
    saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    try:
        for cls, name, wrap in patches:
            setattr(cls, name, wrap(cls.__dict__[name]))
        yield cache
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
        prints.clear()


def _interval(count: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(count, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def _test_split(category, limit_good: int | None, limit_defect: int | None):
    labels = np.asarray(category.labels)
    good = [i for i in range(len(labels)) if labels[i] == 0][:limit_good]
    bad = [i for i in range(len(labels)) if labels[i] == 1]
    if limit_defect is not None and len(bad) > limit_defect:
        bad = [bad[int(round(x))] for x in np.linspace(0, len(bad) - 1, limit_defect)]
    return [category.test_paths[i] for i in good], [category.test_paths[i] for i in bad]


def run_setting(name: str, category, spec: str | None, ks: Sequence[int], draws: int, options: dict,
                limit_good: int | None, limit_defect: int | None, zero_once: bool = False) -> list[dict]:
    """Fit one detector per draw, growing its references through ``ks`` (nested draws), and measure."""
    import vlad

    good, bad = _test_split(category, limit_good, limit_defect)
    rows: dict[tuple[int, float], dict] = {}
    n_train = len(category.train_paths)
    cache: dict = {}
    for d in range(draws):
        rng = np.random.default_rng(1000 + d)
        order = [category.train_paths[i] for i in rng.permutation(n_train)[: max(ks)]]
        torch.manual_seed(0)  # the same random backbone in every draw: only the references vary
        with feature_cache(cache):
            det = vlad.create_detector(spec, device=str(bench_device()), **options)
            _one_draw(det, name, d, ks, order, good, bad, rows, zero_once)
    return _summarise(rows)


def _one_draw(det, name, d, ks, order, good, bad, rows, zero_once) -> None:
    have = 0
    for k in ks:
        if k == 0 and zero_once and d > 0:
            continue
        t0 = clock()
        if have == 0:
            det.fit(order[:k] or None)
        else:
            det.add_references(order[have:k])
        have = k
        det.set_thresholds(false_alarm_rate=ALPHAS[0])
        res = det.predict(good + bad)
        scores = res.image_scores
        for alpha in ALPHAS:
            det.set_thresholds(false_alarm_rate=alpha)
            info = det.threshold_info()
            flagged = ~(scores <= det.image_threshold)
            fa, miss = int(flagged[: len(good)].sum()), int((~flagged[len(good):]).sum())
            row = rows.setdefault((k, alpha), {
                "setting": name, "k": k, "alpha": alpha, "draws": 0, "fa": 0, "n_good": 0, "miss": 0,
                "n_bad": 0, "rules": set(), "bounds": [], "path": info.path, "seconds": 0.0,
                "per_draw_far": []})
            row["draws"] += 1
            row["fa"] += fa
            row["n_good"] += len(good)
            row["miss"] += miss
            row["n_bad"] += len(bad)
            row["rules"].add(info.rule)
            row["bounds"].append(info.guaranteed_rate)
            row["per_draw_far"].append(fa / max(1, len(good)))
            row.setdefault("n_cal", []).append(info.n_calibration)
            row["seconds"] += clock() - t0
        logger.info("%s draw %d k=%d done in %.0f s", name, d, k, clock() - t0)


def _noise(rule_alpha: Sequence[tuple[int, float]], n_test: int) -> float:
    """Standard deviation of the mean false-alarm rate over draws if the bound held exactly: each draw's
    rate is Beta-distributed around its bound (the calibration draw: ``(n, alpha)`` per draw, n the
    calibration size), plus the binomial noise of n_test test images."""
    var = 0.0
    for n, alpha in rule_alpha:
        k = min(n, math.ceil((n + 1) * (1 - alpha) - 1e-9))
        p = (n + 1 - k) / (n + 1)
        var += k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2)) + p * (1 - p) / max(1, n_test)
    return math.sqrt(var) / len(rule_alpha)


def _summarise(rows: dict) -> list[dict]:
    out = []
    for (k, alpha), r in sorted(rows.items()):
        lo, hi = _interval(r["fa"], r["n_good"])
        rule = "/".join(sorted(r["rules"]))
        bounds = [b for b in r["bounds"] if b is not None]
        far = r["fa"] / max(1, r["n_good"])
        bounded = bool(bounds) and rule in ("conformal", "best-available")
        n_test = r["n_good"] // r["draws"]
        band = 2 * _noise([(n, alpha) for n in r["n_cal"]], n_test) if bounded else None
        out.append({
            "setting": r["setting"], "k": k, "alpha": alpha, "draws": r["draws"], "rule": rule, "path": r["path"],
            "bound": max(bounds) if bounds else None, "far": far, "far_ci": [lo, hi],
            "far_per_draw": r["per_draw_far"], "n_calibration_per_draw": r["n_cal"], "noise_2sd": band,
            "miss": r["miss"] / max(1, r["n_bad"]), "n_good": n_test,
            "n_bad": r["n_bad"] // r["draws"], "ok": (far <= max(bounds) + band) if bounded else None,
            "seconds_per_draw": r["seconds"] / r["draws"] / len(ALPHAS),
        })
    return out


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        bound = "-" if r["bound"] is None else f"{r['bound']:.3f}"
        kind = "views: an assumption" if "views" in r["rule"] else "prior"
        ok = {True: "ok", False: "ABOVE", None: f"({kind}: no bound)"}[r["ok"]]
        band = "" if r["noise_2sd"] is None else f" (+{r['noise_2sd']:.3f})"
        print(f"| {r['setting']} | {r['k']} | {r['alpha']:.2f} | {r['rule']} ({r['path']}) | {bound}{band} | "
              f"{r['far']:.3f} [{r['far_ci'][0]:.3f}, {r['far_ci'][1]:.3f}] | {ok} | {r['miss']:.3f} | "
              f"{r['draws']} x {r['n_good']} good / {r['n_bad']} bad | {r['seconds_per_draw']:.0f} |", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench calibration", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data", help="folder holding ksdd/ and mpdd/")
    parser.add_argument("--parts", default="patchcore,anomalydino,autoencoder,default",
                        help="which parts to run (comma-separated: patchcore, anomalydino, autoencoder, default, "
                             "first-image)")
    parser.add_argument("--draws", type=int, default=5, help="patchcore draws (autoencoder: 3, default: 2)")
    parser.add_argument("--ks", default="1,2,4,8,16,32", help="patchcore reference counts")
    parser.add_argument("--ae-steps", type=int, default=30, help="autoencoder training steps (its default: 400)")
    parser.add_argument("--ae-size", type=int, default=128, help="autoencoder image size (its default: ~256)")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--sets", default="ksdd,mpdd", help="which sets the patchcore and autoencoder parts use")
    parser.add_argument("--first-image-sets", default="ksdd,mpdd,mvtec_bottle",
                        help="sets of the first-image part (k = 1 only: default detector, patchcore, anomalydino)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    add_device_option(parser)
    args = parser.parse_args(argv)
    use_device(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from vlad.data import discover_categories

    torch.manual_seed(0)
    data = Path(args.data)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    first_sets = args.first_image_sets.split(",") if "first-image" in parts else []
    cats = {s: discover_categories(data / s)[0] for s in args.sets.split(",") + ["mpdd"] + first_sets}
    print(machine_line())
    print("| setting | k | alpha | rule in force (path) | bound (+2 sd noise) | measured FAR [95% CI] | within | "
          "miss rate | draws x test images | s per draw |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows: list[dict] = []
    t0 = clock()
    if "patchcore" in parts:
        ks = [int(x) for x in args.ks.split(",")]
        for s in args.sets.split(","):
            cat = cats[s]
            new = run_setting(f"patchcore/{s}", cat, "patchcore", ks, args.draws,
                              {"weights": args.weights}, None, None)
            _print_rows(new)
            rows += new
    if "anomalydino" in parts:
        for s in args.sets.split(","):
            new = run_setting(f"anomalydino/{s}", cats[s], "anomalydino", [1, 2, 4, 8], 3,
                              {"weights": args.weights}, None, None)
            _print_rows(new)
            rows += new
    if "autoencoder" in parts:
        for s in args.sets.split(","):
            cat = cats[s]
            ae = {"train_steps": args.ae_steps, "image_size": args.ae_size}
            new = run_setting(f"autoencoder({args.ae_steps} steps, {args.ae_size} px)/{s}", cat, "autoencoder",
                              [1, 8, 32], 3, {"scorer_options": {"autoencoder": ae}, "random_state": 0}, None, None)
            _print_rows(new)
            rows += new
    if "default" in parts:
        cat = cats["mpdd"]
        new = run_setting("default/mpdd", cat, None, [0, 1, 4, 16], 2,
                          {"object_name": cat.object_name, "weights": args.weights,
                           "scorer_options": {"maeday": {"n_masks": 8}}}, 40, 20, zero_once=True)
        _print_rows(new)
        rows += new
    if "first-image" in parts:  # the one-reference rule across kinds of part, 2 draws, 40 good / 20 defective
        for s in first_sets:
            cat = cats[s]
            for spec in ("default", "patchcore", "anomalydino"):
                opts = {"weights": args.weights}
                if spec == "default":
                    opts.update(object_name=cat.object_name, scorer_options={"maeday": {"n_masks": 8}})
                new = run_setting(f"{spec}/{s}", cat, None if spec == "default" else spec, [1], 2, opts, 40, 20)
                _print_rows(new)
                rows += new
    print(f"total {clock() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0
