"""MAEDAY cost at the real size: ``python -m vlad.bench maeday [--images N] [--repeats R] [--mask-batch M]``.

Figures (random weights; the cost of a ViT-MAE-Base does not depend on its weights):

* baseline: one batched masked forward of ``n_masks`` (32) copies of a 224 px image through
  ``facebook/vit-mae-base``'s encoder and decoder (transformers ``ViTMAEForPreTraining``), s/img;
* MAEDAY ``predict`` s/img (batch of one image: ``n_masks`` masked copies, error maps, smoothing, score);
* their ratio (target <= 1.1x, TARGETS.md), and the peak RSS of the process after each stage.

MAEDAY runs first so the peak RSS printed after it is its own (ru_maxrss only grows).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import numpy as np
import torch

from vlad.bench._util import add_device_option, machine_line, median_seconds, peak_rss_mb, use_device


def _images(n: int, size: int = 224) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        base = 0.5 + 0.25 * np.sin(xx / (3.0 + i)) * np.cos(yy / 5.0)
        img = base[..., None] + rng.normal(0, 0.02, (size, size, 3))
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench maeday", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="images per predict call (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    parser.add_argument("--n-masks", type=int, default=32)
    parser.add_argument("--mask-batch", type=int, default=32, help="masked copies per forward (default 32)")
    parser.add_argument("--threads", type=int, default=2)
    add_device_option(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = use_device(args)

    import vlad

    print(machine_line())
    print(f"peak RSS at start: {peak_rss_mb():.0f} MB")
    scorer = vlad.create_scorer(
        "maeday", weights="random", batch_size=1, n_masks=args.n_masks, mask_batch=args.mask_batch, device=device
    ).fit()
    print(f"peak RSS after building vit-mae-base: {peak_rss_mb():.0f} MB")
    images = _images(args.images)

    t_pred = median_seconds(lambda: scorer.predict(images), repeats=args.repeats, warmup=1) / args.images
    rss_pred = peak_rss_mb()

    model = scorer.model_
    x = torch.randn(1, 3, 224, 224).expand(args.n_masks, -1, -1, -1).contiguous().to(device)
    noise = torch.rand(args.n_masks, scorer.n_patches_, generator=torch.Generator().manual_seed(0)).to(device)

    def forward() -> None:
        with torch.inference_mode():
            model(pixel_values=x, noise=noise)

    t_fwd = median_seconds(forward, repeats=args.repeats, warmup=1)
    rss_fwd = peak_rss_mb()

    print(f"MAEDAY n_masks={args.n_masks} mask_ratio={scorer.mask_ratio} mask_batch={args.mask_batch} "
          f"image 224 px, {args.images} images, median of {args.repeats}")
    print(f"  one batched masked forward of {args.n_masks} (encoder+decoder): {t_fwd:.3f} s/img")
    print(f"  MAEDAY predict:                                    {t_pred:.3f} s/img")
    print(f"  ratio predict / forward: {t_pred / t_fwd:.3f}x (target <= 1.1x)")
    print(f"  peak RSS after MAEDAY predict: {rss_pred:.0f} MB; after the plain forwards: {rss_fwd:.0f} MB")
    return 0
