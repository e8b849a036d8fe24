"""The Ray side: connecting (or starting a local Ray), the scoring actor, and the streaming job.

The job is Ray Data's batch-inference pattern: a dataset of paths, ``map_batches`` over a pool of
actors (:class:`ScoreWorker`), each loading the saved detector once from its folder (only the folder's
path crosses the wire, never the model) and returning one row per image. The driver consumes the rows
as they stream in and writes them as Parquet parts (:mod:`vlad.distributed.output`). Ray Data restarts
an actor whose process dies and retries its batch (``max_restarts=-1``, ``max_task_retries=-1``, its
defaults for actor pools), and hands every output block to the driver once.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

from vlad.errors import DistributedError, InvalidParameterError

logger = logging.getLogger(__name__)


def import_ray():
    """``ray`` and ``ray.data``, or a :class:`DistributedError` saying how to install them."""
    try:
        import pyarrow  # noqa: F401 - the output format
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise DistributedError(
            f"the Ray engine needs Ray Data and pyarrow, which are not installed ({exc}); install them with "
            "pip install 'vlad-inspect[ray]' (or score on one process without --engine ray)") from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail now (in seconds, not after Ray's long retries) if nothing listens at ``address``."""
    if address == "auto":
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port_text = target.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise DistributedError(f"--address {address!r}: expected HOST:PORT of a Ray cluster's head (e.g. "
                               "10.0.0.5:6379, or ray://10.0.0.5:10001 for Ray Client), or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout):
            pass
    except OSError as exc:
        raise DistributedError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one there with "
            "`ray start --head`, check the host and port, or leave out --address to start a local Ray for "
            "this job") from None


def connect(address: str | None, num_cpus: int | None = None, object_store_mb: int | None = None) -> bool:
    """Join the Ray cluster at ``address``, or start a local one for this job (``address=None``).

    Returns True when this call started Ray (so the caller shuts it down), False when Ray was already
    running in this process or a cluster was joined.

    Raises:
        DistributedError: Ray missing, or the cluster cannot be reached or joined.
    """
    ray = import_ray()
    if ray.is_initialized():
        logger.info("using the Ray session already running in this process")
        return False
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is not None:
        check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ValueError...
            raise DistributedError(f"cannot join the Ray cluster at {address} ({exc}); check that it runs the "
                                   "same Ray and Python versions as this machine") from None
        return False
    before = os.environ.get("PYTHONPATH")
    # the local workers (started with this environment) import the same vlad as this process does
    here = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *([before] if before else [])])
    try:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, _node_ip_address="127.0.0.1",
                 object_store_memory=None if object_store_mb is None else object_store_mb * 2**20, **quiet)
    except Exception as exc:  # noqa: BLE001
        raise DistributedError(f"cannot start a local Ray ({exc}); check free memory and /tmp space, or pass "
                               "the address of a running cluster") from None
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    return True


def job_failed(exc: BaseException, out_dir: str) -> DistributedError:
    """A Ray error that stopped the job, as one message saying what is kept and how to go on."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return DistributedError(f"the Ray job stopped ({type(cause).__name__}: {text}); the rows written so far are "
                            f"kept in {out_dir}: fix the cause and run the same command again to score the rest")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ScoreWorker:
    """A Ray actor holding one loaded detector; called with a batch of paths, returns their rows.

    Args:
        detector_dir: a folder written by :meth:`vlad.detector.Detector.save` (read by every worker:
            on a cluster, a path all machines see).
        out_dir: the job's output folder (for the PNGs and the worker's statistics file).
        device: passed to :func:`vlad.detector.load_detector` (None: as saved).
        overlays, maps: write the PNGs (see :mod:`vlad.distributed.rows`).
        threads: torch threads of this worker (its share of the CPUs).
        precision: passed to :func:`vlad.detector.load_detector` (None: as saved).
    """

    def __init__(self, detector_dir: str, out_dir: str, device: str | None, overlays: bool, maps: bool,
                 threads: int, precision: str | None = None) -> None:
        import torch

        from vlad.detector import load_detector
        from vlad.distributed.rows import active_scorers, output_schema

        torch.set_num_threads(max(1, threads))
        t0 = time.perf_counter()
        self.det = load_detector(detector_dir, device=device, precision=precision)
        self.out_dir, self.overlays, self.maps = Path(out_dir), overlays, maps
        self.schema = output_schema(active_scorers(self.det), overlays, maps)
        self.stats: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "threads": threads,
                                      "load_seconds": time.perf_counter() - t0, "images": 0, "batches": 0,
                                      "seconds": 0.0, "peak_rss_mb": _peak_rss_mb()}
        from vlad.distributed.output import WORKERS_DIR

        self.stats_path = self.out_dir / WORKERS_DIR / f"{self.stats['host']}-{self.stats['pid']}.json"
        self._write_stats()

    def _write_stats(self) -> None:
        self.stats["peak_rss_mb"] = _peak_rss_mb()
        tmp = self.stats_path.with_name(f".{self.stats_path.name}.tmp")
        try:
            self.stats_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.stats), encoding="utf-8")
            os.replace(tmp, self.stats_path)
        except OSError as exc:  # statistics only: never stop scoring for them
            logger.warning("cannot write worker statistics %s (%s)", self.stats_path, exc)

    def __call__(self, batch: dict[str, Any]):
        import pyarrow as pa

        from vlad.distributed.rows import score_paths

        t0 = time.perf_counter()
        paths = [str(p) for p in batch["path"]]
        rows = score_paths(self.det, paths, self.out_dir, self.overlays, self.maps)
        self.stats["images"] += len(paths)
        self.stats["batches"] += 1
        self.stats["seconds"] += time.perf_counter() - t0
        self._write_stats()
        return pa.Table.from_pylist(rows, schema=self.schema)


def cpus_per_worker(num_workers: int) -> float:
    """Each worker's share of the cluster's CPUs (fractional when there are more workers than CPUs)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    largest_node = max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")),
                       default=total)
    share = total / num_workers
    return max(0.1, min(share, largest_node)) if share < 1 else float(min(int(share), int(largest_node) or 1))


def run(paths_or_dataset, todo_filter, detector_dir: str, out_dir: str, *, num_workers: int, batch_size: int,
        device: str | None, overlays: bool, maps: bool, precision: str | None = None):
    """Build the streaming job; returns ``(dataset of rows, number of inputs to score)``.

    ``paths_or_dataset`` is a list of paths (already filtered) or a Ray Dataset with a ``path`` column,
    filtered here with ``todo_filter`` (the paths already written).
    """
    import ray.data

    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise InvalidParameterError(f"num_workers must be a whole number >= 1, got {num_workers!r}")
    if isinstance(paths_or_dataset, ray.data.Dataset):
        ds = paths_or_dataset
        if "path" not in (ds.columns() or []):
            raise InvalidParameterError(f"a Dataset to score needs a 'path' column of image files; it has "
                                        f"{ds.columns()}")
        ds = ds.select_columns(["path"])
        if todo_filter:
            done = frozenset(todo_filter)
            ds = ds.filter(lambda row: row["path"] not in done)
        total = ds.count()
    else:
        total = len(paths_or_dataset)
        blocks = max(1, min(-(-total // batch_size), 10_000))
        ds = ray.data.from_items([{"path": p} for p in paths_or_dataset], override_num_blocks=blocks)
    cpus = cpus_per_worker(num_workers)
    rows = ds.map_batches(
        ScoreWorker,
        fn_constructor_kwargs={"detector_dir": detector_dir, "out_dir": out_dir, "device": device,
                               "overlays": overlays, "maps": maps, "threads": max(1, int(cpus)),
                               "precision": precision},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=cpus)
    return rows, total
