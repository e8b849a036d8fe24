"""Scoring a folder that holds unreadable files (issue 28): one rule on both engines.

Every readable image is scored; each unreadable one (truncated, empty, not an image, a broken link and,
unless the tests run as root, a file without read permission: ``conftest.write_bad_files``) becomes a
row with its error, the same text on the local engine and on Ray; the run ends with ``N scored, M
failed: see the error column`` and exit code 3. ``--fail-fast`` stops at the first unreadable input with
exit code 2 before any work, and an unreadable reference always does.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import fails_with_one_line, textured, with_defect, write_bad_files
from vlad.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, on its context fields


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """A folder of 6 good images (one defective) with the bad files between them, and 3 references.
    Returns the folder, the references' folder and bad file name -> the words its error says."""
    root = tmp_path_factory.mktemp("line")
    inputs, refs = root / "in", root / "refs"
    inputs.mkdir()
    refs.mkdir()
    for i in range(0, 12, 2):  # 00.png, 02.png, ...: the bad files' names (03_..., 05_...) sort between them
        Image.fromarray(with_defect(textured(i)) if i == 4 else textured(i)).save(inputs / f"{i:02d}.png")
    for i in range(3):
        Image.fromarray(textured(20 + i)).save(refs / f"r{i}.png")
    return inputs, refs, write_bad_files(inputs)


def _argv(line, out: Path, *extra: str) -> list[str]:
    inputs, refs, _ = line
    return ["score", str(inputs), "--scorer", "patchcore", "--refs", str(refs), "--weights", "tiny",
            "--device", "cpu", "--batch-size", "2", "--out", str(out), *extra]


def _summary(line) -> str:
    inputs, _, bad = line
    n = len(list(inputs.iterdir()))
    return f"{n - len(bad)} scored, {len(bad)} failed: see the error column"


def _first_bad(line) -> Path:
    inputs, _, bad = line
    return inputs / sorted(bad)[0]


def test_local_engine_scores_every_readable_image_and_lists_the_others(line, tmp_path, capsys):
    inputs, _, bad = line
    out = tmp_path / "out"
    code = main(_argv(line, out))
    printed = capsys.readouterr().out
    assert code == 3
    assert printed.splitlines()[-1] == _summary(line)
    files = sorted(str(p) for p in inputs.iterdir())
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["file"] for r in rows] == files  # every input once, in order
    assert list(rows[0]) == ["file", "score", "label", "patchcore", "error"]
    for r in rows:
        name = Path(r["file"]).name
        if name in bad:
            assert r["error"].startswith(f"{r['file']}: {bad[name]}"), r["error"]
            assert r["score"] == r["label"] == r["patchcore"] == ""
            assert r["error"] in printed  # the table's error column
        else:
            assert r["error"] == "" and 0.0 <= float(r["score"]) <= 1.0 and r["label"] in ("normal", "anomalous")
    doc = json.loads((out / "scores.json").read_text())
    assert (doc["n_scored"], doc["n_failed"]) == (len(files) - len(bad), len(bad))
    by_file = {r["file"]: r for r in doc["results"]}
    for r in rows:
        j = by_file[r["file"]]
        assert (j["error"] or "") == r["error"]
        if r["error"]:
            assert j["score"] is None and j["label"] is None and j["overlay"] is None
            assert j["components"] == {"patchcore": None}
        else:
            assert (out / j["overlay"]).is_file()
    assert len(list((out / "overlays").iterdir())) == len(files) - len(bad)


def test_local_engine_fail_fast_stops_at_the_first_before_any_work(line, tmp_path, capsys, monkeypatch):
    from vlad.detector import Detector

    def no_work(self, *args, **kwargs):
        raise AssertionError("a detector was fitted or used before the inputs were checked")

    monkeypatch.setattr(Detector, "fit", no_work)
    monkeypatch.setattr(Detector, "predict", no_work)
    out = tmp_path / "out"
    err = fails_with_one_line(capsys, _argv(line, out, "--fail-fast"), str(_first_bad(line)), "truncated")
    assert err == f"vlad: error: {_first_bad(line)}: corrupt or truncated image (image file is truncated)"
    assert not (out / "scores.csv").exists()


def test_an_unreadable_reference_is_an_error_before_any_work(line, tmp_path, capsys):
    inputs, refs, _ = line
    mixed = tmp_path / "refs"
    mixed.mkdir()
    for p in refs.iterdir():
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / "r9.png").write_bytes(b"")
    out = tmp_path / "out"
    argv = ["score", str(inputs / "00.png"), "--scorer", "patchcore", "--refs", str(mixed), "--weights", "tiny",
            "--device", "cpu", "--out", str(out)]
    fails_with_one_line(capsys, argv, str(mixed / "r9.png"), "the file is empty")
    assert not (out / "scores.csv").exists()


def test_a_saved_detector_follows_the_same_rule(line, tmp_path, capsys):
    import vlad

    inputs, refs, _ = line
    det = vlad.create_detector("patchcore", weights="tiny", device="cpu").fit(sorted(map(str, refs.iterdir())))
    base = ["score", str(inputs), "--load", str(det.save(tmp_path / "det")), "--device", "cpu"]
    assert main(base) == 3
    assert capsys.readouterr().out.splitlines()[-1] == _summary(line)
    first = fails_with_one_line(capsys, [*base, "--fail-fast"], str(_first_bad(line)))
    try:
        import ray  # noqa: F401 - the Ray engine's check runs before Ray starts
    except ImportError:
        return
    out = tmp_path / "ray"
    assert fails_with_one_line(capsys, [*base, "--fail-fast", "--engine", "ray", "--out", str(out)]) == first
    assert not (out / "scores").exists()


def test_archive_rows_say_what_predict_says(line):
    """The Ray workers' rows (vlad.distributed.rows, no Ray needed) and Detector.predict(on_error="skip")
    give the same scores and the same error texts."""
    import vlad
    from vlad.distributed.rows import score_paths

    inputs, refs, bad = line
    det = vlad.create_detector("patchcore", weights="tiny", device="cpu").fit(sorted(map(str, refs.iterdir())))
    paths = sorted(str(p) for p in inputs.iterdir())
    rows = score_paths(det, paths)
    res = det.predict(paths, on_error="skip")
    assert [r["path"] for r in rows] == paths
    assert {f.index: f.error for f in res.failures} == {i: r["error"] for i, r in enumerate(rows) if r["error"]}
    assert len(res.failures) == len(bad)
    scores = [r["score"] for r in rows if r["error"] is None]
    assert scores == pytest.approx(res.image_scores.tolist(), abs=1e-6)


@pytest.mark.slow
def test_both_engines_give_the_same_rows_summary_and_exit_code(ray_session, line, tmp_path, capsys):
    from vlad.distributed import read_scores

    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    assert main(_argv(line, local_out)) == 3
    local_printed = capsys.readouterr().out
    assert main(_argv(line, ray_out, "--engine", "ray")) == 3
    ray_printed = capsys.readouterr().out
    assert local_printed.splitlines()[-1] == ray_printed.splitlines()[-1] == _summary(line)
    local = json.loads((local_out / "scores.json").read_text())["results"]
    archive = read_scores(ray_out).to_pylist()
    assert [r["path"] for r in archive] == [r["file"] for r in local]
    for a, b in zip(local, archive):
        assert a["error"] == b["error"]  # the same text, or None on both
        assert a["label"] == b["label"]
        assert (a["score"] is None and b["score"] is None) or a["score"] == pytest.approx(b["score"], abs=1e-5)
    # --fail-fast: the same one line, exit code 2, before any work (no detector saved, no Ray job)
    ray_fast = tmp_path / "ray_fast"
    lines = [fails_with_one_line(capsys, _argv(line, out, "--fail-fast", *engine), str(_first_bad(line)))
             for out, engine in ((tmp_path / "local_fast", ()), (ray_fast, ("--engine", "ray")))]
    assert lines[0] == lines[1]
    assert not (ray_fast / "detector").exists() and not (ray_fast / "scores").exists()
