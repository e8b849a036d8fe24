"""Dynamic micro-batching: the requests that arrive within ``max_wait`` go to the model as one batch.

One thread owns the detector (a single-thread executor: torch models are not re-entered, and a GPU gets
one stream of work). A collector task on the event loop takes the waiting jobs (one job = one request's
decoded images), waits up to ``max_wait`` after the oldest one arrived for more, and hands the model up to
``max_batch`` images at once; while the model runs, new jobs wait, so under load every batch fills
without waiting. Jobs stay whole (a request's images are never split across batches); a job larger than
``max_batch`` goes alone. A job whose client left or timed out before its batch started is skipped.

Admission is counted in images: :meth:`MicroBatcher.admit` refuses a request whose images would take
the images admitted but not yet handed to the model over ``max_queued`` (the caller answers 503), before
any of them is decoded.

This module needs no web framework (plain asyncio and threads).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("vlad.serve")


@dataclass(eq=False)
class Job:
    """One request's images on their way to the model; ``future`` gets ``(result, start, stop)``: the
    batch's :class:`~vlad.types.AnomalyResult` and this job's slice of it."""

    images: Sequence[Any]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Feeds ``predict`` (called in the model thread with a list of images, returns an
    :class:`~vlad.types.AnomalyResult` in input order) batches of up to ``max_batch`` images.

    ``merge=False`` never puts two requests in one batch (for detectors that score a call's images
    against each other, ``Detector.batch_scoring``: another request's images would change the answer).
    ``on_batch(n_images, seconds)`` is called after every batch the model ran (for metrics).
    Create and use it on the event loop; :meth:`start` before the first :meth:`submit`.
    """

    def __init__(self, predict: Callable[[list], Any], max_batch: int, max_wait_s: float, max_queued: int,
                 merge: bool = True, on_batch: Callable[[int, float], None] | None = None) -> None:
        self._predict = predict
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.merge = merge
        self._on_batch = on_batch
        self.admitted = 0  # images admitted and not yet handed to the model (being decoded, or waiting)
        self._jobs: collections.deque[Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlad-serve-model")
        self.last_batch_s = 0.0

    # -- the event loop side -----------------------------------------------------------------
    def start(self) -> None:
        """Start the collector task on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="vlad-serve-batcher")

    def admit(self, n: int) -> bool:
        """Reserve room for ``n`` images; False when the queue is full (nothing reserved)."""
        if self._stopping or self.admitted + n > self.max_queued:
            return False
        self.admitted += n
        return True

    def release(self, n: int) -> None:
        """Give back the room of ``n`` admitted images that will not be submitted (a request that failed)."""
        self.admitted = max(0, self.admitted - n)

    def submit(self, images: Sequence[Any]) -> Job:
        """Queue the (admitted, decoded) ``images`` of one request; await ``job.future`` for the answer.
        Cancelling the future before its batch starts takes the job out of the model's way."""
        job = Job(images, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._wake.set()
        return job

    def retry_after_s(self) -> int:
        """A guess at when room frees up: the queued batches times the last batch's duration (>= 1 s)."""
        batches = max(1, -(-self.admitted // max(1, self.max_batch)))
        return max(1, int(round(batches * self.last_batch_s + 0.5)))

    async def run_in_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the model thread, between batches (the warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._model, fn)

    async def stop(self) -> None:
        """Answer every job already queued, then stop the collector and the model thread."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self._model.shutdown(wait=True)

    # -- the collector -----------------------------------------------------------------------
    def _waiting_images(self) -> int:
        return sum(len(j.images) for j in self._jobs if not j.future.done())

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
            if self.merge:  # wait for company until max_wait after the oldest job arrived, or a full batch
                deadline = loop.time() + max(0.0, self._jobs[0].enqueued + self.max_wait_s - time.perf_counter())
                while self._waiting_images() < self.max_batch and not self._stopping:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
            batch, n = self._take()
            if batch:
                await self._run(batch)

    def _take(self) -> tuple[list[Job], int]:
        """Whole jobs from the front, up to ``max_batch`` images (the first live job always); the jobs
        whose client is gone are dropped on the way."""
        batch: list[Job] = []
        n = 0
        while self._jobs:
            job = self._jobs[0]
            if job.future.done():  # cancelled: the client left or its time ran out
                self._jobs.popleft()
                self.release(len(job.images))
                continue
            if batch and (not self.merge or n + len(job.images) > self.max_batch):
                break
            self._jobs.popleft()
            self.release(len(job.images))
            batch.append(job)
            n += len(job.images)
        return batch, n

    async def _run(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        images = [img for job in batch for img in job.images]
        t0 = time.perf_counter()
        try:
            result = await loop.run_in_executor(self._model, self._predict, images)
        except Exception as exc:  # noqa: BLE001 - answered to the requests, never lost
            if len(batch) > 1:  # one request's image may be the cause: each alone, so only it fails
                logger.warning("a batch of %d requests failed (%s); scoring them one by one", len(batch), exc)
                for job in batch:
                    if not job.future.done():
                        await self._run([job])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        self.last_batch_s = time.perf_counter() - t0
        if self._on_batch is not None:
            self._on_batch(len(images), self.last_batch_s)
        start = 0
        for job in batch:
            stop = start + len(job.images)
            if not job.future.done():
                job.future.set_result((result, start, stop))
            start = stop
