"""``vlad serve DETECTOR_DIR``: score images over HTTP with a saved detector (needs the ``serve`` extra:
``pip install "vlad-inspect[serve]"``). See :mod:`vlad.serve` and docs/serve.md."""

from __future__ import annotations

import argparse

from vlad.cli.common import add_precision_option, check_device, check_precision_option, pixel_count, port_number


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vlad serve`` and its options."""
    p = sub.add_parser("serve", help="score images over HTTP with a saved detector (POST /v1/score)",
                       description="Serve a saved detector over HTTP: POST an image to /v1/score, get its score "
                                   "and label as JSON. See docs/serve.md.")
    p.add_argument("detector_dir", metavar="DETECTOR_DIR", help="folder of a saved detector (Detector.save)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; another address needs "
                        "--token-file or --insecure)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default 8000)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: where it was saved if "
                                                    "this machine has it, else the CPU)")
    add_precision_option(p, "Default: the saved detector's")
    p.add_argument("--max-batch", type=_positive_int, default=32,
                   help="images per model call at most; requests arriving together are merged up to it (default 32)")
    p.add_argument("--max-wait-ms", type=_seconds, default=5.0,
                   help="how long a request waits for others to share its batch, in ms (default 5)")
    p.add_argument("--queue", type=_positive_int, default=256,
                   help="images accepted and waiting for the model at most; more are answered 503 with "
                        "Retry-After (default 256)")
    p.add_argument("--max-images", type=_positive_int, default=16,
                   help="images per request at most (multipart; default 16)")
    p.add_argument("--max-body-mb", type=float, default=64.0,
                   help="request body size at most, in MiB (default 64)")
    p.add_argument("--timeout", type=_seconds, default=60.0,
                   help="seconds from a request's arrival to its answer at most, then 504 (default 60)")
    p.add_argument("--max-pixels", type=pixel_count, metavar="N",
                   help="refuse images with more than N pixels, 413 (default 200000000, or "
                        "$VLAD_MAX_IMAGE_PIXELS; 0: no limit)")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding a token clients must send as 'Authorization: Bearer <token>'")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback address without --token-file")
    p.add_argument("--access-log", action="store_true", help="log a line per request")


def run(args: argparse.Namespace) -> int:
    """Check the options, load the detector, then serve until SIGINT/SIGTERM (in-flight requests answered)."""
    from vlad.serve import ServeOptions, _require_serve_extra, check_bind, read_token_file, serve

    _require_serve_extra()
    check_device(args.device)
    check_precision_option(args)
    token = read_token_file(args.token_file) if args.token_file else None
    options = ServeOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue=args.queue,
                           max_images=args.max_images, max_body_mb=args.max_body_mb, timeout_s=args.timeout,
                           token=token).check()
    check_bind(args.host, token, args.insecure)
    if args.max_pixels is not None:
        from vlad.images import set_max_image_pixels

        set_max_image_pixels(args.max_pixels)
    serve(args.detector_dir, args.host, args.port, device=None if args.device == "auto" else args.device,
          precision=args.precision, insecure=args.insecure, access_log=args.access_log, options=options)
    return 0
