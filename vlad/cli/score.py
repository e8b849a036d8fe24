"""``vlad score``: score image files or folders with a scorer or a fused detector.

    vlad score parts/ --object "metal plate" --refs good/ --out results/
    vlad score a.png b.png --scorer patchcore --refs good/ --weights tiny

Both ``--detector SPEC`` (default :data:`vlad.detector.DEFAULT_SPEC`) and ``--scorer NAME`` build the model
with :func:`vlad.create_detector` (a one-scorer detector for ``--scorer``), so every score is on the
calibrated ``[0, 1]`` scale and every image gets a label from the detector's image threshold, set from
``--false-alarm-rate`` (default 5%) and the references (see :mod:`vlad.detector.calibration`); the last
line says in words what that threshold guarantees. ``--set KEY=VALUE`` sets detector options (``fusion=max``) or scorer parameters
(``n_masks=16``; must be accepted by some scorer).

The unlabeled tier: ``--unlabeled DIR`` gives an unlabeled-tier scorer (``musc``) a pool of the line's
own unlabeled images to score new images against; ``--bootstrap N`` then picks the N pool images judged
most normal as references for the few-shot tier and lists them with every pool score (a person may
veto them); with fewer than 2 real references the thresholds come from the pool under the stated
assumption ``pool_defect_rate`` (5% of the pool defective at most; ``--set pool_defect_rate=0.1``), said
so on the last line. With ``musc`` and no pool, all inputs are scored against each other in one call.

    vlad score new/ --detector musc+anomalydino --unlabeled line_day1/ --bootstrap 4

Output: a table (file, score, label) on stdout; with ``--out``: ``scores.csv``, ``scores.json`` (also
each component's calibrated score and the thresholds) and ``overlays/<NNNN>_<stem>.png`` per image (the
fused map over the image, colour range fixed to ``[0, 1]``). The last line counts the images scored and
those that failed.

**An input image that cannot be read** (corrupt, truncated, empty, not an image, no read permission, a
broken link) does not stop the run: every readable image is scored, and the unreadable one gets a row
with no score and its ``error`` (a column of the table, ``scores.csv``, ``scores.json`` and, with
``--engine ray``, the Parquet rows; the same text on both engines). The run then ends with
``10 scored, 1 failed: see the error column`` and exit code 3
(:data:`~vlad.cli.common.EXIT_FINISHED_WITH_FAILURES`). ``--fail-fast`` reads every input before any work
instead and stops at the first unreadable one with one ``vlad: error:`` line (exit code 2).

``--load DIR`` scores with a detector saved with ``det.save(DIR)`` instead of building and fitting one.
``--engine ray`` scores a whole archive on a pool of Ray workers into Parquet (:mod:`vlad.cli.score_ray`,
:mod:`vlad.distributed`; ``--num-workers``, ``--address``, ``--gpus-per-worker``, ``--overlays``, ``--maps``).

Checked before any work: the options (``--set`` names and types, device, output folder, prompt file),
then every reference and unlabeled pool image (and, with ``--fail-fast``, every input) is read once before
any model is built; the first problem stops the run with one ``vlad: error:`` line naming it (exit code
2). An unreadable reference is always such an error: without it the detector would silently change.
Nothing is skipped silently. A few-shot scorer (or a detector made only of few-shot scorers) without
``--refs`` is an error that says to pass ``--refs``.
"""

from __future__ import annotations

import argparse
import csv
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlad.cli.common import (
    EXIT_FINISHED_WITH_FAILURES,
    add_engine_options,
    add_fail_fast_option,
    add_image_size_options,
    add_model_options,
    add_precision_option,
    apply_image_size_options,
    add_rate_option,
    check_device,
    check_output_folder,
    check_param_types,
    check_precision_option,
    check_prompts,
    check_readable,
    check_weights,
    outcome_line,
    parse_params,
)
from vlad.errors import EmptyReferenceSetError, VladError

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vlad score`` and its options."""
    p = sub.add_parser("score", help="score images (files or folders) with a scorer or a fused detector")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scorer", help="one scorer (see `vlad list`)")
    g.add_argument("--detector", help="a fused detector spec, e.g. winclip+maeday+anomalydino (default)")
    p.add_argument("--object", dest="object_name", help="what the product is, in words, e.g. 'metal plate'")
    p.add_argument("--prompts", help="a prompt YAML file (see prompts/default.yaml)")
    p.add_argument("--refs", nargs="+", help="good reference images: files and/or folders (also comma-separated)")
    p.add_argument("--unlabeled", nargs="+",
                   help="unlabeled images of the line (files/folders, nearly all normal, none checked): the "
                        "unlabeled tier's pool (needs musc in the spec, e.g. --detector musc+anomalydino)")
    p.add_argument("--bootstrap", type=int, metavar="N",
                   help="pick the N unlabeled images judged most normal as references (listed, with scores)")
    p.add_argument("--out", help="folder for scores.csv, scores.json and overlay PNGs")
    add_rate_option(p)
    add_image_size_options(p)
    add_model_options(p)
    add_fail_fast_option(p)
    add_precision_option(p)
    add_engine_options(p)


def _reference_paths(refs: str | list[str] | None) -> list[Path]:
    """``--refs`` values (files, folders, or comma-separated lists of them) -> image paths."""
    from vlad.images import expand_paths

    if not refs:
        return []
    values = [refs] if isinstance(refs, str) else list(refs)
    parts = [p.strip() for v in values for p in v.split(",") if p.strip()]
    if not parts:
        raise VladError(f"--refs {refs!r} names no file or folder")
    return expand_paths(parts)


def _uses(names: list[str], param: str) -> bool:
    from vlad.registry import get_scorer_class, parameter_names

    return any(param in parameter_names(get_scorer_class(n)) for n in names)


def check_options(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """Every check that needs no image and no model: returns the spec and the ``--set`` parameters."""
    from vlad.detector import parse_spec
    from vlad.registry import get_scorer_class

    spec = args.scorer or args.detector
    names = parse_spec(spec)  # unknown scorer names
    params = apply_image_size_options(args, parse_params(args.set))
    check_param_types(names, params)
    check_weights(args.weights)
    check_device(args.device)
    check_precision_option(args)
    if args.prompts and not _uses(names, "prompts"):
        raise VladError(f"--prompts was given but no scorer of {'+'.join(names)} uses prompts; add winclip")
    if _uses(names, "prompts"):
        check_prompts(args.prompts, args.object_name)
    elif args.object_name:
        logger.warning("--object is not used by %s (no text-prompted scorer)", "+".join(names))
    if args.out:
        check_output_folder(args.out)
    if (args.unlabeled or args.bootstrap) and not any(get_scorer_class(n).tier == "unlabeled" for n in names):
        raise VladError(f"--unlabeled/--bootstrap need an unlabeled-tier scorer and {'+'.join(names)} has none; "
                        "add musc, e.g. --detector musc+anomalydino")
    if args.bootstrap is not None and (args.bootstrap < 1 or not args.unlabeled):
        raise VladError(f"--bootstrap N picks N >= 1 references from --unlabeled images; got N = {args.bootstrap}"
                        f"{'' if args.unlabeled else ' and no --unlabeled'}")
    return spec, params


def build_detector(spec: str | None, args: argparse.Namespace, params: dict[str, Any]):
    """The detector ``vlad score`` runs: :func:`vlad.create_detector` with the command's options."""
    import vlad

    options = dict(params)
    for key, value in (("object_name", args.object_name), ("weights", args.weights), ("device", args.device),
                       ("precision", getattr(args, "precision", None)), ("prompts", args.prompts),
                       ("false_alarm_rate", args.false_alarm_rate)):
        if value is not None:
            options.setdefault(key, value)
    return vlad.create_detector(spec, **options)


def run(args: argparse.Namespace) -> int:
    """Run ``vlad score`` (see the module docstring). Returns the exit code."""
    from vlad.images import expand_paths
    from vlad.progress import track
    from vlad.types import AnomalyResult

    if getattr(args, "engine", "local") == "ray":
        from vlad.cli import score_ray

        return score_ray.run(args)
    check_local_engine(args)
    if args.load:
        check_load_options(args)
        paths = expand_paths(args.inputs)
        if args.fail_fast:
            check_readable(paths, "inputs")
        det = load_saved(args.load, args.device, getattr(args, "precision", None))
    else:
        det, paths = fit_detector(args, args.inputs, read_inputs=args.fail_fast)

    chunk = len(paths) if det.batch_scoring else (args.batch_size or max(1, det.batch_size))
    groups = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    on_error = "raise" if args.fail_fast else "skip"
    results = []
    for group in track(groups, "scoring", total=len(groups)):
        results.append(det.predict([str(p) for p in group], on_error=on_error))
    res = AnomalyResult.concatenate(results)
    rows = _rows(paths, res, det)
    _print_table(rows, det)
    if args.out:
        _write_outputs(Path(args.out), rows, res, det)
    print(outcome_line(len(res), len(res.failures)))
    return EXIT_FINISHED_WITH_FAILURES if res.failures else 0


def fit_detector(args: argparse.Namespace, inputs: list[str] | None, read_inputs: bool = True, expand=None):
    """Build the detector of ``--detector``/``--scorer`` and fit it on ``--refs``. The options are checked,
    then every reference and unlabeled image (and, with ``read_inputs``, every image of ``inputs``) is read
    once before any model is built. ``inputs`` are expanded by ``expand`` (default
    :func:`vlad.images.expand_paths`). Returns the fitted detector and the input image paths."""
    from vlad.images import expand_paths

    spec, params = check_options(args)
    det = build_detector(spec, args, params)  # stores parameters only: option errors surface here, cheaply
    paths = (expand or expand_paths)(inputs) if inputs else []
    refs = _reference_paths(args.refs)
    pool = _reference_paths(args.unlabeled)
    if read_inputs:
        check_readable(paths, "inputs")
    check_readable(refs, "references")
    check_readable(pool, "unlabeled images")
    if det.requires_references and not refs and not args.bootstrap:
        names = "+".join(det.scorers)
        raise EmptyReferenceSetError(
            f"{names} learns from good images and none were given: pass --refs FOLDER (or comma-separated "
            "files) of normal images, or use a zero-shot scorer (--detector winclip+maeday)"
        )
    det.fit([str(p) for p in refs] if refs else None)
    if pool:
        det.add_unlabeled([str(p) for p in pool])
        print(f"unlabeled pool: {len(det.list_unlabeled())} images")
    if args.bootstrap:
        print(det.bootstrap_references(args.bootstrap).describe())
    return det, paths


def check_load_options(args: argparse.Namespace, device_here: bool = True) -> None:
    """``--load`` scores with a saved detector: the options that build or fit one do not apply.
    ``device_here=False``: ``--device`` is for GPU workers elsewhere, not checked on this machine."""
    given = [flag for flag, value in (("--scorer", args.scorer), ("--detector", args.detector),
                                      ("--refs", args.refs), ("--object", args.object_name),
                                      ("--prompts", args.prompts), ("--set", args.set),
                                      ("--false-alarm-rate", args.false_alarm_rate),
                                      ("--unlabeled", args.unlabeled), ("--bootstrap", args.bootstrap),
                                      ("--tile", getattr(args, "tile", None))) if value]
    if args.weights != "pretrained":
        given.append("--weights")
    if given:
        raise VladError(f"--load scores with a saved detector, so {', '.join(given)} cannot be used with it (the "
                        "saved detector keeps its scorers, references, weights and thresholds); drop them, or "
                        "drop --load to build and fit a detector")
    if device_here:  # GPU workers elsewhere check --device and --precision on their own machine
        check_device(args.device)
        check_precision_option(args)
    apply_image_size_options(args, {})  # --max-pixels (a saved detector keeps its own tiling)
    if args.out:
        check_output_folder(args.out)


def load_saved(folder: str, device: str = "auto", precision: str | None = None):
    """The detector saved in ``folder`` (``--load``), on ``device`` unless it is ``auto``, at ``precision``
    unless it is None (then as saved)."""
    from vlad.detector import Detector, load_any

    det = load_any(folder, device=None if device == "auto" else device, precision=precision)
    if not isinstance(det, Detector):
        raise VladError(f"--load {folder}: holds a single scorer, not a detector; save a detector "
                        "(vlad.create_detector(...).fit(...).save(folder)) and load that")
    return det


def check_local_engine(args: argparse.Namespace) -> None:
    """Options of ``--engine ray`` given without it."""
    for flag, value in (("--num-workers", args.num_workers), ("--address", args.address),
                        ("--gpus-per-worker", args.gpus_per_worker), ("--maps", args.maps),
                        ("--overlays", args.overlays)):
        if value:
            raise VladError(f"{flag} is an option of --engine ray; add --engine ray (pip install "
                            "'vlad-inspect[ray]') or drop it (the local engine scores in this process, on "
                            "--device, and writes overlays to --out)")


def _active(det) -> list[str]:
    return [n for n, a in det.active_.items() if a]


def _rows(paths: list[Path], res, det) -> list[dict[str, Any]]:
    """One row per input, in order: the scored images from ``res``, the unreadable ones (``res.failures``)
    with no score and their ``error``."""
    import numpy as np

    failed = {f.index: f.error for f in res.failures}
    scored = iter(range(len(res)))
    rows = []
    for k, path in enumerate(paths):
        if k in failed:
            row = {"file": str(path), "score": None, "label": None, "components": dict.fromkeys(_active(det)),
                   **({"anomalous_pixel_fraction": None} if res.masks is not None else {}), "error": failed[k]}
            rows.append(row)
            continue
        i = next(scored)
        row = {
            "file": str(path),
            "score": float(res.image_scores[i]),
            "label": "anomalous" if bool(res.labels[i]) else "normal",
            "components": {n: float(c.image_scores[i]) for n, c in res.components.items()},
        }
        if res.masks is not None:
            row["anomalous_pixel_fraction"] = float(np.mean(res.masks[i]))
        row["error"] = None
        rows.append(row)
    return rows


def _print_table(rows: list[dict[str, Any]], det) -> None:
    width = min(60, max([4] + [len(r["file"]) for r in rows]))
    failed = any(r["error"] for r in rows)
    print(f"{'file':<{width}}  {'score':>7}  " + ("label      error" if failed else "label"))
    for r in rows:
        name = r["file"] if len(r["file"]) <= width else "..." + r["file"][-(width - 3):]
        if r["error"]:
            print(f"{name:<{width}}  {'-':>7}  {'-':<9}  {r['error']}")
        else:
            print(f"{name:<{width}}  {r['score']:7.4f}  {r['label']}")
    scored = [r for r in rows if not r["error"]]
    n_bad = sum(r["label"] == "anomalous" for r in scored)
    print(f"{n_bad} of {len(scored)} anomalous (image threshold {det.image_threshold:.4f}, "
          f"{len(det.list_references())} references, scorers: {'+'.join(_active(det))})")
    print(det.threshold_info().describe())
    for line in selection_lines(det):
        print(line)


def selection_lines(det) -> list[str]:
    """One line per active scorer that chose its map rule on synthetic defects (vlad.selftune)."""
    lines = []
    for name in _active(det):
        scorer = det.scorers[name]
        if getattr(scorer, "selection_", None) is None:
            continue
        rep = scorer.selection_report()
        steps = "" if rep.stopped == "no training" else f" and {rep.step} training steps"
        lines.append(f"{name}: map rule '{rep.rule}'{steps} chosen on {rep.n_defective} "
                     f"synthetic defects of {rep.n_held_out} held-out references (image AUROC "
                     f"{rep.predicted_image_auroc:.1f} on them: a prediction, not a measurement)")
    return lines


def _write_outputs(out: Path, rows: list[dict[str, Any]], res, det) -> None:
    from PIL import Image

    from vlad.images import load_image
    from vlad.visualize import overlay

    out.mkdir(parents=True, exist_ok=True)
    folder = out / "overlays"
    folder.mkdir(exist_ok=True)
    maps = iter(res.map_list())
    for i, row in enumerate(rows):
        if row["error"]:
            row["overlay"] = None
            continue
        path = Path(row["file"])
        img = load_image(path)
        target = folder / f"{i:04d}_{path.stem}.png"
        Image.fromarray(overlay(img.pixels, next(maps), vmin=0.0, vmax=1.0)).save(target)
        row["overlay"] = str(target.relative_to(out))
    comp_names = list(res.components) or _active(det)

    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.6f}"

    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "score", "label", *comp_names, "error"])
        for r in rows:
            writer.writerow([r["file"], number(r["score"]), r["label"] or "",
                             *(number(r["components"].get(n)) for n in comp_names), r["error"] or ""])
    from vlad.serialization import nan_to_none, write_json

    info = det.threshold_info()
    summary = {
        "detector": "+".join(det.scorers),
        "active_scorers": [n for n, a in det.active_.items() if a],
        "fusion_weights": det.fusion_weights,
        "n_references": len(det.list_references()),
        "image_threshold": det.image_threshold,
        "pixel_threshold": det.pixel_threshold,
        "thresholds": {**asdict(info), "assumption": info.assumption, "in_words": info.describe()},
        "n_unlabeled": len(det.list_unlabeled()),
        "n_scored": len(res),
        "n_failed": len(res.failures),
        "score_scale": "calibrated [0, 1] (see vlad.detector.fusion); labels and masks from the thresholds",
        "results": rows,
    }
    write_json(out / "scores.json", nan_to_none(summary))
    logger.info("wrote %s, %s and %d overlays", out / "scores.csv", out / "scores.json", len(res))

