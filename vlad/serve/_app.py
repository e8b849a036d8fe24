"""The FastAPI app of ``vlad serve`` (see :mod:`vlad.serve` for the endpoints and limits). Imported only
once the ``serve`` extra is known to be installed (:func:`vlad.serve.create_app` checks)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlad.errors import ImageTooLargeError, InvalidImageError, VladError
from vlad.serve._batcher import MicroBatcher
from vlad.serve._body import (ARRIVED_SCOPE_KEY, BODY_SCOPE_KEY, MULTIPART, RAW_TYPES, BodyError, Part, media_type,
                              split_multipart)
from vlad.serve._metrics import PATHS, Metrics

logger = logging.getLogger("vlad.serve")

MAP_FORMATS = ("png", "npy")


class ApiError(Exception):
    """An answer other than scores: ``{"error": {"kind": ..., "message": ...}}`` with ``status``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


class ClientGone(Exception):
    """The client closed the connection; nothing is answered."""


def _warmup_images(det) -> list:
    """What the warm-up predict scores: the first reference (the size the line produces), else a grey
    256 x 256 image; two for a detector that never scores an image alone."""
    refs = getattr(det, "references_", None) or []
    image = refs[0] if refs else np.full((256, 256, 3), 128, np.uint8)
    return [image, image] if getattr(det, "batch_scoring", False) else [image]


def _encode_map(values: np.ndarray, fmt: str) -> dict[str, Any]:
    """One anomaly map for JSON: ``png``, a 16-bit grey PNG of ``round(clip(map, 0, 1) * 65535)``; ``npy``,
    the float32 array as a ``.npy`` file (``numpy.load`` reads it), exact. Both base64."""
    buf = io.BytesIO()
    if fmt == "png":
        from PIL import Image

        quantised = np.round(np.clip(values, 0.0, 1.0) * 65535.0).astype(np.uint16)
        Image.fromarray(quantised).save(buf, format="PNG")
        media = "image/png"
    else:
        np.save(buf, np.ascontiguousarray(values, dtype=np.float32), allow_pickle=False)
        media = "application/x-npy"
    return {"format": fmt, "media_type": media, "height": int(values.shape[0]), "width": int(values.shape[1]),
            "data": base64.b64encode(buf.getvalue()).decode("ascii")}


def _rows(result, start: int, stop: int, names: list[str], map_format: str | None) -> list[dict[str, Any]]:
    """The answer for images ``start:stop`` of a batch's result."""
    maps = result.map_list()
    rows = []
    for k, i in enumerate(range(start, stop)):
        label = bool(result.labels[i]) if result.labels is not None else None
        row: dict[str, Any] = {
            "name": names[k],
            "score": float(result.image_scores[i]),
            "anomalous": label,
            "label": None if label is None else ("anomalous" if label else "normal"),
            "scores": {n: float(c.image_scores[i]) for n, c in result.components.items()},
        }
        if result.masks is not None:
            row["anomalous_pixel_fraction"] = float(np.mean(result.masks[i]))
        if map_format:
            row["map"] = _encode_map(maps[i], map_format)
        rows.append(row)
    return rows


class ServerState:
    """What the endpoints share: the detector, its batcher, the pools, the options and the metrics."""

    def __init__(self, detector, options) -> None:
        self.detector = detector
        self.options = options
        self.metrics = Metrics()
        self.ready = False
        self.warmup_error: str | None = None
        self.batcher: MicroBatcher | None = None
        self.pool: ThreadPoolExecutor | None = None
        info = detector.threshold_info()
        self.thresholds = {"image_threshold": float(detector.image_threshold),
                           "pixel_threshold": float(detector.pixel_threshold), "thresholds": info.describe()}
        self._token = options.token.encode("utf-8") if options.token else None

    def check_token(self, authorization: str | None) -> None:
        if self._token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), self._token):
            raise ApiError(401, "unauthorized", "a valid token is needed: send the header 'Authorization: Bearer "
                           "<token>' with the token of the server's --token-file", {"WWW-Authenticate": "Bearer"})

    async def start(self) -> None:
        o = self.options
        self.pool = ThreadPoolExecutor(max_workers=o.decode_threads, thread_name_prefix="vlad-serve-decode")
        det = self.detector
        self.batcher = MicroBatcher(det.predict, o.max_batch, o.max_wait_ms / 1000.0, o.queue,
                                    merge=not getattr(det, "batch_scoring", False), on_batch=self.metrics.on_batch)
        self.batcher.start()
        asyncio.get_running_loop().create_task(self._warm_up(), name="vlad-serve-warmup")

    async def _warm_up(self) -> None:
        t0 = time.perf_counter()
        try:
            await self.batcher.run_in_model_thread(lambda: self.detector.predict(_warmup_images(self.detector)))
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log, the server stays up
            self.warmup_error = f"{type(exc).__name__}: {exc}"
            logger.error("the warm-up predict failed: %s", self.warmup_error)
            return
        self.ready = True
        self.metrics.ready.set(1)
        logger.info("vlad serve: detector warmed up in %.2f s; ready", time.perf_counter() - t0)

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()  # answers every queued job first
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    async def in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


async def _read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is over ``limit`` bytes: by its Content-Length before any byte
    is read, else while it streams in. A body the Ray Serve proxy read whole comes in the request's scope
    (``BODY_SCOPE_KEY``), not from the stream."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the body has {int(declared)} bytes, over the limit of {limit} bytes "
                       "per request (the server's --max-body-mb)")
    carried = request.scope.pop(BODY_SCOPE_KEY, None)  # popped: the caller's ``del`` then frees it
    if isinstance(carried, bytes):  # read whole by the Ray Serve proxy (vlad.serve._ray)
        if len(carried) > limit:
            raise ApiError(413, "body_too_large", f"the body has {len(carried)} bytes, over the limit of {limit} "
                           "bytes per request (the server's --max-body-mb)")
        return carried
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "body_too_large", f"the body is over the limit of {limit} bytes per request "
                               "(the server's --max-body-mb)")
    except ClientDisconnect:
        raise ClientGone() from None
    return bytes(body)


def _decode(part: Part):
    from vlad.images import load_image_bytes

    try:
        return load_image_bytes(part.data, part.name)
    except ImageTooLargeError as exc:
        raise ApiError(413, "image_too_large", str(exc)) from None
    except InvalidImageError as exc:
        raise ApiError(422, "invalid_image", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - whatever a decoder trips on in a client's bytes is the client's image
        logger.warning("decoding %s failed: %r", part.name, exc)
        raise ApiError(422, "invalid_image", f"{part.name}: cannot be decoded ({type(exc).__name__}: {exc})") from None


def _time_left(scope, timeout_s: float) -> float:
    """Seconds left of ``timeout_s`` for a request: all of it, less the time since it reached the Ray Serve
    proxy where that put its arrival in the scope (``ARRIVED_SCOPE_KEY``; a clock that disagrees by more
    than the timeout counts as none elapsed, or all)."""
    arrived = scope.get(ARRIVED_SCOPE_KEY)
    if not isinstance(arrived, float):
        return timeout_s
    return timeout_s - min(max(time.time() - arrived, 0.0), timeout_s)


async def _wait_disconnect(receive) -> None:
    """Returns when the client closes the connection (called once the body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _CountRequests:
    """ASGI middleware counting the answers by path and status (a plain one: Starlette's
    BaseHTTPMiddleware would stand between the endpoint and the client's disconnect)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": "none"}  # "none": the client left before an answer

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in PATHS else "other", status["code"]).inc()


def create_app(detector, options=None, **kwargs):
    """The FastAPI app serving ``detector`` (a fitted :class:`~vlad.detector.Detector`) with ``options``
    (a :class:`~vlad.serve.ServeOptions`, or its fields as keywords). Run it with any ASGI server; the
    batch worker starts and stops with the app's lifespan. See :mod:`vlad.serve`."""
    from vlad.serve import ServeOptions

    if options is not None and kwargs:
        raise VladError("pass either options or keyword options to create_app, not both")
    options = options if options is not None else ServeOptions(**kwargs)
    options.check()
    if not getattr(detector, "fitted_", True):
        raise VladError("the detector is not fitted; fit it (or load a saved one) before serving it")
    state = ServerState(detector, options)

    @asynccontextmanager
    async def lifespan(app):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="vlad serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.vlad = state
    metrics = state.metrics

    def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        metrics.errors.labels(kind).inc()
        return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(422, "invalid_parameter", str(exc))

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state.ready:
            return {"ready": True, "detector": "+".join(detector.scorers), **state.thresholds}
        body = {"ready": False, "error": state.warmup_error or "warming up"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        state.check_token(request.headers.get("authorization"))
        metrics.queue_depth.set(state.batcher.admitted if state.batcher else 0)
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.post("/v1/score")
    async def score(request: Request):
        t0 = time.perf_counter()
        state.check_token(request.headers.get("authorization"))
        try:
            answer = await asyncio.wait_for(_score(request), _time_left(request.scope, options.timeout_s))
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {options.timeout_s:g} s (the server's --timeout); "
                           "the server is busy: retry later, or send fewer images per request") from None
        except ClientGone:
            metrics.errors.labels("client_disconnected").inc()
            return Response(status_code=499)  # nobody reads it
        metrics.latency.observe(time.perf_counter() - t0)
        return JSONResponse(answer)

    async def _score(request) -> dict[str, Any]:
        map_format = request.query_params.get("map") or None
        if map_format is not None and map_format not in MAP_FORMATS:
            raise ApiError(422, "invalid_parameter", f"map={map_format!r}: expected map=png (16-bit grey PNG of "
                           "the map in [0, 1]) or map=npy (float32 .npy), or no map")
        kind = media_type(request.headers.get("content-type"))
        if kind != MULTIPART and kind not in RAW_TYPES:
            raise ApiError(415, "unsupported_media_type", f"Content-Type {kind!r} is not accepted: send one image as "
                           "the body (Content-Type image/png, image/jpeg, image/tiff, ... or application/octet-stream; "
                           "with curl: --data-binary @part.png -H 'Content-Type: image/png') or images as "
                           "multipart/form-data files (curl -F image=@part.png)")
        body = await _read_body(request, options.max_body_bytes)
        try:
            parts = (await state.in_pool(split_multipart, request.headers["content-type"], body, options.max_images)
                     if kind == MULTIPART else [Part("body", body)])  # a large multipart body: off the event loop
        except BodyError as exc:
            raise ApiError(exc.status, exc.kind, exc.message) from None
        del body
        batcher = state.batcher
        if not batcher.admit(len(parts)):
            retry = batcher.retry_after_s()
            metrics.queue_depth.set(batcher.admitted)
            raise ApiError(503, "queue_full", f"the server's queue is full ({batcher.max_queued} images waiting, the "
                           f"server's --queue); retry in about {retry} s", {"Retry-After": str(retry)})
        n_images = len(parts)
        submitted = False
        job = None
        watcher = None
        try:
            images = await asyncio.gather(*(state.in_pool(_decode, p) for p in parts))
            names = [p.name for p in parts]
            del parts
            job = batcher.submit(images)
            submitted = True
            metrics.queue_depth.set(batcher.admitted)
            del images
            watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
            await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():
                raise ClientGone()
            try:
                result, start, stop = job.future.result()
            except VladError as exc:
                raise ApiError(500, "scoring_failed", f"the detector could not score the image(s): {exc}") from None
            except Exception as exc:  # noqa: BLE001
                logger.exception("scoring failed")
                raise ApiError(500, "internal", f"scoring failed ({type(exc).__name__}); see the server's log") from None
            rows = await state.in_pool(_rows, result, start, stop, names, map_format)
            return {"results": rows, **state.thresholds}
        finally:
            if watcher is not None:
                watcher.cancel()
            if job is not None and not job.future.done():
                job.future.cancel()  # the client left or the time ran out: the batcher skips it
            if not submitted:
                batcher.release(n_images)

    return app

