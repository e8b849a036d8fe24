"""Memory on huge images: ``python -m vlad.bench bigimage [--sizes 6000,12000] [--tile 3000,256] [--refs 0]``.

For each size, a JPEG of a striped texture is written once; then, each in a fresh process (so one
run's peak cannot hide in another's), the default detector (``create_detector(weights="random")``,
fitted zero-shot, or on ``--refs`` 512 x 512 references) scores the file

* without tiling, and
* with tiling (``tile_size``, ``tile_overlap`` from ``--tile``).

Printed per run: the models' own resident memory (RSS after building the detector and scoring a small
image once, so lazy allocations are in), the peak RSS while scoring the file (the peak is reset first,
Linux ``/proc/self/clear_refs``), their difference in MB and in bytes per input pixel, and the seconds
taken. Peak memory does not depend on the number of tiles (one tile batch is alive at a time), so a
large tile keeps the tiled runs short on a CPU; time does (every tile is a full forward pass of every
scorer).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlad.bench._util import add_device_option, clock, device_args, use_device


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def write_texture_jpeg(path: Path, size: int, seed: int = 0) -> None:
    """A ``size`` x ``size`` striped texture with mild noise, built strip by strip, saved as JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), dtype=np.uint8)
    x = np.arange(size, dtype=np.float32)[None, :]
    for y0 in range(0, size, 512):
        y = np.arange(y0, min(size, y0 + 512), dtype=np.float32)[:, None]
        band = 0.5 + 0.25 * np.sin(x / 3.0) * np.cos(y / 5.0)
        band = band[..., None] + rng.normal(0, 0.02, (len(y), size, 3)).astype(np.float32)
        img[y0 : y0 + len(y)] = (np.clip(band, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def _child(path: str, tile: str | None, refs: int, threads: int, device: str = "cpu") -> dict:
    """Runs in its own process: models' RSS, then the peak while scoring ``path`` (host memory: on a GPU the
    models' weights are not in it)."""
    import torch

    torch.set_num_threads(threads)
    import vlad
    from vlad.bench._util import synthetic_images

    options = {}
    if tile:
        size, _, overlap = tile.partition(",")
        options = {"tile_size": int(size), "tile_overlap": int(overlap) if overlap else None}
    det = vlad.create_detector(weights="random", device=device, **options)
    det.fit(synthetic_images(refs, 512, seed=1) if refs else None)
    det.predict(synthetic_images(1, 512, seed=2))  # warm-up: lazy buffers and allocator pools
    models = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    t0 = clock()
    res = det.predict(path)
    seconds = clock() - t0
    peak = _status_mb("VmHWM")
    h, w = res.anomaly_maps.shape[-2:]
    return {"models_mb": models, "peak_mb": peak, "seconds": seconds, "map": [int(h), int(w)],
            "active": [n for n, a in det.active_.items() if a]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench bigimage", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="6000,12000", help="image sides in pixels (default 6000,12000)")
    parser.add_argument("--tile", default="3000,256", help="SIZE,OVERLAP of the tiled runs (default 3000,256)")
    parser.add_argument("--refs", type=int, default=0, help="512 px references to fit on (0: zero-shot, the default)")
    parser.add_argument("--threads", type=int, default=2)
    add_device_option(parser)
    parser.add_argument("--child", nargs=2, metavar=("IMAGE", "TILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = use_device(args)  # checked before any child starts
    if args.child:
        image, tile = args.child
        print(json.dumps(_child(image, None if tile == "none" else tile, args.refs, args.threads, device)))
        return 0

    from vlad.bench._util import machine_line

    print(machine_line())
    print(f"default detector, weights=random, {args.refs} references; tiled runs: --tile {args.tile}")
    print(f"{'image':>13} {'tiling':>10} {'models MB':>10} {'peak MB':>9} {'beyond MB':>10} {'B/px':>6} {'s':>7}")
    env = dict(os.environ, VLAD_PROGRESS="0")
    with tempfile.TemporaryDirectory(prefix="vlad-bigimage-") as tmp:
        for side in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp) / f"texture_{side}.jpg"
            write_texture_jpeg(path, side)
            for tile in ("none", args.tile):
                cmd = [sys.executable, "-m", "vlad.bench", "bigimage", "--child", str(path), tile,
                       "--refs", str(args.refs), "--threads", str(args.threads), *device_args()]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(f"{side}x{side} {tile}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    return 1
                r = json.loads(out.stdout.strip().splitlines()[-1])
                beyond = r["peak_mb"] - r["models_mb"]
                per_px = beyond * 2**20 / (side * side)
                print(f"{side:>6}x{side:<6} {tile:>10} {r['models_mb']:>10.0f} {r['peak_mb']:>9.0f} {beyond:>10.0f} "
                      f"{per_px:>6.1f} {r['seconds']:>7.1f}", flush=True)
    return 0
