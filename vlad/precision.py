"""Reduced precision of the pretrained-backbone forwards: ``precision="fp32" | "bf16" | "fp16"``.

Every scorer built on a pretrained backbone takes ``precision``. With ``"bf16"`` or ``"fp16"`` the
backbone's forward passes run under :func:`torch.autocast` with that dtype on the scorer's device type,
and their outputs are cast back to float32 before anything else touches them: distances, nearest-neighbour
search, Gaussians, flows, calibration and fusion stay float32. ``"fp32"`` (the default) enters no autocast
context at all, so results are bit-identical to a scorer without the option. Trained parts (a student, a
flow, a head) always run in float32.

Usage inside a scorer::

    with autocast(self.precision, self.device_):
        feats = model(x)
    feats = to_float32(feats)

The value is checked where it enters (``fit``, ``load``, the detector, the command line) with
:func:`check_precision`, which also asks torch whether autocast with that dtype works on the device (once
per device and dtype); a combination torch cannot run (bf16 on a GPU without bfloat16, fp16 on the CPU of
an older torch) is an :class:`~vlad.errors.InvalidParameterError` that names the precision to use instead.

This module imports torch only inside its functions: the command line reads :data:`PRECISIONS` cheaply.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any

from vlad.errors import InvalidParameterError

#: accepted values of ``precision``, the default first
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_PRECISION = "fp32"
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def check_precision_value(precision: Any, name: str = "precision") -> str:
    """``precision`` if it is one of :data:`PRECISIONS`.

    Raises:
        InvalidParameterError: anything else; the message names the parameter, the value and the accepted values.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InvalidParameterError(
            f"{name} must be one of {', '.join(repr(p) for p in PRECISIONS)}, got {precision!r} ('fp32': full "
            "precision, the default; 'bf16'/'fp16': the backbone forwards run in bfloat16/float16 autocast)"
        )
    return precision


def autocast_dtype(precision: str):
    """The torch dtype of ``precision``, None for ``"fp32"`` (no autocast)."""
    import torch

    name = _DTYPE_NAMES.get(check_precision_value(precision))
    return None if name is None else getattr(torch, name)


@functools.lru_cache(maxsize=None)
def _autocast_failure(device: str, precision: str) -> str | None:
    """Why autocast at ``precision`` does not work on ``device`` (None when it does): a small matrix
    product is run under it and must come out in the autocast dtype, without torch warning or raising."""
    import torch

    dtype = autocast_dtype(precision)
    dev = torch.device(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns and disables autocast for a dtype it cannot run
            with torch.autocast(dev.type, dtype=dtype):
                a = torch.ones(4, 4, device=dev)
                out = a @ a
    except (RuntimeError, UserWarning, ValueError, AssertionError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if out.dtype != dtype:
        return f"autocast left a matrix product in {out.dtype}"
    return None


def check_precision(precision: Any, device: Any, name: str = "precision") -> str:
    """``precision`` checked: one of :data:`PRECISIONS`, and runnable with autocast on ``device``.

    Args:
        precision: the value given.
        device: a resolved torch device (or its name).
        name: the parameter's name in messages (``"--precision"`` on the command line).

    Raises:
        InvalidParameterError: an unknown value, or a dtype torch cannot autocast to on this device; the
            message says which precision to use instead.
    """
    precision = check_precision_value(precision, name)
    if precision == DEFAULT_PRECISION:
        return precision
    reason = _autocast_failure(str(device), precision)
    if reason is None:
        return precision
    others = [p for p in PRECISIONS[1:] if p != precision and _autocast_failure(str(device), p) is None]
    instead = f"{others[0]!r} (or 'fp32')" if others else "'fp32'"
    raise InvalidParameterError(
        f"{name}={precision!r} is not supported on device {str(device)!r} with this torch ({reason}); "
        f"use {name}={instead}"
    )


def autocast(precision: str, device: Any):
    """The context of a backbone forward: :func:`torch.autocast` at ``precision`` on ``device``'s type, or
    a context that does nothing for ``"fp32"``.

    Raises:
        InvalidParameterError: as :func:`check_precision`.
    """
    if check_precision(precision, device) == DEFAULT_PRECISION:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(torch.device(device).type, dtype=autocast_dtype(precision))


def to_float32(out: Any) -> Any:
    """Floating tensors in ``out`` (a tensor, or a list, tuple or dict of them) as float32; anything else
    unchanged. A float32 tensor is returned as it is (no copy)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, list):
        return [to_float32(o) for o in out]
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(to_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: to_float32(v) for k, v in out.items()}
    return out
