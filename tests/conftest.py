"""Test setup: offline mode, no network, small thread count, and fixtures of synthetic images."""

from __future__ import annotations

import os
import socket

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


@pytest.fixture
def good_images() -> list[np.ndarray]:
    return [textured(i) for i in range(4)]


@pytest.fixture
def defect_image() -> np.ndarray:
    return with_defect(textured(100))
