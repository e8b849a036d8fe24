"""Greedy k-center coreset build time: ``python -m vlad.bench coreset [--n 156800 --dim 1024 --ratio 0.1]``.

156,800 x 1024 is PatchCore's memory for 200 references at 224 px (28 x 28 patches each). Random
Gaussian features (a hard case for any pruning: distances concentrate). Prints the time of
:func:`vlad.memory.greedy_coreset` (wall and process CPU time, since the machine may be shared), and,
with ``--ref-steps S``, the plain one-pass-per-centre loop (:func:`vlad.memory.greedy_coreset_reference`'s
algorithm) timed over its first S selections and extrapolated linearly (every step costs one full pass),
plus a check that both select the same first S indices.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from vlad.bench._util import add_device_option, clock, use_device


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench coreset", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=156_800)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--ref-steps", type=int, default=300,
                        help="time the plain loop over this many selections and extrapolate (0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_option(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    device = use_device(args)

    import logging

    import torch

    from vlad.bench._util import machine_line, peak_rss_mb
    from vlad.memory.coreset import _projected, coreset_size, greedy_coreset, plain_greedy_steps

    print(machine_line())
    gen = torch.Generator().manual_seed(args.seed)
    feats = torch.randn(args.n, args.dim, generator=gen).to(device)
    size = coreset_size(args.n, ratio=args.ratio)
    print(f"greedy k-center coreset: {args.n} x {args.dim} -> {size} (ratio {args.ratio}), "
          f"projection {args.projection_dim}, random Gaussian features")

    logging.basicConfig(level=logging.WARNING)
    t0, c0 = clock(), time.process_time()
    sel = greedy_coreset(feats, ratio=args.ratio, projection_dim=args.projection_dim, random_state=args.seed,
                         block_size=args.block_size)
    wall, cpu = clock() - t0, time.process_time() - c0
    print(f"vlad greedy_coreset: {wall:8.1f} s wall, {cpu:8.1f} s CPU ({torch.get_num_threads()} threads), "
          f"peak RSS {peak_rss_mb():.0f} MB")

    if args.ref_steps > 0:
        steps = min(args.ref_steps, size)
        x, start = _projected(feats, args.projection_dim, args.seed)
        t0, c0 = clock(), time.process_time()
        plain = plain_greedy_steps(x, start, steps)
        pw, pc = clock() - t0, time.process_time() - c0
        scale = size / steps
        same = plain == sel[:steps].tolist()
        print(f"plain loop: {pw:.1f} s wall / {pc:.1f} s CPU for {steps} selections -> extrapolated "
              f"{pw * scale:8.1f} s wall, {pc * scale:8.1f} s CPU for {size}")
        print(f"speed-up vs plain loop (same run): {pw * scale / wall:.1f}x wall, {pc * scale / cpu:.1f}x CPU; "
              f"first {steps} indices identical: {same}")
        if not same:  # say whether the first difference is a float32 near-tie (checked in float64)
            fast = sel[:steps].tolist()
            j = next(k for k in range(steps) if fast[k] != plain[k])
            xd = x.double()
            d = torch.cdist(xd[[fast[j], plain[j]]], xd[[start, *fast[:j]]]).min(dim=1).values
            gap = abs(float(d[0] - d[1])) / float(d.max())
            print(f"first difference at step {j}: fast picked {fast[j]}, plain {plain[j]}; float64 distances "
                  f"{d[0]:.9g} vs {d[1]:.9g} (relative gap {gap:.1e}; below ~1e-6 is a float32 near-tie)")
    return 0
