"""Image and map resampling in numpy, equal to the torch operations vlad's scorers use.

* :func:`resize_image`: ``F.interpolate(mode="bicubic" | "bilinear", antialias=True,
  align_corners=False)`` followed by ``clamp(0, 1)``, as :func:`vlad.ops.to_batch` prepares a backbone's
  input. Torch's antialiased kernels are separable filters with weights computed per output pixel
  (the Pillow algorithm: the filter is widened by the scale when downscaling; bicubic uses ``a = -0.5``),
  so the resize is two small matrix products.
* :func:`resize_map`: ``F.interpolate(mode="bilinear", align_corners=False)`` without antialiasing, as
  :func:`vlad.ops.resize_maps` brings maps to an image's own size.
* :func:`gaussian_blur`: :func:`vlad.ops.gaussian_blur` (separable, reflect padding, replicate when the
  map is smaller than the kernel).

Only numpy is imported: this module runs where torch is not installed (:mod:`vlad.runtime`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


@lru_cache(maxsize=64)
def antialias_weights(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """``(out_size, in_size)`` float32 weights of torch's antialiased 1-D resampling (Pillow's rule).

    Computed in float32 step by step as torch computes them for float32 images (its centre and filter
    arguments are float32): a float64 computation differs from torch's result by up to ~2e-5.
    """
    f32 = np.float32
    if interpolation == "bicubic":
        kernel, half = _cubic, 2.0
    elif interpolation == "bilinear":
        kernel, half = _triangle, 1.0
    else:
        raise ValueError(f"antialiased resize supports 'bicubic' and 'bilinear', got {interpolation!r}")
    scale = f32(in_size) / f32(out_size)
    support = f32(half * float(scale)) if scale >= 1.0 else f32(half)
    inv = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
    w = np.zeros((out_size, in_size), dtype=np.float32)
    for i in range(out_size):
        center = f32(float(scale) * (i + 0.5))
        lo = max(int(float(f32(center - support)) + 0.5), 0)
        hi = min(int(float(f32(center + support)) + 0.5), in_size)
        j = np.arange(lo, hi)
        arg = ((j.astype(np.float32) - center).astype(np.float64) + 0.5) * float(inv)
        k = kernel(arg.astype(np.float32).astype(np.float64)).astype(np.float32)
        total = f32(0.0)
        for v in k:  # sequential float32 sum, as torch
            total = f32(total + v)
        w[i, lo:hi] = k / total if total != 0 else f32(0.0)
    return w


@lru_cache(maxsize=64)
def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 weights of torch's bilinear resampling (``align_corners=False``)."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)  # float32 arithmetic, as torch's for float32 maps
    w = np.zeros((out_size, in_size), dtype=np.float32)
    for i in range(out_size):
        src = max(f32(scale * f32(f32(i) + f32(0.5)) - f32(0.5)), f32(0.0))
        i0 = min(int(src), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = f32(src - f32(i0))
        w[i, i0] += np.float32(1.0) - lam
        w[i, i1] += lam
    return w


def resize_image(pixels: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """An ``(H, W, 3)`` float32 image in [0, 1] as a ``(3, h, w)`` backbone input, clamped to [0, 1].

    Equal to :func:`vlad.ops.to_batch`'s resize (to float rounding); an image already at ``size`` is
    passed through unchanged, as there.
    """
    h, w = int(size[0]), int(size[1])
    x = np.ascontiguousarray(np.transpose(pixels, (2, 0, 1)), dtype=np.float32)
    if x.shape[1:] == (h, w):
        return x
    wh = antialias_weights(x.shape[1], h, interpolation)
    ww = antialias_weights(x.shape[2], w, interpolation)
    out = np.matmul(np.matmul(wh, x), ww.T)  # (3, h, w)
    return np.clip(out, 0.0, 1.0, out=out)


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one ``(h, w)`` map to ``size`` = ``(H, W)`` (float32)."""
    m = np.asarray(m, dtype=np.float32)
    if m.shape == tuple(size):
        return m
    wh = bilinear_weights(m.shape[0], int(size[0]))
    ww = bilinear_weights(m.shape[1], int(size[1]))
    return (wh @ m) @ ww.T


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian with radius ``ceil(4 sigma)`` (as :func:`vlad.ops.gaussian_kernel1d`)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / np.float32(sigma)) ** 2).astype(np.float32)
    return k / k.sum()


def gaussian_blur(m: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian smoothing of one ``(H, W)`` map; ``sigma <= 0`` returns it unchanged."""
    if sigma <= 0:
        return np.asarray(m, dtype=np.float32)
    k = gaussian_kernel1d(sigma)
    r = (k.size - 1) // 2
    mode = "reflect" if r <= min(m.shape) - 1 else "edge"
    x = np.pad(np.asarray(m, dtype=np.float32), r, mode=mode)
    h, w = m.shape
    rows = np.zeros((x.shape[0], w), dtype=np.float32)
    for t in range(k.size):
        rows += k[t] * x[:, t : t + w]
    out = np.zeros((h, w), dtype=np.float32)
    for t in range(k.size):
        out += k[t] * rows[t : t + h]
    return out
