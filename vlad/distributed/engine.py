"""The Ray side: connecting (or starting a local Ray), the scoring actor, and the streaming job.

The job is Ray Data's batch-inference pattern: a dataset of paths, ``map_batches`` over a pool of
actors (:class:`ScoreWorker`), each loading the saved detector once from its folder (only the folder's
path crosses the wire, never the model) and returning one row per image. With ``gpus_per_worker`` each
actor reserves that many GPUs (Ray's ``num_gpus``; a fraction shares one GPU between actors) and loads
the detector on ``cuda``, the GPU Ray gives it. The driver consumes the rows
as they stream in and writes them as Parquet parts (:mod:`vlad.distributed.output`). Ray Data restarts
an actor whose process dies and retries its batch (``max_restarts=-1``, ``max_task_retries=-1``, its
defaults for actor pools), and hands every output block to the driver once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import socket
import time
from pathlib import Path
from collections.abc import Iterable
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


def check_gpus_per_worker(value: Any, option: str = "gpus_per_worker") -> float | None:
    """``value`` (None, or GPUs per worker) as a float, checked: a number > 0, and a whole number above 1
    (Ray places a fractional request within one GPU).

    Raises:
        InvalidParameterError: not a number, not finite, <= 0, or a fraction above 1 (names ``option``).
    """
    if value is None:
        return None
    try:
        gpus = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        gpus = math.nan
    if not math.isfinite(gpus) or gpus <= 0:
        raise InvalidParameterError(f"{option} is the number of GPUs each worker reserves: a number > 0 (e.g. 1, "
                                    f"or 0.5 for two workers sharing a GPU), got {value!r}")
    if gpus > 1 and not gpus.is_integer():
        raise InvalidParameterError(f"{option} {value!r}: Ray shares a GPU only in fractions up to 1; above one "
                                    "GPU per worker give a whole number (e.g. 1 or 2)")
    return gpus


def worker_device(device: str | None, gpus_per_worker: float | None,
                  options: tuple[str, str] = ("device", "gpus_per_worker")) -> str | None:
    """The device the workers load the detector on: ``device`` (None: as saved) for CPU workers, ``cuda``
    for GPU workers (Ray shows each actor only the GPUs it reserved, numbered from 0).

    Raises:
        InvalidParameterError: a CUDA device without GPUs reserved (Ray hides every GPU from an actor that
            reserved none), or GPU workers asked to run on another device (names ``options``).
    """
    name = None if device is None else str(device).strip().lower()
    is_cuda = name is not None and name.split(":")[0] == "cuda"
    if gpus_per_worker is None:
        if is_cuda:
            raise InvalidParameterError(f"{options[0]} {device!r} for Ray workers needs GPUs reserved for them (Ray "
                                        f"hides every GPU from a worker that reserved none): add {options[1]} (1, or "
                                        "0.5 for two workers per GPU)")
        return device
    if name in (None, "auto", "cuda", "cuda:0"):
        return "cuda"
    raise InvalidParameterError(f"{options[1]} gives each worker its own GPU, seen as cuda; {options[0]} {device!r} "
                                f"contradicts it: drop {options[0]} (or pass cuda), or drop {options[1]} for CPU workers")


def gpu_capacity(node_gpus: Iterable[float], gpus_per_worker: float) -> int:
    """How many workers of ``gpus_per_worker`` GPUs fit on nodes with these GPU counts (a fraction must fit
    within one GPU: 0.4 puts 2 workers on each GPU)."""
    per_gpu = int(1.0 / gpus_per_worker + 1e-9) if gpus_per_worker <= 1 else 0
    total = 0
    for n in node_gpus:
        whole = int(float(n) + 1e-9)
        total += whole * per_gpu if per_gpu else int(whole // gpus_per_worker)
    return total


def check_gpus(gpus_per_worker: float, num_workers: int, where: str,
               options: tuple[str, str] = ("gpus_per_worker", "num_workers")) -> None:
    """Fail before any work if the Ray cluster this process is connected to cannot hold ``num_workers``
    workers of ``gpus_per_worker`` GPUs (Ray would wait for them forever).

    Raises:
        DistributedError: the cluster has no GPUs, or too few for the workers asked for.
    """
    import ray

    nodes = [float(n.get("Resources", {}).get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    total = sum(nodes)
    if total <= 0:
        raise DistributedError(f"{options[0]} {gpus_per_worker:g} asks for GPU workers, but {where} has no GPUs; "
                               f"drop {options[0]} to score on CPU workers, or start Ray on machines with GPUs "
                               "(ray start ... --num-gpus N)")
    room = gpu_capacity(nodes, gpus_per_worker)
    if room == 0:
        raise DistributedError(f"{options[0]} {gpus_per_worker:g}: no machine of {where} has that many GPUs (the "
                               f"largest has {max(nodes):g}); lower {options[0]}")
    if room < num_workers:
        raise DistributedError(f"{num_workers} workers of {gpus_per_worker:g} GPU do not fit the {total:g} GPU(s) of "
                               f"{where} (room for {room}); lower {options[1]} to {room} or {options[0]}")


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
        device: passed to :func:`vlad.detector.load_detector` (None: as saved; ``cuda`` on a GPU worker:
            the GPU Ray gave it).
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
        device: str | None, overlays: bool, maps: bool, precision: str | None = None,
        gpus_per_worker: float | None = None):
    """Build the streaming job; returns ``(dataset of rows, number of inputs to score)``.

    ``gpus_per_worker``: GPUs each actor reserves (Ray's ``num_gpus``; None: CPU actors).

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
    gpus = {} if gpus_per_worker is None else {"num_gpus": float(gpus_per_worker)}
    rows = ds.map_batches(
        ScoreWorker,
        fn_constructor_kwargs={"detector_dir": detector_dir, "out_dir": out_dir, "device": device,
                               "overlays": overlays, "maps": maps, "threads": max(1, int(cpus)),
                               "precision": precision},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=cpus, **gpus)
    return rows, total
