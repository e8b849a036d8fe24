"""The benchmarks' shared options (not their figures: nothing here is timed).

Every ``python -m vlad.bench`` target takes ``--device`` through :func:`vlad.bench._util.add_device_option`,
names the device in its header line, and reads its clock after synchronising a GPU; a device this
machine does not have is one error line, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
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
    throughput, the server's RSS at ready, after warm-up and at the end, and the closed loop's throughput
    against in-process predict (nothing timed is checked)."""
    pytest.importorskip("fastapi", reason='vlad serve needs the serve extra: pip install "vlad-inspect[serve]"')
    pytest.importorskip("httpx", reason='the serve bench needs httpx: pip install "vlad-inspect[serve]"')
    code = bench.main(["serve", "--weights", "tiny", "--refs", "4", "--size", "64", "--images", "2",
                       "--requests", "24", "--clients", "2", "--rate-share", "0.7", "--warmup", "8",
                       "--compare-seconds", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(closed loop served/in-process = " in out  # the maximum served rate, not the open loop's 70%
    assert "closed served:" in out and "0 errors" in out
    assert "open loop: poisson arrivals at" in out and "0.7 x the closed loop" in out
    assert out.count(" answered, 0 errors") == 2
    assert "reference: an ideal server scoring one image at a time" in out
    rss = next(line for line in out.splitlines() if line.startswith("server RSS"))
    assert "ready" in rss and "after 8 requests" in rss and re.search(r"growth after warm-up [+-]\d+ MB", rss), rss


def test_queue_reference_is_queueing_theory():
    """The bench's reference tail: no queueing under evenly spaced arrivals below capacity; Poisson
    arrivals at 70% load give M/D/1's mean wait (rho D / (2 (1 - rho)) + D) and a p99 about 4x the p50."""
    from vlad.bench.serve import queue_reference

    p50, p99 = queue_reference(0.1, 7.0, "even", n=20_000)
    assert p50 == pytest.approx(0.1) and p99 == pytest.approx(0.1)
    p50, p99 = queue_reference(0.1, 7.0, "poisson", n=100_000)
    assert 3.5 < p99 / p50 < 5.0
    assert p50 < 0.1 + 0.7 * 0.1 / (2 * 0.3) < p99  # the mean response time lies between them


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


def _tiny_set(root, name: str, seed: int) -> None:
    """A category in MVTec layout: textured good images, bright-square defects with their masks."""
    from PIL import Image
    from conftest import textured, with_defect

    cat = root / name / "part"
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (cat / sub).mkdir(parents=True)
    for i in range(6):
        Image.fromarray(textured(seed * 100 + i, size=64)).save(cat / "train/good" / f"{i:03d}.png")
    for i in range(3):
        Image.fromarray(textured(seed * 100 + 50 + i, size=64)).save(cat / "test/good" / f"{i:03d}.png")
        box = (10 + 8 * i, 22 + 8 * i, 20, 32)
        Image.fromarray(with_defect(textured(seed * 100 + 60 + i, size=64), box)).save(cat / "test/defect" / f"{i:03d}.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[box[0]:box[1], box[2]:box[3]] = 255
        Image.fromarray(mask).save(cat / "ground_truth/defect" / f"{i:03d}_mask.png")


def test_quality_bench_prints_each_lines_choice_beside_the_real_figure(tmp_path, capsys):
    # the autoencoder chooses its rule on synthetic defects of its own references: the table shows the
    # synthetic prediction beside the real figure, and --loso adds the fixed-rule protocol
    from vlad.bench import quality

    for i, name in enumerate(("seta", "setb")):
        _tiny_set(tmp_path / "data", name, i)
    out = tmp_path / "report.json"
    code = quality.main(["--data", str(tmp_path / "data"), "--sets", "seta,setb", "--scorers", "autoencoder",
                         "--shots", "6", "--seeds", "1", "--set", "image_size=64", "--set", "train_steps=10",
                         "--cache", str(tmp_path / "cache"), "--out", str(out), "--loso"])
    assert code == 0
    text = capsys.readouterr().out
    assert "each line's own choice on synthetic defects" in text and "synth" in text
    assert "leave-one-set-out" in text
    report = json.loads(out.read_text())
    rows = report["scorers"]["autoencoder"]["self_tuned"]
    assert [r["set"] for r in rows] == ["seta", "setb"]
    for row in rows:
        assert 0.0 <= row["synthetic_image_auroc"][0] <= 1.0 and 0.0 <= row["metrics"]["image_auroc"][0] <= 1.0
        assert row["rules"][0]  # the rule the line chose, by name
        # the ceiling of the choice: the best of the line's own candidates on the real defects, never below it
        assert row["metrics"]["image_auroc"][0] <= row["hindsight_image_auroc"][0] <= 1.0
    assert "hindsight" in text


def test_quality_bench_scores_turned_twins_of_its_sets(tmp_path, capsys):
    # --turned: each set's twin with every image turned at random (a line whose parts come at any angle)
    # joins the main table; the leave-one-set-out protocol still uses the original sets only
    from PIL import Image

    from vlad.bench import quality
    from vlad.data import load_category

    for i, name in enumerate(("seta", "setb")):
        _tiny_set(tmp_path / "data", name, i)
    source = load_category(tmp_path / "data/seta/part")
    twin = load_category(quality.make_turned_set(source.root, tmp_path / "twin", seed=3))
    assert len(twin.train_paths) == len(source.train_paths) and list(twin.labels) == list(source.labels)
    side = int(64 / np.sqrt(2))
    for path, mask in zip(twin.test_paths, twin.mask_paths):
        assert Image.open(path).size == (side, side)
        if mask is not None:
            assert Image.open(mask).size == (side, side) and set(np.unique(np.asarray(Image.open(mask)))) <= {0, 255}
    again = quality.make_turned_set(source.root, tmp_path / "again", seed=3)
    assert (again / "test/defect/000.png").read_bytes() == twin.test_paths[-3].read_bytes()
    turned, upright = (np.asarray(Image.open(c.train_paths[0])) for c in (twin, source))
    assert not np.array_equal(turned, upright[:side, :side])

    out = tmp_path / "report.json"
    code = quality.main(["--data", str(tmp_path / "data"), "--sets", "seta,setb", "--scorers", "autoencoder",
                         "--shots", "6", "--seeds", "1", "--set", "image_size=64", "--set", "train_steps=10",
                         "--cache", str(tmp_path / "cache"), "--out", str(out), "--loso", "--turned"])
    assert code == 0
    report = json.loads(out.read_text())["scorers"]["autoencoder"]
    assert [r["set"] for r in report["self_tuned"]] == ["seta", "setb", "seta_turned", "setb_turned"]
    assert [r["set"] for r in report["rows"]] == ["seta", "setb"]
    assert "seta_turned" in capsys.readouterr().out


def test_selection_bench_runs(capsys):
    """``python -m vlad.bench selection`` fits each scorer with and without the choice on synthetic defects
    and prints both times and the rule chosen (tiny networks; nothing timed is checked)."""
    code = bench.main(["selection", "--weights", "tiny", "--shots", "6", "--size", "64", "--scorers", "padim,stpm",
                       "--set", "image_size=64", "--threads", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("padim ", "stpm "))}
    assert set(rows) == {"padim", "stpm"}
    assert " - " in rows["padim"] and "mahalanobis" in rows["padim"]  # PaDiM trains nothing: no steps
    assert "product" in rows["stpm"] or "layer" in rows["stpm"]
