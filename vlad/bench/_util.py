"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` unmeasured runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_seconds(base: Callable[[], object], fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """``(median base s, median fn s, median of fn / base)``: each repeat times ``base()`` then ``fn()`` back
    to back (one warm-up of each first), so the ratio of a pair is taken under the same machine load;
    the median of those ratios is steadier on a shared machine than the ratio of the two medians."""
    base()
    fn()
    pairs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        fn()
        pairs.append((t1 - t0, time.perf_counter() - t1))
    return (statistics.median(b for b, _ in pairs), statistics.median(f for _, f in pairs),
            statistics.median(f / b for b, f in pairs))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_line() -> str:
    """One line naming the machine and torch setup, for the figures' header."""
    import os
    import platform

    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())  # a shared machine: ratios need a quiet one
    return (f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}, load average {load}")


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
