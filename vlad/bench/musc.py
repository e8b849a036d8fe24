"""MuSc cost at the real size: ``python -m vlad.bench musc [options]``.

Figures (DINOv2 ViT-S/14, random weights, 224 x 224 inputs: 16 x 16 patches of 384 dims; cost does not
depend on the weights), for each batch size N (``--sizes``, default 50,100,200), each N in a fresh
subprocess so that its peak RSS is its own:

* total time of scoring the batch (the paper's setting: every image against every other), and per image;
* the parts: backbone forwards (with the layer norm), mutual scoring (LNAMD + MSM over 4 layers x 3
  degrees), RsCIN; the backbone-forward share of the total;
* peak RSS of the process (and the RSS after imports, before any model);
* above ``--full-max`` (default 100) the total is an estimate, marked ``~``: the forward of 16 images
  scaled by N, and the mutual part as 4 layers x 3 degrees x the one layer/degree pass timed for the
  ratio (every pass does the same work); peak RSS then covers that pass only;
* the ratio of the mutual-scoring part to a dense torch matmul doing the same distance work (the
  ``N P x N P`` similarity products of one layer and degree, chunked into a reused buffer, with no
  reduction), both timed on the same features in the same process, interleaved (``--repeats`` each,
  median). Target: <= 1.5x. The search computes each pair of images once, so it can go below 1x (0.5x
  at most, when the blocks are small against N).

``--paper`` adds an estimate for the paper's backbone (CLIP ViT-L-14-336 at 518 px, 37 x 37 patches of
1024 dims) at N = 50: one measured forward and one measured mutual pass of one layer and degree on 8
images, scaled by N (forwards) and N^2 (mutual scoring); a full run would take far more than minutes on a
2-core CPU, so it is an estimate and says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence

from vlad.bench._util import add_device_option, clock, device_args, use_device

BACKBONE = "vit_small_patch14_dinov2.lvd142m"


def _dense_matmul(z, max_bytes: int) -> None:
    """The bound: every similarity of ``z`` ``(N, P, D)`` against itself as chunked matrix products."""
    import torch

    flat = z.reshape(-1, z.shape[-1])
    m = flat.shape[0]
    rows = max(1, min(m, max_bytes // (4 * m)))
    buf = flat.new_empty(rows * m)
    for s in range(0, m, rows):
        q = flat[s : s + rows]
        torch.mm(q, flat.T, out=buf[: q.shape[0] * m].view(q.shape[0], m))


def _child(args: argparse.Namespace) -> dict:
    import torch

    from vlad.bench._util import peak_rss_mb, synthetic_images
    from vlad.registry import create_scorer
    from vlad.scorers.musc import lnamd, mutual_patch_scores

    baseline_rss = peak_rss_mb()
    device = use_device(args)
    n = args.child_n
    full = n <= args.full_max
    scorer = create_scorer("musc", backbone=args.backbone, weights="random", image_size=args.image_size,
                           batch_size=8, max_bytes=args.max_bytes, search_precision=args.search_precision,
                           device=device).fit()
    with torch.inference_mode():
        if full:
            images = synthetic_images(n, args.image_size, seed=1)
            t0 = clock()
            tokens, emb = scorer.embed(images)
            t1 = clock()
            patch = scorer._maps(tokens, None)
            t2 = clock()
            res = scorer._result(patch, emb)
            t3 = clock()
            assert torch.isfinite(res.scores).all()
        else:  # estimate: forwards of a few images scaled by N; the mutual part from the pair below
            m = min(n, 16)
            images = synthetic_images(m, args.image_size, seed=1)
            t0 = clock()
            tokens, emb = scorer.embed(images)
            t1 = clock()
            reps = -(-n // m)  # the same features repeated to N images (cost does not depend on content)
            tokens = [t.repeat(reps, 1, 1)[:n] for t in tokens]
            emb = emb.repeat(reps, 1)[:n]
        # the ratio: one layer and degree, blocked mutual scoring vs the dense matmul bound, interleaved
        z = lnamd(tokens[-1], scorer.grid_, 1)
        mine, bound = [], []
        for _ in range(args.repeats):
            a = clock()
            mutual_patch_scores(z, max_bytes=args.max_bytes, precision=args.search_precision)
            b = clock()
            _dense_matmul(z, args.max_bytes)
            c = clock()
            mine.append(b - a)
            bound.append(c - b)
    p, d = z.shape[1], z.shape[2]
    if not full:  # forward scaled by N; mutual = (LNAMD + MSM) per layer and degree, one of them timed
        combos = len(tokens) * len(scorer.degrees)
        t0, t1 = 0.0, (t1 - t0) * n / m
        t2 = t1 + combos * statistics.median(mine)
        t3 = t2 + 0.01 * (n / 200)
    return {
        "estimated": not full,
        "n": n, "patches": p, "dim": d, "layers": len(tokens), "degrees": len(scorer.degrees),
        "forward_s": t1 - t0, "mutual_s": t2 - t1, "rscin_s": t3 - t2, "total_s": t3 - t0,
        "pair_mutual_s": statistics.median(mine), "pair_matmul_s": statistics.median(bound),
        "pair_gflop": 2.0 * (n * p) ** 2 * d / 1e9,
        "rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline_rss,
    }


def _paper_child(args: argparse.Namespace) -> dict:
    import torch

    from vlad.bench._util import peak_rss_mb, synthetic_images
    from vlad.registry import create_scorer
    from vlad.scorers.musc import PAPER_BACKBONE, PAPER_IMAGE_SIZE, lnamd, mutual_patch_scores

    device = use_device(args)
    scorer = create_scorer("musc", backbone=PAPER_BACKBONE, weights="random", batch_size=1, device=device,
                           search_precision=args.search_precision).fit()
    img = synthetic_images(1, PAPER_IMAGE_SIZE, seed=1)
    with torch.inference_mode():
        t0 = clock()
        tokens, _ = scorer.embed(img)
        fwd = clock() - t0
        m = 8
        noise = torch.randn(m, *tokens[0].shape[1:]).to(tokens[0].device)
        z = lnamd(torch.nn.functional.layer_norm(noise, tokens[0].shape[1:]), scorer.grid_, 3)
        t0 = clock()
        mutual_patch_scores(z, max_bytes=args.max_bytes, precision=args.search_precision)
        pair = clock() - t0
    combos = len(tokens) * len(scorer.degrees)
    n = 50
    mutual = pair * (n / m) * ((n - 1) / (m - 1)) * combos
    return {"forward_s": fwd, "pair_8_s": pair, "combos": combos, "est_forward_50_s": fwd * n,
            "est_mutual_50_s": mutual, "est_total_50_s": fwd * n + mutual, "patches": z.shape[1],
            "dim": z.shape[2], "rss_mb": peak_rss_mb()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench musc", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50,100,200", help="batch sizes N, comma-separated (default 50,100,200)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the ratio pair (median)")
    parser.add_argument("--max-bytes", type=int, default=64 * 2**20, help="similarity block bound")
    parser.add_argument("--search-precision", default="auto", choices=("auto", "fp32", "tf32"),
                        help="MuSc's search_precision (auto: TF32 candidates on a GPU, float32 on the CPU)")
    parser.add_argument("--full-max", type=int, default=100,
                        help="largest N run in full; above it the total is estimated (forwards of 16 images x N/16, "
                             "mutual part = 12 x the timed layer/degree pass); the ratio is always measured")
    parser.add_argument("--paper", action="store_true", help="add the estimate for the paper's backbone at N=50")
    add_device_option(parser)
    parser.add_argument("--child-n", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--paper-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.paper_child:
        print(json.dumps(_paper_child(args)))
        return 0
    if args.child_n is not None:
        print(json.dumps(_child(args)))
        return 0

    from vlad.bench._util import machine_line

    use_device(args)  # checked here, before any child starts
    print(machine_line())
    print(f"MuSc, {args.backbone} random weights, {args.image_size} px, search_precision={args.search_precision}, "
          f"whole batch scored mutually "
          f"(4 layers x 3 degrees); ratio = one layer/degree of mutual scoring vs the dense matmul of the "
          f"same N P x N P similarities, same run, interleaved, median of {args.repeats}")
    print(f"{'N':>4} {'total s':>8} {'s/img':>7} {'forward':>8} {'fwd %':>6} {'mutual s':>9} {'rscin s':>8} "
          f"{'pair s':>7} {'matmul s':>9} {'ratio':>6} {'GFLOP/s':>8} {'peak MB':>8}")
    base = [sys.executable, "-m", "vlad.bench", "musc", "--image-size", str(args.image_size), "--backbone",
            args.backbone, "--repeats", str(args.repeats), "--max-bytes", str(args.max_bytes),
            "--search-precision", args.search_precision,
            "--full-max", str(args.full_max), *device_args()]
    for n in [int(x) for x in args.sizes.split(",") if x.strip()]:
        proc = subprocess.run([*base, "--child-n", str(n)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{n:>4} failed:\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = r["pair_mutual_s"] / r["pair_matmul_s"]
        est = "~" if r["estimated"] else " "
        print(f"{n:>3}{est} {r['total_s']:>8.1f} {r['total_s'] / n:>7.3f} {r['forward_s']:>8.1f} "
              f"{100 * r['forward_s'] / r['total_s']:>5.1f}% {r['mutual_s']:>9.1f} {r['rscin_s']:>8.3f} "
              f"{r['pair_mutual_s']:>7.2f} {r['pair_matmul_s']:>9.2f} {ratio:>5.2f}x "
              f"{r['pair_gflop'] / r['pair_matmul_s']:>8.1f} {r['rss_mb']:>8.0f}", flush=True)
    print("~ = total, forward and mutual estimated (see --full-max); ratio, pair and matmul always measured")
    if args.paper:
        proc = subprocess.run([sys.executable, "-m", "vlad.bench", "musc", "--paper-child", "--max-bytes",
                               str(args.max_bytes), "--search-precision", args.search_precision, *device_args()],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"paper backbone estimate failed:\n{proc.stderr[-2000:]}")
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"paper backbone ViT-L-14-336 at 518 px ({r['patches']} patches x {r['dim']} dims), ESTIMATE for "
              f"N=50 from one forward ({r['forward_s']:.1f} s) and one layer/degree on 8 images "
              f"({r['pair_8_s']:.1f} s) x {r['combos']}: forwards {r['est_forward_50_s']:.0f} s + mutual "
              f"{r['est_mutual_50_s']:.0f} s = {r['est_total_50_s']:.0f} s ({r['est_total_50_s'] / 50:.1f} s/img); "
              f"peak {r['rss_mb']:.0f} MB")
    return 0
