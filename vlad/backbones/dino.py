"""DINOv2 vision transformers through timm (AnomalyDINO's backbone) and a tiny twin."""

from __future__ import annotations

from pathlib import Path

from vlad.backbones import Backbone
from vlad.weights import WeightSpec


def load_dino(spec: WeightSpec, location: Path | None) -> Backbone:
    """Build a DINOv2 ViT that accepts any input size that is a multiple of its patch size."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if spec.tiny:
        model = VisionTransformer(
            img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=0,
            init_values=1e-5, dynamic_img_size=True,
        )
    else:
        kwargs = {"num_classes": 0, "dynamic_img_size": True}
        if location is None:
            model = timm.create_model(spec.arch, pretrained=False, **kwargs)
        else:
            file = location if location.is_file() else location / spec.files[0]
            model = timm.create_model(
                spec.arch, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs
            )
    model.requires_grad_(False)
    return Backbone(model, spec)
