"""What choosing on synthetic defects costs: each scorer's fit time with ``selection=None`` (its paper's map)
and with ``selection="synthetic"`` (:mod:`vlad.selftune`), on the same references.

``python -m vlad.bench selection --data ../shared/data/mpdd --shots 16``

For each scorer (default the four with a pretrained backbone that offer the choice: PaDiM, STPM,
EfficientAD, FastFlow) the scorer is fitted twice on the same ``--shots`` references drawn from the first
category under ``--data`` (seed 0), with its default parameters and ``--weights`` (``random``: real sizes,
so the time is a user's; quality is not measured here, random weights have none). Printed: fit seconds of
each, their ratio, the training steps and the rule chosen. Without ``--data`` the references are synthetic
textures of ``--size`` px.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

DEFAULT_SCORERS = ("padim", "stpm", "efficientad", "fastflow")


def main(argv: Sequence[str] | None = None) -> int:
    from vlad.bench._util import add_device_option, clock, machine_line, use_device

    parser = argparse.ArgumentParser(prog="python -m vlad.bench selection", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="a set in the MVTec layout (its first category is used)")
    parser.add_argument("--shots", type=int, default=16, help="references (default 16)")
    parser.add_argument("--scorers", default=",".join(DEFAULT_SCORERS))
    parser.add_argument("--weights", default="random", help="random (real sizes, default) or tiny (a smoke run)")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic references without --data")
    parser.add_argument("--set", dest="params", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter given to every scorer (e.g. train_steps=20)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_device_option(parser)
    args = parser.parse_args(argv)
    device = use_device(args)

    import torch

    import vlad
    from vlad.bench.quality import _value

    if args.threads:
        torch.set_num_threads(args.threads)
    refs = _references(args)
    params = {k.strip(): _value(v) for k, _, v in (p.partition("=") for p in args.params)}
    print(machine_line())
    print(f"{len(refs)} references; weights={args.weights}; fit seconds with selection=None (the paper's map) "
          "and selection='synthetic'")
    print(f"{'scorer':12s} {'None s':>8s} {'synthetic s':>12s} {'ratio':>6s} {'steps':>6s}  rule chosen")
    for name in args.scorers.split(","):
        seconds, scorers = [], []
        for selection in (None, "synthetic"):
            scorer = vlad.create_scorer(name, weights=args.weights, device=device, random_state=0,
                                        selection=selection, **params)
            t0 = clock()
            scorer.fit(refs)
            seconds.append(clock() - t0)
            scorers.append(scorer)
        report = scorers[1].selection_report()
        steps = "-" if report.stopped == "no training" else str(report.step)
        print(f"{name:12s} {seconds[0]:8.1f} {seconds[1]:12.1f} {seconds[1] / seconds[0]:6.2f} {steps:>6s}  "
              f"{report.rule}", flush=True)
    return 0


def _references(args: argparse.Namespace) -> list:
    if args.data is None:
        from vlad.bench._util import synthetic_images

        return synthetic_images(args.shots, args.size, seed=0)
    from vlad.data import discover_categories, draw_references

    category = discover_categories(Path(args.data))[0]
    return [str(p) for p in draw_references(category, args.shots, 0)]
