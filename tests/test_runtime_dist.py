"""The vlad-runtime distribution (runtime/pyproject.toml): vlad's own runtime modules shipped as the
torch-free package ``vlad_runtime``.

Unit tests (always run): the shipped files import nothing outside the shipped set and no library
beyond the distribution's dependencies at import time, every module of ``vlad/runtime`` is shipped, the
distribution's dependencies equal vlad-inspect's ``runtime`` extra, its files all lie under
``vlad_runtime/`` (no clash with vlad-inspect), and its version is read from vlad-inspect's pyproject.

Distribution test (needs ``VLAD_RUNTIME_PYTHON``: the python of a venv without torch where the built
wheel is installed; ``.ci/run`` makes one): a tiny PatchCore and a tiny WinCLIP detector are exported,
run by ``vlad_runtime`` in that venv, and compared with torch's ``Detector.predict`` (1e-4). Unset, the
test is skipped, except under ``CI=true``, where it fails: CI must not pass without running it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_close_to_torch, textured, with_defect

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "runtime"
PACKAGE = "vlad_runtime"
#: what the shipped modules may import when imported: the distribution's dependencies (import names)
DEPENDENCIES = {"numpy", "PIL", "yaml", "onnxruntime"}
#: imports inside functions of the shipped modules that the runtime never reaches, and why
LAZY_ELSEWHERE = {
    "torch": "reached only with a tensor (vlad's torch paths through types.py and fusion.py)",
    "sklearn": "vlad.errors.NotFittedError, created on first access; the runtime never raises it",
    "safetensors": "vlad.serialization's tensor files (saved detectors); the runtime reads JSON only",
}
MAX_SITE_PACKAGES = 300 * 10**6  # bytes: onnxruntime, numpy, Pillow, PyYAML and pip (measured ~215 MB)


def _config() -> dict:
    return tomllib.loads((DIST / "pyproject.toml").read_text())


def _shipped() -> dict[str, Path]:
    """Module name in the wheel -> its source file: force-included vlad files and the package's own."""
    wheel = _config()["tool"]["hatch"]["build"]["targets"]["wheel"]
    files = {target: (DIST / source).resolve() for source, target in wheel["force-include"].items()}
    for package in wheel["packages"]:
        for path in (DIST / package).rglob("*.py"):
            files[path.relative_to(DIST).as_posix()] = path
    modules = {}
    for target, source in files.items():
        parts = target.removesuffix(".py").split("/")
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = source
    return modules


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _imports(tree: ast.Module):
    """(node, at import time): every import, and whether it runs when the module is imported (not inside a
    function, not under ``if TYPE_CHECKING:``)."""
    def walk(node, eager):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, eager
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, False)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from walk(ast.Module(body=child.body, type_ignores=[]), False)
                yield from walk(ast.Module(body=child.orelse, type_ignores=[]), eager)
            else:
                yield from walk(child, eager)

    yield from walk(tree, True)


def test_shipped_modules_import_only_each_other_and_the_dependencies():
    modules = _shipped()
    assert f"{PACKAGE}.runtime.session" in modules and f"{PACKAGE}.detector.fusion" in modules
    problems = []
    for module, source in sorted(modules.items()):
        package = module if _is_package(module, modules) else module.rpartition(".")[0]
        for node, eager in _imports(ast.parse(source.read_text(), str(source))):
            where = f"{source.relative_to(ROOT)}:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                names = [base] if node.module else [f"{base}.{a.name}" for a in node.names]
                missing = [n for n in names if n not in modules]
                if missing:
                    problems.append(f"{where}: imports {missing[0]}, which the wheel does not ship "
                                    "(add it to runtime/pyproject.toml's force-include, or do not import it)")
                continue
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top in ("vlad", PACKAGE):
                    problems.append(f"{where}: absolute import of {name}: use a relative import, so the file "
                                    f"imports its own package (vlad or {PACKAGE})")
                elif top == "__future__" or top in sys.stdlib_module_names or top in DEPENDENCIES:
                    continue
                elif eager or top not in LAZY_ELSEWHERE:
                    problems.append(f"{where}: imports {name}{' at import time' if eager else ''}, which "
                                    "vlad-runtime does not install")
    assert not problems, "\n".join(problems)


def test_every_runtime_module_is_shipped():
    shipped = {p for p in _shipped().values()}
    missing = [p.relative_to(ROOT).as_posix() for p in (ROOT / "vlad" / "runtime").glob("*.py") if p not in shipped]
    assert not missing, f"add to runtime/pyproject.toml's force-include: {missing}"


def test_dependencies_equal_the_runtime_extra():
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _config()["project"]["dependencies"] == main["optional-dependencies"]["runtime"]
    assert _config()["project"]["requires-python"] == main["requires-python"]


def test_wheel_installs_next_to_vlad_inspect():
    """Every file of the wheel lies under vlad_runtime/, so it never overwrites one of vlad-inspect's."""
    wheel = _config()["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == [PACKAGE]
    outside = [t for t in wheel["force-include"].values() if not t.startswith(f"{PACKAGE}/")]
    assert not outside, f"runtime/pyproject.toml ships files outside {PACKAGE}/: {outside}"


def test_version_comes_from_vlad_inspects_pyproject():
    """hatch reads vlad-runtime's version from ../pyproject.toml with this regex: it must find vlad-inspect's."""
    import re

    source = _config()["tool"]["hatch"]["version"]
    assert "version" not in _config()["project"] and _config()["project"]["dynamic"] == ["version"]
    assert (DIST / source["path"]).resolve() == ROOT / "pyproject.toml"
    found = re.findall(source["pattern"], (ROOT / "pyproject.toml").read_text())
    assert found == [tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]]


# --- the built distribution, in a venv without torch --------------------------------------------------

_PROBE = """
import importlib.util, json, sys, sysconfig
from pathlib import Path
import numpy as np
torch_importable = importlib.util.find_spec("torch") is not None
import vlad_runtime
for name, folder in FOLDERS.items():
    det = vlad_runtime.load(folder)
    res = det.predict(IMAGES)
    raw = det.predict_raw(IMAGES)[name]
    arrays = {f"comp_{k}": v.image_scores for k, v in res.components.items()}
    for part, r in [("", raw)] + [(f"_{p}", c) for p, c in raw.components.items()]:
        arrays[f"raw{part}_scores"], arrays[f"raw{part}_maps"] = r.image_scores, r.anomaly_maps
    np.savez(OUT[name], scores=res.image_scores, maps=res.anomaly_maps, labels=res.labels, masks=res.masks, **arrays)
pkg = Path(vlad_runtime.__file__).parent
paths = sysconfig.get_paths()
print(json.dumps({
    "version": vlad_runtime.__version__,
    "torch_importable": torch_importable,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "vlad", "sklearn", "scipy", "safetensors")),
    "package_dir": str(pkg),
    "files": sorted(p.relative_to(pkg.parent).as_posix() for p in pkg.rglob("*.py")),
    "site_packages": sorted({paths["purelib"], paths["platlib"]}),
}))
"""


@pytest.fixture(scope="module")
def runtime_python() -> str:
    python = os.environ.get("VLAD_RUNTIME_PYTHON", "")
    if not python:
        reason = ("VLAD_RUNTIME_PYTHON is unset: set it to the python of a venv without torch where the vlad-runtime "
                  "wheel is installed (.ci/run builds one: python -m build --wheel runtime/ -o dist/)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI is set, so this test must run: {reason}", pytrace=False)
        pytest.skip(reason)
    if not Path(python).is_file():
        pytest.fail(f"VLAD_RUNTIME_PYTHON={python!r} is not a file", pytrace=False)
    return python


@pytest.fixture(scope="module")
def dist_run(runtime_python, tmp_path_factory, one_thread):
    """Tiny PatchCore and WinCLIP detectors, exported, run by vlad_runtime in the runtime venv."""
    pytest.importorskip("onnxscript")
    import vlad

    tmp = tmp_path_factory.mktemp("runtime_dist")
    images = []
    for i, arr in enumerate([with_defect(textured(20)), textured(21), textured(22)]):
        from PIL import Image

        images.append(str(tmp / f"img{i}.png"))
        Image.fromarray(arr).save(images[-1])
    detectors, folders, outs = {}, {}, {}
    for spec in ("patchcore", "winclip"):
        det = vlad.create_detector(spec, weights="tiny")
        det.fit([textured(i) for i in range(4)])
        detectors[spec] = det
        folders[spec] = str(det.export(tmp / f"export_{spec}", format="onnx"))
        outs[spec] = str(tmp / f"{spec}.npz")
    script = f"FOLDERS = {folders!r}\nIMAGES = {images!r}\nOUT = {outs!r}\n" + textwrap.dedent(_PROBE)
    # -I: no PYTHONPATH, no user site-packages, not the working directory: only what the venv installed
    proc = subprocess.run([runtime_python, "-I", "-c", script], cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = {spec: dict(np.load(outs[spec])) for spec in outs}
    manifests = {spec: json.loads((Path(folders[spec]) / "manifest.json").read_text()) for spec in folders}
    return detectors, images, report, results, manifests


def _calibrated_tolerance(raw_error: float, normalisers: dict, kind: str) -> float:
    """1e-4, or what the calibration can make of the raw outputs' measured difference if that is more.
    Calibration is ``sigmoid((x - loc) / (scale * temperature) - ...)``, whose steepest slope is
    ``1 / (4 scale temperature)``. A single scorer fitted on 4 references can have a small scale: PatchCore's
    pixel scale here is ~0.06 for raw maps up to ~3, a gain of ~4, so raw maps that differ by 1.1e-4 (3e-5
    of their scale, well within the raw bound) give calibrated maps that differ by 2e-4. test_export's fused
    five-scorer detector averages that away and keeps a flat 1e-4; WinCLIP's raw outputs here agree to
    ~2e-7, so it keeps 1e-4 too. The raw outputs themselves are held to test_export's 1e-4 of their scale."""
    gain = max(1.0, max(1.0 / (4.0 * n[f"{kind}_scale"] * n["temperature"]) for n in normalisers.values()))
    return max(1e-4, gain * raw_error)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["patchcore", "winclip"])
def test_runtime_dist_equals_torch(dist_run, spec):
    from vlad.images import load_images

    detectors, images, _, results, manifests = dist_run
    det, got = detectors[spec], results[spec]
    # each scorer's raw output: 1e-4 of its scale, as tests/test_export.py
    raw = det.scorers[spec].predict(load_images(images))
    raws = [("", raw)] + [(f"_{p}", c) for p, c in raw.components.items()]
    assert {k for k in got if k.startswith("raw")} == {f"raw{p}_{a}" for p, _ in raws for a in ("scores", "maps")}
    raw_error = {"image": 0.0, "pixel": 0.0}
    for part, r in raws:
        assert_close_to_torch(got[f"raw{part}_scores"], r.image_scores, f"{spec}{part} raw scores")
        assert_close_to_torch(got[f"raw{part}_maps"], r.anomaly_maps, f"{spec}{part} raw maps")
        raw_error["image"] = max(raw_error["image"], float(np.abs(got[f"raw{part}_scores"] - r.image_scores).max()))
        raw_error["pixel"] = max(raw_error["pixel"], float(np.abs(got[f"raw{part}_maps"] - r.anomaly_maps).max()))
    # Detector.predict: calibrated scores and maps, labels and masks
    want = det.predict(images)
    normalisers = manifests[spec]["scorers"][spec]["normalisers"]
    tol_scores = _calibrated_tolerance(raw_error["image"], normalisers, "image")
    tol_maps = _calibrated_tolerance(raw_error["pixel"], normalisers, "pixel")
    assert_close_to_torch(got["scores"], want.image_scores, f"{spec} scores", tol=tol_scores)
    assert_close_to_torch(got["maps"], want.anomaly_maps, f"{spec} maps", tol=tol_maps)
    np.testing.assert_array_equal(got["labels"], want.labels)
    clear = np.abs(want.anomaly_maps - det.pixel_threshold) > tol_maps  # pixels not on the threshold itself
    np.testing.assert_array_equal(got["masks"][clear], want.masks[clear])
    assert {k.removeprefix("comp_") for k in got if k.startswith("comp_")} == set(want.components)
    for name, comp in want.components.items():
        assert_close_to_torch(got[f"comp_{name}"], comp.image_scores, f"{spec}: calibrated {name}", tol=tol_scores)


@pytest.mark.slow
def test_runtime_dist_is_torch_free_small_and_versioned(dist_run):
    import vlad

    report = dist_run[2]
    assert not report["torch_importable"], "torch is installed in the runtime venv: it must be a venv without torch"
    assert report["loaded"] == [], f"vlad_runtime imported {report['loaded']}"
    assert any(Path(report["package_dir"]).is_relative_to(p) for p in report["site_packages"]), (
        f"vlad_runtime came from {report['package_dir']}, not from the venv's site-packages")
    expected = sorted(m.replace(".", "/") + ("/__init__.py" if _is_package(m, _shipped()) else ".py") for m in _shipped())
    assert report["files"] == expected, "the installed vlad_runtime holds other files than runtime/pyproject.toml ships"
    size = sum(f.lstat().st_size for p in report["site_packages"] for f in Path(p).rglob("*") if f.is_file())
    assert size < MAX_SITE_PACKAGES, f"the runtime venv's site-packages hold {size / 1e6:.0f} MB"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert report["version"] == declared == vlad.__version__
