"""``vlad score --engine ray``: score a whole archive on a pool of Ray workers, into Parquet.

    vlad score "archive/**/*.png" --load plate-detector --engine ray --num-workers 2 --out runs/archive
    vlad score parts/ --scorer patchcore --refs good/ --engine ray --out runs/parts   # fits, saves, scores

With ``--load DIR`` the saved detector is used as it is; otherwise the detector is built and fitted as
for the local engine and saved to ``OUT/detector`` first (every worker loads it from there). Running the
same command again with ``--load OUT/detector`` and the same ``--out`` resumes: images already written are
skipped. See :mod:`vlad.distributed` for the output and the guarantees.
"""

from __future__ import annotations

import argparse
import logging

from vlad.errors import VladError

logger = logging.getLogger(__name__)

DETECTOR_SUBDIR = "detector"


def run(args: argparse.Namespace) -> int:
    """Run ``vlad score --engine ray``. Returns the exit code."""
    from vlad.cli.common import check_output_folder
    from vlad.cli.score import check_load_options, fit_detector
    from vlad.distributed import score
    from vlad.distributed.engine import check_reachable, import_ray

    import_ray()  # Ray missing: say so before any work
    if not getattr(args, "verbose", False):  # Ray Data logs each dataset's plan at INFO; vlad shows its own bar
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not args.out:
        raise VladError("--engine ray writes its results as Parquet to a folder: add --out FOLDER")
    if args.address:
        check_reachable(args.address)
    out = check_output_folder(args.out)
    if args.load:
        check_load_options(args)
        detector_dir = args.load
    else:
        target = out / DETECTOR_SUBDIR
        if target.exists():
            raise VladError(f"{target} holds the detector of an earlier run: resume that run with --load {target} "
                            "(instead of --detector/--scorer/--refs), or choose another --out")
        det, _ = fit_detector(args, None)
        det.save(target)
        logger.info("saved the fitted detector to %s", target)
        detector_dir = target
    summary = score(args.inputs, detector_dir, out, num_workers=args.num_workers or 1, batch_size=args.batch_size,
                    address=args.address, device=None if args.device == "auto" else args.device,
                    precision=getattr(args, "precision", None), overlays=args.overlays, maps=args.maps)
    skipped = f", {summary.skipped} already written by an earlier run" if summary.skipped else ""
    print(f"{summary.scored} images scored in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s on "
          f"{args.num_workers or 1} Ray worker{'s' * ((args.num_workers or 1) > 1)}){skipped}; "
          f"{summary.errors} could not be scored (see the error column)")
    print(f"rows: {summary.out_dir / 'scores'} (Parquet; vlad.distributed.read_scores({str(summary.out_dir)!r}))")
    return 0
