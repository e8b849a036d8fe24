"""``vlad score --engine ray``: score a whole archive on a pool of Ray workers, into Parquet.

    vlad score "archive/**/*.png" --load plate-detector --engine ray --num-workers 2 --out runs/archive
    vlad score parts/ --scorer patchcore --refs good/ --engine ray --out runs/parts   # fits, saves, scores
    vlad score images.txt --load plate-detector --engine ray --num-workers 4 --gpus-per-worker 0.5 --out runs/a

With ``--load DIR`` the saved detector is used as it is; otherwise the detector is built and fitted as
for the local engine and saved to ``OUT/detector`` first (every worker loads it from there). Running the
same command again with ``--load OUT/detector`` and the same ``--out`` resumes: images already written are
skipped. See :mod:`vlad.distributed` for the output and the guarantees.

``--gpus-per-worker F`` makes every worker reserve F GPUs (0.5: two workers share a GPU) and run the
detector there. It is checked before anything is fitted or scored: a number > 0 (above 1 a whole number),
and a cluster with room for ``--num-workers`` such workers (Ray would otherwise wait for GPUs that never
come). Without it the workers are CPU workers, and ``--device cuda`` is refused (Ray hides the GPUs from
them).

A bad input is treated as on the local engine (:mod:`vlad.cli.score`): it becomes a row with its ``error``
(the same text), the run ends with ``N scored, M failed: see the error column`` and exit code 3; with
``--fail-fast`` this process reads every input before any work and stops at the first unreadable one
(exit code 2).
"""

from __future__ import annotations

import argparse
import logging

from vlad.errors import VladError

logger = logging.getLogger(__name__)

DETECTOR_SUBDIR = "detector"


def run(args: argparse.Namespace) -> int:
    """Run ``vlad score --engine ray``. Returns the exit code."""
    from vlad.cli.common import EXIT_FINISHED_WITH_FAILURES, check_output_folder, check_readable, outcome_line
    from vlad.cli.score import check_load_options, fit_detector
    from vlad.distributed import engine, expand_inputs, score

    gpus = engine.check_gpus_per_worker(args.gpus_per_worker, "--gpus-per-worker")
    device = engine.worker_device(None if args.device == "auto" else args.device, gpus,
                                  ("--device", "--gpus-per-worker"))
    ray = engine.import_ray()  # Ray missing: say so before any work
    if not getattr(args, "verbose", False):  # Ray Data logs each dataset's plan at INFO; vlad shows its own bar
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not args.out:
        raise VladError("--engine ray writes its results as Parquet to a folder: add --out FOLDER")
    if args.address:
        engine.check_reachable(args.address)
    out = check_output_folder(args.out)
    target = out / DETECTOR_SUBDIR
    if args.load:
        check_load_options(args, device_here=gpus is None)  # GPU workers check their own device
        if args.fail_fast:
            check_readable(expand_inputs(args.inputs), "inputs")
    elif target.exists():
        raise VladError(f"{target} holds the detector of an earlier run: resume that run with --load {target} "
                        "(instead of --detector/--scorer/--refs), or choose another --out")
    started = False
    try:
        if gpus is not None:  # a cluster without room for the GPU workers: say so before fitting or scoring
            started = engine.connect(args.address)
            engine.check_gpus(gpus, args.num_workers or 1,
                              f"the Ray cluster{f' at {args.address}' if args.address else ''}",
                              ("--gpus-per-worker", "--num-workers"))
        if args.load:
            detector_dir = args.load
        else:
            det, _ = fit_detector(args, args.inputs if args.fail_fast else None, expand=expand_inputs)
            det.save(target)
            logger.info("saved the fitted detector to %s", target)
            detector_dir = target
        summary = score(args.inputs, detector_dir, out, num_workers=args.num_workers or 1,
                        batch_size=args.batch_size, address=args.address, device=device, gpus_per_worker=gpus,
                        precision=getattr(args, "precision", None), overlays=args.overlays, maps=args.maps)
    finally:
        if started:  # score() used the Ray started here and left it running
            ray.shutdown()
    skipped = f", {summary.skipped} already written by an earlier run" if summary.skipped else ""
    on_gpus = f" with {gpus:g} GPU each" if gpus is not None else ""
    print(f"{summary.scored} rows written in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s on "
          f"{args.num_workers or 1} Ray worker{'s' * ((args.num_workers or 1) > 1)}{on_gpus}){skipped}")
    print(f"rows: {summary.out_dir / 'scores'} (Parquet; vlad.distributed.read_scores({str(summary.out_dir)!r}))")
    print(outcome_line(summary.scored - summary.errors, summary.errors))  # this run's rows, as the local engine
    return EXIT_FINISHED_WITH_FAILURES if summary.errors else 0
