"""Masked autoencoders (MAEDAY's backbone) through transformers, with their decoder, and a tiny twin."""

from __future__ import annotations

from pathlib import Path

from vlad.backbones import Backbone
from vlad.weights import WeightSpec

TINY_MAE_CFG = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2,
    "decoder_intermediate_size": 64, "image_size": 64, "patch_size": 16,
}


def load_mae(spec: WeightSpec, location: Path | None) -> Backbone:
    """Build ``ViTMAEForPreTraining``; ``location`` None means random init (base size by default)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    if spec.tiny:
        model = ViTMAEForPreTraining(ViTMAEConfig(**TINY_MAE_CFG))
    elif location is None:
        model = ViTMAEForPreTraining(ViTMAEConfig())  # the defaults are vit-mae-base's architecture
    else:
        folder = location.parent if location.is_file() else location
        model = ViTMAEForPreTraining.from_pretrained(str(folder), local_files_only=True)
    model.requires_grad_(False)
    return Backbone(model, spec)
