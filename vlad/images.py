"""Read any image a plant produces into a float RGB array, or fail with a clear InvalidImageError.

Accepted: file paths (PNG incl. 16-bit/palette/RGBA/grey, JPEG with EXIF rotation, BMP, TIFF, ...),
PIL images, numpy arrays ``(H, W)`` / ``(H, W, C)`` (uint8, uint16, bool or float in [0, 1]) and torch
tensors ``(C, H, W)`` / ``(H, W)`` (float in [0, 1] or uint8). Everything becomes float32 ``(H, W, 3)``
in [0, 1]; an alpha channel is dropped (inspection images are opaque).

**Memory.** 8-bit sources (most files, uint8 arrays) are kept as uint8 ``(H, W, 3)`` (3 bytes per
pixel, not 12): :attr:`LoadedImage.data` is what is stored, :attr:`LoadedImage.pixels` the float32
view of it (a converted copy for uint8 data). Resizing (:func:`vlad.ops.to_batch`) and tiling read
``data`` directly, so a large image is never held as float32 in full.

**Pixel limit.** A file with more than :func:`max_image_pixels` pixels (default
:data:`DEFAULT_MAX_IMAGE_PIXELS`, 200 megapixels: a 14142 x 14142 image) is refused before it is
decoded, with an :class:`~vlad.errors.InvalidImageError` naming its size and how to raise the limit:
the environment variable ``VLAD_MAX_IMAGE_PIXELS=<pixels>`` (``0`` = no limit), ``--max-pixels`` on
the command line, or :func:`set_max_image_pixels` in Python. This replaces PIL's own
decompression-bomb limit for files read by vlad.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageTooLargeError, InvalidImageError
from .types import ImageFailure

#: what a folder is searched for: the common formats, the netpbm family that machine-vision cameras write
#: (8 to 16 bits), and GIF (its first frame)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm", ".pbm", ".gif")
MIN_SIZE = 8  # smaller images cannot give a meaningful map from any backbone
#: environment variable setting the pixel limit for files (whole number of pixels; 0 = no limit)
MAX_PIXELS_ENV = "VLAD_MAX_IMAGE_PIXELS"
#: files with more pixels are refused unless the limit is raised (200 Mpx: 12000 x 12000 passes)
DEFAULT_MAX_IMAGE_PIXELS = 200_000_000
_max_pixels_override: int | None = None
_EXIF_ORIENTATION = 0x0112
_STRIP_PIXELS = 1 << 22  # decoded images larger than this are copied to numpy a strip at a time


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for a scorer: ``data`` ``(H, W, 3)``, uint8 (0..255) or float32 (0..1), and a name."""

    data: np.ndarray
    name: str

    @property
    def pixels(self) -> np.ndarray:
        """float32 ``(H, W, 3)`` in [0, 1] (for uint8 data a new array: 12 bytes per pixel)."""
        if self.data.dtype == np.uint8:
            return self.data.astype(np.float32) / 255.0
        return self.data

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.data.shape[0], self.data.shape[1]

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> LoadedImage:
        """The region ``[y0:y1, x0:x1]`` as a LoadedImage sharing this one's memory (no copy)."""
        return LoadedImage(self.data[y0:y1, x0:x1], f"{self.name}[{y0}:{y1},{x0}:{x1}]")


def _pil_to_array(img: Image.Image, name: str) -> np.ndarray:
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose would copy even an upright image
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # Pillow spreads a netpbm file's samples over 0..65535 whenever its maxval is above 255 (12-bit
        # cameras write 4095), so a dim one with every sample under 256 is still 16-bit, not 8-bit
        sixteen = img.mode.startswith("I;16") or img.format == "PPM"
        peak = 65535.0 if sixteen or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak, 0.0, 1.0)[..., None].repeat(3, axis=2)
        return arr.astype(np.float32)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return _array_to_rgb(arr, name)
    width, height = img.size
    if width * height <= _STRIP_PIXELS:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # uint8 (H, W, 3), kept as is
    # a large image: copied out strip by strip (a whole-image conversion would hold two more full copies)
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // width)
    for y0 in range(0, height, rows):
        strip = img.crop((0, y0, width, min(height, y0 + rows)))
        out[y0 : y0 + rows] = np.asarray(strip if strip.mode == "RGB" else strip.convert("RGB"))
    return out


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InvalidImageError(
            f"{name}: expected an (H, W), (H, W, 1|3|4) array or (1|3|4, H, W) tensor, got shape "
            f"{tuple(arr.shape)}"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.uint8:
        pass  # kept as uint8 (see LoadedImage.pixels)
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise InvalidImageError(f"{name}: the image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise InvalidImageError(
                f"{name}: float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                "divide by 255 (8-bit) or 65535 (16-bit) first, or pass a uint8/uint16 array"
            )
        arr = np.clip(arr, 0.0, 1.0)
    else:
        raise InvalidImageError(f"{name}: unsupported dtype {arr.dtype}; use uint8, uint16, bool or float")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def set_max_image_pixels(limit: int | None) -> None:
    """Set the pixel limit for files read by vlad in this process (None: back to the environment
    variable or the default; 0: no limit). Overrides ``$VLAD_MAX_IMAGE_PIXELS``.

    Raises:
        InvalidImageError: ``limit`` is not a non-negative whole number.
    """
    global _max_pixels_override
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        raise InvalidImageError(f"the pixel limit must be a whole number of pixels >= 0 (0: no limit), got {limit!r}")
    _max_pixels_override = None if limit is None else int(limit)


def max_image_pixels() -> int | None:
    """The pixel limit in force for files: :func:`set_max_image_pixels`, else ``$VLAD_MAX_IMAGE_PIXELS``
    (read at each call), else :data:`DEFAULT_MAX_IMAGE_PIXELS`; None means no limit.

    Raises:
        InvalidImageError: the environment variable is not a whole number.
    """
    if _max_pixels_override is not None:
        return _max_pixels_override or None
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        raise InvalidImageError(f"{MAX_PIXELS_ENV}={value!r} is not a whole number of pixels (0: no limit)") from None
    return limit if limit > 0 else None


def _too_large(name: str, width: int, height: int, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{name}: {width}x{height} = {width * height} pixels is over the limit of {limit} pixels, which "
        f"guards against decompression bombs. If the image is genuine, raise the limit: environment variable "
        f"{MAX_PIXELS_ENV}=<pixels> (0: no limit), `--max-pixels N` on the command line, or "
        f"{__name__}.set_max_image_pixels(N) in Python; or downscale the image"  # vlad.images or vlad_runtime.images
    )


_pil_limit_lock = threading.Lock()
_pil_limit_users = 0  # decodes under way with PIL's check off (several threads may decode at once)
_pil_limit_saved = None


@contextmanager
def _pil_limit_off():
    """vlad checks the pixel limit itself (with the size in its message): PIL's check is off meanwhile.
    Counted, so that threads decoding at once (``vlad serve``'s decoders) neither restore PIL's limit
    under another thread's decode nor leave it off for good."""
    global _pil_limit_users, _pil_limit_saved
    with _pil_limit_lock:
        if _pil_limit_users == 0:
            _pil_limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_limit_users += 1
    try:
        yield
    finally:
        with _pil_limit_lock:
            _pil_limit_users -= 1
            if _pil_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit_saved


def _cannot_open(name: str, exc: OSError) -> InvalidImageError:
    return InvalidImageError(f"{name}: cannot be opened ({exc.strerror or exc}); check that this user may read "
                             "it (its permissions) and that the disk or share holding it is reachable")


def _read_file(path: Path) -> np.ndarray:
    name = str(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise InvalidImageError(f"{name}: a broken link: it points to {os.readlink(path)}, which does not "
                                    "exist") from None
        raise InvalidImageError(f"{name}: no such file") from None
    except OSError as exc:  # permission denied on a folder above it, a loop of links, an I/O error
        raise _cannot_open(name, exc) from None
    if stat.S_ISDIR(info.st_mode):
        raise InvalidImageError(f"{name}: is a folder; pass the image files (or use vlad.images.list_images)")
    if info.st_size == 0:
        raise InvalidImageError(f"{name}: the file is empty")
    limit = max_image_pixels()
    try:
        fh = open(path, "rb")
    except OSError as exc:  # e.g. no read permission: the file is fine, this user cannot read it
        raise _cannot_open(name, exc) from None
    with fh:
        return _decode(fh, name, limit)


def _decode(fh, name: str, limit: int | None) -> np.ndarray:
    """Decode the image file open as ``fh`` (a binary file object), refusing more than ``limit`` pixels
    from its header, before decoding."""
    try:
        with _pil_limit_off(), Image.open(fh) as img:
            width, height = img.size
            if limit is not None and width * height > limit:  # from the header, before decoding
                raise _too_large(name, width, height, limit)
            img.load()  # decode fully now so truncation is caught here, not later
            return _pil_to_array(img, name)
    except InvalidImageError:
        raise  # over the pixel limit: a ValueError too, but its own message already says everything
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name}: not an image file PIL can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{name}: corrupt or truncated image ({exc})") from exc


def load_image_bytes(data: bytes | bytearray | memoryview, name: str = "<bytes>") -> LoadedImage:
    """Read an image file held in memory (e.g. an HTTP request's body) exactly as :func:`load_image` reads
    it from disk: the same decoder, the same pixel limit (checked from the header before decoding), the
    same array.

    Raises:
        ImageTooLargeError: more pixels than :func:`max_image_pixels`.
        InvalidImageError: empty, not an image, corrupt or truncated, or smaller than 8 x 8 pixels.
    """
    import io

    if not len(data):
        raise InvalidImageError(f"{name}: the file is empty")
    pixels = _decode(io.BytesIO(data), name, max_image_pixels())
    h, w = pixels.shape[:2]
    if h < MIN_SIZE or w < MIN_SIZE:
        raise InvalidImageError(f"{name}: image is {h}x{w}; at least {MIN_SIZE}x{MIN_SIZE} pixels are needed")
    return LoadedImage(pixels, name)


def _default_name(image) -> str:
    """What an input is called in messages: its path, or the kind of image it is in memory."""
    if isinstance(image, (str, os.PathLike)):
        return str(Path(image))
    if isinstance(image, Image.Image):
        return "<PIL image>"
    if isinstance(image, np.ndarray):
        return "<array>"
    if type(image).__module__.startswith("torch"):
        return "<tensor>"
    return f"<{type(image).__name__}>"


def load_image(image, name: str | None = None) -> LoadedImage:
    """Read one image of any accepted kind into a :class:`LoadedImage`.

    Raises:
        InvalidImageError: the input is not a readable image; the message names it.
    """
    name = name or _default_name(image)
    if isinstance(image, (str, os.PathLike)):
        pixels = _read_file(Path(image))
    elif isinstance(image, Image.Image):
        try:
            pixels = _pil_to_array(image, name)
        except OSError as exc:
            raise InvalidImageError(f"{name}: could not decode ({exc})") from exc
    elif isinstance(image, np.ndarray):
        pixels = _array_to_rgb(image, name)
    elif type(image).__module__.startswith("torch"):
        arr = image.detach().cpu()
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
            arr = arr.permute(1, 2, 0)
        elif arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
            arr = arr.permute(1, 2, 0)  # ambiguous tiny case: torch images are channel-first
        pixels = _array_to_rgb(arr.numpy(), name)
    else:
        raise InvalidImageError(
            f"expected a path, PIL image, numpy array or torch tensor, got {type(image).__name__}"
        )
    h, w = pixels.shape[:2]
    if h < MIN_SIZE or w < MIN_SIZE:
        raise InvalidImageError(f"{name}: image is {h}x{w}; at least {MIN_SIZE}x{MIN_SIZE} pixels are needed")
    return LoadedImage(pixels, name)


def as_image_list(images) -> list:
    """The inputs of one call as a list of single images (a path, a PIL image, an array or a tensor
    each); a ``(B, H, W, C)`` array or ``(B, C, H, W)`` tensor is B images. Nothing is read."""
    return _as_sequence(images)


def _as_sequence(images) -> list:
    if isinstance(images, (str, os.PathLike, Image.Image, LoadedImage)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if type(images).__module__.startswith("torch") and hasattr(images, "ndim"):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Iterable):
        return list(images)
    return [images]


def _load_each(images, skip: bool) -> tuple[list[LoadedImage], tuple[ImageFailure, ...]]:
    items = _as_sequence(images)
    if not items:
        raise InvalidImageError("no images were given")
    loaded: list[LoadedImage] = []
    failures: list[ImageFailure] = []
    for i, item in enumerate(items):
        try:
            loaded.append(item if isinstance(item, LoadedImage) else load_image(item))
        except InvalidImageError as exc:
            if not skip:
                raise
            failures.append(ImageFailure.from_error(i, _default_name(item), exc))
    return loaded, tuple(failures)


def load_images(images) -> list[LoadedImage]:
    """Read one image or a sequence (a ``(B, ...)`` array/tensor counts as a batch).

    Raises:
        InvalidImageError: for the first unreadable input, or for an empty input.
    """
    return _load_each(images, skip=False)[0]


def load_readable(images) -> tuple[list[LoadedImage], tuple[ImageFailure, ...]]:
    """Read every input that can be read, as :func:`load_images` does, and list the others.

    Returns:
        The readable images, in input order, and an :class:`~vlad.types.ImageFailure` per unreadable
        one (its position among the inputs, its name and the error's message).

    Raises:
        InvalidImageError: an empty input (no images at all).
    """
    return _load_each(images, skip=True)


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted), by suffix. A link named like an image whose target is missing
    is listed too, so that reading it reports it rather than the folder silently losing an image.
    Raises InvalidImageError if there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidImageError(f"{root}: not a folder")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in root.glob(pattern)
                   if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or (p.is_symlink() and not p.exists())))
    if not files:
        raise InvalidImageError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def expand_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files stay files; folders become their image files. For the command line."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        out.extend(list_images(p) if p.is_dir() else [p])
    return out
