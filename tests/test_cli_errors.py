"""Every user mistake on the command line ends as one ``vlad: error:`` line, exit code 2, no traceback.

The cases come from a hostile-input run of the CLI (issue 16). Each one is checked before any model is
built or image scored. Most run in-process through ``vlad.cli.main`` (an unexpected exception would fail
the test); a few run the real entry point in a subprocess to check stderr as a user sees it.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

import vlad
from conftest import fails_with_one_line, textured
from vlad.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "part.png"
    Image.fromarray(textured(0)).save(path)
    return path


def _score(image: Path, *extra: str) -> list[str]:
    return ["score", str(image), "--scorer", "patchcore", "--weights", "tiny", "--refs", str(image), *extra]


def test_unknown_weights_names(capsys):
    line = fails_with_one_line(capsys, ["weights", "verify", "no-such-model"], "no-such-model", "weights list")
    assert "resnet18.tv_in1k" in line  # the valid names are listed
    fails_with_one_line(capsys, ["weights", "download", "no-such-model"], "no-such-model")


def test_device_not_a_device(capsys, image):
    fails_with_one_line(capsys, _score(image, "--device", "gpu0"), "gpu0", "cpu")


def test_device_cuda_without_cuda(capsys, image):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fails_with_one_line(capsys, _score(image, "--device", "cuda"), "cuda", "not available")


def test_weights_neither_a_mode_nor_a_folder(capsys, image):
    fails_with_one_line(capsys, ["score", str(image), "--scorer", "patchcore", "--weights", "pretraind"],
                         "pretraind", "random")


def test_out_is_an_existing_file(capsys, image, tmp_path):
    target = tmp_path / "scores.csv"
    target.write_text("keep me")
    fails_with_one_line(capsys, _score(image, "--out", str(target)), "existing file")
    assert target.read_text() == "keep me"
    fails_with_one_line(capsys, _score(image, "--out", str(target / "sub")), "cannot write")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_out_under_an_unwritable_folder(capsys, image, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        fails_with_one_line(capsys, _score(image, "--out", str(locked / "out")), "cannot write")
    finally:
        locked.chmod(0o700)


def test_set_value_of_the_wrong_type(capsys, image):
    fails_with_one_line(capsys, ["score", str(image), "--detector", "maeday", "--weights", "tiny",
                                  "--set", "n_masks=many"], "n_masks", "whole number")
    fails_with_one_line(capsys, ["score", str(image), "--detector", "maeday", "--set", "n_masks"], "KEY=VALUE")


def test_prompt_yaml_not_utf8(capsys, image, tmp_path):
    bad = tmp_path / "prompts.yaml"
    bad.write_bytes("normal_states: ['fl\u00e4wless {}']\n".encode("latin-1"))
    fails_with_one_line(capsys, ["score", str(image), "--detector", "winclip", "--weights", "tiny",
                                  "--prompts", str(bad)], "UTF-8")


def test_prompt_yaml_nested_too_deeply(capsys, image, tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("normal_states: " + "[" * 50_000 + "]" * 50_000 + "\n")
    fails_with_one_line(capsys, ["score", str(image), "--detector", "winclip", "--weights", "tiny",
                                  "--prompts", str(deep)], "deep")


def test_very_long_object_name_is_no_os_error(capsys, image, tmp_path):
    """A 300-character object name cannot be a prompts/objects file name: no OSError, the run goes on."""
    out = tmp_path / "out"
    code = main(["score", str(image), "--detector", "winclip", "--weights", "tiny", "--device", "cpu",
                 "--object", "plate " * 50, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "scores.csv").is_file()


def test_demo_port_out_of_range(capsys):
    fails_with_one_line(capsys, ["demo", "--port", "99999"], "99999", "65535")
    fails_with_one_line(capsys, ["demo", "--port", "http"], "port")


def test_demo_port_in_use(capsys):
    pytest.importorskip("gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fails_with_one_line(capsys, ["demo", "--port", str(port), "--device", "cpu"], str(port), "--port")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width x height`` pixels (PIL refuses it from the header, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def test_image_over_the_pixel_limit(capsys, tmp_path):
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 20_000, 20_000)  # 400 Mpx: over twice PIL's default limit
    line = fails_with_one_line(capsys, ["score", str(huge), "--detector", "winclip", "--weights", "tiny",
                                         "--device", "cpu", "--fail-fast"], "huge.png", "VLAD_MAX_IMAGE_PIXELS")
    assert "400000000" in line  # names the size


def test_pixel_limit_can_be_raised(monkeypatch, tmp_path):
    from vlad.images import load_image

    path = tmp_path / "big.png"
    Image.fromarray(textured(3, size=96)).save(path)
    monkeypatch.setenv("VLAD_MAX_IMAGE_PIXELS", "1000")  # 96 * 96 > 2 * 1000: refused
    with pytest.raises(vlad.InvalidImageError, match="VLAD_MAX_IMAGE_PIXELS") as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: 96x96 = 9216 pixels is over the limit")  # not "corrupt"
    monkeypatch.setenv("VLAD_MAX_IMAGE_PIXELS", "0")  # no limit
    assert load_image(path).pixels.shape == (96, 96, 3)


def test_misspelt_keyword_suggests_the_parameter():
    with pytest.raises(vlad.InvalidParameterError, match="did you mean 'weights'"):
        vlad.create_scorer("patchcore", weigths="random")
    with pytest.raises(vlad.VladError):
        vlad.create_scorer("patchcore", weigths="random")


def test_unknown_backbone_in_the_library():
    from vlad.weights import get_spec

    with pytest.raises(vlad.UnknownBackboneError, match="resnet18.tv_in1k"):
        get_spec("resnet81.tv_in1k")


@pytest.mark.parametrize("argv, words", [
    (["weights", "verify", "no-such-model"], ["no-such-model"]),
    (["demo", "--port", "99999"], ["65535"]),
    (["score", "x.png", "--device", "gpu0", "--scorer", "patchcore"], ["gpu0"]),
])
def test_as_a_user_sees_it(argv, words):
    env = {**os.environ, "VLAD_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "vlad", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("vlad: error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), proc.stderr
