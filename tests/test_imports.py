"""``import vlad`` stays light: no model or numeric library is imported until a scorer needs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "transformers", "open_clip", "sklearn", "scipy", "gradio", "numpy")


def _modules_after(code: str) -> list[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import vlad",
    "import vlad; vlad.list_scorers(); vlad.VladError; vlad.InvalidImageError",
    "import vlad.cli; vlad.cli.build_parser()",
    "from vlad.cli import main; main(['list'])",
])
def test_light_imports(code):
    assert _modules_after(code) == []


def test_heavy_libraries_arrive_with_a_scorer():
    """The probe can see imports (so the test above can fail): building a scorer brings torch."""
    assert "torch" in _modules_after("import vlad; vlad.create_scorer('patchcore')")


def test_a_scorer_does_not_import_scikit_learn():
    """Fitting and scoring with PatchCore imports neither scikit-learn nor SciPy (about 145 MB and 1 s
    when pandas is installed); the NotFittedError raised before fit still is scikit-learn's."""
    code = (
        "import numpy as np, vlad\n"
        "imgs = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(3)]\n"
        "s = vlad.create_scorer('patchcore', weights='tiny')\n"
        "s.fit(imgs[:2]); s.predict(imgs[2:])"
    )
    loaded = _modules_after(code)
    assert "torch" in loaded and "sklearn" not in loaded and "scipy" not in loaded
    raised = _modules_after(
        "import vlad\ntry:\n    vlad.create_scorer('patchcore').predict([])\nexcept vlad.NotFittedError as e:\n"
        "    from sklearn.exceptions import NotFittedError\n    assert isinstance(e, NotFittedError)"
    )
    assert "sklearn" in raised


def test_not_fitted_error_is_still_scikit_learns():
    from sklearn.exceptions import NotFittedError as SklearnNotFittedError

    import vlad
    from vlad.errors import NotFittedError

    assert vlad.NotFittedError is NotFittedError
    assert issubclass(NotFittedError, SklearnNotFittedError) and issubclass(NotFittedError, vlad.VladError)
    assert NotFittedError.__module__ == "vlad.errors"


def test_version_is_the_installed_distributions(capsys):
    """``vlad.__version__`` and ``vlad --version`` both say pyproject.toml's version (from the metadata)."""
    import tomllib
    from pathlib import Path

    import vlad
    from vlad.cli import main

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert vlad.__version__ == declared
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vlad {declared}"
