"""Multi-layer CNN patch features aligned to one grid, shared by the feature-based scorers.

PaDiM, SPADE, Patch SVDD and the FastFlow-style flow all read intermediate stages of a frozen ImageNet
CNN (timm ``features_only``; stage ``1`` = ``layer1`` at stride 4 ... ``4`` = ``layer4`` at stride 32).
This module loads such a backbone for a set of stages and turns its outputs into one feature map on a
common grid.

Usage::

    bb = load_cnn_stages("wide_resnet50_2.tv_in1k", "random", "cpu", layers=(1, 2, 3))
    x = preprocess_batch(images, bb.spec.preprocess, size=224)          # (B, 3, 224, 224)
    f = aligned_features(bb.model(x), target=0, mode="nearest")        # (B, 256+512+1024, 56, 56)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from vlad.backbones import Backbone, load_backbone
from vlad.errors import VladError
from vlad.images import LoadedImage
from vlad.ops import preprocess_batch
from vlad.precision import autocast, to_float32
from vlad.progress import track

logger = logging.getLogger(__name__)

#: the CNN stages a timm ResNet exposes (1 = layer1, stride 4 ... 4 = layer4, stride 32)
VALID_LAYERS = (1, 2, 3, 4)


def check_layers(layers: Sequence[int], owner: str) -> tuple[int, ...]:
    """Validate a tuple of CNN stages: non-empty, increasing, each in 1..4.

    Raises:
        VladError: the message names what was expected and what was got.
    """
    try:
        out = tuple(int(v) for v in layers)
    except (TypeError, ValueError):
        raise VladError(f"{owner}: layers must be a sequence of stage numbers in 1..4, got {layers!r}") from None
    if not out or any(v not in VALID_LAYERS for v in out) or list(out) != sorted(set(out)):
        raise VladError(
            f"{owner}: layers must be increasing stage numbers in 1..4 (1 = layer1, stride 4), got {layers!r}; "
            "e.g. layers=(1, 2, 3)"
        )
    return out


def load_cnn_stages(
    name: str, weights: str, device: torch.device | str, layers: Sequence[int], seed: int = 0
) -> Backbone:
    """A frozen CNN backbone (eval mode, no grad) returning the stages ``layers`` (``seed``: of a random
    initialisation).

    Raises:
        VladError: ``name`` is not a CNN backbone.
        WeightsNotAvailableError: pretrained weights asked for but not found.
    """
    bb = load_backbone(name, weights=weights, device=device, seed=seed, out_indices=tuple(layers))
    if not hasattr(bb.model, "feature_info"):
        raise VladError(
            f"backbone {name!r} is not a CNN feature extractor; these scorers need one such as "
            "'wide_resnet50_2.tv_in1k' or 'resnet18.tv_in1k'"
        )
    bb.model.requires_grad_(False)
    return bb


def stage_channels(bb: Backbone) -> list[int]:
    """Channels of each returned stage, in order."""
    return list(bb.model.feature_info.channels())


def aligned_features(
    features: Sequence[torch.Tensor], target: int = 0, mode: str = "bilinear", local_pool: int = 1
) -> torch.Tensor:
    """Concatenate stage outputs on the grid of stage ``target``.

    Args:
        features: stage outputs, each ``(B, C_i, h_i, w_i)``.
        target: index (into ``features``) of the stage whose grid is kept.
        mode: ``"nearest"`` (each coarse cell copied to the fine cells it covers, as PaDiM's code) or
            ``"bilinear"``.
        local_pool: >1 averages each stage over a ``local_pool x local_pool`` neighbourhood first
            (stride 1, PatchCore's local aggregation).

    Returns:
        ``(B, sum C_i, h_target, w_target)``.
    """
    size = features[target].shape[-2:]
    out = []
    for f in features:
        if local_pool > 1:
            f = F.avg_pool2d(f, local_pool, stride=1, padding=local_pool // 2, count_include_pad=False)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
        out.append(f)
    return torch.cat(out, dim=1)


def embed_all(
    images: Sequence[LoadedImage],
    bb: Backbone,
    size: int,
    device: torch.device,
    batch_size: int,
    fn: Callable[[list[torch.Tensor]], torch.Tensor],
    desc: str = "features",
    precision: str = "fp32",
) -> torch.Tensor:
    """Run the frozen backbone over ``images`` in batches and concatenate ``fn(stage outputs)``.

    The forwards run at ``precision`` (:mod:`vlad.precision`); ``fn`` gets the stages in float32.

    Returns:
        ``fn``'s outputs concatenated on dimension 0 (e.g. ``(N, C, h, w)``), on ``device``.
    """
    batch_size = max(1, int(batch_size or 8))
    batches = [list(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    iterator = track(batches, desc) if len(batches) > 1 else batches
    chunks = []
    with torch.inference_mode():
        for batch in iterator:
            x = preprocess_batch(batch, bb.spec.preprocess, device, size=size)
            chunks.append(fn(stage_outputs(bb, x, precision)))
    return torch.cat(chunks)


def stage_outputs(bb: Backbone, x: torch.Tensor, precision: str = "fp32") -> list[torch.Tensor]:
    """The frozen backbone's stage outputs for the batch ``x``, computed at ``precision`` (autocast on
    ``x``'s device, :mod:`vlad.precision`) and returned in float32."""
    with autocast(precision, x.device):
        out = list(bb.model(x))
    return to_float32(out)
