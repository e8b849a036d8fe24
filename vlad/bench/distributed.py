"""Ray engine vs plain scoring: ``python -m vlad.bench distributed [--images 200] [--default-images 40]``.

For a PatchCore detector (``--images`` images) and the default detector (``--default-images``), both
with ``--weights`` (default ``random``: the real architectures, whose cost does not depend on the
weights), fitted on ``--refs`` good images and saved, this prints, timed in one run in the order plain,
Ray with 1 worker, Ray with 2 workers (``--workers``), repeated ``--rounds`` times (medians):

* **plain**: one fresh process loading the saved detector and scoring the images in batches with the same
  per-image work as a worker (decode, predict, row), i.e. ``vlad score --load`` without its table;
  its wall time from process start, images/s and peak memory;
* for both, the detector's load time and the images/s of the scoring alone (in-process time: for Ray,
  the busiest worker's), which separates the engine's own cost from process start and loading;
* **Ray**: :func:`vlad.distributed.score` into a fresh output folder on the local Ray started once for
  the benchmark; wall time from the call (workers starting, loading the detector, scoring, Parquet),
  images/s, the ratio to plain (the overhead; target <= 1.2x for 1 worker) and the peak memory of each
  worker process. Starting the local Ray itself is timed separately and added in the ratio "with start".

Images are real ones from ``--data`` (the MVTec-layout sets, cycled when there are fewer than asked).
With ``--device cuda`` the detectors are fitted and the plain side scores on the GPU, and the Ray
workers share it (``gpus_per_worker`` = 1 / workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vlad.bench._util import add_device_option, bench_device, clock, device_args, machine_line, use_device


def plain_score(detector_dir: str, list_file: str, batch_size: int) -> dict:
    """Score the images of ``list_file`` in this process (load, decode, predict, rows): the plain side."""
    from vlad.bench._util import peak_rss_mb
    from vlad.detector import load_detector
    from vlad.distributed.inputs import expand_inputs
    from vlad.distributed.rows import score_paths

    t0 = clock()
    det = load_detector(detector_dir)  # on the device it was saved on: the benchmark's
    load_s = clock() - t0
    paths = expand_inputs(list_file)
    rows = []
    t0 = clock()
    for i in range(0, len(paths), batch_size):
        rows.extend(score_paths(det, paths[i : i + batch_size]))
    return {"images": len(rows), "errors": sum(r["error"] is not None for r in rows), "peak_rss_mb": peak_rss_mb(),
            "load_s": load_s, "scoring_s": clock() - t0}


def _plain(detector_dir: Path, list_file: Path, batch_size: int) -> dict:
    code = ("import json, sys, argparse; from vlad.bench._util import use_device; "
            "from vlad.bench.distributed import plain_score; use_device(argparse.Namespace(device=sys.argv[5])); "
            "print(json.dumps(plain_score(sys.argv[1], sys.argv[2], int(sys.argv[3]))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])]))
    t0 = clock()
    out = subprocess.run([sys.executable, "-c", code, str(detector_dir), str(list_file), str(batch_size),
                          *device_args()], check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] = clock() - t0
    return result


def _ray(detector_dir: Path, list_file: Path, out: Path, workers: int, batch_size: int) -> dict:
    from vlad.distributed import score

    shutil.rmtree(out, ignore_errors=True)
    # on a GPU the workers share it (one GPU, each worker reserving its share)
    gpus = 1.0 / workers if bench_device().type == "cuda" else None
    t0 = clock()
    summary = score(list_file, detector_dir, out, num_workers=workers, batch_size=batch_size, progress=False,
                    gpus_per_worker=gpus)
    seconds = clock() - t0
    return {"images": summary.scored, "errors": summary.errors, "seconds": seconds,
            "peak_rss_mb": max((w["peak_rss_mb"] for w in summary.workers), default=float("nan")),
            "worker_peaks": [round(w["peak_rss_mb"]) for w in summary.workers],
            "load_s": max((w["load_seconds"] for w in summary.workers), default=float("nan")),
            "scoring_s": max((w["seconds"] for w in summary.workers), default=float("nan"))}


def _images(data: Path, n: int, skip: set[str]) -> list[str]:
    """``n`` real images, round-robin over the sets' test folders then train folders (cycled if short)."""
    pools = []
    for split in ("test", "train"):
        for cat in sorted(p for p in data.glob("*/*") if (p / split).is_dir()):
            pools.append(sorted(str(f) for f in (cat / split).rglob("*.png") if str(f) not in skip))
    pools = [p for p in pools if p]
    if not pools:
        raise SystemExit(f"no images under {data}; pass --data (the MVTec-layout benchmark sets)")
    flat = [p[i] for i in range(max(map(len, pools))) for p in pools if i < len(p)]
    return [flat[i % len(flat)] for i in range(n)]


def _bench_detector(name: str, spec: str | None, n: int, args, workdir: Path, init_s: float) -> None:
    import vlad

    data = Path(args.data)
    refs = sorted(str(p) for p in (data / "mvtec_bottle" / "bottle" / "train" / "good").glob("*.png"))[: args.refs]
    if len(refs) < args.refs:
        refs = _images(data, args.refs, set())
    images = _images(data, n, set(refs))
    list_file = workdir / f"{name}.txt"
    # distinct paths: a cycled image is listed again under another name (a symlink)
    seen: dict[str, int] = {}
    lines = []
    for p in images:
        k = seen.get(p, 0)
        seen[p] = k + 1
        if k:
            link = workdir / "links" / name / f"{k}_{Path(p).name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(p)
            p = str(link)
        lines.append(p)
    list_file.write_text("\n".join(lines))
    t0 = clock()
    det = vlad.create_detector(spec, weights=args.weights, device=str(bench_device()), object_name="bottle").fit(refs)
    det_dir = det.save(workdir / f"{name}-detector")
    batch = args.batch_size or det.batch_size
    print(f"\n{name}: {'+'.join(det.scorers)}, {len(refs)} references, {n} images, batch {batch} "
          f"(fit and save {clock() - t0:.0f} s)", flush=True)
    del det
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):  # interleaved: plain, then each worker count, per round
        runs.setdefault("plain", []).append(_plain(det_dir, list_file, batch))
        for w in args.workers:
            runs.setdefault(f"ray {w}", []).append(_ray(det_dir, list_file, workdir / f"out-{name}-{w}", w, batch))
    plain_s = statistics.median(r["seconds"] for r in runs["plain"])
    print(f"{'engine':<10} {'wall s':>8} {'images/s':>9} {'vs plain':>9} {'with start':>11} {'load s':>7} "
          f"{'scoring img/s':>14}  peak MB per process")
    for key, rs in runs.items():
        s = statistics.median(r["seconds"] for r in rs)
        ratio = "" if key == "plain" else f"{s / plain_s:8.2f}x"
        with_start = "" if key == "plain" else f"{(s + init_s) / plain_s:10.2f}x"
        load = statistics.median(r["load_s"] for r in rs)
        scoring = statistics.median(r["images"] / r["scoring_s"] for r in rs)  # in-process scoring time only
        peaks = rs[-1].get("worker_peaks") or [round(rs[-1]["peak_rss_mb"])]
        bad = f"  ({rs[-1]['errors']} errors)" if rs[-1]["errors"] else ""
        print(f"{key:<10} {s:8.1f} {rs[-1]['images'] / s:9.2f} {ratio:>9} {with_start:>11} {load:7.1f} "
              f"{scoring:14.2f}  {', '.join(map(str, peaks))}{bad}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images for the PatchCore detector (0: skip it)")
    parser.add_argument("--default-images", type=int, default=40,
                        help="images for the default detector (0: skip it)")
    parser.add_argument("--refs", type=int, default=8, help="good references each detector is fitted on")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts, comma-separated")
    parser.add_argument("--batch-size", type=int, default=None, help="images per model call (default: the detector's)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians)")
    parser.add_argument("--weights", default="random", help="random (real size, default) or tiny (a smoke run)")
    parser.add_argument("--data", default="../shared/data", help="folder holding the MVTec-layout sets")
    add_device_option(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    use_device(args)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]

    from vlad.distributed.engine import connect

    print(machine_line())
    t0 = clock()
    started = connect(None, num_cpus=os.cpu_count(), object_store_mb=256)
    init_s = clock() - t0
    print(f"local Ray started in {init_s:.1f} s ({os.cpu_count()} CPUs; once per `vlad score --engine ray` job)")
    try:
        with tempfile.TemporaryDirectory(prefix="vlad-bench-ray-") as tmp:
            if args.images:
                _bench_detector("patchcore", "patchcore", args.images, args, Path(tmp), init_s)
            if args.default_images:
                _bench_detector("default", None, args.default_images, args, Path(tmp), init_s)
    finally:
        if started:
            import ray

            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
