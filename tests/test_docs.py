"""The documentation site: ``mkdocs build --strict`` passes, and the docs' Python examples run.

Every ```` ```python ```` block of ``README.md`` and ``docs/**/*.md`` runs here, offline, with the tiny
random-init twins of the real models: the blocks of one page run in order in one namespace (a page's
later examples use what its earlier ones built), from a scratch folder that holds the repository's
``demo/`` (the example images the docs use). A block that cannot run here (real weights, a GPU, a Ray
cluster, a running server) is marked by an HTML comment right before it::

    <!-- no-run: why -->

and is skipped; the test counts the blocks that ran, so a page cannot quietly mark everything no-run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

#: At least this many blocks must run (there are more; this catches a parser that finds nothing).
MIN_BLOCKS_RUN = 25

FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
NO_RUN = re.compile(r"<!--\s*no-run\b")

#: What every scorer is built with here, whatever the example says: the tiny twins on the CPU, and
#: small training budgets (the examples show real settings; here they only have to run).
TEST_DEFAULTS: dict[str, object] = {"weights": "tiny", "device": "cpu"}
CHEAP: dict[str, dict] = {
    "anomalydino": dict(rotations=1),
    "autoencoder": dict(image_size=64, train_steps=3, batch_size=4),
    "draem": dict(image_size=64, train_steps=3, batch_size=4, validation_fraction=0.0),
    "efficientad": dict(image_size=96, train_steps=3, batch_size=4),
    "fastflow": dict(epochs=1, flow_steps=2),
    "maeday": dict(n_masks=4),
    "musc": dict(backbone="vit_small_patch14_dinov2.lvd142m", image_size=112),
    "patchsvdd": dict(epochs=1, hidden_dim=32, out_dim=8),
    "stpm": dict(train_steps=3, batch_size=4),
}


def blocks(page: Path) -> list[tuple[int, str, bool]]:
    """``(line, code, runs)`` for each Python block of ``page``; ``runs`` is False after a no-run mark."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        marked = bool(before) and NO_RUN.search(before[-1]) is not None
        indent = m.group("indent")
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line
                         for line in m.group("body").splitlines())
        out.append((text.count("\n", 0, m.start()) + 1, code, not marked))
    return out


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


# -- the site -------------------------------------------------------------------------------------------
def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mkdocs is not installed in CI: pip install -e '.[docs]' (or '.[dev]')")
        pytest.skip("mkdocs not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for member in ("vlad.detector.detector.Detector.predict", "vlad.types.AnomalyResult", "vlad.runtime.load"):
        assert f'id="{member}"' in api, f"{member} did not render in the API reference"
    patchcore = (tmp_path / "site" / "scorers" / "patchcore" / "index.html").read_text(encoding="utf-8")
    assert 'id="vlad.scorers.patchcore.PatchCore"' in patchcore


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        assert page.relative_to(DOCS).as_posix() in nav, f"{page} is not in mkdocs.yml's nav"


def test_every_scorer_has_a_page():
    from vlad.registry import _BUILTIN  # built-in scorers only: other tests register toy plugins

    assert len(_BUILTIN) >= 13
    for name in sorted(_BUILTIN):
        page = DOCS / "scorers" / f"{name}.md"
        assert page.is_file(), f"no page for scorer {name!r}"
        assert "::: vlad.scorers." in page.read_text(encoding="utf-8")


# -- the examples ---------------------------------------------------------------------------------------
@pytest.fixture
def tiny_models(monkeypatch):
    """Every ``create_scorer`` (also inside ``create_detector``) builds the tiny twin on the CPU, cheaply."""
    import vlad
    import vlad.detector.spec
    import vlad.registry

    real = vlad.registry.create_scorer

    def create_scorer(name, **params):
        params.update(TEST_DEFAULTS)
        params.update(CHEAP.get(name, {}))
        return real(name, **params)

    for module in (vlad, vlad.registry, vlad.detector.spec):
        monkeypatch.setattr(module, "create_scorer", create_scorer)
    return create_scorer


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # the tiny networks run faster on one thread of a shared machine
@pytest.mark.parametrize("page", [p for p in PAGES if any(runs for _, _, runs in blocks(p))], ids=_page_id)
def test_examples_run(page, tiny_models, tmp_path, monkeypatch):
    (tmp_path / "demo").symlink_to(ROOT / "demo", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs_example__"}
    ran = 0
    for line, code, runs in blocks(page):
        if not runs:
            continue
        try:
            exec(compile(code, f"{_page_id(page)}:{line}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - name the block, keep the traceback
            raise AssertionError(f"the example at {_page_id(page)} line {line} failed: {exc!r}") from exc
        ran += 1


def test_enough_examples_are_marked_to_run():
    runnable = sum(runs for page in PAGES for _, _, runs in blocks(page))
    assert runnable >= MIN_BLOCKS_RUN, f"only {runnable} runnable Python blocks in the docs"
    for page in PAGES:
        for line, code, runs in blocks(page):
            if not runs:  # a no-run block must still be Python
                compile(code, f"{_page_id(page)}:{line}", "exec")
