"""Reduced precision against fp32 on real images: ``python -m vlad.bench precision [--data DIR] [--device D]
[--precision P]``.

Each detector (default: the default detector ``winclip+maeday+anomalydino``, and PatchCore alone) is built
twice with the same random weights at the real size (``weights="random"``: the seeded initialisation is the
same for both), once in fp32 and once at ``--precision`` (:mod:`vlad.precision`), fitted on the same
``train/good`` references of an MVTec-layout category and run on the same test images (the first
``--good`` of ``test/good`` and the first ``--defects`` of the defect folders, sorted by name). Figures:

* the Spearman rank correlation of the image scores, fused and per scorer (calibrated scores);
* the largest and the mean absolute difference of the maps (calibrated ``[0, 1]`` scale, at each image's
  resolution), fused and per scorer;
* wall time of ``fit`` and of ``predict`` per image at each precision (one run each, after an untimed
  warm-up with the tiny twins; on a shared machine only a rough guide).

With random weights the scores say nothing about defects; what is measured is how much reduced precision
moves a model of the real size, which does not depend on the weights being trained.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlad.bench._util import machine_line
from vlad.images import IMAGE_SUFFIXES


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def pick_images(category: Path, n_refs: int, n_good: int, n_defects: int) -> tuple[list[Path], list[Path]]:
    """``(references, tests)``: the first ``n_refs`` of ``train/good``; the first ``n_good`` of ``test/good``
    then the first ``n_defects`` of the other ``test/`` folders together, each sorted by name."""
    refs = _images(category / "train" / "good")[:n_refs]
    good = _images(category / "test" / "good")[:n_good]
    defect_dirs = sorted(d for d in (category / "test").iterdir() if d.is_dir() and d.name != "good") \
        if (category / "test").is_dir() else []
    defects = sorted(p for d in defect_dirs for p in _images(d))[:n_defects]
    if len(refs) < n_refs or len(good) + len(defects) < 2:
        raise SystemExit(f"{category}: expected an MVTec-layout category (train/good, test/good, test/<defect>) "
                         f"with {n_refs} references and some test images; found {len(refs)} references, "
                         f"{len(good)} good and {len(defects)} defect test images")
    return refs, good + defects


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of ``a`` and ``b`` (NaN when either is constant)."""
    ra, rb = rankdata(np.asarray(a)), rankdata(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def compare(ref, other) -> dict[str, float]:
    """Spearman of the image scores and max/mean absolute map difference of two results."""
    diffs = [np.abs(a.astype(np.float64) - b) for a, b in zip(ref.map_list(), other.map_list(), strict=True)]
    return {"spearman": spearman(ref.image_scores, other.image_scores),
            "max_map_diff": float(max(d.max() for d in diffs)),
            "mean_map_diff": float(np.mean([d.mean() for d in diffs]))}


def run_one(spec: str, precision: str, refs: list[str], tests: list[str], args: argparse.Namespace):
    """Build, fit and run one detector: ``(result, fit seconds, predict seconds)``."""
    import vlad

    det = vlad.create_detector(spec, weights=args.weights, device=args.device, precision=precision,
                               object_name=args.object)
    t0 = time.perf_counter()
    det.fit(refs)
    t1 = time.perf_counter()
    res = det.predict(tests)
    t2 = time.perf_counter()
    del det
    gc.collect()
    return res, t1 - t0, t2 - t1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench precision", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mpdd/metal_plate",
                        help="an MVTec-layout category folder (default ../shared/data/mpdd/metal_plate)")
    parser.add_argument("--object", default="metal plate", help="object name for WinCLIP's prompts")
    parser.add_argument("--detectors", default="winclip+maeday+anomalydino,patchcore",
                        help="comma-separated detector specs (default: the default detector, then patchcore)")
    parser.add_argument("--refs", type=int, default=4, help="references from train/good (default 4)")
    parser.add_argument("--good", type=int, default=6, help="test/good images (default 6)")
    parser.add_argument("--defects", type=int, default=6, help="defect test images (default 6)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="the precision compared with fp32 (default bf16)")
    parser.add_argument("--weights", default="random", help="random (real size, default) or tiny (a smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    refs, tests = pick_images(Path(args.data).expanduser(), args.refs, args.good, args.defects)
    print(machine_line())
    print(f"data: {args.data}: {len(refs)} references, {len(tests)} test images; weights={args.weights}, "
          f"device={args.device}, {args.precision} against fp32 (autocast of the backbone forwards)")
    started = time.perf_counter()
    for spec in (s.strip() for s in args.detectors.split(",") if s.strip()):
        # untimed warm-up with the tiny twins: imports and one-off setup do not land on the first timing
        warm = argparse.Namespace(**{**vars(args), "weights": "tiny"})
        for p in ("fp32", args.precision):
            run_one(spec, p, [str(refs[0])], [str(tests[0])], warm)
        base, fit32, pred32 = run_one(spec, "fp32", [str(p) for p in refs], [str(p) for p in tests], args)
        low, fit_lo, pred_lo = run_one(spec, args.precision, [str(p) for p in refs], [str(p) for p in tests], args)
        print(f"\n{spec}: {args.precision} vs fp32, calibrated scores and maps")
        rows = [("fused", compare(base, low))]
        rows += [(name, compare(base.components[name], low.components[name]))
                 for name in base.components if name in low.components]
        for name, c in rows:
            print(f"  {name:<12} Spearman {c['spearman']:.4f}   largest |map diff| {c['max_map_diff']:.4f}   "
                  f"mean |map diff| {c['mean_map_diff']:.5f}")
        n = len(tests)
        print(f"  time: fit fp32 {fit32:.1f} s, {args.precision} {fit_lo:.1f} s; predict fp32 {pred32 / n:.2f} s/img, "
              f"{args.precision} {pred_lo / n:.2f} s/img")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0
