"""Test setup: offline mode, no network, small thread count, and fixtures of synthetic images."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ["VLAD_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("VLAD_PROGRESS", "0")

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or self.family == socket.AF_UNIX):
        return _real_connect(self, address)
    raise RuntimeError(f"tests must not use the network (tried to connect to {address!r})")


socket.socket.connect = _guarded_connect


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where ``torch.cuda.is_available()`` and are skipped elsewhere."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread: tiny networks run several times faster so on a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def textured(seed: int, size: int = 96) -> np.ndarray:
    """A normal-looking uint8 RGB texture: smooth stripes plus mild noise, (size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 0.5 + 0.25 * np.sin(xx / 3.0) * np.cos(yy / 5.0)
    img = base[..., None] + rng.normal(0, 0.02, (size, size, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def with_defect(img: np.ndarray, box=(30, 50, 60, 80)) -> np.ndarray:
    """A copy of ``img`` with a bright square defect at ``box`` = (y0, y1, x0, x1)."""
    out = img.copy()
    y0, y1, x0, x1 = box
    out[y0:y1, x0:x1] = [255, 30, 30]
    return out


def assert_close_to_torch(a, b, what: str, tol: float = 1e-4) -> None:
    """An exported graph's output ``a`` equals torch's ``b`` within ``tol`` of ``b``'s scale (absolute for
    outputs up to 1, e.g. calibrated ones; relative beyond). Feature distances computed as
    ``||q||^2 - 2 q.m + ||m||^2`` in float32 differ by ~1e-4 between two correct matrix-product orders
    when the features are large. Used by the export parity tests (test_export, test_runtime_dist)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    err = np.abs(a - b).max() if a.size else 0.0
    scale = max(1.0, float(np.abs(b).max())) if b.size else 1.0
    assert err <= tol * scale, f"{what}: max |onnx - torch| = {err:.3g} (allowed {tol * scale:.3g})"


def fails_with_one_line(capsys, argv: list[str], *words: str) -> str:
    """Run the command line on ``argv`` and assert a user mistake: exit code 2, exactly one
    ``vlad: error:`` line naming each of ``words`` (case-insensitive), no traceback. Returns that line."""
    from vlad.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("vlad: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


#: as root (these tests often run so) every file is readable: a file without read permission cannot be made
RUNS_AS_ROOT = os.name == "posix" and os.geteuid() == 0


def write_bad_files(folder: Path) -> dict[str, str]:
    """Write the unreadable files a line archive holds into ``folder``: a truncated PNG, an empty file, a
    text file named ``.png``, a link to a missing file (cannot be opened, also as root) and, unless this
    runs as root (root reads every file), a file without read permission. Returns file name -> the words
    its error must say. Names start with digits, to sort between good images named ``00.png``..."""
    from PIL import Image

    whole = folder / "03_truncated.png"
    Image.fromarray(textured(50)).save(whole)
    whole.write_bytes(whole.read_bytes()[:300])
    (folder / "05_empty.png").write_bytes(b"")
    (folder / "07_text.png").write_text("a log line, not pixels\n")
    (folder / "09_link.png").symlink_to(folder / "moved_away.png")
    expected = {"03_truncated.png": "corrupt or truncated image", "05_empty.png": "the file is empty",
                "07_text.png": "not an image file PIL can read", "09_link.png": "a broken link"}
    if not RUNS_AS_ROOT:
        locked = folder / "11_no_permission.png"
        Image.fromarray(textured(51)).save(locked)
        locked.chmod(0)
        expected[locked.name] = "cannot be opened (Permission denied)"
    return expected


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for the tests of one module (2 CPUs, a small object store); skips without Ray."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    from vlad.distributed.engine import connect

    assert connect(None, num_cpus=2, object_store_mb=80)  # as the library starts a local Ray
    yield ray
    ray.shutdown()


@pytest.fixture
def good_images() -> list[np.ndarray]:
    return [textured(i) for i in range(4)]


@pytest.fixture
def defect_image() -> np.ndarray:
    return with_defect(textured(100))
