"""Scoring a whole archive with Ray Data: one machine by default, a cluster with ``address``.

>>> summary = vlad.distributed.score("archive/**/*.png", "plate-detector", "runs/archive",
...                                  num_workers=2)                      # doctest: +SKIP
>>> table = vlad.distributed.read_scores("runs/archive")                # pyarrow Table, one row per image

Also ``vlad score IMAGES --load DETECTOR --engine ray --out OUT [--num-workers N] [--address HOST:PORT]
[--gpus-per-worker F]``.

**What runs where.** The driver (this process) lists the inputs (:mod:`~vlad.distributed.inputs`:
folders, globs, list files), starts a local Ray for the job (or joins the cluster at ``address``), and
streams the paths through a pool of ``num_workers`` actors (:mod:`~vlad.distributed.engine`), each of
which loads the saved detector once from ``detector_dir`` and reads the images with vlad's own decoder
(16-bit, palette, EXIF rotation), so every score equals what ``vlad score`` gives for the same detector.
On a cluster, ``detector_dir``, the images and ``out_dir`` must be paths every machine sees (a shared
file system); the Parquet rows are written by the driver, the optional PNGs by the workers. With
``gpus_per_worker`` every worker reserves that many GPUs (a fraction such as 0.5 puts two workers on one
GPU) and runs the detector on it; the cluster must have room for all the workers when the job starts
(checked first: a cluster without GPUs, or with too few, is an error before any image is scored).

**Nothing lost, nothing twice.** An image that cannot be read or scored becomes a row with an ``error``
and the job goes on. A worker process that dies is restarted by Ray and its batch retried. Rows are
written in whole Parquet parts renamed into place; a job restarted with the same ``out_dir`` skips every
image already written (:mod:`~vlad.distributed.output`), and ``manifest.json`` says ``complete: true``
once every input has its row. The output columns are described in :mod:`~vlad.distributed.rows`.

Needs the optional extra: ``pip install "vlad-inspect[ray]"`` (Ray Data and pyarrow).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlad.distributed.inputs import expand_inputs
from vlad.distributed.output import OutputFolder, PartBuffer, read_scores
from vlad.errors import InvalidParameterError, VladError

logger = logging.getLogger(__name__)

__all__ = ["ScoreSummary", "expand_inputs", "read_scores", "score"]


@dataclass(frozen=True)
class ScoreSummary:
    """What one call of :func:`score` did.

    Attributes:
        out_dir: the output folder.
        total: inputs of this call (already written ones included).
        skipped: inputs already written by an earlier run (not scored again).
        scored: rows written by this run (``total - skipped`` when the job completes).
        errors: rows of this run with an ``error`` (images that could not be read or scored).
        seconds: wall time of the scoring (from the start of Ray's job to the last part written).
        workers: per worker process: host, pid, threads, images, seconds, load_seconds, peak_rss_mb.
    """

    out_dir: Path
    total: int
    skipped: int
    scored: int
    errors: int
    seconds: float
    workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Images scored per second of wall time in this run."""
        return self.scored / self.seconds if self.seconds > 0 else float("nan")


def _positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _detector_identity(detector_dir: str | os.PathLike) -> tuple[str, str, list[str], int]:
    """Check the saved detector folder cheaply (no model built): returns its absolute path, the sha256 of
    ``detector.json``, the active scorers and the batch size its scorers were saved with."""
    from vlad.detector.persistence import DETECTOR_FILE, FORMAT, _check_detector_digests
    from vlad.detector.spec import parse_spec
    from vlad.scorers.base import CONFIG_FILE
    from vlad.serialization import check_digests, read_json, sha256_file

    folder = Path(detector_dir).expanduser().absolute()
    if not (folder / DETECTOR_FILE).is_file():
        raise VladError(f"{folder}: not a saved detector (no {DETECTOR_FILE}); save one with det.save(folder) "
                        "or `vlad score ... --out OUT` (it saves the detector it fits to OUT/detector)")
    doc = read_json(folder / DETECTOR_FILE, "a detector file written by Detector.save()")
    entries = doc.get("scorers")
    if doc.get("format") != FORMAT or not isinstance(entries, dict) or not entries:
        raise VladError(f"{folder / DETECTOR_FILE}: not a detector written by Detector.save() of this vlad")
    names = parse_spec(list(entries))
    active = {n: bool(isinstance(entries[n], dict) and entries[n].get("active")) for n in names}
    _check_detector_digests(folder, doc.get("sha256"), names, active)
    batch = 8
    for n in names:
        if active[n]:
            config = read_json(folder / n / CONFIG_FILE, "a scorer file")
            check_digests(folder / n, config.get("sha256"), str(folder / n / CONFIG_FILE))  # before any worker
            batch = max(batch, int((config.get("params") or {}).get("batch_size") or 8))
    return str(folder), sha256_file(folder / DETECTOR_FILE), [n for n in names if active[n]], batch


def score(inputs: str | os.PathLike | Iterable[str | os.PathLike] | Any, detector_dir: str | os.PathLike,
          out_dir: str | os.PathLike, *, num_workers: int = 1, batch_size: int | None = None,
          address: str | None = None, device: str | None = None, gpus_per_worker: float | None = None,
          overlays: bool = False, maps: bool = False, recursive: bool = False, rows_per_part: int = 1000,
          num_cpus: int | None = None, object_store_mb: int | None = None, progress: bool = True,
          precision: str | None = None) -> ScoreSummary:
    """Score every input image with a saved detector on Ray, writing Parquet to ``out_dir``.

    Args:
        inputs: folders, glob patterns, list files and image files (see
            :mod:`vlad.distributed.inputs`).
        detector_dir: a folder written by :meth:`vlad.detector.Detector.save`.
        out_dir: the output folder; a folder of an earlier run of the same detector is resumed.
        num_workers: actors, each holding one detector and an equal share of the CPUs.
        batch_size: images per model call (default: the detector's own batch size).
        address: a running Ray cluster (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``); None starts a
            local Ray for this job and stops it at the end. A Ray already initialised in this process
            is used as it is.
        device: device of the workers' models (None: the saved one when the worker has it, else the CPU;
            with ``gpus_per_worker``: ``cuda``, the only one allowed then).
        gpus_per_worker: GPUs each worker reserves (Ray's ``num_gpus``; a fraction shares a GPU, above 1 a
            whole number); None: CPU workers.
        overlays: also write each fused map over its image (``overlays/*.png``, path in ``overlay``).
        maps: also write each fused map as a 16-bit PNG (``maps/*.png``, path in ``map``).
        recursive: folders include their sub-folders.
        rows_per_part: rows per Parquet part (a part is also written at least every minute).
        num_cpus: CPUs of the local Ray (default: all of this machine's); ignored with ``address``.
        object_store_mb: object store size of the local Ray (default: Ray's own choice).
        progress: show a progress bar (images written / total; ``VLAD_PROGRESS=0`` hides it too).
        precision: precision of the workers' backbone forwards (None: the saved one; see :mod:`vlad.precision`).

    Returns:
        A :class:`ScoreSummary`; the rows are read back with :func:`read_scores`.

    Raises:
        DistributedError: Ray missing, cluster unreachable, ``out_dir`` holds another job's scores, or
            the cluster has too few GPUs for ``num_workers`` workers of ``gpus_per_worker``.
        InvalidParameterError: ``num_workers``/``batch_size``/``rows_per_part`` not whole numbers >= 1,
            ``gpus_per_worker`` not a number > 0, or a CUDA ``device`` without ``gpus_per_worker``.
        VladError: no inputs, or ``detector_dir`` is not a saved detector.
    """
    from vlad.distributed import engine
    from vlad.distributed.rows import output_schema

    _positive("num_workers", num_workers)
    _positive("batch_size", batch_size)
    _positive("rows_per_part", rows_per_part)
    gpus = engine.check_gpus_per_worker(gpus_per_worker)
    device = engine.worker_device(device, gpus)
    ray = engine.import_ray()
    if address is not None and not ray.is_initialized():
        engine.check_reachable(address)
    folder, digest, names, saved_batch = _detector_identity(detector_dir)
    batch_size = batch_size or saved_batch
    is_dataset = type(inputs).__module__.startswith("ray.data")
    if is_dataset:  # the filtered-Dataset path hung in a test (issue 14 notes); paths are the supported input
        raise InvalidParameterError("score() takes image paths, folders, glob patterns or list files, not a Ray "
                                    "Dataset (not supported yet): write the paths to a .txt list file and pass it")
    paths = None if is_dataset else expand_inputs(inputs, recursive)
    out = OutputFolder(Path(out_dir).expanduser().absolute(), (folder, digest), output_schema(names, overlays, maps))
    done = out.open()
    todo = inputs if is_dataset else [p for p in paths if p not in done]
    skipped = len(done) if is_dataset else len(paths) - len(todo)
    work = is_dataset or bool(todo)
    started = engine.connect(address, num_cpus=num_cpus, object_store_mb=object_store_mb) if work else False
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False  # vlad's own bar counts images; Ray's per-operator bars are noise here
    buffer = PartBuffer(out, rows_per_part)
    t0, since = time.perf_counter(), time.time()
    try:
        if work:
            if gpus is not None:
                engine.check_gpus(gpus, num_workers, f"the Ray cluster{f' at {address}' if address else ''}")
            rows, n_todo = engine.run(todo, done, folder, str(out.root), num_workers=num_workers,
                                      batch_size=batch_size, device=device, overlays=overlays, maps=maps,
                                      gpus_per_worker=gpus, precision=precision)
            try:
                _stream(rows, buffer, n_todo, num_workers, progress)
            except ray.exceptions.RayError as exc:
                buffer.flush()  # keep every row that arrived
                raise engine.job_failed(exc, str(out.root)) from exc
        buffer.flush()
    finally:
        context.enable_progress_bars = bars
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - t0
    total = skipped + len(buffer.written) if is_dataset else len(paths)
    if skipped + len(buffer.written) >= total:
        out.finish()
    summary = ScoreSummary(out.root, total, skipped, len(buffer.written), buffer.errors, seconds, out.worker_stats(since))
    logger.info("%s: %d images scored (%d errors), %d skipped as already written, %.1f images/s",
                out.root, summary.scored, summary.errors, summary.skipped, summary.images_per_second)
    return summary


def _stream(rows, buffer: PartBuffer, total: int, num_workers: int, progress: bool) -> None:
    """Consume the rows as Ray produces them, into Parquet parts, with a progress bar."""
    from vlad.progress import counter

    bar = counter(total, f"scoring on {num_workers} Ray worker{'s' * (num_workers > 1)}", enabled=progress)
    try:
        for table in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
            bar.update(buffer.add(table))
            bar.set_postfix(errors=buffer.errors, refresh=False)
    finally:
        bar.close()
