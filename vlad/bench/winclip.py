"""WinCLIP / WinCLIP+ cost at the real size: ``python -m vlad.bench winclip [--batch 1,8] [--repeats 3]``.

Random weights (cost does not depend on them), ViT-B-16-plus-240 at 240 px. Prints: one
``encode_image`` s/img at batch 1 (the unit), zero-shot s/img per batch size and its ratio to the unit,
text-embedding setup time on first construction, on a repeated construction (same weights: cache hit)
and after editing one prompt, then WinCLIP+ 4-shot s/img and its ratio to zero-shot. All ratios come
from this one run (the machine is shared; absolute figures drift).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from vlad.bench._util import add_device_option, clock, machine_line, median_seconds, peak_rss_mb, use_device


def _images(n: int, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        base = 0.5 + 0.25 * np.sin(xx / (3.0 + i % 3)) * np.cos(yy / 5.0)
        img = base[..., None] + rng.normal(0, 0.03, (size, size, 3))
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


def _make(backbone: str, batch: int, seed: int = 0, **kw):
    import vlad
    from vlad.bench._util import bench_device

    torch.manual_seed(seed)  # same random weights each time, so the text cache may legitimately hit
    return vlad.create_scorer("winclip", object_name="metal plate", backbone=backbone, weights="random",
                              batch_size=batch, device=str(bench_device()), **kw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench winclip", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (median)")
    parser.add_argument("--backbone", default="ViT-B-16-plus-240")
    parser.add_argument("--shots", type=int, default=4)
    add_device_option(parser)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    device = use_device(args)

    print(machine_line())
    print(f"backbone {args.backbone}, weights=random, repeats={args.repeats} (median)")
    t0 = clock()
    scorer = _make(args.backbone, max(batches)).fit()
    setup_first = scorer.text_stats_
    print(f"construction + fit (first): {clock() - t0:.2f} s; text setup {setup_first['seconds']:.2f} s "
          f"({setup_first['encoded']} sentences encoded)")

    model = scorer.backbone_.model
    x1 = torch.randn(1, 3, *scorer.image_size_).to(device)

    def unit_now() -> float:  # re-measured next to every figure: the machine is shared and drifts
        with torch.inference_mode():
            return median_seconds(lambda: model.encode_image(x1), repeats=args.repeats)

    unit = unit_now()
    print(f"encode_image, batch 1: {unit:.3f} s/img  (unit; re-measured next to each figure below)")

    zs_per_img, zs_ratio = {}, {}
    for b in batches:
        scorer.batch_size = b
        imgs = _images(b)
        t = median_seconds(lambda: scorer.predict(imgs), repeats=args.repeats) / b
        u = unit_now()
        zs_per_img[b], zs_ratio[b] = t, t / u
        print(f"WinCLIP zero-shot, batch {b}: {t:.3f} s/img = {t / u:.2f}x encode_image (unit now {u:.3f} s)")
    if len(batches) > 1:
        b0, b1 = batches[0], batches[-1]
        print(f"batch {b1} vs batch {b0} per image (unit-normalised): {zs_ratio[b1] / zs_ratio[b0]:.2f}x")

    t0 = clock()
    again = _make(args.backbone, 1).fit()
    print(f"construction + fit (repeat, same weights): {clock() - t0:.2f} s; text setup "
          f"{again.text_stats_['seconds']:.3f} s ({again.text_stats_['encoded']} encoded, "
          f"{again.text_stats_['reused']} from the cache)")
    del again
    scorer.set_prompts({"extra_anomalous_states": ["{} with a hairline crack"]})
    print(f"set_prompts with one new state: {scorer.text_stats_['seconds']:.3f} s "
          f"({scorer.text_stats_['encoded']} sentences encoded, {scorer.text_stats_['reused']} reused)")

    b = batches[0]
    scorer.batch_size = b
    imgs = _images(b)
    zs_t = median_seconds(lambda: scorer.predict(imgs), repeats=args.repeats) / b
    scorer.add_references(_images(args.shots, seed=1))
    t = median_seconds(lambda: scorer.predict(imgs), repeats=args.repeats) / b
    u = unit_now()
    print(f"WinCLIP+ {args.shots}-shot, batch {b}: {t:.3f} s/img = {t / zs_t:.2f}x zero-shot measured just before "
          f"({zs_t:.3f} s/img) = {t / u:.2f}x encode_image (unit now {u:.3f} s)")
    print(f"peak RSS: {peak_rss_mb():.0f} MB")
    return 0
