"""``vlad serve``: a real uvicorn server on a free loopback port, a real HTTP client (httpx), a tiny saved
PatchCore detector. Answers equal ``Detector.predict``; every limit is a JSON error with its status; clients
that leave cost nothing; SIGTERM drains; the token is enforced; no open bind without one."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fails_with_one_line, textured, with_defect

if os.environ.get("CI") == "true":  # CI installs the serve extra: its absence is a failure there
    import fastapi  # noqa: F401
    import httpx
    import uvicorn
else:
    pytest.importorskip("fastapi", reason='vlad serve needs the serve extra: pip install "vlad-inspect[serve]"')
    httpx = pytest.importorskip("httpx", reason='the serve tests need httpx: pip install "vlad-inspect[serve]"')
    uvicorn = pytest.importorskip("uvicorn", reason='vlad serve needs the serve extra: pip install "vlad-inspect[serve]"')

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
PIXEL_LIMIT = 20_000  # images over it (e.g. 200 x 200) are refused; the test images are at most 96 x 96


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gated:
    """The detector, with a gate in front of ``predict``: tests close it to hold the model busy."""

    def __init__(self, det) -> None:
        self._det = det
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.calls: list[int] = []
        self.busy = 0  # predict calls in progress

    def __getattr__(self, name):
        return getattr(self._det, name)

    def predict(self, images, on_error="raise"):
        self.busy += 1
        try:
            self.calls.append(len(images))
            self.entered.set()
            assert self.open.wait(60), "the test never opened the gate"
            return self._det.predict(images, on_error)
        finally:
            self.busy -= 1


class Server:
    """An app from ``create_app`` served by uvicorn in a thread."""

    def __init__(self, detector, wrap=None, **options) -> None:
        from vlad.serve import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(detector, **options)
        served = wrap(self.app) if wrap is not None else self.app  # e.g. the Ray Serve proxy's middleware
        config = uvicorn.Config(served, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        headers = {"Authorization": f"Bearer {options['token']}"} if options.get("token") else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=60)
        while self.client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the server never got ready"
            time.sleep(0.05)

    def metric(self, name: str) -> float:
        text = self.client.get("/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory, one_thread):
    import vlad

    det = vlad.create_detector("patchcore", weights="tiny", random_state=0, batch_size=2, device="cpu")
    det.fit([textured(i, 64) for i in range(4)])
    return det.save(tmp_path_factory.mktemp("serve") / "detector")


@pytest.fixture(scope="module")
def detector(detector_dir):
    from vlad.detector import Detector

    return Detector.load(detector_dir, device="cpu")


@pytest.fixture(scope="module")
def gated(detector):
    return Gated(detector)


@pytest.fixture(scope="module")
def server(gated):
    from vlad.images import set_max_image_pixels

    set_max_image_pixels(PIXEL_LIMIT)  # the server reads it in this process
    srv = Server(gated, token=TOKEN, max_batch=4, max_wait_ms=20, queue=6, max_images=3, max_body_mb=0.25,
                 timeout_s=30, decode_threads=2)
    yield srv
    srv.close()
    set_max_image_pixels(None)


@pytest.fixture
def gate(gated):
    """Close the gate for a test; it is open again afterwards whatever happens."""
    gated.open.clear()
    gated.entered.clear()
    yield gated
    gated.open.set()


def images():
    return [textured(10, 64), with_defect(textured(11, 96)), textured(12, 80)]


def check_rows(rows, result, names):
    assert [r["name"] for r in rows] == names
    for i, row in enumerate(rows):
        assert abs(row["score"] - float(result.image_scores[i])) <= 1e-6
        assert row["anomalous"] is bool(result.labels[i])
        assert row["label"] == ("anomalous" if result.labels[i] else "normal")
        assert set(row["scores"]) == set(result.components)
        for name, comp in result.components.items():
            assert abs(row["scores"][name] - float(comp.image_scores[i])) <= 1e-6


def decode_map(entry) -> np.ndarray:
    from PIL import Image

    data = base64.b64decode(entry["data"])
    if entry["format"] == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    return np.asarray(Image.open(io.BytesIO(data)))


def test_answers_equal_predict(server, detector):
    imgs = images()
    expected = detector.predict(imgs)
    assert expected.labels.any() and not expected.labels.all()  # both labels occur
    files = [("image", (f"{k}.png", png(im), "image/png")) for k, im in enumerate(imgs)]
    r = server.client.post("/v1/score", params={"map": "npy"}, files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    check_rows(body["results"], expected, ["0.png", "1.png", "2.png"])
    assert body["thresholds"] == detector.threshold_info().describe()
    assert body["image_threshold"] == pytest.approx(detector.image_threshold, abs=1e-7)
    for row, m in zip(body["results"], expected.map_list(), strict=True):
        got = decode_map(row["map"])
        assert got.shape == m.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, m, atol=1e-6)
    # one image as the raw body, its map as a 16-bit PNG
    r = server.client.post("/v1/score?map=png", content=png(imgs[1]), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    row = r.json()["results"][0]
    # compared with a batch of one, as the server ran it: on some CPUs another batch size takes other BLAS
    # kernels, and the calibrated map moves by a few 1e-5
    alone = detector.predict(imgs[1:2])
    check_rows([row], alone, ["body"])
    quantised = np.round(np.clip(alone.map_list()[0], 0, 1) * 65535)
    assert np.abs(decode_map(row["map"]).astype(np.float64) - quantised).max() <= 1
    assert "map" not in server.client.post("/v1/score", content=png(imgs[0])).json()["results"][0]


def test_a_twelve_bit_netpbm_body_is_scored_as_the_library_scores_the_file(server, detector, tmp_path):
    # machine-vision cameras write netpbm, 12-bit ones with maxval 4095: the server takes it under its own
    # content type and scores the same pixels as Detector.predict on the file
    grey = textured(13, 64)[..., 0].astype(np.int64) * 16  # 8-bit samples spread over 12 bits
    body = b"P5\n64 64\n4095\n" + grey.astype(">u2").tobytes()
    (tmp_path / "frame.pgm").write_bytes(body)
    r = server.client.post("/v1/score", content=body, headers={"Content-Type": "image/x-portable-graymap"})
    assert r.status_code == 200, r.text
    check_rows(r.json()["results"], detector.predict([str(tmp_path / "frame.pgm")]), ["body"])


def test_requests_arriving_together_share_a_batch(server, gate, detector):
    imgs = images()
    answers = {}
    deadline = time.monotonic() + 30  # an earlier test's abandoned request may still be scored: let it finish
    while gate.busy or server.metric("vlad_serve_queue_images"):
        gate.open.set()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    gate.open.clear()
    gate.entered.clear()

    def post(k):
        answers[k] = server.client.post("/v1/score", content=png(imgs[k % 3]),
                                        headers={"Content-Type": "application/octet-stream"})

    first = threading.Thread(target=post, args=(0,))
    first.start()
    assert gate.entered.wait(30)  # the first request holds the model
    calls_before = len(gate.calls)
    others = [threading.Thread(target=post, args=(k,)) for k in (1, 2, 3)]
    deadline = time.monotonic() + 30
    for n, t in enumerate(others, 1):  # one after the other: they queue in this order
        t.start()
        while server.metric("vlad_serve_queue_images") < n:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    gate.open.set()
    for t in [first, *others]:
        t.join(60)
    assert gate.calls[calls_before:] == [3]  # the three waiting requests: one batch of three images
    assert all(answers[k].status_code == 200 for k in range(4)), [answers[k].text for k in range(4)]
    check_rows(answers[0].json()["results"], detector.predict(imgs[:1]), ["body"])
    # float32 results depend on the batch an image is scored in (~1e-5 here): compare with that very batch
    batch = detector.predict([imgs[k % 3] for k in (1, 2, 3)])
    for i, k in enumerate((1, 2, 3)):
        check_rows(answers[k].json()["results"], pick(batch, i), ["body"])


def pick(result, i):
    """Image ``i`` of a result, as a result of one image."""
    from vlad.types import AnomalyResult

    comps = {n: AnomalyResult(c.image_scores[i:i + 1], c.map_list()[i:i + 1]) for n, c in result.components.items()}
    return AnomalyResult(result.image_scores[i:i + 1], result.map_list()[i:i + 1], result.labels[i:i + 1],
                         components=comps)


@pytest.mark.parametrize("case", ["declared", "streamed"])
def test_body_over_the_limit_is_413(server, case):
    big = os.urandom(300 * 1024)
    content = big if case == "declared" else iter([big[i:i + 65536] for i in range(0, len(big), 65536)])
    r = server.client.post("/v1/score", content=content, headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["kind"] == "body_too_large"


@pytest.mark.parametrize("body, content_type, status, kind, words", [
    ("huge", "image/png", 413, "image_too_large", "over the limit"),
    (b"not pixels", "image/png", 422, "invalid_image", "not an image"),
    (b"", "image/png", 422, "invalid_image", "empty"),
    ("truncated", "image/png", 422, "invalid_image", "truncated"),
    ("tiny", "image/png", 422, "invalid_image", "8x8"),
    ("ok", "text/plain", 415, "unsupported_media_type", "content-type"),
    ("ok", "application/json", 415, "unsupported_media_type", "multipart"),
    (b"--x\r\nbroken", "multipart/form-data; boundary=x", 400, "bad_multipart", "multipart"),
    (b"abc", "multipart/form-data", 400, "bad_multipart", "boundary"),
])
def test_bad_bodies_are_json_errors(server, body, content_type, status, kind, words):
    body = {"huge": lambda: png(textured(1, 200)), "truncated": lambda: png(textured(2))[:200],
            "tiny": lambda: png(textured(3, 4)), "ok": lambda: png(textured(4))}.get(body, lambda: body)()
    r = server.client.post("/v1/score", content=body, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["kind"] == kind and words.lower() in error["message"].lower()


def test_request_limits(server):
    files = [("image", (f"{k}.png", png(textured(k, 32)), "image/png")) for k in range(4)]
    r = server.client.post("/v1/score", files=files)
    assert r.status_code == 413 and r.json()["error"]["kind"] == "too_many_images"
    r = server.client.post("/v1/score?map=jpeg", content=png(textured(0)))
    assert r.status_code == 422 and r.json()["error"]["kind"] == "invalid_parameter"
    r = server.client.post("/v1/score", files=[("image", ("a.png", png(textured(0)), "image/png")),
                                               ("image", ("b.png", b"junk", "image/png"))])
    assert r.status_code == 422 and "b.png" in r.json()["error"]["message"]
    assert server.client.get("/v1/nothing").status_code == 404
    assert server.client.get("/v1/score").json()["error"]["kind"] == "method_not_allowed"


def test_full_queue_is_503_with_retry_after(server, gate):
    answers = []
    one = png(textured(5, 32))
    threes = [("image", (f"{k}.png", one, "image/png")) for k in range(3)]

    def post(files=None):
        answers.append(server.client.post("/v1/score", **({"files": files} if files else {"content": one})))

    holder = threading.Thread(target=post)
    holder.start()
    assert gate.entered.wait(30)
    waiting = [threading.Thread(target=post, args=(threes,)) for _ in range(2)]  # 6 images: the whole queue
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 30
    while server.metric("vlad_serve_queue_images") < 6:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = server.client.post("/v1/score", content=one)
    assert r.status_code == 503 and r.json()["error"]["kind"] == "queue_full"
    assert int(r.headers["Retry-After"]) >= 1
    gate.open.set()
    for t in [holder, *waiting]:
        t.join(60)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert server.client.post("/v1/score", content=one).status_code == 200


def test_token_is_enforced(server):
    one = png(textured(6, 32))
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").status_code == 200  # probes need no token
        assert anonymous.get("/readyz").json()["ready"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = anonymous.post("/v1/score", content=one, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        assert anonymous.get("/metrics").status_code == 401
        ok = anonymous.post("/v1/score", content=one, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200


def raw_request(port: int, body: bytes, declared: int | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {declared or len(body)}\r\n\r\n")
    s.sendall(head.encode() + body)
    return s


def test_clients_that_leave_cost_nothing(server, gate):
    one = png(textured(7, 32))
    # killed mid-upload: half a body, then the connection closes
    raw_request(server.port, one[: len(one) // 2], declared=len(one)).close()
    # mid-inference: its batch is running when it leaves; and one waiting behind it leaves too
    running = raw_request(server.port, one)
    assert gate.entered.wait(30)
    scored_before = server.metric("vlad_serve_images_total")
    waiting = raw_request(server.port, one)
    deadline = time.monotonic() + 30
    while server.metric("vlad_serve_queue_images") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiting.close()
    running.close()
    deadline = time.monotonic() + 30
    while server.metric('vlad_serve_errors_total{kind="client_disconnected"}') < 2:
        assert time.monotonic() < deadline, server.client.get("/metrics").text
        time.sleep(0.02)
    calls = len(gate.calls)
    gate.open.set()
    r = server.client.post("/v1/score", content=one)
    assert r.status_code == 200
    assert gate.calls[calls:] == [1]  # the waiting request that left was never scored
    assert server.metric("vlad_serve_images_total") == scored_before + 2  # the running one, and r
    assert server.metric("vlad_serve_queue_images") == 0
    assert server.client.get("/healthz").status_code == 200


def test_timeout_is_504(gated):
    srv = Server(gated, timeout_s=0.5, decode_threads=2)
    try:
        gated.open.clear()
        r = srv.client.post("/v1/score", content=png(textured(8, 32)))
        assert r.status_code == 504 and r.json()["error"]["kind"] == "timeout"
        gated.open.set()
        assert srv.client.get("/healthz").status_code == 200
    finally:
        gated.open.set()
        srv.close()


def test_non_loopback_without_token_is_refused(capsys, detector_dir, tmp_path):
    from vlad.errors import VladError
    from vlad.serve import check_bind, serve

    fails_with_one_line(capsys, ["serve", str(detector_dir), "--host", "0.0.0.0"], "token-file", "insecure")
    with pytest.raises(VladError, match="without a token"):
        serve(str(detector_dir), host="0.0.0.0", port=free_port())
    check_bind("0.0.0.0", "a-token")  # with a token: allowed
    check_bind("0.0.0.0", None, insecure=True)
    check_bind("localhost", None)
    empty = tmp_path / "token"
    empty.write_text("\n")
    fails_with_one_line(capsys, ["serve", str(detector_dir), "--token-file", str(empty)], "empty")
    fails_with_one_line(capsys, ["serve", str(detector_dir), "--max-images", "999"], "max_images")


SLOW_SERVER = """
import sys, time
from vlad.detector import Detector
from vlad.serve import serve

class Slow:
    def __init__(self, det):
        self._det, self._calls = det, 0
    def __getattr__(self, name):
        return getattr(self._det, name)
    def predict(self, images, on_error="raise"):
        self._calls += 1
        if self._calls > 1:  # not the warm-up
            time.sleep(2.0)
        return self._det.predict(images, on_error)

serve(Slow(Detector.load(sys.argv[1], device="cpu")), port=int(sys.argv[2]), log_level="warning")
"""


def test_sigterm_answers_the_request_in_flight_then_exits_0(detector_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(detector_dir), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            answer = {}
            t = threading.Thread(target=lambda: answer.update(r=client.post("/v1/score", content=png(textured(9, 32)))))
            t.start()
            time.sleep(0.7)  # the request is in the model (2 s)
            proc.send_signal(signal.SIGTERM)
            t.join(60)
        assert answer["r"].status_code == 200 and len(answer["r"].json()["results"]) == 1
        assert proc.wait(60) == 0, proc.communicate()[1][-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_metrics_text(server):
    text = server.client.get("/metrics").text
    for name in ("vlad_serve_requests_total", "vlad_serve_errors_total", "vlad_serve_batch_size_bucket",
                 "vlad_serve_request_seconds_bucket", "vlad_serve_queue_images", "vlad_serve_ready 1.0"):
        assert name in text, name
    assert json.loads(server.client.get("/readyz").text)["detector"] == "patchcore"


# -- behind the Ray Serve proxy's middleware (vlad.serve._ray._ProxyMiddleware), without Ray -----------------

class BodyTakenByALostReplica:
    """The hop from Ray Serve's proxy to a replica, when the replica the request was first sent to died
    after it had taken the body from the proxy's queue: the request reaches the app with its scope, and a
    ``receive`` whose body is gone (it answers only the client's disconnect)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        message = await receive()  # the lost replica read the body
        while message["type"] == "http.request" and message.get("more_body"):
            message = await receive()

        async def emptied():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return message

        await self.app(scope, emptied, send)


def test_a_request_rerouted_after_a_lost_replica_still_has_its_body(detector):
    from vlad.serve._ray import _ProxyMiddleware

    image = textured(21, 64)
    expected = detector.predict([image])
    srv = Server(detector, wrap=lambda app: _ProxyMiddleware(BodyTakenByALostReplica(app)), timeout_s=5,
                 decode_threads=2)
    try:
        r = srv.client.post("/v1/score", content=png(image), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        assert abs(r.json()["results"][0]["score"] - float(expected.image_scores[0])) <= 1e-6
        assert srv.client.get("/readyz").status_code == 200  # requests without a body pass unchanged
    finally:
        srv.close()
    # without the proxy reading the body whole, the rerouted request waits for it until the timeout
    bare = Server(detector, wrap=BodyTakenByALostReplica, timeout_s=1, decode_threads=2)
    try:
        r = bare.client.post("/v1/score", content=png(image), headers={"Content-Type": "image/png"})
        assert r.status_code == 504 and r.json()["error"]["kind"] == "timeout"
    finally:
        bare.close()


def test_the_proxy_middleware_keeps_the_body_limits(detector):
    from vlad.serve._ray import _ProxyMiddleware

    limit = 64 * 1024
    srv = Server(detector, wrap=lambda app: _ProxyMiddleware(app, max_body_bytes=limit, timeout_s=1), timeout_s=30,
                 max_body_mb=limit / 2**20, decode_threads=2)
    try:
        big = os.urandom(3 * limit)
        for content in (big, iter([big[i:i + 8192] for i in range(0, len(big), 8192)])):  # declared, streamed
            r = srv.client.post("/v1/score", content=content, headers={"Content-Type": "image/png"})
            assert r.status_code == 413 and r.json()["error"]["kind"] == "body_too_large", r.text
        one = png(textured(7, 32))
        raw_request(srv.port, one[: len(one) // 2], declared=len(one)).close()  # left mid-upload
        stalled = raw_request(srv.port, one[: len(one) // 2], declared=len(one))  # the rest never comes
        answer = ""
        try:
            while "}" not in answer:  # the head, then the JSON body
                chunk = stalled.recv(4096).decode("latin-1")
                assert chunk, f"the connection closed after {answer!r}"
                answer += chunk
        finally:
            stalled.close()
        assert answer.startswith("HTTP/1.1 504") and '"timeout"' in answer, answer
        r = srv.client.post("/v1/score", content=one, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
    finally:
        srv.close()


def test_the_timeout_counts_from_the_arrival_at_the_proxy(gated):
    """Behind the Ray Serve proxy, the time spent there (reading the body) counts toward --timeout."""
    from vlad.serve._body import ARRIVED_SCOPE_KEY

    def arrived_long_ago(app):
        async def wrapped(scope, receive, send):
            if scope["type"] == "http" and scope["method"] == "POST":
                scope = {**scope, ARRIVED_SCOPE_KEY: time.time() - 29.5}
            await app(scope, receive, send)

        return wrapped

    srv = Server(gated, wrap=arrived_long_ago, timeout_s=30, decode_threads=2)
    try:
        gated.open.clear()  # the model is busy: only the timeout answers
        t0 = time.monotonic()
        r = srv.client.post("/v1/score", content=png(textured(8, 32)), headers={"Content-Type": "image/png"})
        assert r.status_code == 504 and r.json()["error"]["kind"] == "timeout", r.text
        assert time.monotonic() - t0 < 10  # 0.5 s were left of 30, not 30
    finally:
        gated.open.set()
        srv.close()
