"""PatchCore cost at the real size: ``python -m vlad.bench patchcore [--refs 1,16,200] [--batch 8]``.

Figures (WideResNet-50 layers 2+3, random weights, 224 x 224 inputs; cost does not depend on weights),
each reference count in a fresh subprocess so peak RSS is per setting:

* one plain backbone forward (layers 2+3), s/img at batch 1,
* PatchCore ``predict`` s/img at batch 1 and its ratio to that forward: the median of ``--repeats``
  back-to-back forward/predict pairs (target <= 1.5x),
* ``predict`` images/s at batch ``--batch``,
* ``fit`` time including the coreset (10% by default), and the memory size,
* peak RSS of the process,
* the nearest-neighbour search alone for one image: dense vs :class:`vlad.memory.BoundedIndex`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence

from vlad.bench._util import add_device_option, clock, device_args, use_device
from vlad.bench._util import synthetic_images as _images

BACKBONE = "wide_resnet50_2.tv_in1k"


def _child(args: argparse.Namespace) -> dict:
    import torch

    from vlad.bench._util import paired_seconds, peak_rss_mb
    from vlad.registry import create_scorer

    import_rss = peak_rss_mb()
    device = use_device(args)
    torch.manual_seed(0)
    size = 224
    scorer = create_scorer("patchcore", backbone=args.backbone, weights="random", batch_size=args.batch,
                           coreset_ratio=args.ratio, device=device)
    refs = _images(args.child_refs, size, seed=1)
    t0 = clock()
    scorer.fit(refs)
    fit_s = clock() - t0
    del refs
    model = scorer.backbone_.model
    x1 = torch.randn(1, 3, size, size).to(device)
    test1 = _images(1, size, seed=2)
    test_b = _images(args.batch, size, seed=3)

    def timed(fn):
        t = clock()
        fn()
        return clock() - t

    def forward():
        with torch.inference_mode():
            model(x1)

    # back-to-back forward/predict pairs: each pair's ratio is taken under the same machine load
    forward_s, predict_s, ratio = paired_seconds(forward, lambda: scorer.predict(test1), args.repeats)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    pb = [timed(lambda: scorer.predict(test_b)) for _ in range(max(1, args.repeats // 2))]
    # the nearest-neighbour search alone, dense vs the pruned exact index, on one image's patches
    from vlad.images import load_images
    from vlad.memory import BoundedIndex, knn_distances

    q = scorer._embed(load_images(test1)).reshape(-1, scorer.memory_.shape[1])
    index = BoundedIndex(scorer.memory_)
    dense_s = med([timed(lambda: knn_distances(q, scorer.memory_, memory_sq_norms=scorer.memory_sq_))
                   for _ in range(args.repeats)])
    index_s = med([timed(lambda: index.search(q)) for _ in range(args.repeats)])
    same = bool(torch.equal(index.search(q)[1], knn_distances(q, scorer.memory_)[1]))
    searched = index.scored_fraction
    return {"knn_dense_s": dense_s, "knn_index_s": index_s, "knn_same": same, "rows_frac": searched,
        "refs": args.child_refs, "memory": int(scorer.memory_.shape[0]), "fit_s": fit_s,
        "forward_s": forward_s, "predict_s": predict_s, "ratio": ratio, "batch_img_per_s": args.batch / med(pb),
        "peak_rss_mb": peak_rss_mb(), "import_rss_mb": import_rss, "threads": torch.get_num_threads(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench patchcore", description=__doc__.split("\n")[0])
    parser.add_argument("--refs", default="1,16,200", help="reference counts, comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the throughput figure")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per figure (median)")
    parser.add_argument("--backbone", default=BACKBONE)
    add_device_option(parser)
    parser.add_argument("--child-refs", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.child_refs is not None:
        print(json.dumps(_child(args)))
        return 0

    from vlad.bench._util import machine_line

    use_device(args)  # checked here, before any child starts
    print(machine_line())
    print(f"PatchCore, {args.backbone} random weights, layers 2+3, 224 px, coreset {args.ratio}, "
          f"median of {args.repeats}")
    print(f"{'refs':>5} {'memory':>7} {'forward s':>10} {'predict s':>10} {'ratio':>6} "
          f"{'img/s @b' + str(args.batch):>10} {'fit s':>8} {'peak RSS MB':>12} {'(imports)':>9}")
    status = 0
    for n in [int(v) for v in args.refs.split(",") if v.strip()]:
        cmd = [sys.executable, "-m", "vlad.bench", "patchcore", "--child-refs", str(n), "--batch", str(args.batch),
               "--ratio", str(args.ratio), "--repeats", str(args.repeats), "--backbone", args.backbone,
               *device_args()]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{n:>5} failed:\n{proc.stderr[-2000:]}")
            status = 1
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = r["ratio"]
        print(f"{n:>5} {r['memory']:>7} {r['forward_s']:>10.3f} {r['predict_s']:>10.3f} {ratio:>5.2f}x "
              f"{r['batch_img_per_s']:>10.2f} {r['fit_s']:>8.1f} {r['peak_rss_mb']:>12.0f} "
              f"{r['import_rss_mb']:>9.0f}", flush=True)
        print(f"      kNN alone, 1 image: dense {r['knn_dense_s']:.3f} s, pruned index {r['knn_index_s']:.3f} s "
              f"(scored {100 * r['rows_frac']:.1f}% of the query-row pairs; same indices: "
              f"{r['knn_same']})", flush=True)
    return status
