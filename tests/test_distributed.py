"""vlad.distributed and ``vlad score --engine ray``: every input exactly once, equal to plain scoring.

The Ray tests share one local Ray (2 CPUs, a small object store) per module and a tiny-twin detector
saved once; they score real images copied from ``../shared/data`` (skipped when it is absent) plus a
corrupt file. They skip without Ray (``pip install -e ".[ray]"``); the input and CLI checks run always.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fails_with_one_line

import vlad
from vlad.cli import main
from vlad.distributed.inputs import expand_inputs
from vlad.errors import VladError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, on its context fields

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BOTTLE = DATA / "mvtec_bottle" / "bottle"
KSDD = DATA / "ksdd" / "commutator"


# -- inputs (no Ray needed) ---------------------------------------------------------------------------

def test_expand_inputs_folders_globs_lists(tmp_path):
    from PIL import Image

    (tmp_path / "a" / "sub").mkdir(parents=True)
    for rel in ("a/1.png", "a/2.jpg", "a/sub/3.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / rel)
    (tmp_path / "a" / "notes.md").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text("# archive of line 2\na/sub/3.png\n\n" + str(tmp_path / "a" / "1.png") + "\nmissing.png\n")
    folder = [str(tmp_path / "a" / n) for n in ("1.png", "2.jpg")]
    assert expand_inputs(tmp_path / "a") == folder
    assert expand_inputs(tmp_path / "a", recursive=True) == [*folder, str(tmp_path / "a" / "sub" / "3.png")]
    assert expand_inputs(str(tmp_path / "**" / "*.png")) == [str(tmp_path / "a" / "1.png"),
                                                               str(tmp_path / "a" / "sub" / "3.png")]
    # a list file: relative to its folder, comments skipped, missing files kept (they become error rows);
    # every path once, at its first place
    assert expand_inputs([listing, tmp_path / "a"]) == [str(tmp_path / "a" / "sub" / "3.png"),
                                                       str(tmp_path / "a" / "1.png"), str(tmp_path / "missing.png"),
                                                       str(tmp_path / "a" / "2.jpg")]
    with pytest.raises(VladError, match="matches no file"):
        expand_inputs(str(tmp_path / "*.tif"))


# -- CLI mistakes: one line, exit 2 ---------------------------------------------------------------------


def test_engine_ray_without_ray(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    fails_with_one_line(capsys, ["score", str(tmp_path), "--engine", "ray", "--out", str(tmp_path / "o")],
                         "vlad-inspect[ray]")


def test_engine_options_checked(capsys, tmp_path):
    fails_with_one_line(capsys, ["score", str(tmp_path), "--engine", "ray", "--num-workers", "0"], "num-workers")
    fails_with_one_line(capsys, ["score", str(tmp_path), "--num-workers", "2"], "--engine ray")
    fails_with_one_line(capsys, ["score", str(tmp_path), "--load", str(tmp_path), "--scorer", "patchcore"],
                         "--load", "--scorer")


@pytest.mark.parametrize("value", ["0", "-0.5", "abc", "nan", "inf", "1.5"])
def test_gpus_per_worker_must_be_a_number_of_gpus(capsys, tmp_path, value):
    # checked before Ray is imported or anything is read: no Ray needed
    fails_with_one_line(capsys, ["score", str(tmp_path), "--load", str(tmp_path), "--engine", "ray", "--out",
                                 str(tmp_path / "o"), f"--gpus-per-worker={value}"], "--gpus-per-worker")


def test_gpus_per_worker_and_device_fit_together(capsys, tmp_path):
    base = ["score", str(tmp_path), "--load", str(tmp_path), "--out", str(tmp_path / "o")]
    fails_with_one_line(capsys, [*base, "--gpus-per-worker", "1"], "--engine ray")
    # Ray hides every GPU from a worker that reserved none: --device cuda alone would fail in every worker
    fails_with_one_line(capsys, [*base, "--engine", "ray", "--device", "cuda"], "--device", "--gpus-per-worker")
    fails_with_one_line(capsys, [*base, "--engine", "ray", "--device", "cpu", "--gpus-per-worker", "0.5"],
                        "--device", "--gpus-per-worker")
    from vlad.distributed import score
    from vlad.errors import InvalidParameterError

    for bad in (0, -1, True, "half", float("nan")):
        with pytest.raises(InvalidParameterError, match="gpus_per_worker"):
            score(tmp_path, tmp_path, tmp_path / "o", gpus_per_worker=bad)
    with pytest.raises(InvalidParameterError, match="gpus_per_worker"):
        score(tmp_path, tmp_path, tmp_path / "o", device="cuda")


def test_gpu_workers_fit_on_the_cluster():
    from vlad.distributed.engine import check_gpus_per_worker, gpu_capacity, worker_device

    assert gpu_capacity([1.0], 0.5) == 2 and gpu_capacity([1.0, 2.0], 0.4) == 6  # 0.4: 2 per GPU, not 2.5
    assert gpu_capacity([1.0, 2.0], 1) == 3 and gpu_capacity([1.0, 2.0, 4.0], 2) == 3 and gpu_capacity([0.0], 0.5) == 0
    assert check_gpus_per_worker("0.25") == 0.25 and check_gpus_per_worker(2) == 2.0
    assert check_gpus_per_worker(None) is None
    assert worker_device(None, 0.5) == "cuda" and worker_device("cuda:0", 1.0) == "cuda"  # the actor's own GPU
    assert worker_device(None, None) is None and worker_device("cpu", None) == "cpu"  # CPU workers: as today


def test_engine_ray_needs_out_and_a_reachable_cluster(capsys, tmp_path):
    pytest.importorskip("ray")
    fails_with_one_line(capsys, ["score", str(tmp_path), "--engine", "ray"], "--out")
    fails_with_one_line(capsys, ["score", str(tmp_path), "--engine", "ray", "--out", str(tmp_path / "o"),
                                  "--address", "127.0.0.1:1"], "cannot reach", "127.0.0.1:1")
    fails_with_one_line(capsys, ["score", str(tmp_path), "--engine", "ray", "--out", str(tmp_path / "o"),
                                  "--address", "nowhere"], "HOST:PORT")


# -- Ray: one session per module (conftest.ray_session) ------------------------------------------------

@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A folder of real images (two sizes, grey and colour) plus a corrupt file, and the readable ones."""
    if not BOTTLE.is_dir() or not KSDD.is_dir():
        pytest.skip(f"benchmark images not found under {DATA}")
    folder = tmp_path_factory.mktemp("archive")
    picks = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[:4] + sorted((KSDD / "test" / "good").glob("*.png"))[:2]
    good = []
    for i, src in enumerate(picks):
        good.append(folder / f"{i:02d}_{src.name}")
        shutil.copy(src, good[-1])
    (folder / "99_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return folder, good


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory, archive) -> Path:
    import vlad

    refs = [str(p) for p in sorted((BOTTLE / "train" / "good").glob("*.png"))[:3]]
    det = vlad.create_detector("patchcore+anomalydino", weights="tiny", device="cpu", batch_size=2).fit(refs)
    return det.save(tmp_path_factory.mktemp("det") / "detector")


def _plain_scores(capsys, paths, detector_dir, out) -> dict[str, dict]:
    """``vlad score --load`` (the local engine) on the same images: path -> row of scores.json."""
    assert main(["score", *map(str, paths), "--load", str(detector_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    return {r["file"]: r for r in json.loads((out / "scores.json").read_text())["results"]}


def _rows(out) -> list[dict]:
    from vlad.distributed import read_scores

    return read_scores(out).to_pylist()


def _fake_gpus(monkeypatch, ray, *counts: float) -> None:
    """Ray reports alive nodes with these GPU counts (whatever this machine has)."""
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0, "GPU": float(n)}}
                                               for n in counts])


@pytest.fixture
def good_folder(tmp_path):
    from conftest import textured
    from PIL import Image

    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(textured(i)).save(folder / f"{i}.png")
    return folder


def test_gpu_workers_on_a_cluster_without_room_stop_before_any_work(ray_session, monkeypatch, capsys, tmp_path,
                                                                   good_folder):
    from vlad.distributed import engine

    def never(*args, **kwargs):
        raise AssertionError("the job started")

    monkeypatch.setattr(engine, "run", never)
    fit = ["score", str(good_folder), "--scorer", "padim", "--refs", str(good_folder), "--weights", "tiny",
           "--engine", "ray", "--out", str(tmp_path / "o")]
    _fake_gpus(monkeypatch, ray_session, 0, 0)
    fails_with_one_line(capsys, [*fit, "--gpus-per-worker", "0.5"], "--gpus-per-worker", "no GPUs")
    assert not (tmp_path / "o" / "detector").exists()  # nothing fitted
    _fake_gpus(monkeypatch, ray_session, 1)
    fails_with_one_line(capsys, [*fit, "--gpus-per-worker", "0.5", "--num-workers", "3"], "--num-workers",
                        "room for 2")
    fails_with_one_line(capsys, [*fit, "--gpus-per-worker", "2"], "--gpus-per-worker", "largest has 1")
    assert not (tmp_path / "o" / "detector").exists()
    from vlad.distributed import score
    from vlad.errors import DistributedError

    det = vlad.create_detector("padim", weights="tiny").fit(sorted(map(str, good_folder.iterdir())))
    det = det.save(tmp_path / "det")
    _fake_gpus(monkeypatch, ray_session, 0)
    with pytest.raises(DistributedError, match="no GPUs"):
        score(good_folder, det, tmp_path / "o2", gpus_per_worker=1)
    assert not list((tmp_path / "o2").glob("scores/*.parquet"))


def test_gpus_per_worker_reaches_rays_actor_pool(ray_session, monkeypatch, capsys, tmp_path, good_folder):
    import ray.data

    from vlad.distributed import engine
    from vlad.errors import VladError

    calls = []
    map_batches = ray.data.Dataset.map_batches

    def recording(self, fn, **kwargs):
        calls.append(kwargs)
        return map_batches(self, fn, **kwargs)  # lazy: nothing runs until the rows are read

    monkeypatch.setattr(ray.data.Dataset, "map_batches", recording)
    paths = [str(p) for p in sorted(good_folder.iterdir())]
    engine.run(paths, [], str(tmp_path / "det"), str(tmp_path / "o"), num_workers=2, batch_size=1, device="cuda",
               overlays=False, maps=False, gpus_per_worker=0.5)
    engine.run(paths, [], str(tmp_path / "det"), str(tmp_path / "o"), num_workers=2, batch_size=1, device=None,
               overlays=False, maps=False)
    assert calls[0]["num_gpus"] == 0.5 and calls[0]["fn_constructor_kwargs"]["device"] == "cuda"
    assert calls[0]["compute"].min_size == calls[0]["compute"].max_size == 2 and calls[0]["num_cpus"] > 0
    assert "num_gpus" not in calls[1]  # CPU workers as before
    # the command line: --gpus-per-worker and the workers' device reach the job (stopped there)
    seen = {}

    def stop(*args, **kwargs):
        seen.update(kwargs)
        raise VladError("stopped before Ray's job")

    monkeypatch.setattr(engine, "run", stop)
    _fake_gpus(monkeypatch, ray_session, 1)
    det = vlad.create_detector("padim", weights="tiny").fit(paths).save(tmp_path / "det")
    fails_with_one_line(capsys, ["score", str(good_folder), "--load", str(det), "--engine", "ray", "--out",
                                 str(tmp_path / "o"), "--num-workers", "2", "--gpus-per-worker", "0.5"], "stopped")
    assert seen["gpus_per_worker"] == 0.5 and seen["device"] == "cuda" and seen["num_workers"] == 2


#: CPU workers, and (where there is a GPU) two workers sharing one GPU; their scores are compared with the
#: local engine's on the CPU within ``tol`` (GPU workers run torch's defaults, TF32 convolutions included)
WORKERS = [pytest.param(None, 1e-5, id="cpu"), pytest.param(0.5, 1e-3, id="gpu", marks=pytest.mark.gpu)]


@pytest.mark.slow
@pytest.mark.parametrize("gpus, tol", WORKERS)
def test_ray_equals_plain_scoring(ray_session, archive, detector_dir, tmp_path, capsys, gpus, tol):
    from vlad.distributed import score

    folder, good = archive
    summary = score(folder, detector_dir, tmp_path / "out", num_workers=2, batch_size=2, maps=True,
                    gpus_per_worker=gpus)
    rows = _rows(tmp_path / "out")
    inputs = sorted(str(p) for p in folder.iterdir())
    assert [r["path"] for r in rows] == inputs  # one row per input, none twice
    assert summary.scored == len(inputs) and summary.errors == 1 and summary.skipped == 0
    bad = next(r for r in rows if r["path"].endswith("99_corrupt.png"))
    assert "corrupt" in bad["error"] and bad["score"] is None and bad["label"] is None
    plain = _plain_scores(capsys, good, detector_dir, tmp_path / "plain")
    for row in rows:
        if row is bad:
            continue
        ref = plain[row["path"]]
        assert row["error"] is None and (gpus or row["label"] == ref["label"])  # a GPU may sit a hair off
        assert row["score"] == pytest.approx(ref["score"], abs=tol)
        for name in ("patchcore", "anomalydino"):
            assert row[f"score_{name}"] == pytest.approx(ref["components"][name], abs=tol)
        assert 0.0 <= row["map_mean"] <= row["map_p99"] <= row["map_max"]
        from PIL import Image

        saved_map = np.asarray(Image.open(tmp_path / "out" / row["map"]))
        assert saved_map.shape == (row["height"], row["width"]) and saved_map.dtype == np.uint16
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == len(inputs)
    assert {w["pid"] for w in summary.workers} and all(w["peak_rss_mb"] > 0 for w in summary.workers)


@pytest.mark.slow
@pytest.mark.parametrize("gpus, tol", WORKERS)
def test_killed_worker_loses_nothing_and_duplicates_nothing(ray_session, archive, detector_dir, tmp_path, gpus, tol):
    from vlad.distributed import score

    folder, good = archive
    many = tmp_path / "many"
    many.mkdir()
    for k in range(3):  # 18 readable images, one per batch: time to kill a worker mid-job
        for p in good:
            shutil.copy(p, many / f"{k}_{p.name}")
    shutil.copy(folder / "99_corrupt.png", many / "99_corrupt.png")
    out = tmp_path / "out"
    killed: list[int] = []
    finished = threading.Event()

    def kill_first_busy_worker():
        while not finished.is_set() and not killed:
            for f in (out / "workers").glob("*.json"):
                try:
                    stats = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                if stats["batches"] >= 1:
                    os.kill(stats["pid"], signal.SIGKILL)
                    killed.append(stats["pid"])
                    break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_busy_worker, daemon=True)
    killer.start()
    summary = score(many, detector_dir, out, num_workers=2, batch_size=1, gpus_per_worker=gpus)
    finished.set()
    killer.join()
    assert killed, "no worker was killed: the job ended before the test could kill one"
    rows = _rows(out)
    inputs = sorted(str(p) for p in many.iterdir())
    assert [r["path"] for r in rows] == inputs  # every input, exactly once
    assert summary.scored == len(inputs) and sum(r["error"] is not None for r in rows) == 1
    assert sum(w["images"] for w in summary.workers if w["pid"] == killed[0]) < len(inputs)
    # the retried batches give the same scores as one process does
    first = {Path(r["path"]).name.split("_", 1)[1]: r["score"] for r in rows if r["path"].startswith(str(many / "0_"))}
    for r in rows:
        name = Path(r["path"]).name.split("_", 1)[1]
        if r["error"] is None:
            assert r["score"] == pytest.approx(first[name], abs=tol)


@pytest.mark.slow
@pytest.mark.parametrize("gpus, tol", WORKERS)
def test_restarted_job_skips_what_is_written(ray_session, archive, detector_dir, tmp_path, capsys, gpus, tol):
    from vlad.distributed import score

    folder, good = archive
    out = tmp_path / "out"
    listing = tmp_path / "first.txt"
    listing.write_text("\n".join(str(p) for p in good[:3]))
    first = score(listing, detector_dir, out, num_workers=1, gpus_per_worker=gpus)  # as if stopped after 3 of 7
    assert first.scored == 3
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("part-*.parquet")}
    assert parts
    (out / "scores" / ".part-x.parquet.tmp").write_bytes(b"half a part of a killed run")
    # the rest through the command line, which resumes the same way
    on_gpus = ["--gpus-per-worker", str(gpus)] if gpus else []
    assert main(["score", str(folder), "--load", str(detector_dir), "--engine", "ray", "--out", str(out), *on_gpus]) == 3
    printed = capsys.readouterr().out
    assert "4 rows written" in printed and "3 already written" in printed
    assert printed.splitlines()[-1] == "3 scored, 1 failed: see the error column"
    rows = _rows(out)
    assert [r["path"] for r in rows] == sorted(str(p) for p in folder.iterdir())
    assert all((out / "scores" / n).stat().st_mtime_ns == t for n, t in parts.items())  # written once
    assert not list((out / "scores").glob(".*.tmp"))
    assert json.loads((out / "manifest.json").read_text())["complete"]
    done = score(folder, detector_dir, out, num_workers=1, gpus_per_worker=gpus)  # nothing left: no Ray work
    assert (done.skipped, done.scored) == (7, 0)


def test_output_folder_of_another_detector_is_refused(tmp_path):
    pytest.importorskip("pyarrow")
    from vlad.distributed.output import OutputFolder
    from vlad.distributed.rows import output_schema
    from vlad.errors import DistributedError

    schema = output_schema(["patchcore"])
    OutputFolder(tmp_path, ("/det/a", "a" * 64), schema).open()
    with pytest.raises(DistributedError, match="another detector"):
        OutputFolder(tmp_path, ("/det/b", "b" * 64), schema).open()
    with pytest.raises(DistributedError, match="other columns"):
        folder = OutputFolder(tmp_path, ("/det/a", "a" * 64), schema)
        folder.open()
        import pyarrow as pa

        folder.write_part(pa.Table.from_pylist([{"path": "x.png"}], schema=schema))
        OutputFolder(tmp_path, ("/det/a", "a" * 64), output_schema(["patchcore"], overlays=True)).open()
