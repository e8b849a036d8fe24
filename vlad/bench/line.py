"""Line speed, each scorer next to its backbone bound: ``python -m vlad.bench line [--device cuda]``.

One command for the table of issue "Line speed on a GPU" (random weights at the real sizes; cost does
not depend on the weights). Per row, in ms per image (medians of ``--repeats``, cuda-synchronised on a
GPU), the plain backbone forward at the same batch size beside it:

* ``around``: the work around the models, with the tiny twins (model time near zero): the default
  detector (winclip+maeday+anomalydino, 8 references) on ``--size`` images and on 256 px images,
  and the ratio of the two (target: at most 2x);
* ``winclip``: zero-shot at 240 px, batch 1 and ``--batch``, against CLIP ViT-B-16-plus-240 forwards;
* ``patchcore``: 200 references (coreset 10%), batch 1 and ``--batch``, against WideResNet-50
  layers 2+3; and the fit time;
* ``anomalydino``: 8 references x 8 rotations at 448 px, batch 1 and 16, against DINOv2 ViT-S/14;
* ``detector``: the default detector at real size, 8 references, ``--size`` images, batch ``--batch``;
* ``musc``: N = 200 images scored against each other with CLIP ViT-L/14-336 at 518 px (the paper's
  setting; on by default on a GPU only: on 2 CPU cores it takes hours); ``--musc-search fp32`` times
  the exact float32 search instead of the default TF32 candidates.

The header names the machine, the device, the precision and the threads. ``--rows`` picks rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

ROWS = ("around", "winclip", "patchcore", "anomalydino", "detector", "musc")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], object], device: str, repeats: int, per: int) -> float:
    """Median wall time of ``fn()`` in ms per item (``per`` items a call), after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / per


def _forward_ms(forward: Callable, shape: tuple[int, ...], device: str, repeats: int) -> float:
    import torch

    x = torch.randn(*shape, device=device)

    def run():
        with torch.inference_mode():
            forward(x)

    return _median_ms(run, device, repeats, shape[0])


def _opts(args: argparse.Namespace) -> dict:
    opts = {"device": args.device}
    if args.precision != "fp32":
        opts["precision"] = args.precision
    return opts


def _around(args: argparse.Namespace) -> str:
    import vlad
    from vlad.bench._util import synthetic_images

    det = vlad.create_detector(weights="tiny", random_state=0, device=args.device)
    det.fit(synthetic_images(8, 256, seed=1))
    out = []
    for side in (args.size, 256):
        imgs = synthetic_images(args.around_images, side, seed=2)
        out.append(_median_ms(lambda: det.predict(imgs), args.device, args.repeats, len(imgs)))
    return (f"around    tiny twins, default detector, 8 refs: {out[0]:.1f} ms/img at {args.size} px, "
            f"{out[1]:.1f} at 256 px ({out[0] / out[1]:.2f}x)")


def _two_batches(name: str, predict_ms: Callable[[int], float], forward_ms: Callable[[int], float],
                 batches: Sequence[int], extra: str = "") -> str:
    cells = []
    for b in batches:
        f, p = forward_ms(b), predict_ms(b)
        cells.append(f"b{b}: {p:.2f} ms/img (forward {f:.2f}, {p / f:.2f}x)")
    return f"{name:<9} " + "; ".join(cells) + extra


def _scorer_ms(scorer, imgs: list, batch: int, args: argparse.Namespace) -> float:
    scorer.batch_size = batch
    return _median_ms(lambda: scorer.predict(imgs[:batch]), args.device, args.repeats, batch)


def _winclip(args: argparse.Namespace) -> str:
    import vlad
    from vlad.bench._util import synthetic_images

    s = vlad.create_scorer("winclip", object_name="metal plate", weights="random", **_opts(args)).fit()
    imgs = synthetic_images(args.batch, 240, seed=2)
    model = s.backbone_.model
    return _two_batches("winclip", lambda b: _scorer_ms(s, imgs, b, args),
                        lambda b: _forward_ms(model.encode_image, (b, 3, 240, 240), args.device, args.repeats),
                        (1, args.batch))


def _patchcore(args: argparse.Namespace) -> str:
    import vlad
    from vlad.bench._util import synthetic_images

    s = vlad.create_scorer("patchcore", weights="random", **_opts(args))
    t0 = time.perf_counter()
    s.fit(synthetic_images(200, 224, seed=1))
    _sync(args.device)
    fit_s = time.perf_counter() - t0
    imgs = synthetic_images(args.batch, 224, seed=2)
    model = s.backbone_.model
    return _two_batches("patchcore", lambda b: _scorer_ms(s, imgs, b, args),
                        lambda b: _forward_ms(model, (b, 3, 224, 224), args.device, args.repeats),
                        (1, args.batch), f"; fit {fit_s:.1f} s (200 refs, memory {s.memory_.shape[0]} rows)")


def _anomalydino(args: argparse.Namespace) -> str:
    import vlad
    from vlad.bench._util import synthetic_images

    s = vlad.create_scorer("anomalydino", weights="random", image_size=448, **_opts(args))
    s.fit(synthetic_images(8, 448, seed=1))
    imgs = synthetic_images(16, 448, seed=2)
    model = s.model_
    return _two_batches("anomalydino", lambda b: _scorer_ms(s, imgs, b, args),
                        lambda b: _forward_ms(model.forward_features, (b, 3, 448, 448), args.device, args.repeats),
                        (1, 16))


def _detector(args: argparse.Namespace) -> str:
    import vlad
    from vlad.bench._util import synthetic_images

    det = vlad.create_detector(weights="random", random_state=0, batch_size=args.batch, **_opts(args))
    t0 = time.perf_counter()
    det.fit(synthetic_images(8, 512, seed=1))
    fit_s = time.perf_counter() - t0
    imgs = synthetic_images(args.batch, args.size, seed=2)
    ms = _median_ms(lambda: det.predict(imgs), args.device, args.repeats, len(imgs))
    return f"detector  default, real size, 8 refs, {args.size} px, batch {args.batch}: {ms:.1f} ms/img (fit {fit_s:.1f} s)"


def _musc(args: argparse.Namespace) -> str:
    import torch

    import vlad
    from vlad.bench._util import synthetic_images

    s = vlad.create_scorer("musc", weights="random", search_precision=args.musc_search, **_opts(args)).fit()
    imgs = synthetic_images(args.musc_n, 518, seed=2)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    s.predict(imgs)
    _sync(args.device)
    total = time.perf_counter() - t0
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if args.device.startswith("cuda") else ""
    from vlad.memory.mutual import resolve_search_precision

    search = resolve_search_precision(s.search_precision, s.device_)
    return (f"musc      N = {args.musc_n}, {s.backbone}, {search} search: {total:.1f} s "
            f"({1000 * total / args.musc_n:.0f} ms/img){mem}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlad.bench line", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--rows", default=None, help=f"comma-separated rows of {', '.join(ROWS)} (default: all; "
                                                     "musc only on a GPU)")
    parser.add_argument("--batch", type=int, default=32, help="the large batch (default 32)")
    parser.add_argument("--size", type=int, default=1024, help="image side of the detector rows (default 1024)")
    parser.add_argument("--around-images", type=int, default=8, help="images per call of the 'around' row")
    parser.add_argument("--musc-n", type=int, default=200)
    parser.add_argument("--musc-search", default="auto", choices=("auto", "fp32", "tf32"),
                        help="MuSc's search_precision (auto: TF32 candidates on a GPU, float32 on the CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    import logging

    import torch

    from vlad.bench._util import machine_line

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = args.device.startswith("cuda")
    rows = [r for r in (args.rows.split(",") if args.rows else ROWS) if r != "musc" or on_gpu or args.rows]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    gpu = f", {torch.cuda.get_device_name(args.device)}" if on_gpu else ""
    print(machine_line())
    print(f"device {args.device}{gpu}, precision {args.precision}, weights random at real size (tiny twins for "
          f"'around'), medians of {args.repeats}")
    for row in rows:
        print(globals()[f"_{row}"](args), flush=True)
    return 0
