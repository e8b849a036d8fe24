"""Heatmap overlays for anomaly maps, with PIL and numpy only (no matplotlib).

>>> rgb = colorize(amap)                       # (H, W, 3) uint8, jet colours  # doctest: +SKIP
>>> blend = overlay(image_pixels, amap)        # map over the image             # doctest: +SKIP
>>> panel(image_pixels, amap, mask, title="scratch_003  score 0.82").save("p.png")  # doctest: +SKIP
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageDraw

from vlad.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

_LUT_SIZE = 256


def _jet_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, _LUT_SIZE)
    rgb = np.stack([1.5 - np.abs(4.0 * x - 3.0), 1.5 - np.abs(4.0 * x - 2.0), 1.5 - np.abs(4.0 * x - 1.0)], axis=1)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _gray_lut() -> np.ndarray:
    g = np.arange(_LUT_SIZE, dtype=np.uint8)
    return np.stack([g, g, g], axis=1)


COLORMAPS = {"jet": _jet_lut(), "gray": _gray_lut()}


def _as_map(amap) -> np.ndarray:
    if hasattr(amap, "detach"):
        amap = amap.detach().cpu().numpy()
    arr = np.asarray(amap, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InvalidArgumentError(f"expected an anomaly map of shape (H, W), got {arr.shape}")
    return arr


def _as_rgb_uint8(image) -> np.ndarray:
    if hasattr(image, "pixels"):  # a LoadedImage
        image = image.pixels
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InvalidArgumentError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise InvalidArgumentError(f"expected a uint8 image or floats in [0, 1], got dtype {arr.dtype}")


def value_range(amap, vmin: float | None = None, vmax: float | None = None) -> tuple[float, float]:
    """``(vmin, vmax)`` with missing ends taken from the finite values of ``amap``."""
    arr = _as_map(amap) if not isinstance(amap, (list, tuple)) else np.concatenate([_as_map(m).ravel() for m in amap])
    finite = arr[np.isfinite(arr)]
    lo = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else float(vmin))
    hi = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else float(vmax))
    return lo, hi


def colorize(amap, vmin: float | None = None, vmax: float | None = None, cmap: str = "jet") -> np.ndarray:
    """Map values to colours: ``(H, W)`` floats -> ``(H, W, 3)`` uint8.

    Args:
        amap: ``(H, W)`` anomaly map.
        vmin: value shown as the lowest colour (default: the map's minimum). Use one shared range to
            compare maps across images.
        vmax: value shown as the highest colour (default: the map's maximum).
        cmap: ``"jet"`` (blue = normal, red = anomalous) or ``"gray"``.
    """
    if cmap not in COLORMAPS:
        raise InvalidArgumentError(f"unknown colormap {cmap!r}; available: {sorted(COLORMAPS)}")
    arr = _as_map(amap)
    lo, hi = value_range(arr, vmin, vmax)
    scale = (hi - lo) if hi > lo else 1.0
    x = (np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo) - lo) / scale
    idx = np.clip(np.round(x * (_LUT_SIZE - 1)), 0, _LUT_SIZE - 1).astype(np.intp)
    return COLORMAPS[cmap][idx]


def _resize_map(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if arr.shape == hw:
        return arr
    logger.debug("resizing a %s map to the image size %s for display", arr.shape, hw)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
    return np.asarray(img.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def overlay(image, amap, vmin: float | None = None, vmax: float | None = None, alpha: float = 0.5,
            cmap: str = "jet") -> np.ndarray:
    """The coloured map blended over the image: ``(H, W, 3)`` uint8.

    Args:
        image: ``(H, W, 3)`` float in [0, 1] or uint8 (also a PIL image or a LoadedImage).
        amap: ``(H, W)`` anomaly map; resized bilinearly if its size differs from the image's.
        vmin: see :func:`colorize`.
        vmax: see :func:`colorize`.
        alpha: weight of the colour map (0 = image only, 1 = map only).
        cmap: see :func:`colorize`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgumentError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb_uint8(image)
    arr = _resize_map(_as_map(amap), rgb.shape[:2])
    color = colorize(arr, vmin, vmax, cmap).astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * color
    return (out + 0.5).clip(0, 255).astype(np.uint8)


def _mask_tile(rgb: np.ndarray, mask) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    m = m > 0
    if m.shape != rgb.shape[:2]:
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
            (rgb.shape[1], rgb.shape[0]), Image.Resampling.NEAREST)) > 0
    tile = (rgb.astype(np.float32) * 0.5).astype(np.uint8)
    tile[m] = (0.4 * rgb[m] + 0.6 * np.array([255, 255, 255])).astype(np.uint8)
    return tile


def panel(image, amap, mask=None, title: str | None = None, vmin: float | None = None,
          vmax: float | None = None, alpha: float = 0.5, cmap: str = "jet", gap: int = 4) -> Image.Image:
    """Side by side: image | map over image | ground-truth mask (when given), with an optional title.

    Args:
        image: ``(H, W, 3)`` float in [0, 1] or uint8 (also a PIL image or a LoadedImage).
        amap: ``(H, W)`` anomaly map.
        mask: optional ``(H, W)`` ground truth (nonzero = anomalous), shown white on the darkened image.
        title: text drawn above the tiles (e.g. file name and score); the colour range is appended.
        vmin: see :func:`colorize`.
        vmax: see :func:`colorize`.
        alpha: see :func:`overlay`.
        cmap: see :func:`colorize`.
        gap: pixels between tiles.
    """
    rgb = _as_rgb_uint8(image)
    lo, hi = value_range(_as_map(amap), vmin, vmax)
    tiles = [rgb, overlay(rgb, amap, lo, hi, alpha, cmap)]
    if mask is not None:
        tiles.append(_mask_tile(rgb, mask))
    h, w = rgb.shape[:2]
    header = 16 if title is not None else 0
    width = len(tiles) * w + (len(tiles) - 1) * gap
    canvas = Image.new("RGB", (width, h + header), (255, 255, 255))
    for i, tile in enumerate(tiles):
        canvas.paste(Image.fromarray(tile), (i * (w + gap), header))
    if title is not None:
        ImageDraw.Draw(canvas).text((2, 2), f"{title}   [colours {lo:.3g} .. {hi:.3g}]", fill=(0, 0, 0))
    return canvas
