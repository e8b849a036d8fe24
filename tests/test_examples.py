"""The README's first command scores the example images shipped in demo/examples (tiny twins here)."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest

from vlad.cli import main
from vlad.images import IMAGE_SUFFIXES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "demo" / "examples"


def _readme_score_command() -> list[str]:
    """The ``vlad score ...`` part of the README's quick-start command, as arguments."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    parts = [p.strip() for p in block.replace("\\\n", " ").split("&&")]
    score = next(p for p in parts if p.startswith("vlad score"))
    return shlex.split(score)[1:]


def test_examples_are_small_and_licensed():
    images = [p for p in EXAMPLES.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    assert 0 < len(images) <= 8
    assert sum(p.stat().st_size for p in images) <= 2 * 1024 * 1024
    for folder in {p.parent.parent for p in images}:
        licence = (folder / "LICENSE.md").read_text(encoding="utf-8")
        assert "CC BY-NC-SA 4.0" in licence and "MPDD" in licence


@pytest.mark.slow
def test_readme_first_command_scores_the_shipped_examples(tmp_path, monkeypatch, capsys):
    argv = _readme_score_command()
    assert argv[0] == "score" and argv[1].startswith("demo/examples/")
    assert argv[argv.index("--weights") + 1] == "random"  # works without the model hub
    argv[argv.index("--weights") + 1] = "tiny"  # the same command with the tiny twins, for speed
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    monkeypatch.chdir(ROOT)  # the README runs it from the repository root
    code = main([*argv, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    tested = sorted(p.name for p in (ROOT / argv[1]).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    assert sorted(Path(r["file"]).name for r in rows) == tested
    assert "3 references" in captured.out
    # the last line says what the labels promise: 3 references cannot guarantee 5%, only 1/4
    assert ("3 references: the lowest false-alarm rate that can be guaranteed is 25%; add 16 more for 5%"
            in captured.out)
    info = json.loads((tmp_path / "out" / "scores.json").read_text())["thresholds"]
    assert info["rule"] == "best-available" and info["guaranteed_rate"] == 0.25
