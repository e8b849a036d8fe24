"""``vlad eval``: evaluate a scorer or detector on MVTec-layout data (see :mod:`vlad.evaluation`).

    vlad eval data/mpdd --scorer patchcore --shots 1,4 --seeds 3 --weights random --out results/

Options, device and output folder are checked before the first model is built.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlad.cli.common import (
    add_image_size_options,
    add_model_options,
    add_precision_option,
    apply_image_size_options,
    add_rate_option,
    check_device,
    check_output_folder,
    check_param_types,
    check_precision_option,
    check_weights,
    parse_params,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vlad eval`` and its options."""
    p = sub.add_parser("eval", help="evaluate on MVTec-layout data: per-category and mean metrics")
    p.add_argument("data_dir", help="a dataset folder (categories inside) or one category folder")
    p.add_argument("--scorer", default="patchcore", help="a scorer name or a detector spec (a+b)")
    p.add_argument("--shots", default="0", help="comma-separated reference counts, e.g. 0,1,2,4; 'all' for all")
    p.add_argument("--seeds", type=int, default=1, help="reference draws per shot count (mean ± std)")
    p.add_argument("--categories", help="comma-separated subset of categories")
    p.add_argument("--limit", type=int, help="use at most this many test images per category (quick runs)")
    p.add_argument("--out", help="folder for results.json and heatmap overlays")
    add_rate_option(p)
    add_image_size_options(p)
    add_model_options(p)
    add_precision_option(p, "")  # eval fits new detectors: it has no --load


def run(args: argparse.Namespace) -> int:
    """Run :func:`vlad.evaluation.run_eval` from the parsed arguments, print the table, save results."""
    from vlad.detector import parse_spec
    from vlad.evaluation import format_table, run_eval

    params = apply_image_size_options(args, parse_params(args.set))
    if args.precision is not None:
        params.setdefault("precision", args.precision)  # --set precision=... wins, as for --tile
    check_param_types(parse_spec(args.scorer), params)
    check_weights(args.weights)
    check_device(args.device)
    check_precision_option(args)
    if args.out:
        check_output_folder(args.out)
    cats = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    results = run_eval(
        args.data_dir, scorer=args.scorer, shots=args.shots, seeds=args.seeds, categories=cats,
        limit=args.limit, weights=args.weights, device=args.device, params=params, out=args.out,
        false_alarm_rate=args.false_alarm_rate,
    )
    print(format_table(results))
    if "results_path" in results:
        n_png = sum(len(v) for v in results["overlays"].values())
        print(f"results: {results['results_path']}  ({n_png} overlay PNGs under {Path(args.out) / 'overlays'})")
    else:
        print("results not saved: pass --out DIR to write results.json and heatmap overlays")
    return 0
