"""AnomalyDINO cost at the real size: ``python -m vlad.bench anomalydino [options]``.

Figures (DINOv2 ViT-S/14, random weights, 448 x 448 inputs; the dense search's cost does not depend on
the weights, the pruned search's does, through how well the bound separates the memory):

* one plain ``forward_features`` of the backbone, s/img (batch 1),
* AnomalyDINO ``predict`` s/img (batch 1) with 1, 8 and 64 references x 8 rotations, and its ratio to
  the plain forward: the median of ``--repeats`` back-to-back forward/predict pairs in one process
  (target <= 1.3x at 8 refs x 8 rotations),
* reference embedding time (``fit`` / ``add_references``) per reference,
* peak RSS of each setting, each in a fresh subprocess.

``--coreset N`` measures the optional per-reference coreset (N patches kept per reference).

By default only up to ``--embed-max`` references are embedded for real and the memory is completed with
copies of their blocks (slightly perturbed and re-normalised): the search cost depends only on the
memory size, and embedding 64 x 8 rotated images would take ~10 minutes. ``--embed-max 0`` embeds all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence

from vlad.bench._util import add_device_option, clock, device_args, use_device
from vlad.bench._util import synthetic_images as _images

BACKBONE = "vit_small_patch14_dinov2.lvd142m"


def _child(args: argparse.Namespace) -> dict:
    import torch

    from vlad.bench._util import paired_seconds, peak_rss_mb
    from vlad.registry import create_scorer

    baseline_rss = peak_rss_mb()  # after imports, before any model
    device = use_device(args)
    torch.manual_seed(0)
    size = args.image_size
    scorer = create_scorer(
        "anomalydino", backbone=args.backbone, weights="random", rotations=args.rotations, batch_size=8,
        image_size=size, coreset_per_reference=args.coreset or None, pruned_search=not args.dense, device=device,
    )
    n_refs = args.child_refs
    embed_n = n_refs if args.embed_max <= 0 else min(n_refs, args.embed_max)
    refs = _images(max(1, embed_n), size, seed=1)
    t0 = clock()
    scorer.fit(refs[:1])
    if embed_n > 1:
        scorer.add_references(refs[1:embed_n])
    embed_s = (clock() - t0) / max(1, embed_n)
    if n_refs > embed_n:  # complete the memory with perturbed copies (same search cost)
        gen = torch.Generator().manual_seed(0)
        blocks = list(scorer.memory_chunks_)
        infos = list(scorer.ref_info_)
        for i in range(n_refs - embed_n):
            src = blocks[i % len(blocks)]
            noise = torch.randn(src.shape, generator=gen).to(src.device)
            blk = torch.nn.functional.normalize(src + 0.01 * noise, dim=1)
            info = dict(infos[i % len(infos)])
            info["query"] = blk[: info["query"].shape[0]]
            scorer._pending_infos = [info]
            scorer.memory_chunks_.append(blk)
            scorer.reference_names_.append(f"copy{i}")
            scorer._memory_changed()
    scorer.n_references_ = len(scorer.reference_names_)
    test = _images(1, size, seed=2)
    model = scorer.model_
    x = torch.randn(1, 3, size, size).to(device)

    def forward():
        with torch.inference_mode():
            model.forward_features(x)

    def predict():
        scorer.predict(test)

    forward_s, predict_s, ratio = paired_seconds(forward, predict, args.repeats)
    return {
        "refs": n_refs, "embedded": embed_n, "rotations": args.rotations, "memory_patches": scorer.n_memory_,
        "forward_s": forward_s, "predict_s": predict_s, "ratio": ratio, "embed_s_per_ref": embed_s,
        "peak_rss_mb": peak_rss_mb(), "import_rss_mb": baseline_rss, "threads": torch.get_num_threads(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench anomalydino", description=__doc__.split("\n")[0])
    parser.add_argument("--refs", default="1,8,64", help="reference counts, comma-separated (default 1,8,64)")
    parser.add_argument("--rotations", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--repeats", type=int, default=9, help="timed forward+predict pairs per setting (median)")
    parser.add_argument("--embed-max", type=int, default=8,
                        help="embed at most this many references for real (0 = all); the rest are copies")
    parser.add_argument("--coreset", type=int, default=0,
                        help="coreset_per_reference (patches kept per reference incl. rotations); 0 = exact, off")
    parser.add_argument("--dense", action="store_true", help="dense search instead of the exact pruned one")
    add_device_option(parser)
    parser.add_argument("--child-refs", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.child_refs is not None:
        print(json.dumps(_child(args)))
        return 0

    from vlad.bench._util import machine_line

    use_device(args)  # checked here, before any child starts
    print(machine_line())
    print(f"AnomalyDINO, {args.backbone} random weights, {args.image_size} px, batch 1, "
          f"{args.rotations} rotations per reference, medians of {args.repeats} forward/predict pairs, "
          + (f"coreset {args.coreset} patches/reference" if args.coreset else "exact memory (no coreset)")
          + (", dense search" if args.dense else ", exact pruned search"))
    print(f"{'refs':>5} {'memory':>8} {'forward s':>10} {'predict s':>10} {'ratio':>6} {'embed s/ref':>12} "
          f"{'peak RSS MB':>12} {'(imports)':>9}")
    worst = 0
    for n in [int(v) for v in args.refs.split(",") if v.strip()]:
        cmd = [sys.executable, "-m", "vlad.bench", "anomalydino", "--child-refs", str(n),
               "--rotations", str(args.rotations), "--image-size", str(args.image_size),
               "--backbone", args.backbone, "--repeats", str(args.repeats), "--embed-max", str(args.embed_max),
               "--coreset", str(args.coreset), *device_args()] + (["--dense"] if args.dense else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{n:>5} failed:\n{proc.stderr[-2000:]}")
            worst = 1
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = r["ratio"]
        note = "" if r["embedded"] == n else f"  ({r['embedded']} embedded, rest copies)"
        print(f"{n:>5} {r['memory_patches']:>8} {r['forward_s']:>10.3f} {r['predict_s']:>10.3f} {ratio:>5.2f}x "
              f"{r['embed_s_per_ref']:>12.2f} {r['peak_rss_mb']:>12.0f} {r['import_rss_mb']:>9.0f}{note}", flush=True)
    return worst
