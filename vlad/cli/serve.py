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


def _gpus(text: str) -> float:
    value = _seconds(text)
    if value > 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a fraction up to 1 (replicas sharing a GPU) or a whole number, "
                                         f"got {text!r}")
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
    r = p.add_argument_group("scale out (--engine ray: Ray Serve replicas behind one address; "
                             "pip install \"vlad-inspect[serve-ray]\")")
    r.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: --replicas Ray Serve replicas of the same app")
    r.add_argument("--replicas", type=_positive_int, default=None,
                   help="replicas, each loading the detector and batching its own requests (default 1)")
    r.add_argument("--gpus-per-replica", type=_gpus, default=None, metavar="F",
                   help="GPUs each replica reserves; a fraction (0.5) shares a GPU (default 0: the CPU)")
    r.add_argument("--cpus-per-replica", type=_seconds, default=None, metavar="F",
                   help="CPUs each replica reserves in Ray's accounting (default 1)")
    r.add_argument("--address", default=None,
                   help="a running Ray cluster's HOST:PORT (or auto); default: start a local Ray")


def run(args: argparse.Namespace) -> int:
    """Check the options, load the detector, then serve until SIGINT/SIGTERM (in-flight requests answered)."""
    from vlad.serve import ServeOptions, _require_serve_extra, check_bind, read_token_file, serve

    _require_serve_extra()
    ray_only = [flag for flag, value in (("--replicas", args.replicas), ("--gpus-per-replica", args.gpus_per_replica),
                                         ("--cpus-per-replica", args.cpus_per_replica), ("--address", args.address))
                if value is not None]
    if args.engine == "local" and ray_only:
        from vlad.errors import VladError

        raise VladError(f"{', '.join(ray_only)}: options of --engine ray; add --engine ray (pip install "
                        "\"vlad-inspect[serve-ray]\") or drop them")
    if args.engine == "ray":
        from vlad.serve._ray import require_ray_serve

        require_ray_serve()
    else:  # Ray replicas check their own device (this machine may have no GPU, the replicas' nodes do)
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
    if args.engine == "ray":
        from pathlib import Path

        from vlad.cli.common import check_port_free
        from vlad.serve._ray import check_scale, replica_device, serve_ray

        replicas, gpus, cpus = check_scale(args.replicas or 1, args.gpus_per_replica or 0.0,
                                           1.0 if args.cpus_per_replica is None else args.cpus_per_replica)
        device = None if args.device == "auto" else args.device
        replica_device(device, gpus)
        folder = Path(args.detector_dir).expanduser().resolve()
        if not folder.is_dir():
            from vlad.errors import VladError

            raise VladError(f"{args.detector_dir}: no such folder (a saved detector's folder, Detector.save)")
        check_port_free(args.host, args.port)
        serve_ray(str(folder), args.host, args.port, replicas=replicas, gpus_per_replica=gpus, cpus_per_replica=cpus,
                  device=device, precision=args.precision, options=options, max_pixels=args.max_pixels,
                  address=args.address, access_log=args.access_log)
        return 0
    serve(args.detector_dir, args.host, args.port, device=None if args.device == "auto" else args.device,
          precision=args.precision, insecure=args.insecure, access_log=args.access_log, options=options)
    return 0
