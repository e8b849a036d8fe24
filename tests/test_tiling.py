"""Tiling of high-resolution images, working-resolution maps, the decode pixel limit (vlad.tiling)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import textured
from PIL import Image

import vlad
import vlad.tiling as tiling
from vlad.images import LoadedImage, load_image, set_max_image_pixels
from vlad.ops import to_batch
from vlad.registry import get_scorer_class
from vlad.scorers.base import BaseScorer
from vlad.tiling import Stitcher, check_tiling, parse_tile_option, tile_boxes, tile_starts


def large_texture(size: int, seed: int) -> np.ndarray:
    """conftest's striped texture at any size, built in float32 (a 4096 x 4096 one stays small)."""
    rng = np.random.default_rng(seed)
    y = np.arange(size, dtype=np.float32)[:, None]
    x = np.arange(size, dtype=np.float32)[None, :]
    base = 0.5 + 0.25 * np.sin(x / 3.0) * np.cos(y / 5.0)
    img = base[..., None] + rng.normal(0, 0.02, (size, size, 3)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


class ConstantScorer(BaseScorer):
    """Maps of one value at a small resolution of its own (a stand-in for a backbone scorer)."""

    def __init__(self, value: float = 3.0, batch_size: int = 4) -> None:
        self.value = value
        self.batch_size = batch_size

    def _fit(self, references):
        self.seen_ = [r.size for r in references or []]

    def _predict_batch(self, images):
        return torch.full((len(images),), self.value), torch.full((len(images), 17, 23), self.value)


# -- grid and blending -------------------------------------------------------------------------
@pytest.mark.parametrize("h, w, size, overlap", [(1001, 777, 256, 64), (333, 3001, 256, 0), (97, 97, 32, 15),
                                                 (4096, 4096, 448, 112), (300, 200, 448, 112)])
def test_tile_grid_covers_every_pixel_edges_included(h, w, size, overlap):
    cover = np.zeros((h, w), dtype=np.int32)
    for y0, y1, x0, x1 in tile_boxes((h, w), size, overlap):
        assert y1 - y0 == min(size, h) and x1 - x0 == min(size, w)  # whole tiles, none cut by the border
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    for length in (h, w):
        starts = tile_starts(length, size, overlap)
        assert starts[0] == 0 and starts[-1] + min(size, length) == length
        assert all(b - a <= size - overlap + 1 for a, b in zip(starts, starts[1:]))  # overlap kept (±1 px rounding)


@pytest.mark.parametrize("h, w", [(1001, 777), (2500, 3001)])
def test_stitching_a_constant_map_gives_that_constant(h, w):
    st = Stitcher((h, w), 256, 64)
    for box in st.boxes:
        st.add(box, torch.full((31, 29), 2.5))
    out = st.result().numpy()
    assert out.shape == tiling.working_shape((h, w))
    np.testing.assert_allclose(out, 2.5, rtol=1e-5)


def test_blending_is_smooth_across_tile_borders():
    """Two tiles with different constant maps: the stitched map ramps between them in the overlap,
    with no step larger than the ramp allows."""
    st = Stitcher((64, 100), 64, 28)
    assert [b[2] for b in st.boxes] == [0, 36]
    st.add(st.boxes[0], torch.zeros(64, 64))
    st.add(st.boxes[1], torch.ones(64, 64))
    row = st.result().numpy()[10]
    assert row[0] == 0 and row[-1] == 1
    assert np.all(np.diff(row) >= -1e-6) and np.diff(row).max() < 0.15


def test_tiled_scorer_map_is_the_constant_at_the_image_size():
    s = ConstantScorer(tile_size=64, tile_overlap=16).fit()
    res = s.predict(np.zeros((301, 257, 3), np.uint8))
    assert res.anomaly_maps.shape == (1, 301, 257)
    np.testing.assert_allclose(res.anomaly_maps, 3.0, rtol=1e-5)
    np.testing.assert_allclose(res.image_scores, 3.0, rtol=1e-5)


def test_every_scorer_takes_the_tiling_parameters():
    for name in vlad.list_scorers():
        if not get_scorer_class(name).tiles:  # musc scores whole images together: refused where it enters
            with pytest.raises(vlad.InvalidParameterError, match="cannot score tiles"):
                vlad.create_scorer(name, tile_size=448, tile_overlap=32)
            assert vlad.create_scorer(name, tile_overlap=32).get_params()["tile_size"] is None
            continue
        params = vlad.create_scorer(name, tile_size=448, tile_overlap=32).get_params()
        assert params["tile_size"] == 448 and params["tile_overlap"] == 32, name


@pytest.mark.parametrize("size, overlap", [(16, None), (448, 224), (448, -1), ("448", None), (True, None), (448, 2.5)])
def test_bad_tiling_is_refused_clearly(size, overlap):
    with pytest.raises(vlad.InvalidParameterError, match="tile_"):
        check_tiling(size, overlap)
    with pytest.raises(vlad.InvalidParameterError):
        ConstantScorer(tile_size=size, tile_overlap=overlap).fit()


def test_tile_option_parsing():
    assert parse_tile_option("448") == (448, None)
    assert parse_tile_option("448,64") == (448, 64)
    assert parse_tile_option("0") == (0, None)
    for bad in ("448,", "a", "448,64,2", "448,300"):
        with pytest.raises(vlad.InvalidParameterError, match="tile"):
            parse_tile_option(bad)


def test_references_are_tiled_for_fitting():
    s = ConstantScorer(tile_size=64, tile_overlap=16).fit([np.zeros((150, 100, 3), np.uint8)])
    assert len(s.seen_) == len(tile_boxes((150, 100), 64, 16)) > 1
    assert set(s.seen_) == {(64, 64)} and s.n_references_ == 1


# -- working resolution and memory ---------------------------------------------------------------
def test_large_uint8_images_stay_uint8_and_resize_in_strips_like_in_one_go(monkeypatch):
    img = load_image(textured(1, size=96))
    assert img.data.dtype == np.uint8 and img.pixels.dtype == np.float32
    big = LoadedImage(np.random.default_rng(0).integers(0, 256, (700, 500, 3), dtype=np.uint8), "big")
    whole = to_batch([big], (96, 80), None, None)
    monkeypatch.setattr("vlad.ops.RESIZE_CHUNK_PIXELS", 5000)  # forces strips of 10 rows
    strips = to_batch([big], (96, 80), None, None)
    torch.testing.assert_close(strips, whole, atol=1e-5, rtol=0)


def test_maps_are_fused_at_the_working_resolution_and_upsampled_once(monkeypatch):
    monkeypatch.setattr(tiling, "WORK_PIXELS", 64 * 64)
    det = vlad.create_detector("patchcore", weights="tiny", device="cpu").fit([textured(i) for i in range(3)])
    image = textured(9, size=200)
    res, raw = det.predict_with_raw([image])
    assert res.anomaly_maps.shape == (1, 200, 200)  # the fused map at the image's size
    assert raw["patchcore"].anomaly_maps.shape == (1, 64, 64)  # scorers' maps at the working size
    assert det.scorers["patchcore"].predict([image]).anomaly_maps.shape == (1, 200, 200)


# -- the point of tiling -------------------------------------------------------------------------
@pytest.mark.slow
def test_tiling_finds_a_thin_scratch_in_a_4096_image(one_thread):
    """A 3-pixel-wide, 1000-pixel-long dark scratch in a 4096 x 4096 striped texture. PatchCore (tiny
    CNN twin, 128 px input, references: two 512 x 512 textures) sees it when the image is cut into
    256 px tiles (2x shrink per tile), not when the whole image is shrunk 32x to 128 px."""
    image = large_texture(4096, 7)
    y0, x0, x1 = 2000, 1500, 2500
    image[y0 : y0 + 3, x0:x1] = 20
    refs = [large_texture(512, s) for s in range(2)]

    def peak(tile_size):
        s = vlad.create_scorer("patchcore", weights="tiny", image_size=128, embed_dim=128,
                               tile_size=tile_size, tile_overlap=64).fit(refs)
        m = s.predict_working([image]).anomaly_maps[0]
        yy, xx = np.unravel_index(np.argmax(m), m.shape)
        return yy * 4096 / m.shape[0], xx * 4096 / m.shape[1]

    def on_scratch(p):
        return abs(p[0] - (y0 + 1)) < 40 and x0 - 40 < p[1] < x1 + 40

    assert on_scratch(peak(256))
    assert not on_scratch(peak(None))


# -- pixel limit ----------------------------------------------------------------------------------
def _png_header_only(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def test_pixel_limit_error_names_the_size_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("VLAD_MAX_IMAGE_PIXELS", raising=False)
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 20_000, 15_000)  # refused from the header: nothing is decoded
    with pytest.raises(vlad.InvalidImageError) as err:
        load_image(huge)
    msg = str(err.value)
    assert "20000x15000" in msg and "300000000" in msg and "200000000" in msg
    assert "VLAD_MAX_IMAGE_PIXELS" in msg and "--max-pixels" in msg and "set_max_image_pixels" in msg


def test_pixel_limit_can_be_set_in_python(tmp_path, monkeypatch):
    monkeypatch.setenv("VLAD_MAX_IMAGE_PIXELS", "0")
    path = tmp_path / "img.png"
    Image.fromarray(textured(3, size=96)).save(path)
    try:
        set_max_image_pixels(96 * 96 - 1)  # the Python setting wins over the environment
        with pytest.raises(vlad.InvalidImageError, match="96x96"):
            load_image(path)
        set_max_image_pixels(96 * 96)
        assert load_image(path).size == (96, 96)
        with pytest.raises(vlad.InvalidImageError, match="whole number"):
            set_max_image_pixels(-5)
    finally:
        set_max_image_pixels(None)


# -- persistence ----------------------------------------------------------------------------------
def test_save_and_load_keep_tiling_and_reference_tiles(tmp_path):
    refs = [textured(i, size=96) for i in range(3)]
    det = vlad.create_detector("patchcore", weights="tiny", device="cpu", tile_size=64, tile_overlap=16).fit(refs)
    scorer = det.scorers["patchcore"]
    n_tiles = len(tile_boxes((96, 96), 64, 16))
    assert det.list_references() == scorer.list_references() and len(scorer.reference_names_) == 3 * n_tiles
    image = textured(50, size=160)
    before = det.predict([image])
    loaded = vlad.load(det.save(tmp_path / "det"))
    s2 = loaded.scorers["patchcore"]
    assert (s2.tile_size, s2.tile_overlap) == (64, 16)
    assert s2.tile_groups_ == scorer.tile_groups_
    after = loaded.predict([image])
    np.testing.assert_allclose(after.anomaly_maps, before.anomaly_maps, rtol=1e-4, atol=1e-5)
    loaded.remove_reference(1)  # all tiles of one reference image go at once
    assert len(s2.reference_names_) == 2 * n_tiles and s2.n_references_ == 2


def test_cli_tile_option(tmp_path, capsys):
    from vlad.cli.main import main

    path = tmp_path / "a.png"
    Image.fromarray(textured(1, size=96)).save(path)
    assert main(["score", str(path), "--detector", "winclip", "--weights", "tiny", "--device", "cpu",
                 "--tile", "64,16"]) == 0
    assert main(["score", str(path), "--detector", "winclip", "--weights", "tiny", "--tile", "64,40"]) == 2
    assert "tile_overlap" in capsys.readouterr().err


def test_checking_references_of_a_tiled_scorer_says_it_cannot(caplog):
    refs = [textured(i, 96) for i in range(4)]
    scorer = vlad.create_scorer("patchcore", weights="tiny", tile_size=64).fit(refs)
    with pytest.raises(vlad.UnsupportedOperationError, match="not available with tiling.*without tile_size"):
        scorer.check_references()
    det = vlad.create_detector("patchcore", weights="tiny", tile_size=64).fit(refs)
    with caplog.at_level("WARNING"):
        assert det.check_references() == {}
    assert "patchcore: its references were not checked" in caplog.text  # not a silent "nothing suspicious"

