"""``vlad serve --engine ray``: the same app (:func:`vlad.serve.create_app`) as a Ray Serve deployment of
``replicas`` replicas behind Ray Serve's HTTP proxy, so several GPUs or machines answer at one address.

Each replica is a Ray actor that loads the saved detector itself (the folder must be readable at the same
path on every node), builds the app with the same options, and batches its own requests; the proxy spreads
requests over the replicas. The answers, limits, token and errors are those of the local engine; every
answer from a replica carries ``X-Vlad-Replica`` (the replica's id). ``/metrics`` and ``/readyz`` are
answered by whichever replica the proxy picks.

A replica that dies (killed, out of memory, its node lost) is restarted by Ray Serve. Requests not yet
handed to it go to another replica; one it was scoring is lost with it: the proxy answers it 500, which a
proxy-side middleware (:func:`proxy_middlewares`, installed through Ray Serve's
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in the Serve controller's environment) turns into
``503 replica_lost`` with ``Retry-After: 1``, so clients retry it as they retry ``queue_full``.

The same middleware reads each request's body whole at the proxy and sends it to the replica inside the
request (:data:`vlad.serve._body.BODY_SCOPE_KEY`). Ray Serve otherwise hands a body over from a queue in
the proxy that the first replica to read it empties: when that replica died after reading the body but
before the proxy heard that it took the request, the proxy sent the request to another replica, which
waited for a body that never came until the server's timeout (504).
docs/serve.md, "Scale out with Ray Serve".
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from vlad.errors import InvalidParameterError, VladError
from vlad.serve import ServeOptions
from vlad.serve._body import ARRIVED_SCOPE_KEY, BODY_SCOPE_KEY

logger = logging.getLogger("vlad.serve")

APP_NAME = "vlad"
REPLICA_HEADER = "x-vlad-replica"
INSTALL = 'pip install "vlad-inspect[serve-ray]"'
_CALLBACK = "vlad.serve._ray.proxy_middlewares"
_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
#: Serve's controller gives a starting HTTP proxy 5 s to answer, and a running one 10 s per health check,
#: before it kills it; a machine busy with the replicas' own start (2 cores, a backbone loading per
#: replica) can miss both, and the server then fails to start. vlad's own defaults, unless set already.
_PROXY_PATIENCE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


#: the proxy middleware's limits on the bodies it reads whole (the app's --max-body-mb and --timeout)
_BODY_LIMIT_ENV = "VLAD_SERVE_PROXY_MAX_BODY_BYTES"
_BODY_TIMEOUT_ENV = "VLAD_SERVE_PROXY_TIMEOUT_S"


def _controller_env(options=None) -> dict[str, str]:
    """Environment of Serve's controller (its proxies inherit it): the proxy callback, the limits of the
    bodies it reads (``options``: a :class:`~vlad.serve.ServeOptions`), and the proxies' timeouts (this
    process's values where it sets them, also for a cluster started elsewhere)."""
    env = {_CALLBACK_ENV: _CALLBACK, **{k: os.environ.get(k, v) for k, v in _PROXY_PATIENCE.items()}}
    if options is not None:
        env[_BODY_LIMIT_ENV] = str(options.max_body_bytes)
        env[_BODY_TIMEOUT_ENV] = repr(float(options.timeout_s))
    return env


def _env_number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default


def require_ray_serve() -> None:
    """Raises VladError (how to install it) when Ray Serve is not importable."""
    if importlib.util.find_spec("ray") is None:
        raise VladError(f"vlad serve --engine ray needs Ray Serve, which is not installed: {INSTALL}")
    try:
        import ray.serve  # noqa: F401 - its own imports (grpc, aiohttp, ...) come with ray[serve] only
    except ImportError as exc:
        raise VladError(f"vlad serve --engine ray needs Ray Serve ({exc}): {INSTALL}") from None


def check_scale(replicas: Any, gpus_per_replica: Any, cpus_per_replica: Any = 1.0) -> tuple[int, float, float]:
    """``(replicas, gpus_per_replica, cpus_per_replica)`` checked: a whole number >= 1; GPUs a number >= 0
    (a fraction up to 1 shares a GPU, above 1 a whole number); CPUs a number >= 0.

    Raises:
        InvalidParameterError: a value out of range.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 10_000:
        raise InvalidParameterError(f"replicas must be a whole number from 1 to 10000, got {replicas!r}")

    def number(name: str, value: Any) -> float:
        try:
            x = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x) or x < 0:
            raise InvalidParameterError(f"{name} must be a number >= 0, got {value!r}")
        return x

    gpus = number("gpus_per_replica", gpus_per_replica)
    if gpus > 1 and not gpus.is_integer():
        raise InvalidParameterError(f"gpus_per_replica {gpus_per_replica!r}: Ray shares a GPU only in fractions up "
                                    "to 1; above one GPU per replica give a whole number (e.g. 1 or 2)")
    return replicas, gpus, number("cpus_per_replica", cpus_per_replica)


def replica_device(device: str | None, gpus: float) -> str | None:
    """Where a replica loads the detector: ``cuda`` when it reserved GPUs (Ray shows it only those, from
    0), else ``device`` (None: where it was saved if the node has it, else the CPU).

    Raises:
        InvalidParameterError: a CUDA device without GPUs reserved, or GPUs reserved for another device.
    """
    name = None if device in (None, "auto") else str(device).strip().lower()
    is_cuda = name is not None and name.split(":")[0] == "cuda"
    if gpus == 0:
        if is_cuda:
            raise InvalidParameterError(f"device {device!r} for Ray Serve replicas needs GPUs reserved for them (Ray "
                                        "hides every GPU from a replica that reserved none): add --gpus-per-replica "
                                        "(1, or 0.5 for two replicas per GPU)")
        return name
    if name is not None and not is_cuda:
        raise InvalidParameterError(f"--gpus-per-replica {gpus:g} with device {device!r}: replicas that reserve "
                                    "GPUs run on them; drop --device or use --device cuda")
    return "cuda"


# -- the proxy side: bodies read whole; a replica lost mid-request -> 503 the client can retry ---------------

class _ProxyMiddleware:
    """ASGI middleware on Ray Serve's proxy.

    - It reads a request's body whole (up to ``max_body_bytes``, within ``timeout_s``) and puts it in the
      request's scope, which Ray Serve sends to the replica with the request, so every replica the request
      is routed to has the body (see the module's docstring). A body over the limit streams through as
      before (the replica answers 413); a client that leaves mid-upload gets no answer. The scope also
      carries the time the request arrived, from which the replica counts its timeout.
    - When the replica scoring a request dies, the proxy ends the request without an answer (its HTTP
      server would then send a bare ``500 Internal Server Error``); this answers ``503 replica_lost`` with
      ``Retry-After: 1`` and the app's JSON error body instead, so that clients retry it. Every answer a
      replica (or the proxy) started passes unchanged.

    ``max_body_bytes`` and ``timeout_s`` default to the values :func:`start` put in the proxy's
    environment (else those of :class:`~vlad.serve.ServeOptions`).
    """

    def __init__(self, app, max_body_bytes: int | None = None, timeout_s: float | None = None) -> None:
        self.app = app
        defaults = ServeOptions()
        self.max_body_bytes = int(max_body_bytes or _env_number(_BODY_LIMIT_ENV, defaults.max_body_bytes))
        self.timeout_s = float(timeout_s or _env_number(_BODY_TIMEOUT_ENV, defaults.timeout_s))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            scope = {**scope, ARRIVED_SCOPE_KEY: time.time()}
            try:
                read = await asyncio.wait_for(_read_whole_body(scope, receive, self.max_body_bytes), self.timeout_s)
            except asyncio.TimeoutError:
                await _send_error(send, 504, "timeout", f"the request's body did not arrive within {self.timeout_s:g} "
                                  "s (the server's --timeout); retry on a faster link, or send a smaller body")
                return
            if read is None:  # the client left mid-upload: nobody to answer
                return
            scope, receive = read
        started = False

        async def watched_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            if started:
                raise
            logger.warning("Ray Serve failed %s before answering it; answered 503 replica_lost", scope.get("path"),
                           exc_info=True)
            await _send_replica_lost(send)
            return
        if not started:
            await _send_replica_lost(send)


async def _read_whole_body(scope, receive, limit: int):
    """``(scope, receive)`` for the rest of the proxy: the body read whole into ``scope[BODY_SCOPE_KEY]``,
    and a ``receive`` that gives one empty body message, then the client's own messages (its disconnect).
    A body over ``limit`` (declared or read): ``receive`` replays what was read, then streams the rest.
    None when the client disconnected before its body was complete."""
    declared = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), b"")
    if declared.strip().isdigit() and int(declared) > limit:
        return scope, receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        more = message.get("more_body", False)
        if size > limit:
            return scope, _replaying(receive, {"type": "http.request", "body": b"".join(chunks), "more_body": more})
        if not more:
            break
    return ({**scope, BODY_SCOPE_KEY: b"".join(chunks)},
            _replaying(receive, {"type": "http.request", "body": b"", "more_body": False}))


def _replaying(receive, first: dict):
    """A ``receive`` that answers ``first`` once, then whatever ``receive`` answers."""
    pending = [first]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


async def _send_error(send, status: int, kind: str, message: str, headers: tuple = ()) -> None:
    body = json.dumps({"error": {"kind": kind, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers,
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_replica_lost(send) -> None:
    await _send_error(send, 503, "replica_lost", "the replica scoring this request stopped before it answered (Ray "
                      "Serve restarts it); retry the request", ((b"retry-after", b"1"),))


def proxy_middlewares() -> list:
    """The middlewares Ray Serve's HTTP proxy applies (named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(_ProxyMiddleware)]


# -- the replicas ---------------------------------------------------------------------------------------------

class VladReplica:
    """One replica: loads the detector in its actor and builds the app of :func:`vlad.serve.create_app`
    (Ray Serve calls ``__serve_build_asgi_app__`` after ``__init__``, then runs the app's lifespan)."""

    def __init__(self, path: str, device: str | None, precision: str | None, options, max_pixels: int | None) -> None:
        logging.getLogger("vlad.serve").setLevel(logging.INFO)
        if max_pixels is not None:
            from vlad.images import set_max_image_pixels

            set_max_image_pixels(max_pixels)
        from vlad.serve import load_detector

        self._detector = load_detector(path, device, precision)
        self._options = options
        self._app = None
        try:
            from ray import serve

            self._replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests of the class itself)
            self._replica_id = f"pid-{os.getpid()}"

    def __serve_build_asgi_app__(self):
        from vlad.serve import create_app

        app = create_app(self._detector, self._options)
        replica = self._replica_id.encode("latin-1", "replace")

        class _ReplicaHeader:
            def __init__(self, inner) -> None:
                self.inner = inner

            async def __call__(self, scope, receive, send):
                async def tagged(message):
                    if message["type"] == "http.response.start":
                        message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(),
                                                                                        replica)]}
                    await send(message)

                await self.inner(scope, receive, tagged if scope["type"] == "http" else send)

        app.add_middleware(_ReplicaHeader)
        self._app = app
        return app

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose warm-up predict failed is unhealthy (restarted)."""
        state = getattr(getattr(self._app, "state", None), "vlad", None)
        if state is not None and state.warmup_error:
            raise RuntimeError(f"the warm-up predict failed: {state.warmup_error}")


def build_deployment(path: str, *, replicas: int, gpus_per_replica: float, cpus_per_replica: float,
                     device: str | None, precision: str | None, options, max_pixels: int | None = None,
                     access_log: bool = False):
    """The bound Ray Serve application (``serve.run`` it): ``replicas`` replicas of :class:`VladReplica`."""
    from ray import serve

    actor_options: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        actor_options["num_gpus"] = gpus_per_replica
    ingress = serve.ingress()(VladReplica)
    deployment = serve.deployment(
        ingress, name="VladReplica", num_replicas=replicas, ray_actor_options=actor_options,
        # the app batches and bounds its own queue (503 queue_full): let every admitted request through
        max_ongoing_requests=options.queue, max_queued_requests=options.queue,
        graceful_shutdown_timeout_s=options.timeout_s + 5, health_check_period_s=5, health_check_timeout_s=30,
        logging_config={"enable_access_log": access_log})
    return deployment.bind(str(path), replica_device(device, gpus_per_replica), precision, options, max_pixels)


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` or start a local one (True: this call started it)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is not None:
        from vlad.distributed.engine import check_reachable

        try:
            check_reachable(address)
            ray.init(address=address, **quiet)
        except VladError:
            raise
        except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ValueError...
            raise VladError(f"cannot join the Ray cluster at {address} ({exc}); check that it runs the same Ray "
                            "and Python versions as this machine") from None
        return False
    saved = {"PYTHONPATH": os.environ.get("PYTHONPATH")}
    here = str(Path(__file__).resolve().parents[2])  # the workers import the same vlad as this process
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else [])])
    # ray.init takes SIGTERM (its handler exits at once); keep the handlers of the caller (serve_ray's drain)
    handlers = ({sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **quiet)
    except Exception as exc:  # noqa: BLE001
        raise VladError(f"cannot start a local Ray ({exc}); check free memory and /tmp space, or pass the "
                        "address of a running cluster with --address") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return True


class Stopped(Exception):
    """``stop_event`` was set while the replicas were starting (SIGINT/SIGTERM)."""


def start(path: str, host: str, port: int, *, replicas: int, gpus_per_replica: float, cpus_per_replica: float,
          device: str | None, precision: str | None, options, max_pixels: int | None = None,
          address: str | None = None, num_cpus: int | None = None, access_log: bool = False,
          stop_event: threading.Event | None = None) -> bool:
    """Start (or join) Ray, start Serve's proxy on ``host:port`` and deploy the replicas; returns when
    they are all running (True: this call started Ray). :func:`stop` undoes it.

    Raises:
        Stopped: ``stop_event`` was set before the replicas ran (everything started is stopped).
        VladError: Ray cannot be started or joined, or the replicas failed to start.
    """
    require_ray_serve()
    from ray import serve
    from ray.exceptions import RayError

    started = connect(address, num_cpus)
    try:
        # the controller starts the proxies, which inherit its environment: _ProxyMiddleware and its limits
        try:
            serve.start(http_options={"host": host, "port": port, "request_timeout_s": options.timeout_s + 10,
                                      "keep_alive_timeout_s": 30},
                        controller_options={"runtime_env": {"env_vars": _controller_env(options)}})
        except (RayError, TimeoutError) as exc:
            raise VladError(
                f"Ray Serve could not start its HTTP proxy on {host}:{port} ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else 'no detail'}); if the machine is "
                "busy, retry when it is quieter, or give the proxy more time with "
                "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S (seconds, vlad's default 60)") from exc
        app = build_deployment(path, replicas=replicas, gpus_per_replica=gpus_per_replica,
                               cpus_per_replica=cpus_per_replica, device=device, precision=precision,
                               options=options, max_pixels=max_pixels, access_log=access_log)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        _wait_running(stop_event)
    except BaseException:
        stop(started)
        raise
    return started


def _wait_running(stop_event: threading.Event | None = None, timeout_s: float = 3600.0) -> None:
    """Until the application is RUNNING; raises VladError when it fails to deploy (a replica's error)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        if stop_event is not None and stop_event.is_set():
            raise Stopped()
        status = serve.status().applications.get(APP_NAME)
        state = str(getattr(status, "status", "")).rsplit(".", 1)[-1]
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            message = getattr(status, "message", "") or ""
            for dep in getattr(status, "deployments", {}).values():
                message = message or getattr(dep, "message", "")
            raise VladError(f"the Ray Serve replicas failed to start: {message.strip()[-2000:]}")
        if time.monotonic() > deadline:
            raise VladError(f"the Ray Serve replicas did not start within {timeout_s:g} s")
        time.sleep(0.25)


def stop(started_ray: bool) -> None:
    """Shut Serve down (replicas answer what they hold first) and Ray, if :func:`start` started it."""
    try:
        from ray import serve

        serve.shutdown()
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def serve_ray(path: str, host: str, port: int, **kwargs: Any) -> None:
    """:func:`start`, then block until SIGINT/SIGTERM, then :func:`stop`."""
    done = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: done.set())
    try:
        try:
            started = start(path, host, port, stop_event=done, **kwargs)
        except Stopped:
            logger.info("vlad serve: stopped before the replicas were running")
            return
        logger.info("vlad serve (Ray Serve, %d replicas): http://%s:%d/v1/score", kwargs["replicas"], host, port)
        try:
            while not done.wait(1.0):
                pass
        finally:
            logger.info("vlad serve: stopping the Ray Serve replicas (they answer what they hold first)")
            stop(started)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
