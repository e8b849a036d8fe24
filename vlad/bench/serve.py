"""``vlad serve`` under load: ``python -m vlad.bench serve [--clients 16] [--duration 15 | --requests 5000]``.

Builds a detector (PatchCore, ``--refs`` references, random weights at the real size: cost does not
depend on the weights; ``--weights tiny`` for a quick check), saves it, starts ``vlad serve`` on it as a
subprocess on a free loopback port, waits for ``/readyz``, then runs ``--clients`` concurrent clients
(one asyncio httpx client, keep-alive connections) posting PNG images to ``/v1/score`` for ``--duration``
seconds or ``--requests`` requests in all. Prints:

* throughput (requests/s and images/s), latency p50 / p99 / max, errors by status or exception,
* the server's batches (mean images per model call, from its ``/metrics``),
* the server process's peak RSS (``VmHWM`` of ``/proc/<pid>/status``),
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


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _load(url: str, bodies: list[bytes], clients: int, duration: float, requests: int | None,
                timeout: float) -> tuple[list[float], Counter, float, int]:
    """Run the clients; returns (latencies of the answered requests in s, errors by kind, wall s, images)."""
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
                else:
                    errors[f"HTTP {r.status_code}"] += 1

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return latencies, errors, time.perf_counter() - start, len(latencies)


def _metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench serve", description=__doc__.split("\n")[0])
    parser.add_argument("--refs", type=int, default=200, help="references of the PatchCore detector (default 200)")
    parser.add_argument("--size", type=int, default=224, help="side of the square test images in px (default 224)")
    parser.add_argument("--weights", choices=("random", "tiny"), default="random",
                        help="random: the real architecture (default); tiny: miniature models, a quick check")
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio (default 0.1)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load (default 15)")
    parser.add_argument("--requests", type=int, default=None, help="requests in all, instead of --duration")
    parser.add_argument("--images", type=int, default=16, help="distinct images posted in turn (default 16)")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms (default 5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, client and server (s)")
    parser.add_argument("--detector", default=None, help="serve this saved detector instead of building one")
    add_device_option(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.requests is not None and args.requests < 1 or args.clients < 1 or args.images < 1:
        parser.error("--requests, --clients and --images must be >= 1")
    from vlad.serve import _require_serve_extra

    _require_serve_extra()
    device = use_device(args)
    print(machine_line())
    bodies = [_png(im) for im in _images(args.images, args.size, seed=2)]
    with tempfile.TemporaryDirectory(prefix="vlad-bench-serve-") as tmp:
        path = Path(args.detector) if args.detector else _build(args, Path(tmp), device)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "server.log", "w+")
        cmd = [sys.executable, "-m", "vlad", "serve", str(path), "--port", str(port), "--device", device,
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--queue", str(max(256, 4 * args.clients)), "--timeout", str(args.timeout)]
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
            idle_rss, _ = _rss_mb(server.pid)
            what = f"{args.requests} requests" if args.requests else f"{args.duration:g} s"
            print(f"load: {args.clients} clients, {what}, one {args.size} px PNG per request "
                  f"({statistics.mean(map(len, bodies)) / 1024:.0f} KiB); server --max-batch {args.max_batch} "
                  f"--max-wait-ms {args.max_wait_ms:g}, pid {server.pid}, RSS {idle_rss:.0f} MB when ready", flush=True)
            lat, errors, wall, n = asyncio.run(_load(url, bodies, args.clients, args.duration, args.requests,
                                                     args.timeout))
            calls = _metric(url, "vlad_serve_batch_size_count")
            scored = _metric(url, "vlad_serve_batch_size_sum")
            _, peak = _rss_mb(server.pid)
        finally:
            server.terminate()
            try:
                code = server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = server.wait()
            log.close()
        ms = [1000 * v for v in lat]
        print(f"served:     {n / wall:8.2f} req/s = img/s over {wall:.1f} s ({n} answered, "
              f"{sum(errors.values())} errors{': ' + dict(errors).__repr__() if errors else ''})")
        print(f"latency:    p50 {_percentile(ms, 0.5):.0f} ms, p99 {_percentile(ms, 0.99):.0f} ms, "
              f"max {max(ms, default=float('nan')):.0f} ms")
        print(f"batches:    {calls:.0f} model calls, {scored / max(calls, 1):.1f} images per call on average "
              "(warm-up included)")
        print(f"server RSS: peak {peak:.0f} MB (VmHWM); exit code after SIGTERM {code}")
        rate = _in_process(path, bodies, args.max_batch, device, seconds=max(5.0, min(30.0, wall / 2)))
        print(f"in-process: {rate:8.2f} img/s  Detector.predict, batches of {args.max_batch}, same images "
              f"(served/in-process = {n / wall / rate:.2f})")
    return 0 if not errors and code == 0 else 1
