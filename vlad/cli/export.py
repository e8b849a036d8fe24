"""``vlad export DETECTOR_DIR --format onnx --out DIR``: a saved detector as ONNX graphs for vlad.runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlad.cli.common import check_output_folder
from vlad.errors import VladError

FORMATS = ("onnx",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vlad export``."""
    p = sub.add_parser("export", help="export a saved detector to ONNX (run it with vlad.runtime, no torch)")
    p.add_argument("detector", help="detector folder written by Detector.save()")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="export format (default onnx)")
    p.add_argument("--out", required=True, help="output folder (created; earlier export files in it are replaced)")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                   help="height and width of the images to score, for graphs that follow the image's aspect "
                        "(AnomalyDINO); default: the first reference's size")


def run(args: argparse.Namespace) -> int:
    """Load the detector, export it, print where; returns the exit code."""
    folder = Path(args.detector)
    if not folder.is_dir():
        raise VladError(f"{folder}: not a folder; pass a detector folder written by Detector.save()")
    if not (folder / "detector.json").is_file():
        hint = (" (it holds one scorer: export a detector, e.g. vlad.create_detector('NAME', ...).fit(refs).save(dir))"
                if (folder / "config.json").is_file() else "")
        raise VladError(f"{folder}: no detector.json; pass a folder written by Detector.save(){hint}")
    if args.image_size is not None and min(args.image_size) < 1:
        raise VladError(f"--image-size must be two positive numbers (height width), got {args.image_size}")
    out = check_output_folder(args.out)
    from vlad.detector import load_detector

    det = load_detector(folder)
    written = det.export(out, format=args.format, image_size=args.image_size)
    files = sorted(p.name for p in written.iterdir() if p.is_file())
    print(f"exported {'+'.join(n for n, a in det.active_.items() if a)} to {written}: {', '.join(files)}")
    return 0
