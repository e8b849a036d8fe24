"""Timing, device and memory helpers shared by the benchmarks.

Every target takes ``--device`` the same way: :func:`add_device_option` adds it, :func:`use_device`
resolves it once (an unavailable device is a :class:`~vlad.errors.InvalidDeviceError`, one line from
``python -m vlad.bench``) and remembers it, and every time is read with :func:`clock`, which waits for the
device's queued work first (CUDA runs asynchronously: without a synchronisation a timer measures the
launch, not the work). :func:`median_seconds` and :func:`paired_seconds` use it, and :func:`machine_line`
names the device in each benchmark's header.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

_device: Any = None  # the torch.device chosen by use_device (None: the CPU)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the benchmark's models run (default ``cpu``)."""
    parser.add_argument("--device", default="cpu",
                        help="where the models run: cpu (default), cuda, cuda:N or auto (cuda when available); "
                             "times on a GPU are read after torch.cuda.synchronize()")


def use_device(args: argparse.Namespace) -> str:
    """Resolve ``args.device``, remember it for :func:`clock` and :func:`machine_line`, and return it as
    the ``device`` to give scorers and detectors (``"auto"`` resolved).

    Raises:
        InvalidDeviceError: a device torch does not know, or one this machine does not have.
    """
    global _device
    from vlad.backbones import resolve_device

    _device = resolve_device(getattr(args, "device", "cpu"))
    return str(_device)


def bench_device() -> Any:
    """The ``torch.device`` of this benchmark run (the CPU until :func:`use_device` is called)."""
    import torch

    return _device if _device is not None else torch.device("cpu")


def device_args() -> list[str]:
    """``["--device", DEVICE]``: the option to pass on to a benchmark's child processes."""
    return ["--device", str(bench_device())]


def synchronize() -> None:
    """Wait for the work queued on the benchmark's device (a no-op on the CPU)."""
    if _device is not None and _device.type == "cuda":
        import torch

        torch.cuda.synchronize(_device)


def clock() -> float:
    """``time.perf_counter()`` once the device's queued work is done: the one clock of every benchmark."""
    synchronize()
    return time.perf_counter()


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` unmeasured runs (device-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def paired_seconds(base: Callable[[], object], fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """``(median base s, median fn s, median of fn / base)``: each repeat times ``base()`` then ``fn()`` back
    to back (one warm-up of each first), so the ratio of a pair is taken under the same machine load;
    the median of those ratios is steadier on a shared machine than the ratio of the two medians."""
    base()
    fn()
    pairs = []
    for _ in range(repeats):
        t0 = clock()
        base()
        t1 = clock()
        fn()
        pairs.append((t1 - t0, clock() - t1))
    return (statistics.median(b for b, _ in pairs), statistics.median(f for _, f in pairs),
            statistics.median(f / b for b, f in pairs))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_line() -> str:
    """One line naming the machine, the torch setup and the device the figures were taken on."""
    import os
    import platform

    import torch

    device = bench_device()
    where = f"device {device}"
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())  # a shared machine: ratios need a quiet one
    return (f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}, {where}, load average {load}")


def synthetic_images(n: int, size: int, seed: int) -> list:
    """``n`` seeded striped-texture uint8 RGB images ``(size, size, 3)``: benchmark inputs (cost does
    not depend on content)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        fx, fy = rng.uniform(2, 8, 2)
        base = 0.5 + 0.25 * np.sin(xx / fx) * np.cos(yy / fy)
        img = base[..., None] + rng.normal(0, 0.03, (size, size, 3))
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out
