"""The server's Prometheus metrics, in a registry of its own (two apps in one process do not collide)."""

from __future__ import annotations

#: the paths counted by name in ``vlad_serve_requests_total`` (anything else is ``other``)
PATHS = ("/v1/score", "/healthz", "/readyz", "/metrics")


class Metrics:
    """Counters, histograms and gauges of one app; ``render()`` gives the Prometheus text."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("vlad_serve_requests", "HTTP requests answered, by path and status code",
                                ["path", "status"], registry=r)
        self.errors = Counter("vlad_serve_errors", "requests that did not get scores, by kind of error",
                              ["kind"], registry=r)
        self.images = Counter("vlad_serve_images", "images scored", registry=r)
        self.batch_size = Histogram("vlad_serve_batch_size", "images per batch handed to the model",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_seconds = Histogram("vlad_serve_batch_seconds", "time the model took per batch",
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.latency = Histogram("vlad_serve_request_seconds", "time from a scoring request's arrival to its answer",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.queue_depth = Gauge("vlad_serve_queue_images", "images admitted and not yet handed to the model",
                                 registry=r)
        self.ready = Gauge("vlad_serve_ready", "1 once the detector is loaded and warmed up", registry=r)

    def on_batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.batch_seconds.observe(seconds)
        self.images.inc(n)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
