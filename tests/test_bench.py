"""The benchmarks' shared options (not their figures: nothing here is timed).

Every ``python -m vlad.bench`` target takes ``--device`` through :func:`vlad.bench._util.add_device_option`,
names the device in its header line, and reads its clock after synchronising a GPU; a device this
machine does not have is one error line, not a traceback.
"""

from __future__ import annotations

import argparse

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
