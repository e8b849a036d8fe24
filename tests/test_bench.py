"""The benchmarks' shared options (not their figures: nothing here is timed).

Every ``python -m vlad.bench`` target takes ``--device`` through :func:`vlad.bench._util.add_device_option`,
names the device in its header line, and reads its clock after synchronising a GPU; a device this
machine does not have is one error line, not a traceback.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from vlad import bench
from vlad.bench import _util


@pytest.fixture(autouse=True)
def _cpu_again():
    yield
    _util._device = None  # the benchmark device is process state: leave the CPU for the next test


@pytest.mark.parametrize("target", bench.targets())
def test_every_target_takes_device(target, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main([target, "--help"])
    assert exit_.value.code == 0
    assert "--device" in capsys.readouterr().out


def test_a_missing_device_is_one_line(capsys):
    assert bench.main(["coreset", "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpu0" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        assert bench.main(["coreset", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_small_target_runs_on_the_device_it_names(capsys):
    assert bench.main(["coreset", "--n", "400", "--dim", "16", "--ref-steps", "5", "--device", "cpu"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("machine:") and "device cpu" in header


def test_clock_waits_for_the_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    assert _util.use_device(argparse.Namespace(device="cpu")) == "cpu"
    _util.clock()
    _util.median_seconds(lambda: None, repeats=2, warmup=0)
    assert calls == []  # nothing to wait for on the CPU
    _util._device = torch.device("cuda")  # as use_device sets it on a GPU machine
    _util.clock()
    assert calls == [torch.device("cuda")]
    _util.paired_seconds(lambda: None, lambda: None, repeats=1)
    assert len(calls) == 1 + 3  # each timed point of the pair
    assert _util.device_args() == ["--device", "cuda"]


@pytest.mark.slow
def test_serve_bench_open_loop_runs(capsys):
    """A tiny run of ``python -m vlad.bench serve``: the closed loop, then the open loop at a share of its
    throughput, and the server's RSS at ready, after warm-up and at the end (nothing timed is checked)."""
    pytest.importorskip("fastapi", reason='vlad serve needs the serve extra: pip install "vlad-inspect[serve]"')
    pytest.importorskip("httpx", reason='the serve bench needs httpx: pip install "vlad-inspect[serve]"')
    code = bench.main(["serve", "--weights", "tiny", "--refs", "4", "--size", "64", "--images", "2",
                       "--requests", "24", "--clients", "2", "--rate-share", "0.7", "--warmup", "8",
                       "--compare-seconds", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "closed served:" in out and "0 errors" in out
    assert "open loop: poisson arrivals at" in out and "0.7 x the closed loop" in out
    assert out.count(" answered, 0 errors") == 2
    rss = next(line for line in out.splitlines() if line.startswith("server RSS"))
    assert "ready" in rss and "after 8 requests" in rss and re.search(r"growth after warm-up [+-]\d+ MB", rss), rss


def test_serve_bench_open_loop_paces_arrivals():
    """The open loop sends at the rate asked, whatever the server's pace (here: a server that never
    answers within the run), and skips arrivals beyond the in-flight cap."""
    pytest.importorskip("httpx")
    import asyncio
    import socket
    import threading

    from vlad.bench.serve import _open_load

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    held = []
    stop = threading.Event()

    def accept():  # accept and never answer
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        lat, errors, wall, n, skipped, offered = asyncio.run(_open_load(
            f"http://127.0.0.1:{port}", [b"x"], rate=50.0, duration=0.5, requests=None, timeout=1.0,
            max_in_flight=10, arrivals="even"))
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        listener.close()
    assert n == 0 and not lat
    assert 20 <= offered <= 60  # 25 arrivals in 0.5 s, sent without waiting for answers (closed: ~10/s)
    assert skipped == 25 - 10  # only the cap's worth were sent; the rest were skipped
    assert sum(errors.values()) == 10  # each sent one timed out
