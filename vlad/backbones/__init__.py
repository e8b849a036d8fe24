"""Pretrained backbones (and their tiny random-init twins), built from a name in :mod:`vlad.weights`.

Usage::

    bb = load_backbone("vit_small_patch14_dinov2.lvd142m", weights="pretrained", device="cpu")
    bb.model, bb.spec.preprocess, bb.tokenizer  # tokenizer is set for CLIP models only

``weights`` is ``"pretrained"`` (resolved as in :func:`vlad.weights.resolve`), ``"random"`` (real
architecture, random init: for benchmarks) or a path to a folder/file of weights. Names starting with
``tiny-`` are miniature twins of the real architectures, always random, for tests; ``weights="tiny"``
swaps any backbone for the twin of its family.

Random initialisation is reproducible: every backbone is built on the CPU with torch's CPU generator
seeded with ``seed`` (default 0) inside :func:`vlad.rng.seeded`, then moved to the device, so two builds
with the same name, weights and seed are identical on every device (a saved random-weight scorer
reloads the backbone it was fitted with) and the caller's RNG state (CPU and GPU) is left exactly as it
was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlad.errors import InvalidDeviceError
from vlad.rng import seeded
from vlad.weights import WeightSpec, get_spec, resolve

WEIGHT_MODES = ("pretrained", "random", "tiny")


def tiny_twin(name: str) -> str:
    """The tiny random-init twin of backbone ``name``'s family."""
    spec = get_spec(name)
    if spec.tiny:
        return name
    if spec.library == "open_clip":
        return "tiny-clip"
    if spec.library == "transformers":
        return "tiny-mae"
    return "tiny-dino" if spec.arch.startswith("vit") else "tiny-cnn"


@dataclass
class Backbone:
    """A loaded backbone: the torch module, its weight spec (with preprocessing) and, for CLIP, a tokenizer."""

    model: torch.nn.Module
    spec: WeightSpec
    tokenizer: Any = None
    pretrained: bool = False


def weights_location(name: str, weights: str | os.PathLike) -> Path | None:
    """None for random weights, else the resolved folder or file holding pretrained ones."""
    spec = get_spec(name)
    if spec.tiny or weights == "random":
        return None
    if weights == "pretrained":
        return resolve(name)
    return resolve(name, weights_path=weights)


def load_backbone(
    name: str, weights: str | os.PathLike = "pretrained", device: str | torch.device = "cpu", seed: int = 0,
    **kwargs: Any,
) -> Backbone:
    """Build backbone ``name`` with the requested weights, in eval mode, on ``device``.

    Args:
        name: a key of :data:`vlad.weights.WEIGHTS`.
        weights: ``"pretrained"``, ``"random"``, ``"tiny"`` or a path to local weights.
        device: torch device.
        seed: seed of the random initialisation (of the whole model for ``"random"``/``"tiny"``, of any
            part pretrained weights do not cover otherwise); the caller's RNG state is not touched.
        **kwargs: passed to the family loader (e.g. ``out_indices`` for CNNs).

    Raises:
        WeightsNotAvailableError: pretrained weights asked for but not found.
    """
    if weights == "tiny":
        name, weights = tiny_twin(name), "random"
    spec = get_spec(name)
    location = weights_location(name, weights)
    if spec.library == "open_clip":
        from vlad.backbones.clip import load_clip as loader
    elif spec.library == "transformers":
        from vlad.backbones.mae import load_mae as loader
    elif spec.arch.startswith("vit") or name == "tiny-dino":
        from vlad.backbones.dino import load_dino as loader
    else:
        from vlad.backbones.cnn import load_cnn as loader
    with seeded(int(seed)):  # construction runs on the CPU generator only (vlad.rng)
        backbone = loader(spec, location, **kwargs)
    backbone.model.to(device).eval()
    backbone.pretrained = location is not None
    return backbone


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> cuda when available, else cpu; anything else checked and returned as a device.

    Raises:
        InvalidDeviceError: torch does not know the device string (e.g. ``"gpu0"``), or the device is not
            available here (``"cuda"`` without a GPU, driver or CUDA build of torch; ``"cuda:3"`` on a
            machine with fewer GPUs; ``"mps"`` off Apple silicon).
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidDeviceError(
            f"device {device!r} is not a device name torch knows; use cpu, cuda, cuda:N (N = GPU index), "
            "mps or auto"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidDeviceError(
                f"device {device!r} asked for, but CUDA is not available here (no GPU, no driver, or a CPU-only "
                "build of torch); use device 'cpu' (or 'auto' to take a GPU only when there is one)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidDeviceError(
                f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidDeviceError(f"device {device!r} asked for, but MPS is not available here; use 'cpu' or 'auto'")
    return dev
