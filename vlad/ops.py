"""Small tensor operations shared by scorers: batching images, resizing and smoothing maps."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vlad.images import LoadedImage
from vlad.weights import Preprocess


def to_batch(
    images: Sequence[LoadedImage],
    size: int | tuple[int, int],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    device: torch.device | str = "cpu",
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Resize each image to ``size`` and normalise: float32 ``(B, 3, H, W)``.

    ``mean``/``std`` None leaves pixels in [0, 1]. Downscaling uses antialiasing. Images over
    :data:`RESIZE_CHUNK_PIXELS` pixels are resized in two separable passes over strips of rows, so
    that a large uint8 image is never converted to float32 whole (memory stays near the output's).
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    device = torch.device(device)
    out = []
    for img in images:
        out.append(_resized(img.data, hw, interpolation, device))
    batch = torch.cat(out).to(device)
    if mean is not None and std is not None:
        m = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=batch.device).view(1, 3, 1, 1)
        batch = (batch - m) / s
    return batch


#: images with more pixels than this are resized strip by strip (see :func:`to_batch`)
RESIZE_CHUNK_PIXELS = 1 << 22


#: within :func:`shared_device_copies`: id of an image array -> (the array, its copy on a device)
_device_copies: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vlad_device_copies", default=None)


@contextlib.contextmanager
def shared_device_copies():
    """Inside the block, an image copied to a GPU is copied once, whatever the number of scorers that
    read it (the detector scores each image with several); the copies are freed when the block ends."""
    token = _device_copies.set({})
    try:
        yield
    finally:
        _device_copies.reset(token)


def _to_device(arr: np.ndarray, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (a view of ``arr``) on ``device``: copied once within :func:`shared_device_copies`."""
    cache = _device_copies.get()
    key = (id(arr), str(device))
    hit = None if cache is None else cache.get(key)
    if hit is not None and hit[0] is arr:  # the array is kept with its copy, so its id is not reused
        return hit[1]
    # to a GPU from page-locked memory (measured on an H200: a pageable copy is ~50x slower)
    copy = (x.pin_memory() if device.type == "cuda" else x).to(device)
    if cache is not None:
        cache[key] = (arr, copy)
    return copy


def _as_float(arr: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """``(h, w, 3)`` uint8 or float32 -> float32 ``(1, 3, h, w)`` in [0, 1] (a view for float32 on the
    CPU); with a ``device``, the array is copied there first (as uint8: a quarter of the bytes)."""
    with warnings.catch_warnings():  # a decoded file's array is read-only; it is only read here
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(arr)
    if device is not None and device.type != "cpu":
        x = _to_device(arr, x, device)
    x = x.permute(2, 0, 1)[None]
    return x.float().div_(255.0) if arr.dtype == np.uint8 else x


def _interpolate(x: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    antialias = mode in ("bilinear", "bicubic")
    return F.interpolate(x, size=hw, mode=mode, align_corners=None if mode == "nearest" else False,
                         antialias=antialias)


def _resized(arr: np.ndarray, hw: tuple[int, int], mode: str, device: torch.device | None = None) -> torch.Tensor:
    """One ``(H, W, 3)`` image resized to ``hw``: float32 ``(1, 3, h, w)`` in [0, 1]. On a GPU ``device``
    the image is resized there (the host only copies its bytes); on the CPU, a large image strip by strip."""
    h, w = arr.shape[:2]
    if (h, w) == tuple(hw):
        return _as_float(arr, device)
    if device is not None and device.type != "cpu":
        return _interpolate(_as_float(arr, device), hw, mode).clamp_(0.0, 1.0)
    if h * w <= RESIZE_CHUNK_PIXELS or mode not in ("bilinear", "bicubic"):
        return _interpolate(_as_float(arr), hw, mode).clamp_(0.0, 1.0)
    # separable: widths first, a strip of rows at a time (the height pass at scale 1 is the identity)
    rows = max(8, RESIZE_CHUNK_PIXELS // w)
    strips = [_interpolate(_as_float(arr[r : r + rows]), (min(rows, h - r), hw[1]), mode) for r in range(0, h, rows)]
    x = torch.cat(strips, dim=2)
    del strips
    return _interpolate(x, hw, mode).clamp_(0.0, 1.0)


def preprocess_batch(
    images: Sequence[LoadedImage], pre: Preprocess, device: torch.device | str = "cpu", size=None
) -> torch.Tensor:
    """:func:`to_batch` with a backbone's :class:`~vlad.weights.Preprocess` (``size`` overrides its size)."""
    return to_batch(images, size or pre.size, pre.mean, pre.std, device, pre.interpolation)


def _blur_radius(sigma: float) -> int:
    """The radius of :func:`gaussian_kernel1d`: ``4 * sigma`` rounded up (scipy's default truncate)."""
    return max(1, int(math.ceil(4.0 * sigma)))


def gaussian_kernel1d(sigma: float, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius ``4 * sigma`` (as scipy's default truncate)."""
    radius = _blur_radius(sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, H, W)`` maps with reflect padding; sigma <= 0 is a no-op."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device).to(maps.dtype)
    r = (k.numel() - 1) // 2
    x = maps[:, None]
    # a map smaller than the kernel: replicate padding (reflect needs a side longer than the radius)
    x = F.pad(x, (r, r, r, r), mode=_blur_padding(tuple(maps.shape[-2:]), r))
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def _blur_padding(shape: tuple[int, int], radius: int) -> str:
    """The padding :func:`gaussian_blur` uses for maps of ``shape``: reflect, or replicate when a side is
    shorter than the kernel's radius + 1."""
    return "reflect" if min(shape[0], shape[1]) - 1 >= radius else "replicate"


@functools.lru_cache(maxsize=64)
def _resize_blur_matrix(n_in: int, n_out: int, sigma: float, padding: str, device: str) -> torch.Tensor:
    """``(n_out, n_in)`` float32 matrix of one axis of :func:`resize_blur`: linear interpolation from
    ``n_in`` to ``n_out`` samples (as bilinear ``F.interpolate``, ``align_corners=False``), then the 1-D
    Gaussian of :func:`gaussian_blur` with ``padding``. Built by passing the identity through both."""
    eye = torch.eye(n_in, dtype=torch.float64)[:, None]  # (n_in, 1, n_in): one unit impulse per row
    x = eye if n_in == n_out else F.interpolate(eye, size=n_out, mode="linear", align_corners=False)
    if sigma > 0:
        k = gaussian_kernel1d(sigma).double()
        r = (k.numel() - 1) // 2
        x = F.conv1d(F.pad(x, (r, r), mode=padding), k.view(1, 1, -1))
    return x[:, 0].T.contiguous().float().to(device)


def resize_blur(maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """:func:`resize_maps` to ``size`` followed by :func:`gaussian_blur` with ``sigma``, as two small
    matrix products (both steps are separable and linear: ``A_h @ m @ A_w.T``), so the cost grows with
    the output's pixels times the input's side rather than with the kernel at full size.

    Equals the two-step result to float32 rounding. ``maps``: ``(B, h, w)``; returns ``(B, H, W)``.
    """
    size = (int(size[0]), int(size[1]))
    sigma = float(sigma)
    if sigma <= 0 and tuple(maps.shape[-2:]) == size:
        return maps
    radius = _blur_radius(sigma) if sigma > 0 else 0
    padding = _blur_padding(size, radius)
    dev = str(maps.device)
    a_h = _resize_blur_matrix(maps.shape[-2], size[0], sigma, padding, dev)
    a_w = _resize_blur_matrix(maps.shape[-1], size[1], sigma, padding, dev)
    x = maps.float()
    # the smaller intermediate first: (B, h, w) -> (B, h, W) or (B, H, w)
    if maps.shape[-2] * size[1] <= size[0] * maps.shape[-1]:
        return a_h @ (x @ a_w.T)
    return (a_h @ x) @ a_w.T


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, h, w)`` maps to ``size`` = ``(H, W)``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def maps_to_image_sizes(maps: torch.Tensor, images: Sequence[LoadedImage]) -> list[np.ndarray]:
    """Resize each ``(h, w)`` map of ``maps`` ``(B, h, w)`` back to its image's own ``(H, W)``."""
    return [
        resize_maps(m[None].float(), img.size)[0].cpu().numpy().astype(np.float32)
        for m, img in zip(maps, images, strict=True)
    ]


def topk_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest ``fraction`` of each row of ``(B, N)`` (at least one value)."""
    k = max(1, int(round(values.shape[1] * fraction)))
    return values.topk(k, dim=1).values.mean(dim=1)
