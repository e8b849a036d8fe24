"""Convolutional feature extractors through timm (PatchCore, PaDiM, ...) and a tiny ResNet twin."""

from __future__ import annotations

from pathlib import Path

from vlad.backbones import Backbone
from vlad.weights import WeightSpec


def load_cnn(spec: WeightSpec, location: Path | None, out_indices: tuple[int, ...] = (2, 3)) -> Backbone:
    """A timm ``features_only`` model returning the stages in ``out_indices`` (1 = layer1, ... 4 = layer4)."""
    import timm

    if spec.tiny:
        # timm's own miniature ResNet: the same stage layout and strides as WRN-50, narrow channels.
        model = timm.create_model("test_resnet", pretrained=False, features_only=True, out_indices=out_indices)
    elif location is None:
        model = timm.create_model(spec.arch, pretrained=False, features_only=True, out_indices=out_indices)
    else:
        file = location if location.is_file() else location / spec.files[0]
        model = timm.create_model(
            spec.arch, pretrained=True, features_only=True, out_indices=out_indices,
            pretrained_cfg_overlay={"file": str(file)},
        )
    model.requires_grad_(False)
    return Backbone(model, spec)
