"""An HTTP scoring service for a saved detector: ``vlad serve DETECTOR_DIR`` or :func:`serve`.

>>> vlad.serve.serve("plate-detector", port=8000)                         # doctest: +SKIP
>>> app = vlad.serve.create_app(det, max_batch=16)   # a FastAPI app, for any ASGI server  # doctest: +SKIP

Endpoints (user documentation: ``docs/serve.md``):

``POST /v1/score``
    One image as the raw body (``Content-Type: image/png``, ``image/jpeg``, ..., or
    ``application/octet-stream``), or several as ``multipart/form-data`` files (at most ``max_images``).
    Answers ``{"results": [{"name", "score", "anomalous", "label", "scores": {scorer: score},
    "anomalous_pixel_fraction", "map"?}, ...], "image_threshold", "pixel_threshold", "thresholds"}``:
    the fused calibrated score, the label from the detector's thresholds, each scorer's calibrated
    score and the thresholds' promise in words (``threshold_info().describe()``), the very numbers
    ``Detector.predict`` gives for the same files. ``?map=png`` adds each anomaly map as a base64 16-bit
    grey PNG (``round(clip(map, 0, 1) * 65535)``), ``?map=npy`` as a base64 float32 ``.npy`` (exact).
``GET /healthz``
    200 while the process serves. ``GET /readyz``: 200 once the detector is loaded and a warm-up
    ``predict`` has run, else 503.
``GET /metrics``
    Prometheus text: requests by path and status, errors by kind, images, batch sizes, model time per
    batch, request latency, queue depth, readiness.

**Batching.** One thread owns the detector; the requests that arrive within ``max_wait_ms`` of each
other go to it as one ``predict`` of up to ``max_batch`` images (:mod:`vlad.serve._batcher`). Bodies
are decoded by a pool of threads while the model runs, never on the event loop.

**Limits**, each answered as ``{"error": {"kind", "message"}}``: a body over ``max_body_mb`` (413
``body_too_large``), an image over the pixel limit of :mod:`vlad.images` (413 ``image_too_large``), a body
that is not an image (422 ``invalid_image``), another content type (415), a malformed multipart body
(400), more than ``max_images`` images (413 ``too_many_images``), a full queue (``queue`` images admitted
and not yet scored: 503 ``queue_full`` with ``Retry-After``), no answer within ``timeout_s`` (504), a
missing or wrong token (401). A client that leaves mid-upload or mid-inference costs nothing more: its
images are dropped from the queue if their batch has not started.

**Security.** With a token (``token`` / ``--token-file``) ``/v1/score`` and ``/metrics`` need
``Authorization: Bearer <token>`` (``/healthz`` and ``/readyz`` stay open for probes). Without one the
server listens only on a loopback address unless ``insecure=True``.

Needs the optional extra: ``pip install "vlad-inspect[serve]"`` (FastAPI, uvicorn, python-multipart,
prometheus-client).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import math
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlad.errors import InvalidParameterError, VladError

logger = logging.getLogger("vlad.serve")

__all__ = ["ServeOptions", "check_bind", "create_app", "read_token_file", "serve"]

_EXTRA = ("fastapi", "uvicorn", "python_multipart", "prometheus_client")


def _require_serve_extra() -> None:
    missing = [m for m in _EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise VladError(f"vlad serve needs {', '.join(missing)}: pip install \"vlad-inspect[serve]\"")


@dataclass(frozen=True)
class ServeOptions:
    """The server's limits and batching (the ``vlad serve`` flags of the same names).

    Attributes:
        max_batch: images per ``predict`` call at most (requests are merged up to it).
        max_wait_ms: how long the oldest waiting request waits for others to join its batch.
        queue: images admitted (being decoded or waiting for the model) at most; more answer 503.
        max_images: images per request at most (multipart); more answer 413.
        max_body_mb: request body size at most, in MiB (a raw image or the whole multipart body).
        timeout_s: seconds from a request's arrival to its answer at most; then 504.
        decode_threads: threads decoding request bodies (default: one per core, 2 to 8).
        token: the bearer token clients must send (None: no authentication).
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue: int = 256
    max_images: int = 16
    max_body_mb: float = 64.0
    timeout_s: float = 60.0
    decode_threads: int | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.decode_threads is None:  # one per core, 2 to 8
            object.__setattr__(self, "decode_threads", max(2, min(8, os.cpu_count() or 2)))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def check(self) -> ServeOptions:
        """Raises InvalidParameterError for a value out of range; returns self."""
        def whole(name: str, lo: int, hi: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise InvalidParameterError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")

        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            value = getattr(self, name)
            ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
                  and (value > lo if lo_open else value >= lo) and value <= hi)
            if not ok:
                raise InvalidParameterError(f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], "
                                            f"got {value!r}")

        whole("max_batch", 1, 4096)
        number("max_wait_ms", 0, 10_000)
        whole("queue", 1, 1_000_000)
        whole("max_images", 1, 10_000)
        number("max_body_mb", 0, 65_536, lo_open=True)
        number("timeout_s", 0, 86_400, lo_open=True)
        whole("decode_threads", 1, 256)
        if self.max_images > self.queue:
            raise InvalidParameterError(f"max_images ({self.max_images}) cannot exceed queue ({self.queue}): a "
                                        "request that large could never be admitted")
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise InvalidParameterError("token must be a non-empty string (or None for no authentication)")
        return self


def read_token_file(path: str | os.PathLike) -> str:
    """The token in ``path`` (surrounding whitespace removed).

    Raises:
        VladError: the file cannot be read or holds no token.
    """
    p = Path(path).expanduser()
    try:
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise VladError(f"--token-file {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not token:
        raise VladError(f"--token-file {path}: the file is empty; put the token clients must send in it")
    if any(c.isspace() for c in token):
        raise VladError(f"--token-file {path}: the token must be one word (no spaces or line breaks)")
    return token


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0].split("%", 1)[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_bind(host: str, token: str | None, insecure: bool = False) -> None:
    """Refuse to listen beyond this machine without a token, unless ``insecure``.

    Raises:
        VladError: ``host`` is not a loopback address, there is no token and ``insecure`` is False.
    """
    if token is None and not insecure and not is_loopback(host):
        raise VladError(f"refusing to listen on {host} without a token: anyone who reaches the port could use the "
                        "detector. Pass --token-file FILE (clients then send 'Authorization: Bearer <token>'), "
                        "or --insecure on a network you trust, or listen on 127.0.0.1 (the default)")


def create_app(detector, options: ServeOptions | None = None, **kwargs: Any):
    """The FastAPI app serving the fitted ``detector`` (see :mod:`vlad.serve`); ``options`` or its fields
    as keywords (``create_app(det, max_batch=16)``)."""
    _require_serve_extra()
    from vlad.serve._app import create_app as _create

    return _create(detector, options, **kwargs)


def load_detector(detector, device: str | None = None, precision: str | None = None):
    """A saved detector's folder -> the loaded :class:`~vlad.detector.Detector` (on ``device``, at
    ``precision``); a Detector passes through (``device``/``precision`` must then be None)."""
    if isinstance(detector, (str, os.PathLike)):
        from vlad.detector import Detector, load_any

        det = load_any(detector, device=None if device in (None, "auto") else device, precision=precision)
        if not isinstance(det, Detector):
            raise VladError(f"{detector}: holds a single scorer, not a detector; save a detector "
                            "(vlad.create_detector(...).fit(...).save(folder)) and serve that")
        return det
    if device is not None or precision is not None:
        raise VladError("device and precision apply when loading a saved detector; move an object yourself")
    return detector


def serve(detector, host: str = "127.0.0.1", port: int = 8000, *, device: str | None = None,
          precision: str | None = None, token: str | None = None, token_file: str | os.PathLike | None = None,
          insecure: bool = False, access_log: bool = False, log_level: str = "info",
          options: ServeOptions | None = None, **limits: Any) -> None:
    """Serve ``detector`` (a saved detector's folder, or a fitted Detector) over HTTP until SIGINT/SIGTERM,
    which stop new requests and answer those in flight first.

    Args:
        detector: folder of a saved detector, or a fitted :class:`~vlad.detector.Detector`.
        host, port: where to listen (default: this machine only, port 8000).
        device, precision: where and how a saved detector runs (as ``Detector.load``).
        token, token_file: the bearer token clients must send (or the file holding it).
        insecure: allow a non-loopback ``host`` without a token.
        access_log: log a line per request.
        options, **limits: a :class:`ServeOptions` or its fields (``max_batch=16``, ``timeout_s=10``, ...).

    Raises:
        VladError: the extra is missing, the detector cannot be loaded, an option is out of range, the port
            is taken, or a non-loopback host without a token.
    """
    _require_serve_extra()
    if token_file is not None:
        if token is not None:
            raise VladError("give token or token_file, not both")
        token = read_token_file(token_file)
    if options is not None and limits:
        raise VladError("pass either options or keyword limits, not both")
    options = options if options is not None else ServeOptions(**limits)
    if token is not None:
        from dataclasses import replace

        options = replace(options, token=token)
    options.check()
    check_bind(host, options.token, insecure)
    from vlad.cli.common import check_port_free

    check_port_free(host, port)
    det = load_detector(detector, device, precision)
    app = create_app(det, options)
    import uvicorn

    logger.info("vlad serve: http://%s:%d/v1/score (max batch %d, wait %g ms, queue %d images%s)", host, port,
                   options.max_batch, options.max_wait_ms, options.queue, ", token required" if options.token else "")
    config = uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level,
                            timeout_graceful_shutdown=int(math.ceil(options.timeout_s)) + 5, lifespan="on")
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn drains on SIGTERM, then raises the signal again under the handler found before it ran: a
    # handler that does nothing makes a drained SIGTERM a normal return (exit code 0, as process managers
    # expect of a clean stop), instead of death by the signal. SIGINT keeps its KeyboardInterrupt.
    before = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, before)
