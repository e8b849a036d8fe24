"""The ``vlad`` command line: score, eval, weights, demo, bench.

Each sub-command's work lives in its own module; this file only parses arguments and reports errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from vlad.errors import VladError


def parse_params(pairs: Sequence[str] | None) -> dict:
    """``["k=v", ...]`` -> dict, with values parsed as YAML scalars (numbers, booleans, lists)."""
    import yaml

    params = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise VladError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        params[key.strip()] = yaml.safe_load(value)
    return params


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="pretrained",
                   help="'pretrained' (default; see `vlad weights list`), 'random' (real size, random init: "
                        "for benchmarks), 'tiny' (miniature random models: smoke tests) or a folder of weights")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="extra scorer parameter, repeatable (e.g. --set n_masks=16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlad", description="Zero- and few-shot visual anomaly detection.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score images (files or folders) with a scorer or a fused detector")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scorer", help="one scorer (see `vlad list`)")
    g.add_argument("--detector", help="a fused detector spec, e.g. winclip+maeday+anomalydino (default)")
    p.add_argument("--object", dest="object_name", help="what the product is, in words, e.g. 'metal plate'")
    p.add_argument("--prompts", help="a prompt YAML file (see prompts/default.yaml)")
    p.add_argument("--refs", nargs="+", help="good reference images: files and/or folders (also comma-separated)")
    p.add_argument("--out", help="folder for scores.csv, scores.json and overlay PNGs")
    _add_model_options(p)

    p = sub.add_parser("eval", help="evaluate on MVTec-layout data: per-category and mean metrics")
    p.add_argument("data_dir", help="a dataset folder (categories inside) or one category folder")
    p.add_argument("--scorer", default="patchcore", help="a scorer name or a detector spec (a+b)")
    p.add_argument("--shots", default="0", help="comma-separated reference counts, e.g. 0,1,2,4; 'all' for all")
    p.add_argument("--seeds", type=int, default=1, help="reference draws per shot count (mean ± std)")
    p.add_argument("--categories", help="comma-separated subset of categories")
    p.add_argument("--limit", type=int, help="use at most this many test images per category (quick runs)")
    p.add_argument("--out", help="folder for results.json and heatmap overlays")
    _add_model_options(p)

    p = sub.add_parser("weights", help="list, download or verify pretrained weights")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    wsub.add_parser("list", help="the known backbones and where their weights are")
    d = wsub.add_parser("download", help="download weights (needs internet)")
    d.add_argument("names", nargs="+")
    d.add_argument("--to", help="target folder (default $VLAD_WEIGHTS_DIR/<name>)")
    v = wsub.add_parser("verify", help="check local weights (files present, sha256 where known)")
    v.add_argument("names", nargs="*")

    sub.add_parser("list", help="list the registered scorers")

    p = sub.add_parser("demo", help="start the Gradio app for prompt editing and live inspection")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--detector", default=None, help="initial detector spec")
    p.add_argument("--object", dest="object_name", default=None)
    _add_model_options(p)

    p = sub.add_parser("bench", help="benchmark a scorer at real size (prints figures)")
    p.add_argument("target", help="what to benchmark: patchcore, coreset, winclip, maeday, anomalydino, ...")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see --help there)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "score":
            from vlad.scoring import main_score

            return main_score(args)
        if args.command == "eval":
            from vlad.evaluation import main_eval

            return main_eval(args)
        if args.command == "weights":
            from vlad.weights_cli import main_weights

            return main_weights(args)
        if args.command == "list":
            from vlad.registry import list_scorers

            print("\n".join(list_scorers()))
            return 0
        if args.command == "demo":
            from vlad.demo_launch import main_demo

            return main_demo(args)
        if args.command == "bench":
            from vlad.bench import main as bench_main

            return bench_main([args.target, *args.rest])
    except VladError as exc:
        print(f"vlad: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlad: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
