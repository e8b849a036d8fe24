"""A Ray Serve replica for tests/test_serve_ray.py that can be made to lose the race a ``ray.kill`` hits only
rarely: once armed (a file ``armed`` in ``$VLAD_TEST_RACE_DIR``), the first HTTP request one replica takes is
accepted, but the acceptance is held back from the proxy's router while the app reads the request's body;
then the replica dies. The router, never told that the request was taken, sends it to another replica.
Unarmed, it is :class:`vlad.serve._ray.VladReplica`. It replaces a method of Ray Serve's private
``Replica`` class (Ray 2.60): ``patchable()`` says whether this Ray still has it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from vlad.serve._ray import VladReplica


def patchable() -> bool:
    try:
        from ray.serve._private.replica import Replica
    except ImportError:
        return False
    return hasattr(Replica, "handle_request_with_rejection")


def _race_dir() -> Path | None:
    value = os.environ.get("VLAD_TEST_RACE_DIR")
    return Path(value) if value else None


def _take(race_dir: Path) -> bool:
    """True for the first caller once armed (across the replicas' processes)."""
    if not (race_dir / "armed").exists():
        return False
    try:
        (race_dir / "taken").mkdir()
    except FileExistsError:
        return False
    return True


class RaceReplica(VladReplica):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from ray.serve._private.replica import Replica

        if getattr(Replica, "_vlad_race", False):
            return
        original = Replica.handle_request_with_rejection

        async def handle_request_with_rejection(self, request_metadata, *request_args, **request_kwargs):
            race_dir = _race_dir()
            if race_dir is not None and request_metadata.is_http_request and _take(race_dir):
                answers = original(self, request_metadata, *request_args, **request_kwargs)
                await answers.__anext__()  # "accepted": never reaches the router
                reading = asyncio.ensure_future(answers.__anext__())  # the app starts: it reads the body
                await asyncio.sleep(1.0)
                (race_dir / "died").write_text(f"{os.getpid()} {reading.done()}")
                os._exit(1)
            async for answer in original(self, request_metadata, *request_args, **request_kwargs):
                yield answer

        Replica.handle_request_with_rejection = handle_request_with_rejection
        Replica._vlad_race = True
