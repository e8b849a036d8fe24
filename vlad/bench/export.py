"""torch vs onnxruntime at the real sizes, and the size of a runtime-only install:
``python -m vlad.bench export [--scorers patchcore,anomalydino,winclip] [--runtime-venv PATH]``.

Random weights (cost does not depend on them). For each scorer: a one-scorer detector is fitted on
synthetic references, exported (export time printed), and the same images are scored by the scorer's
own ``predict`` (torch, preprocessing included) and by :mod:`vlad.runtime` (numpy preprocessing +
onnxruntime), timed interleaved (torch, onnx, torch, onnx, ...) so both see the same machine load; both
use the same number of threads. Also printed: the largest difference of scores and maps relative to
their scale. Then the installed size (``du``) of the site-packages of this environment and of
``--runtime-venv`` (a venv without torch, e.g. one holding the ``vlad-runtime`` wheel: ``pip install
./runtime``; see docs/deployment.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from vlad.bench._util import (
    add_device_option,
    bench_device,
    clock,
    machine_line,
    peak_rss_mb,
    synthetic_images,
    use_device,
)

#: per scorer: image size, references, scorer options (the real recipes, shortened where only the
#: memory size changes the cost)
SETUPS = {
    "patchcore": (256, 8, {}),
    "anomalydino": (448, 2, {"rotations": 8}),
    "winclip": (256, 0, {"object_name": "metal plate"}),
    "padim": (256, 8, {}),
    "efficientad": (256, 4, {"train_steps": 10}),
}


def _interleaved(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turns after one warm-up round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(1.0, float(np.abs(b).max())))


def site_packages_size(prefix: str | Path) -> tuple[str, Path]:
    """``du -sh`` of the site-packages of the environment at ``prefix`` (a venv folder): (size, path)."""
    prefix = Path(prefix)
    found = sorted(prefix.glob("lib/python3*/site-packages"))
    if not found:
        return "not found", prefix
    out = subprocess.run(["du", "-sh", str(found[0])], capture_output=True, text=True, check=False).stdout.split()
    return (out[0] if out else "?"), found[0]


def bench_scorer(name: str, batch: int, repeats: int, folder: Path) -> None:
    """Fit, export and time one scorer; prints its lines."""
    import onnxruntime as ort

    import vlad
    from vlad import runtime
    from vlad.images import load_images

    size, n_refs, opts = SETUPS[name]
    det = vlad.create_detector(name, weights="random", device=str(bench_device()),
                               scorer_options={name: {**opts, "batch_size": batch}})
    t0 = clock()
    det.fit(synthetic_images(n_refs, size, seed=1) if n_refs else None)
    fit_s = clock() - t0
    t0 = clock()
    det.export(folder / name)
    export_s = clock() - t0
    onnx_mb = sum(p.stat().st_size for p in (folder / name).iterdir()) / 2**20
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch
    options.inter_op_num_threads = 1
    session = runtime.load(folder / name, session_options=options).scorers[name]
    scorer = det.scorers[name]
    images = load_images(synthetic_images(batch, size, seed=2))
    want, got = scorer.predict(images), session.predict(images)
    t = _interleaved({"torch": lambda: scorer.predict(images), "onnx": lambda: session.predict(images)}, repeats)
    print(f"{name}: {size} px, {n_refs} refs, fit {fit_s:.1f} s, export {export_s:.1f} s ({onnx_mb:.0f} MB of ONNX)")
    print(f"  batch {batch}: torch {t['torch'] / batch:.3f} s/img, onnxruntime {t['onnx'] / batch:.3f} s/img "
          f"(onnx/torch = {t['onnx'] / t['torch']:.2f}x); max difference / scale: scores "
          f"{_rel_diff(got.image_scores, want.image_scores):.1e}, maps {_rel_diff(got.anomaly_maps, want.anomaly_maps):.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench export", description=__doc__.split("\n")[0])
    parser.add_argument("--scorers", default="patchcore,anomalydino,winclip", help=f"comma-separated, of {list(SETUPS)}")
    parser.add_argument("--batch", type=int, default=1, help="images per predict call (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--runtime-venv", default=None, help="a venv without torch, e.g. with the vlad-runtime wheel (its size is printed)")
    parser.add_argument("--sizes-only", action="store_true", help="print the environment sizes only")
    add_device_option(parser)  # torch's side; onnxruntime runs on the CPU
    args = parser.parse_args(argv)
    use_device(args)
    names = [n.strip() for n in args.scorers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        print(f"unknown scorer(s) {unknown}; choose from {list(SETUPS)}", file=sys.stderr)
        return 2
    print(machine_line())
    if not args.sizes_only:
        with tempfile.TemporaryDirectory(prefix="vlad-bench-export-") as tmp:
            for name in names:
                bench_scorer(name, args.batch, args.repeats, Path(tmp))
        print(f"peak RSS: {peak_rss_mb():.0f} MB")
    full, path = site_packages_size(sys.prefix)
    print(f"installed size, this environment (full vlad + dev extras): {full}  ({path})")
    if args.runtime_venv:
        size, path = site_packages_size(args.runtime_venv)
        print(f"installed size, runtime-only environment: {size}  ({path})")
    else:
        print("runtime-only environment: pass --runtime-venv PATH (a venv without torch, e.g. with pip install ./runtime; see docs/deployment.md)")
    return 0
