"""Every image kind a plant produces loads to float RGB; bad inputs raise InvalidImageError naming them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RUNS_AS_ROOT, write_bad_files
from vlad.errors import InvalidImageError
from vlad.images import expand_paths, list_images, load_image, load_images, load_readable


def _rgb(h=20, w=30):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_path_pil_numpy_tensor_agree(tmp_path):
    arr = _rgb()
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    expected = arr.astype(np.float32) / 255
    for item in (path, str(path), Image.fromarray(arr), arr, torch.from_numpy(arr).permute(2, 0, 1).float() / 255):
        img = load_image(item)
        assert img.pixels.shape == (20, 30, 3) and img.pixels.dtype == np.float32
        np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    assert load_image(path).name == str(path)


def test_gray_rgba_palette_16bit(tmp_path):
    gray = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    g = load_image(tmp_path / "g.png").pixels
    assert g.shape == (20, 30, 3) and np.allclose(g[..., 0], g[..., 2])

    rgba = np.dstack([_rgb(), np.full((20, 30), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(load_image(tmp_path / "a.png").pixels, rgba[..., :3] / 255, atol=1e-6)

    Image.fromarray(_rgb()).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").pixels.shape == (20, 30, 3)

    deep = (np.linspace(0, 65535, 20 * 30).reshape(20, 30)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    d = load_image(tmp_path / "d.png").pixels
    assert d.max() == pytest.approx(1.0) and d.min() == pytest.approx(0.0)
    # 16-bit detail survives (an 8-bit conversion would collapse neighbouring values)
    assert len(np.unique(d[..., 0])) > 256
    np.testing.assert_allclose(load_image(deep).pixels[..., 0], deep / 65535, atol=1e-6)


def _pgm(path, samples: np.ndarray, maxval: int) -> None:
    """A binary netpbm greyscale file, as a machine-vision camera writes it (big-endian above 8 bits)."""
    dtype = ">u2" if maxval > 255 else np.uint8
    header = b"P5\n%d %d\n%d\n" % (samples.shape[1], samples.shape[0], maxval)
    path.write_bytes(header + samples.astype(dtype).tobytes())


def test_netpbm_files_keep_their_bit_depth(tmp_path):
    # a dim 16-bit frame (every sample under 256) is not an 8-bit one: 200 is 200/65535, not 200/255
    dim = np.full((12, 16), 200)
    dim[0, 0] = 100
    _pgm(tmp_path / "dim16.pgm", dim, 65535)
    np.testing.assert_allclose(load_image(tmp_path / "dim16.pgm").pixels[..., 0], dim / 65535, atol=1e-6)
    # a 12-bit camera's file (maxval 4095): full scale is 1
    twelve = np.tile(np.array([0, 100, 2048, 4095]), (12, 4))
    _pgm(tmp_path / "twelve.pgm", twelve, 4095)
    np.testing.assert_allclose(load_image(tmp_path / "twelve.pgm").pixels[..., 1], twelve / 4095, atol=1e-4)
    eight = (np.arange(12 * 16).reshape(12, 16) % 256)
    _pgm(tmp_path / "eight.pgm", eight, 255)
    np.testing.assert_allclose(load_image(tmp_path / "eight.pgm").pixels[..., 2], eight / 255, atol=1e-6)


def test_jpeg_exif_rotation(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg").pixels
    assert out.shape == (40, 20, 3)
    assert out[:20].mean() > 0.9 and out[20:].mean() < 0.1  # white half now on top


def test_mixed_sizes_batch_and_4d_arrays():
    imgs = load_images([_rgb(20, 30), _rgb(25, 25)])
    assert [i.size for i in imgs] == [(20, 30), (25, 25)]
    assert len(load_images(np.stack([_rgb(), _rgb()]))) == 2
    assert len(load_images(torch.rand(3, 3, 16, 16))) == 3


@pytest.mark.parametrize(
    "content, match",
    [(b"", "empty"), (b"this is text, not pixels", "not an image"), ("truncated", "corrupt or truncated")],
)
def test_bad_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.fromarray(_rgb(64, 64)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(InvalidImageError, match=match) as info:
        load_images([path])
    assert str(path) in str(info.value)


def test_every_bad_file_of_an_archive_says_what_is_wrong(tmp_path):
    """Each kind of unreadable file gets its own message, starting with the file's path (a missing
    permission is not reported as a corrupt image); a broken link is listed with the folder's images."""
    Image.fromarray(_rgb()).save(tmp_path / "00.png")
    expected = write_bad_files(tmp_path)
    listed = list_images(tmp_path)
    assert [p.name for p in listed] == ["00.png", *sorted(expected)]
    for path in listed[1:]:
        with pytest.raises(InvalidImageError) as info:
            load_image(path)
        assert str(info.value).startswith(f"{path}: {expected[path.name]}"), info.value


@pytest.mark.skipif(not RUNS_AS_ROOT, reason="tested for real by the test above")
def test_no_read_permission_as_root_would_see_it(tmp_path, monkeypatch):
    """Root reads every file, so a missing read permission is shown by an open() that is refused."""
    import builtins

    path = tmp_path / "locked.png"
    Image.fromarray(_rgb()).save(path)
    real_open = builtins.open

    def refuse(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    with pytest.raises(InvalidImageError, match=r"locked.png: cannot be opened \(Permission denied\)"):
        load_image(path)


def test_load_readable_lists_what_cannot_be_read(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "00.png")
    expected = write_bad_files(tmp_path)
    items = [*list_images(tmp_path), np.zeros((3, 3), np.uint8), _rgb()]
    loaded, failures = load_readable(items)
    assert [img.name for img in loaded] == [str(tmp_path / "00.png"), "<array>"]
    names = [*sorted(expected), "<array>"]
    assert [f.index for f in failures] == list(range(1, len(names) + 1))
    assert [f.name.rsplit("/", 1)[-1] for f in failures] == names
    for f in failures[:-1]:
        assert f.error.startswith(f"{f.name}: {expected[f.name.rsplit('/', 1)[-1]]}")
    assert failures[-1].error == "<array>: image is 3x3; at least 8x8 pixels are needed"
    with pytest.raises(InvalidImageError, match="truncated"):
        load_images(items)  # the first unreadable one raises
    with pytest.raises(InvalidImageError, match="no images"):
        load_readable([])


def test_bad_arrays_and_types(tmp_path):
    with pytest.raises(InvalidImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match=r"\[0, 1\]"):
        load_image(np.full((20, 20, 3), 200.0))
    with pytest.raises(InvalidImageError, match="NaN"):
        load_image(np.full((20, 20), np.nan, np.float32))
    with pytest.raises(InvalidImageError, match="shape"):
        load_image(np.zeros((20, 20, 5), np.uint8))
    with pytest.raises(InvalidImageError, match="at least"):
        load_image(np.zeros((4, 20), np.uint8))
    with pytest.raises(InvalidImageError, match="expected a path"):
        load_image(42)
    with pytest.raises(InvalidImageError, match="no images"):
        load_images([])


def test_folders(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "b.png")
    Image.fromarray(_rgb()).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    assert len(expand_paths([tmp_path, tmp_path / "b.png"])) == 3
    # the formats machine-vision cameras write are found in a folder too, and read
    for name in ("c.pgm", "d.ppm", "e.gif"):
        Image.fromarray(_rgb()).convert("L" if name.endswith(".pgm") else "RGB").save(tmp_path / name)
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png", "c.pgm", "d.ppm", "e.gif"]
    assert all(i.pixels.shape == (20, 30, 3) for i in load_images(list_images(tmp_path)))
    with pytest.raises(InvalidImageError, match="no image files"):
        list_images(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path)
    with pytest.raises(InvalidImageError, match="is a folder"):
        load_image(tmp_path)
