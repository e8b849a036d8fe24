"""Synthetic anomalies for training scorers on normal images only.

Two families from the anomaly-synthesis literature, reusable by any trainable scorer:

* **CutPaste** (Li et al., CVPR 2021, arXiv 2104.04015): a random rectangle is cut from the image and
  pasted elsewhere, optionally colour-jittered (:func:`cutpaste`); the *scar* variant pastes a thin,
  rotated rectangle (:func:`cutpaste_scar`).
* **Cracks and scratches** (:func:`crack`): a thin random-walk line, darker or lighter than its
  surroundings, the shape of scratches and cracks that neither of the above draws.
* **Perlin-noise masked texture blending** (DRAEM, Zavrtanik et al., ICCV 2021, arXiv 2108.07610):
  2-D Perlin noise at a random scale is thresholded to a mask; a texture source (another image, or the
  image itself augmented) is blended into the masked area with an opacity ``beta`` drawn from
  ``[0.1, 1)``: ``aug = img * (1 - m) + (1 - beta) * texture * m + beta * img * m``
  (:func:`perlin_blend`). DRAEM draws its textures from the DTD dataset; vlad ships no dataset, so the
  default texture source is the image itself (or any image passed as ``texture``), augmented.

Every function takes a float ``(H, W, 3)`` array in [0, 1] and a :class:`numpy.random.Generator`, and
returns ``(augmented image (H, W, 3) float32 in [0, 1], mask (H, W) float32 in {0, 1})``. The result depends
only on the inputs and the generator's state: the same seed gives the same output.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "perlin_noise",
    "perlin_mask",
    "augment_texture",
    "perlin_blend",
    "cutpaste",
    "cutpaste_scar",
    "crack",
    "defect",
    "DEFECT_KINDS",
    "synthesize",
]


def _check_image(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a float (H, W, 3) image in [0, 1], got shape {arr.shape}; "
                         "load it with vlad.images.load_image(...).pixels")
    if arr.shape[0] < 4 or arr.shape[1] < 4:
        raise ValueError(f"image too small for synthesis: {arr.shape[:2]}, need at least 4x4 pixels")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1], got dtype {arr.dtype}; divide uint8 by 255")
    return arr.astype(np.float32, copy=False)


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"expected a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    return rng


# -- Perlin noise --------------------------------------------------------------------------------------
def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise with ``res`` = (cells along y, cells along x) over ``shape`` = (H, W).

    Any shape works (noise is generated on a grid padded to a multiple of ``res`` and cropped).

    Returns:
        float32 ``(H, W)``, roughly in [-1, 1] (about [-0.71, 0.71]).
    """
    rng = _check_rng(rng)
    h, w = int(shape[0]), int(shape[1])
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    ch, cw = math.ceil(h / ry), math.ceil(w / rx)  # pixels per cell
    ph, pw = ch * ry, cw * rx
    angles = rng.uniform(0.0, 2 * math.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (ry+1, rx+1, 2)
    # local coordinates inside each cell, in [0, 1)
    ty = (np.arange(ph) % ch) / ch
    tx = (np.arange(pw) % cw) / cw
    iy = np.arange(ph) // ch
    ix = np.arange(pw) // cw
    fy, fx = np.meshgrid(ty, tx, indexing="ij")
    gy, gx = np.meshgrid(iy, ix, indexing="ij")

    def dot(oy: int, ox: int) -> np.ndarray:
        g = grads[gy + oy, gx + ox]
        return g[..., 0] * (fx - ox) + g[..., 1] * (fy - oy)

    n00, n10, n01, n11 = dot(0, 0), dot(0, 1), dot(1, 0), dot(1, 1)
    u, v = _fade(fx), _fade(fy)
    top = n00 + u * (n10 - n00)
    bottom = n01 + u * (n11 - n01)
    noise = math.sqrt(2) * (top + v * (bottom - top))
    return noise[:h, :w].astype(np.float32)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    min_scale: int = 0,
    max_scale: int = 6,
    threshold: float = 0.5,
    max_tries: int = 20,
) -> np.ndarray:
    """A binary anomaly mask from thresholded Perlin noise, as in DRAEM.

    The noise scale along each axis is ``2 ** k`` cells with ``k`` drawn from ``[min_scale, max_scale)``
    independently; the noise is randomly rotated by a multiple of 90 degrees / flipped (DRAEM rotates it
    by a random angle in [-90, 90]) and thresholded at ``threshold``. Redrawn until non-empty.

    Returns:
        float32 ``(H, W)`` in {0, 1}, with at least one pixel set.
    """
    rng = _check_rng(rng)
    if not 0 <= min_scale < max_scale:
        raise ValueError(f"need 0 <= min_scale < max_scale, got {min_scale}, {max_scale}")
    h, w = int(shape[0]), int(shape[1])
    for _ in range(max_tries):
        sy = 2 ** int(rng.integers(min_scale, max_scale))
        sx = 2 ** int(rng.integers(min_scale, max_scale))
        k = int(rng.integers(0, 4))
        hh, ww = (w, h) if k % 2 else (h, w)
        noise = np.rot90(perlin_noise((hh, ww), (min(sy, hh), min(sx, ww)), rng), k)
        if rng.random() < 0.5:
            noise = noise[:, ::-1]
        mask = (noise > threshold).astype(np.float32)
        if mask.any():
            return np.ascontiguousarray(mask)
    # Extremely unlikely: fall back to a small blob around the noise maximum.
    mask = np.zeros((h, w), np.float32)
    y, x = np.unravel_index(int(np.argmax(noise)), noise.shape)
    mask[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] = 1.0
    return mask


# -- texture augmentation ------------------------------------------------------------------------------
def _gamma(img, rng):
    return img ** rng.uniform(0.5, 2.0)


def _brightness_contrast(img, rng):
    return (img - 0.5) * rng.uniform(0.6, 1.6) + 0.5 + rng.uniform(-0.25, 0.25)


def _invert(img, rng):
    return 1.0 - img


def _posterize(img, rng):
    levels = 2 ** int(rng.integers(1, 4))
    return np.floor(img * levels) / levels


def _solarize(img, rng):
    t = rng.uniform(0.3, 0.8)
    return np.where(img > t, 1.0 - img, img)


def _colour(img, rng):
    mix = rng.dirichlet(np.ones(3), size=3).astype(np.float32)  # random channel mixing
    return img @ mix.T


def _autocontrast(img, rng):
    lo, hi = img.min(axis=(0, 1), keepdims=True), img.max(axis=(0, 1), keepdims=True)
    return (img - lo) / np.maximum(hi - lo, 1e-6)


def _geometric(img, rng):
    out = np.rot90(img, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        out = out[::-1]
    return out


_TEXTURE_OPS = (_gamma, _brightness_contrast, _invert, _posterize, _solarize, _colour, _autocontrast)


def _fit_to(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Tile/crop ``img`` to ``shape`` (no interpolation, keeps the texture's scale)."""
    h, w = shape
    reps = (math.ceil(h / img.shape[0]), math.ceil(w / img.shape[1]), 1)
    return np.tile(img, reps)[:h, :w]


def augment_texture(image: np.ndarray, rng: np.random.Generator, n_ops: int = 3) -> np.ndarray:
    """Randomly re-style an image to serve as an anomaly texture (DRAEM: 3 random imgaug-like ops).

    Applies a random rotation/flip, a random circular shift and ``n_ops`` of: gamma, brightness/contrast,
    invert, posterize, solarize, colour mixing, autocontrast.

    Returns:
        float32 ``(H, W, 3)`` in [0, 1], same shape as ``image``.
    """
    img = _check_image(image)
    rng = _check_rng(rng)
    h, w = img.shape[:2]
    out = _geometric(img, rng)
    out = np.roll(out, (int(rng.integers(0, out.shape[0])), int(rng.integers(0, out.shape[1]))), axis=(0, 1))
    out = _fit_to(np.ascontiguousarray(out), (h, w))
    for idx in rng.choice(len(_TEXTURE_OPS), size=min(n_ops, len(_TEXTURE_OPS)), replace=False):
        out = np.clip(_TEXTURE_OPS[int(idx)](out, rng), 0.0, 1.0)
    return np.ascontiguousarray(out, dtype=np.float32)


def perlin_blend(
    image: np.ndarray,
    rng: np.random.Generator,
    texture: np.ndarray | None = None,
    beta_range: tuple[float, float] = (0.1, 1.0),
    min_scale: int = 0,
    max_scale: int = 6,
    threshold: float = 0.5,
    augment: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM's synthetic anomaly: blend a texture into ``image`` inside a Perlin-noise mask.

    Args:
        image: float ``(H, W, 3)`` in [0, 1].
        rng: numpy Generator (all randomness comes from it).
        texture: texture source ``(h, w, 3)`` in [0, 1] (e.g. another image; tiled/cropped to ``image``'s
            size); None uses ``image`` itself.
        beta_range: opacity of the original image inside the mask, drawn uniformly from ``[lo, hi)``.
        min_scale, max_scale, threshold: see :func:`perlin_mask`.
        augment: re-style the texture with :func:`augment_texture` (DRAEM does).

    Returns:
        ``(augmented (H, W, 3), mask (H, W))`` float32; the mask is non-empty.
    """
    img = _check_image(image)
    rng = _check_rng(rng)
    lo, hi = beta_range
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"beta_range must satisfy 0 <= lo < hi <= 1, got {beta_range}")
    src = img if texture is None else _fit_to(_check_image(texture), img.shape[:2])
    if augment:
        src = augment_texture(src, rng)
    mask = perlin_mask(img.shape[:2], rng, min_scale, max_scale, threshold)
    beta = float(rng.uniform(lo, hi))
    m = mask[..., None]
    out = img * (1 - m) + (1 - beta) * src * m + beta * img * m
    return np.clip(out, 0.0, 1.0).astype(np.float32), mask


# -- CutPaste ------------------------------------------------------------------------------------------
def _jitter(patch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Colour jitter: brightness, contrast, saturation (each +-strength) and a small hue-like mix."""
    out = patch * rng.uniform(1 - strength, 1 + strength)
    mean = out.mean()
    out = (out - mean) * rng.uniform(1 - strength, 1 + strength) + mean
    grey = out.mean(axis=2, keepdims=True)
    out = (out - grey) * rng.uniform(1 - strength, 1 + strength) + grey
    shift = rng.uniform(-strength, strength, size=3).astype(np.float32) * 0.3
    return np.clip(out + shift, 0.0, 1.0)


def _paste(img, patch, pmask, rng):
    """Paste ``patch`` (with its own ``pmask``) at a random place; returns (out, mask)."""
    h, w = img.shape[:2]
    ph, pw = patch.shape[:2]
    y = int(rng.integers(0, h - ph + 1))
    x = int(rng.integers(0, w - pw + 1))
    out = img.copy()
    mask = np.zeros((h, w), np.float32)
    region = out[y : y + ph, x : x + pw]
    region[:] = region * (1 - pmask[..., None]) + patch * pmask[..., None]
    mask[y : y + ph, x : x + pw] = pmask
    return out, mask


def cutpaste(
    image: np.ndarray,
    rng: np.random.Generator,
    area_ratio: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: float = 0.3,
    colour_jitter: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: cut a random rectangle and paste it at another random place.

    Args:
        image: float ``(H, W, 3)`` in [0, 1].
        rng: numpy Generator.
        area_ratio: the rectangle's area as a fraction of the image, drawn uniformly from this range.
        aspect_ratio: width/height drawn log-uniformly from ``[aspect_ratio, 1/aspect_ratio]``.
        colour_jitter: strength of the colour jitter on the pasted patch (0 disables it).

    Returns:
        ``(augmented (H, W, 3), mask (H, W))`` float32; the mask marks the pasted rectangle.
    """
    img = _check_image(image)
    rng = _check_rng(rng)
    h, w = img.shape[:2]
    area = rng.uniform(*area_ratio) * h * w
    log_r = math.log(aspect_ratio)
    ratio = math.exp(rng.uniform(log_r, -log_r))
    pw = int(np.clip(round(math.sqrt(area * ratio)), 1, w))
    ph = int(np.clip(round(math.sqrt(area / ratio)), 1, h))
    y0 = int(rng.integers(0, h - ph + 1))
    x0 = int(rng.integers(0, w - pw + 1))
    patch = img[y0 : y0 + ph, x0 : x0 + pw].copy()
    if colour_jitter > 0:
        patch = _jitter(patch, rng, colour_jitter)
    return _paste(img, patch, np.ones((ph, pw), np.float32), rng)


def cutpaste_scar(
    image: np.ndarray,
    rng: np.random.Generator,
    width: tuple[int, int] = (2, 16),
    height: tuple[int, int] = (10, 25),
    rotation: tuple[float, float] = (-45.0, 45.0),
    colour_jitter: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste-Scar: a thin rectangle (``width`` x ``height`` pixels at 256 px, scaled to the image),
    colour-jittered, rotated by an angle in ``rotation`` degrees and pasted at a random place.

    Returns:
        ``(augmented (H, W, 3), mask (H, W))`` float32; the mask marks the scar.
    """
    from scipy.ndimage import rotate

    img = _check_image(image)
    rng = _check_rng(rng)
    h, w = img.shape[:2]
    scale = min(h, w) / 256.0
    sw = max(1, min(w, int(round(rng.integers(width[0], width[1] + 1) * scale))))
    sh = max(2, min(h, int(round(rng.integers(height[0], height[1] + 1) * scale))))
    y0 = int(rng.integers(0, h - sh + 1))
    x0 = int(rng.integers(0, w - sw + 1))
    patch = img[y0 : y0 + sh, x0 : x0 + sw].copy()
    if colour_jitter > 0:
        patch = _jitter(patch, rng, colour_jitter)
    angle = float(rng.uniform(*rotation))
    patch = np.clip(rotate(patch, angle, axes=(1, 0), reshape=True, order=1, mode="constant"), 0, 1)
    pmask = rotate(np.ones((sh, sw), np.float32), angle, axes=(1, 0), reshape=True, order=1, mode="constant")
    pmask = (pmask > 0.5).astype(np.float32)
    if patch.shape[0] > h or patch.shape[1] > w:  # rotated scar larger than a tiny image: crop it
        patch, pmask = patch[:h, :w], pmask[:h, :w]
    if not pmask.any():
        pmask[pmask.shape[0] // 2, pmask.shape[1] // 2] = 1.0
    return _paste(img, patch.astype(np.float32), pmask, rng)


# -- cracks and scratches -------------------------------------------------------------------------------
def crack(
    image: np.ndarray,
    rng: np.random.Generator,
    length: float = 0.3,
    width: float = 1.5,
    strength: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """A thin crack or scratch: a random walk of ``length`` (share of the image's shorter side) drawn
    ``width`` pixels wide, darker (two times in three) or lighter than the image by ``strength`` (a share
    of the full range, at the line's centre; the edge fades over a pixel).

    Returns:
        ``(augmented (H, W, 3), mask (H, W))`` float32; the mask marks the line.
    """
    from scipy.ndimage import distance_transform_edt

    img = _check_image(image)
    rng = _check_rng(rng)
    h, w = img.shape[:2]
    n = max(2, int(round(length * min(h, w))))
    y, x = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
    heading = rng.uniform(0.0, 2 * math.pi)
    line = np.zeros((h, w), bool)
    for _ in range(n):  # unit steps; the heading wanders a little, as a crack does
        heading += rng.normal(0.0, 0.25)
        y = float(np.clip(y + math.sin(heading), 0, h - 1))
        x = float(np.clip(x + math.cos(heading), 0, w - 1))
        line[int(round(y)), int(round(x))] = True
    dist = distance_transform_edt(~line)
    weight = np.clip(width / 2.0 + 0.5 - dist, 0.0, 1.0).astype(np.float32)
    mask = (weight > 0.5).astype(np.float32)
    sign = -1.0 if rng.random() < 2 / 3 else 1.0
    out = img + sign * float(strength) * weight[..., None]
    return np.clip(out, 0.0, 1.0).astype(np.float32), mask


def _blob_mask(shape: tuple[int, int], area: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob of about ``area`` (share of the image) at a random place: low-frequency Perlin
    noise thresholded inside an ellipse."""
    h, w = shape
    side = math.sqrt(max(area, 1e-6) * h * w / 0.6)  # the blob fills about 60% of its box
    aspect = math.exp(rng.uniform(-0.7, 0.7))
    bh = int(np.clip(round(side / math.sqrt(aspect)), 3, h))
    bw = int(np.clip(round(side * math.sqrt(aspect)), 3, w))
    noise = perlin_noise((bh, bw), (2, 2), rng)
    yy, xx = np.mgrid[0:bh, 0:bw]
    ell = ((yy - (bh - 1) / 2) / (bh / 2)) ** 2 + ((xx - (bw - 1) / 2) / (bw / 2)) ** 2
    blob = (noise + 0.6 * (1 - ell)) > 0.25
    if not blob.any():
        blob[bh // 2, bw // 2] = True
    y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    mask = np.zeros((h, w), np.float32)
    mask[y0 : y0 + bh, x0 : x0 + bw] = blob
    return mask


#: the kinds :func:`defect` draws
DEFECT_KINDS = ("cutpaste", "perlin", "crack")


def defect(
    image: np.ndarray,
    rng: np.random.Generator,
    kind: str,
    area: float = 0.01,
    strength: float = 1.0,
    texture: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect of a given size and strength, for validation sets (see :mod:`vlad.selftune`).

    Args:
        image: float ``(H, W, 3)`` in [0, 1].
        rng: numpy Generator.
        kind: ``"cutpaste"`` (a patch of the image moved, colour-jittered), ``"perlin"`` (an irregular
            blob of re-styled texture: ``texture`` or the image itself) or ``"crack"`` (a thin line).
        area: the defect's size as a share of the image (for a crack: its length is ``sqrt(area)``
            times 3 of the shorter side).
        strength: in (0, 1]: the opacity of a patch or blob, the intensity change of a crack.

    Returns:
        ``(augmented (H, W, 3), mask (H, W))`` float32; the mask is non-empty.
    """
    img = _check_image(image)
    rng = _check_rng(rng)
    if not 0.0 < strength <= 1.0 or not 0.0 < area < 1.0:
        raise ValueError(f"need 0 < strength <= 1 and 0 < area < 1, got strength {strength}, area {area}")
    if kind == "crack":
        return crack(img, rng, length=3.0 * math.sqrt(area), width=float(rng.uniform(1.0, 2.5)),
                     strength=0.6 * strength)
    if kind == "cutpaste":
        out, mask = cutpaste(img, rng, area_ratio=(0.7 * area, 1.3 * area), colour_jitter=0.2)
    elif kind == "perlin":
        mask = _blob_mask(img.shape[:2], area, rng)
        src = augment_texture(img if texture is None else _fit_to(_check_image(texture), img.shape[:2]), rng)
        out = img * (1 - mask[..., None]) + src * mask[..., None]
    else:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECT_KINDS}")
    m = mask[..., None] * float(strength)
    return np.clip(img * (1 - m) + out * m, 0.0, 1.0).astype(np.float32), mask


_KINDS = {"perlin": perlin_blend, "cutpaste": cutpaste, "scar": cutpaste_scar, "crack": crack}


def synthesize(image: np.ndarray, rng: np.random.Generator, kind: str = "perlin", **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch to one synthesis by name: ``"perlin"``, ``"cutpaste"``, ``"scar"`` or ``"crack"``."""
    if kind not in _KINDS:
        raise ValueError(f"unknown synthesis kind {kind!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[kind](image, rng, **kwargs)
