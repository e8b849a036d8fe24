"""Tiling of high-resolution images and working-resolution maps: the one place both live.

A backbone sees 224-518 px. Shrinking a 4096 x 4096 image to that size makes a 3 px scratch a
fraction of a pixel, and it disappears. With tiling (the ``tile_size`` / ``tile_overlap`` parameters
every scorer has, see :mod:`vlad.scorers.base`) a large image is cut into overlapping tiles of
``tile_size`` pixels (choose the backbone's input resolution, so a tile is scored at its own
resolution), each tile is scored as an image, and the tile maps are stitched back:

* **Grid** (:func:`tile_starts`): along each side, the fewest tiles that overlap by at least
  ``tile_overlap`` pixels, spread evenly from the first pixel to the last (the last tile ends on the
  border), so every pixel is covered, for any size. A side no longer than ``tile_size`` is one tile.
* **Blending** (:class:`Stitcher`): each tile map is weighted by a smooth window, ``w(y, x) = a(y) b(x)``,
  a raised-cosine ramp over ``tile_overlap`` pixels on each side that has a neighbouring tile (flat on
  the image border), and the weighted sum is divided by the sum of the weights. The division makes the
  weights sum to one at every pixel (a constant map stays constant), and the smooth ramps leave no
  seams where tiles meet. Because the grid is a product of rows and columns, the weight sum is the
  outer product of two 1-D sums: no full-size weight image is held.
* **Image score** = the maximum of the stitched map. A defect is local: wherever it is, in however many
  tiles the image is cut, it raises the map there, so the maximum finds it independently of the image
  size (a mean or top-fraction mean would dilute a small defect more the larger the image). It is
  taken after blending, so a tile-border artefact seen by one tile only is damped by its neighbour.
  The map and the score are in the scorer's own units, so a detector calibrates tiled scorers on
  references tiled the same way.

**Working resolution.** Maps are kept at a working resolution (:func:`working_shape`: the image's own
up to :data:`WORK_PIXELS`, otherwise scaled down to that many pixels, aspect kept), calibrated and
fused there, and brought to the image's own resolution once, at the very end
(:func:`upsample_maps`). The stitched canvas of a tiled image is at the working resolution too, so the
memory beyond the models is the image itself (uint8: 3 bytes per pixel) plus the final map (float32:
4 bytes per pixel), whatever the number of tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vlad.errors import InvalidParameterError

#: maps are calibrated and fused at no more than this many pixels (2048 x 2048), then upsampled once
WORK_PIXELS = 2048 * 2048


def check_tiling(tile_size, tile_overlap) -> tuple[int, int] | None:
    """Checked ``(tile_size, tile_overlap)`` in pixels, or None when tiling is off.

    Args:
        tile_size: side of a square tile in image pixels; None or 0 turns tiling off.
        tile_overlap: pixels shared by neighbouring tiles, ``0 <= overlap < tile_size / 2``; None is a
            quarter of ``tile_size``.

    Raises:
        InvalidParameterError: a size or overlap that is not a whole number in range.
    """
    if tile_size is None or (isinstance(tile_size, (int, np.integer)) and not isinstance(tile_size, bool)
                             and tile_size == 0):
        return None
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 32:
        raise InvalidParameterError(
            f"tile_size must be a whole number of pixels >= 32 (e.g. the backbone's input size, 448), or "
            f"None/0 for no tiling; got {tile_size!r}"
        )
    size = int(tile_size)
    overlap = size // 4 if tile_overlap is None else tile_overlap
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < size / 2:
        raise InvalidParameterError(
            f"tile_overlap must be a whole number of pixels in [0, tile_size/2) = [0, {size / 2:g}), or None "
            f"for a quarter of the tile; got {tile_overlap!r}"
        )
    return size, int(overlap)


def parse_tile_option(text: str) -> tuple[int, int | None]:
    """``"SIZE"`` or ``"SIZE,OVERLAP"`` (the command line's ``--tile``) -> ``(size, overlap or None)``.

    Raises:
        InvalidParameterError: not one or two whole numbers, or out of range (see :func:`check_tiling`).
    """
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or len(parts) != len(values):
        raise InvalidParameterError(f"--tile takes SIZE or SIZE,OVERLAP in pixels, e.g. 448 or 448,64; got {text!r}")
    size, overlap = values[0], (values[1] if len(values) == 2 else None)
    checked = check_tiling(size, overlap)
    return (checked[0], overlap) if checked else (0, None)


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """First pixel of each tile along a side of ``length`` pixels: tiles of ``size`` overlapping by at
    least ``overlap``, evenly spread, the last ending on the border. ``[0]`` when one tile suffices."""
    if length <= size:
        return [0]
    n = math.ceil((length - overlap) / (size - overlap))
    return [round(k * (length - size) / (n - 1)) for k in range(n)]


def tile_boxes(image_size: tuple[int, int], size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of every tile of an image of ``(H, W)`` pixels, row by row."""
    h, w = image_size
    return [(y, min(h, y + size), x, min(w, x + size))
            for y in tile_starts(h, size, overlap) for x in tile_starts(w, size, overlap)]


def needs_tiling(image_size: tuple[int, int], tiling: tuple[int, int] | None) -> bool:
    """True when ``tiling`` is on and the image is larger than one tile along a side."""
    return tiling is not None and max(image_size) > tiling[0]


def working_shape(image_size: tuple[int, int], max_pixels: int | None = None) -> tuple[int, int]:
    """The resolution at which an image's maps are calibrated and fused: its own ``(H, W)`` up to
    ``max_pixels`` (None: :data:`WORK_PIXELS`), else scaled down to about that many pixels (aspect kept)."""
    max_pixels = WORK_PIXELS if max_pixels is None else max_pixels
    h, w = int(image_size[0]), int(image_size[1])
    if h * w <= max_pixels:
        return h, w
    scale = math.sqrt(max_pixels / (h * w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _window(start: int, stop: int, total: int, ramp: float) -> np.ndarray:
    """1-D blending weights of a tile spanning ``[start, stop)`` of ``total``: a raised-cosine ramp of
    ``ramp`` pixels on each side with a neighbour (strictly positive), flat elsewhere."""
    n = stop - start
    w = np.ones(n, dtype=np.float64)
    if ramp >= 1 and n > 1:
        d = np.arange(n, dtype=np.float64)
        rise = np.sin(0.5 * np.pi * np.minimum(1.0, (d + 0.5) / ramp)) ** 2
        if start > 0:
            w = np.minimum(w, rise)
        if stop < total:
            w = np.minimum(w, rise[::-1])
    return w


class Stitcher:
    """Blends tile maps into one map of an image at its working resolution (see the module docstring).

    Args:
        image_size: ``(H, W)`` of the image in pixels.
        size, overlap: the tiling (:func:`check_tiling`).
        shape: ``(h, w)`` of the stitched map; None for :func:`working_shape` of the image.
    """

    def __init__(self, image_size: tuple[int, int], size: int, overlap: int,
                 shape: tuple[int, int] | None = None) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.shape = tuple(shape) if shape is not None else working_shape(self.image_size)
        self.sy = self.shape[0] / self.image_size[0]
        self.sx = self.shape[1] / self.image_size[1]
        self.ramp_y, self.ramp_x = overlap * self.sy, overlap * self.sx
        self.boxes = tile_boxes(self.image_size, size, overlap)
        self.sum = torch.zeros(self.shape, dtype=torch.float32)
        norm_y = np.zeros(self.shape[0])
        norm_x = np.zeros(self.shape[1])
        for y0, y1 in {(b[0], b[1]) for b in self.boxes}:
            a, b = self._span(y0, y1, self.sy, self.shape[0])
            norm_y[a:b] += _window(a, b, self.shape[0], self.ramp_y)
        for x0, x1 in {(b[2], b[3]) for b in self.boxes}:
            a, b = self._span(x0, x1, self.sx, self.shape[1])
            norm_x[a:b] += _window(a, b, self.shape[1], self.ramp_x)
        self._norm_y = torch.from_numpy(norm_y).float()
        self._norm_x = torch.from_numpy(norm_x).float()

    @staticmethod
    def _span(p0: int, p1: int, scale: float, total: int) -> tuple[int, int]:
        a = min(total - 1, round(p0 * scale))
        return a, max(a + 1, min(total, round(p1 * scale)))

    def add(self, box: tuple[int, int, int, int], tile_map: torch.Tensor) -> None:
        """Add the map ``(h, w)`` (any resolution) of the tile ``box`` = ``(y0, y1, x0, x1)``."""
        ya, yb = self._span(box[0], box[1], self.sy, self.shape[0])
        xa, xb = self._span(box[2], box[3], self.sx, self.shape[1])
        m = tile_map.detach().float().cpu()
        if tuple(m.shape) != (yb - ya, xb - xa):
            m = F.interpolate(m[None, None], size=(yb - ya, xb - xa), mode="bilinear", align_corners=False)[0, 0]
        wy = torch.from_numpy(_window(ya, yb, self.shape[0], self.ramp_y)).float()
        wx = torch.from_numpy(_window(xa, xb, self.shape[1], self.ramp_x)).float()
        self.sum[ya:yb, xa:xb] += m * wy[:, None] * wx[None, :]

    def result(self) -> torch.Tensor:
        """The stitched map ``(h, w)``: weighted sum over the weight sum."""
        return self.sum / (self._norm_y[:, None] * self._norm_x[None, :])


def upsample_maps(maps: Sequence[np.ndarray | torch.Tensor], sizes: Sequence[tuple[int, int]]) -> np.ndarray | list[np.ndarray]:
    """Bring working-resolution maps to their images' sizes, once, at the end: float32 ``(B, H, W)``
    when all sizes agree (written into one array, no second copy), else a list of ``(H_i, W_i)``."""
    def one(m, size):
        t = torch.as_tensor(m).float()
        if tuple(t.shape) == tuple(size):
            return t.numpy()
        return F.interpolate(t[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()

    sizes = [tuple(s) for s in sizes]
    if len(maps) == 1:
        return one(maps[0], sizes[0])[None]
    if len(set(sizes)) == 1:
        out = np.empty((len(maps), *sizes[0]), dtype=np.float32)
        for i, (m, s) in enumerate(zip(maps, sizes, strict=True)):
            out[i] = one(m, s)
        return out
    return [one(m, s) for m, s in zip(maps, sizes, strict=True)]
