"""``vlad serve`` under load: ``python -m vlad.bench serve [--clients 16 | --rate R | --rate-share 0.7]
[--duration 15 | --requests 5000] [--engine ray --replicas 2]``.

Builds a detector (PatchCore, ``--refs`` references, random weights at the real size: cost does not
depend on the weights; ``--weights tiny`` for a quick check), saves it, starts ``vlad serve`` on it as a
subprocess on a free loopback port, waits for ``/readyz``, then runs ``--clients`` concurrent clients
(one asyncio httpx client, keep-alive connections) posting PNG images to ``/v1/score`` for ``--duration``
seconds or ``--requests`` requests in all (closed loop: each client sends its next request when the
last is answered). ``--rate R`` is an open loop instead: requests arrive at R per second (Poisson, or
evenly spaced with ``--arrivals even``), each on its own task whatever the server's pace, at most
``--max-in-flight`` at once (an arrival beyond it is counted as skipped, not sent); latency runs from the
scheduled arrival. ``--rate-share F`` runs the closed loop first, then the open loop at F times the
throughput it served (the "p99 at most 2 x p50 at 70% of the throughput" check: ``--rate-share 0.7``).
Prints:

* throughput (requests/s and images/s), latency p50 / p99 / max, errors by status or exception,
* the server's batches (mean images per model call, from its ``/metrics``),
* the server's RSS (its process tree: with ``--engine ray`` the Ray processes and replicas too) when
  ready, after the first ``--warmup`` answered requests and at the end, with the growth between the
  last two (the "grows by at most 50 MB over 5,000 requests" check), and its peak (``VmHWM``),
* beside it, in-process ``Detector.predict`` on the same images in batches of ``--max-batch`` (images/s),
  measured after the server has stopped, so that the two do not share the CPU.

The load generator runs on the same machine as the server: on a small machine it takes CPU from it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from vlad.bench._util import add_device_option, machine_line, use_device
from vlad.bench._util import synthetic_images as _images

BACKBONE = "wide_resnet50_2.tv_in1k"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of process ``pid`` in MB, from /proc (0 where unreadable)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _tree_rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` and its descendants in MB (shared pages counted per process)."""
    return sum(_rss_mb(p)[0] for p in _tree(pid))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _load(url: str, bodies: list[bytes], clients: int, duration: float, requests: int | None,
                timeout: float, on_answer=None) -> tuple[list[float], Counter, float, int]:
    """Run the clients (closed loop); returns (latencies of the answered requests in s, errors by kind,
    wall s, images). ``on_answer()`` is called after each answered request."""
    import httpx

    latencies: list[float] = []
    errors: Counter = Counter()
    sent = 0
    start = time.perf_counter()
    stop_at = start + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def worker(k: int) -> None:
            nonlocal sent
            i = k
            while True:
                if requests is not None:
                    if sent >= requests:
                        return
                elif time.perf_counter() >= stop_at:
                    return
                sent += 1
                body = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/score", content=body, headers={"Content-Type": "image/png"})
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    if on_answer is not None:
                        on_answer()
                else:
                    errors[f"HTTP {r.status_code}"] += 1

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return latencies, errors, time.perf_counter() - start, len(latencies)


async def _open_load(url: str, bodies: list[bytes], rate: float, duration: float, requests: int | None,
                     timeout: float, max_in_flight: int, arrivals: str = "poisson", seed: int = 0,
                     on_answer=None) -> tuple[list[float], Counter, float, int, int, float]:
    """Open loop: requests arrive at ``rate`` per second (Poisson or evenly spaced) for ``duration`` s or
    ``requests`` arrivals, each sent on its own task, whatever the server's pace; an arrival while
    ``max_in_flight`` requests are unanswered is skipped (counted, not sent). Latency runs from the
    scheduled arrival, so a client that falls behind shows in it. Returns (latencies s, errors by kind,
    wall s, answered, skipped, the arrival rate achieved per s)."""
    import random

    import httpx

    rng = random.Random(seed)
    latencies: list[float] = []
    errors: Counter = Counter()
    in_flight = 0
    skipped = 0
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    # the pool must not queue a request for a connection: max_in_flight connections, waited for no longer
    # than the request's own timeout
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one(i: int, scheduled: float) -> None:
            nonlocal in_flight
            try:
                r = await client.post("/v1/score", content=bodies[i % len(bodies)],
                                      headers={"Content-Type": "image/png"})
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                return
            finally:
                in_flight -= 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - scheduled)
                if on_answer is not None:
                    on_answer()
            else:
                errors[f"HTTP {r.status_code}"] += 1

        tasks: set[asyncio.Task] = set()
        start = time.perf_counter()
        offset = 0.0  # the arrival's time after start (kept apart from start: rounding must not add one)
        i = 0
        while (i < requests) if requests is not None else (offset < duration):
            due = start + offset
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max_in_flight:
                skipped += 1
            else:
                in_flight += 1
                task = asyncio.create_task(one(i, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
            offset = offset + rng.expovariate(rate) if arrivals == "poisson" else i / rate
        offered = i / max(time.perf_counter() - start, 1e-9)
        await asyncio.gather(*tasks)
    return latencies, errors, time.perf_counter() - start, len(latencies), skipped, offered


def queue_reference(service_s: float, rate: float, arrivals: str = "poisson", n: int = 200_000,
                    seed: int = 0) -> tuple[float, float]:
    """``(p50, p99)`` latency in seconds of an ideal server that scores one request at a time in exactly
    ``service_s``, first come first served, under ``rate`` arrivals per second (Poisson or evenly spaced):
    what queueing alone gives, whatever the server (M/D/1 for Poisson arrivals). The bench prints it beside
    the measured tail: with Poisson arrivals at 70% load its p99/p50 is about 4, so a server whose batches
    cost as much per image as single images (2 CPU cores) cannot reach 2."""
    import numpy as np

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n) if arrivals == "poisson" else np.full(n, 1.0 / rate)
    arrive = np.cumsum(gaps)
    done = np.empty(n)
    free = 0.0
    for i, t in enumerate(arrive.tolist()):  # Lindley's recursion
        free = max(free, t) + service_s
        done[i] = free
    wait = (done - arrive)[n // 100 :]  # past the empty-queue start
    return float(np.percentile(wait, 50)), float(np.percentile(wait, 99))


def _metric(text: str, name: str) -> float:
    """The sum of the samples of ``name`` in Prometheus ``text``."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def _build(args: argparse.Namespace, folder: Path, device: str) -> Path:
    import torch

    import vlad

    torch.manual_seed(0)
    opts = {"weights": args.weights, "device": device, "random_state": 0, "coreset_ratio": args.ratio}
    if args.weights != "tiny":
        opts["backbone"] = args.backbone
    det = vlad.create_detector("patchcore", **opts)
    t0 = time.perf_counter()
    det.fit(_images(args.refs, args.size, seed=1))
    print(f"detector: PatchCore, {args.refs} references, {args.weights} weights"
          f"{'' if args.weights == 'tiny' else ', ' + args.backbone}, {args.size} px; fit {time.perf_counter() - t0:.1f} s",
          flush=True)
    return det.save(folder / "detector")


def _in_process(path: Path, bodies: list[bytes], batch: int, device: str, seconds: float) -> float:
    """Images/s of Detector.predict on the decoded images, in batches of ``batch`` (after one warm-up)."""
    from vlad.detector import Detector
    from vlad.images import load_image_bytes

    det = Detector.load(path, device=device)
    images = [load_image_bytes(b, f"{k}.png") for k, b in enumerate(bodies)]
    batches = [[images[(i + j) % len(images)] for j in range(batch)] for i in range(0, len(images), batch)]
    det.predict(batches[0])
    done, t0 = 0, time.perf_counter()
    while True:
        for b in batches:
            det.predict(b)
            done += len(b)
        if time.perf_counter() - t0 >= seconds:
            return done / (time.perf_counter() - t0)


class _RssAfter:
    """Samples the server's RSS once ``n`` requests have been answered (the after-warm-up figure)."""

    def __init__(self, pid: int, n: int) -> None:
        self.pid, self.n, self.answered, self.mb = pid, n, 0, None

    def __call__(self) -> None:
        self.answered += 1
        if self.answered == self.n:
            self.mb = _tree_rss_mb(self.pid)


def _report(label: str, lat: list[float], errors: Counter, wall: float, n: int) -> None:
    ms = [1000 * v for v in lat]
    p50, p99 = _percentile(ms, 0.5), _percentile(ms, 0.99)
    print(f"{label} served:  {n / wall:8.2f} req/s = img/s over {wall:.1f} s ({n} answered, "
          f"{sum(errors.values())} errors{': ' + dict(errors).__repr__() if errors else ''})")
    print(f"{label} latency: p50 {p50:.0f} ms, p99 {p99:.0f} ms (p99/p50 {p99 / p50 if p50 else float('nan'):.2f}), "
          f"max {max(ms, default=float('nan')):.0f} ms", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench serve", description=__doc__.split("\n")[0])
    parser.add_argument("--refs", type=int, default=200, help="references of the PatchCore detector (default 200)")
    parser.add_argument("--size", type=int, default=224, help="side of the square test images in px (default 224)")
    parser.add_argument("--weights", choices=("random", "tiny"), default="random",
                        help="random: the real architecture (default); tiny: miniature models, a quick check")
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio (default 0.1)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the closed loop (default 16)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None,
                      help="open loop instead: requests arriving per second, whatever the server's pace")
    load.add_argument("--rate-share", type=float, default=None, metavar="F",
                      help="closed loop first, then the open loop at F x the throughput it served (e.g. 0.7)")
    parser.add_argument("--arrivals", choices=("poisson", "even"), default="poisson",
                        help="open loop arrivals: Poisson (default) or evenly spaced")
    parser.add_argument("--max-in-flight", type=int, default=512,
                        help="open loop: unanswered requests at most; arrivals beyond are skipped (default 512)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per phase (default 15)")
    parser.add_argument("--requests", type=int, default=None, help="requests per phase, instead of --duration")
    parser.add_argument("--warmup", type=int, default=200,
                        help="answered requests before the after-warm-up RSS sample (default 200)")
    parser.add_argument("--images", type=int, default=16, help="distinct images posted in turn (default 16)")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms (default 5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, client and server (s)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="the server's --engine (ray: Ray Serve replicas; needs the serve-ray extra)")
    parser.add_argument("--replicas", type=int, default=2, help="the server's --replicas with --engine ray (default 2)")
    parser.add_argument("--compare-seconds", type=float, default=None,
                        help="seconds of in-process Detector.predict after the server stops (default: half the "
                             "load's time, 5 to 30; 0: skip)")
    parser.add_argument("--detector", default=None, help="serve this saved detector instead of building one")
    add_device_option(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.requests is not None and args.requests < 1 or args.clients < 1 or args.images < 1 or args.replicas < 1:
        parser.error("--requests, --clients, --images and --replicas must be >= 1")
    if args.rate is not None and not args.rate > 0 or args.rate_share is not None and not args.rate_share > 0:
        parser.error("--rate and --rate-share must be > 0")
    if args.max_in_flight < 1 or args.warmup < 1:
        parser.error("--max-in-flight and --warmup must be >= 1")
    from vlad.serve import _require_serve_extra

    _require_serve_extra()
    if args.engine == "ray":
        from vlad.serve._ray import require_ray_serve

        require_ray_serve()
    device = use_device(args)
    print(machine_line())
    bodies = [_png(im) for im in _images(args.images, args.size, seed=2)]
    errors: Counter = Counter()
    with tempfile.TemporaryDirectory(prefix="vlad-bench-serve-") as tmp:
        path = Path(args.detector) if args.detector else _build(args, Path(tmp), device)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "server.log", "w+")
        in_flight = args.max_in_flight if args.rate is not None or args.rate_share is not None else 0
        cmd = [sys.executable, "-m", "vlad", "serve", str(path), "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--queue", str(max(256, 4 * args.clients, in_flight)), "--timeout", str(args.timeout)]
        if args.engine == "ray":
            gpus = "1" if device.startswith("cuda") else "0"
            cmd += ["--engine", "ray", "--replicas", str(args.replicas), "--gpus-per-replica", gpus]
            if gpus == "0":
                cmd += ["--device", device]
        else:
            cmd += ["--device", device]
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            import httpx

            deadline = time.perf_counter() + 600
            while True:
                if server.poll() is not None or time.perf_counter() > deadline:
                    log.seek(0)
                    print(f"the server did not get ready:\n{log.read()[-3000:]}", file=sys.stderr)
                    return 1
                try:
                    if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            ready_rss = _tree_rss_mb(server.pid)
            what = f"{args.requests} requests" if args.requests else f"{args.duration:g} s"
            engine = f"--engine ray --replicas {args.replicas}" if args.engine == "ray" else "local engine"
            print(f"server: {engine}, --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}, pid "
                  f"{server.pid}; one {args.size} px PNG per request ({statistics.mean(map(len, bodies)) / 1024:.0f} "
                  f"KiB), {what} per phase", flush=True)
            after_warmup = _RssAfter(server.pid, args.warmup)
            wall = n = 0.0
            if args.rate is None:
                print(f"closed loop: {args.clients} clients", flush=True)
                lat, errs, wall, n = asyncio.run(_load(url, bodies, args.clients, args.duration, args.requests,
                                                       args.timeout, on_answer=after_warmup))
                errors.update(errs)
                _report("closed", lat, errs, wall, n)
            closed_rate = n / wall if wall else None  # the served throughput the in-process rate is compared with
            rate = args.rate if args.rate is not None else (args.rate_share * n / wall if args.rate_share else None)
            if rate is not None:
                share = f" = {args.rate_share:g} x the closed loop's {n / wall:.2f}" if args.rate_share else ""
                print(f"open loop: {args.arrivals} arrivals at {rate:.2f} req/s{share}, at most "
                      f"{args.max_in_flight} in flight", flush=True)
                lat, errs, wall_o, n_o, skipped, offered = asyncio.run(_open_load(
                    url, bodies, rate, args.duration, args.requests, args.timeout, args.max_in_flight,
                    args.arrivals, on_answer=after_warmup))
                errors.update(errs)
                if skipped:
                    errors["skipped (--max-in-flight)"] += skipped
                print(f"open   arrivals: {offered:.2f} req/s offered (target {rate:.2f}), {skipped} skipped at the "
                      f"in-flight cap")
                _report("open  ", lat, errs, wall_o, n_o)
                if closed_rate:
                    q50, q99 = queue_reference(1.0 / closed_rate, offered or rate, args.arrivals)
                    print(f"reference: an ideal server scoring one image at a time in {1000 / closed_rate:.0f} ms "
                          f"(the closed loop's pace) under the same arrivals: p50 {1000 * q50:.0f} ms, p99 "
                          f"{1000 * q99:.0f} ms (p99/p50 {q99 / q50:.2f}; queueing alone, vlad.bench.serve.queue_reference)")
                wall, n = wall + wall_o, n + n_o
            end_rss = _tree_rss_mb(server.pid)
            text = httpx.get(url + "/metrics", timeout=30).text  # once: with Ray, each GET may reach another replica
            calls = _metric(text, "vlad_serve_batch_size_count")
            scored = _metric(text, "vlad_serve_batch_size_sum")
            _, peak = _rss_mb(server.pid)
        finally:
            server.terminate()
            try:
                code = server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()
                code = server.wait()
            log.close()
        one = " (one replica's, the one that answered /metrics)" if args.engine == "ray" else ""
        print(f"batches:    {calls:.0f} model calls, {scored / max(calls, 1):.1f} images per call on average "
              f"(warm-up included){one}")
        warm = "n/a (fewer answered requests than --warmup)" if after_warmup.mb is None else f"{after_warmup.mb:.0f} MB"
        after = after_warmup.answered - args.warmup
        growth = "n/a" if after_warmup.mb is None else f"{end_rss - after_warmup.mb:+.0f} MB over the {after} requests after it"
        tree = " (process tree: Ray's processes and the replicas)" if args.engine == "ray" else ""
        print(f"server RSS{tree}: ready {ready_rss:.0f} MB, after {args.warmup} requests {warm}, end {end_rss:.0f} "
              f"MB; growth after warm-up {growth}")
        print(f"server:     peak RSS {peak:.0f} MB (VmHWM of the server process); exit code after SIGTERM {code}")
        seconds = args.compare_seconds if args.compare_seconds is not None else max(5.0, min(30.0, wall / 2))
        if seconds > 0:
            rate_in = _in_process(path, bodies, args.max_batch, device, seconds=seconds)
            served, which = (closed_rate, "closed loop") if closed_rate else (n / wall, "open loop")
            print(f"in-process: {rate_in:8.2f} img/s  Detector.predict, batches of {args.max_batch}, same images "
                  f"({which} served/in-process = {served / rate_in:.2f})")
    return 0 if not errors and code == 0 else 1
