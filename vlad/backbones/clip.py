"""OpenCLIP models (WinCLIP's backbone) and a tiny CLIP twin for tests."""

from __future__ import annotations

import logging

from pathlib import Path

from vlad.backbones import Backbone
from vlad.weights import WeightSpec

# A real open_clip CLIP, just very small: 96 px input, 16 px patches -> a 6x6 grid, 2 layers each side.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 96, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _weight_file(location: Path) -> Path:
    if location.is_file():
        return location
    for fname in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors", "model.safetensors"):
        if (location / fname).is_file():
            return location / fname
    raise FileNotFoundError(f"no open_clip weight file in {location}")


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs a warning when it builds a model without pretrained weights; with
    ``weights="random"`` that is what the user asked for, so it is not worth a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def load_clip(spec: WeightSpec, location: Path | None) -> Backbone:
    """Build an open_clip model; ``location`` None means random init."""
    import open_clip

    if spec.tiny:
        model = open_clip.CLIP(**TINY_CLIP_CFG)
        tokenizer = open_clip.get_tokenizer("ViT-B-16")
    else:
        pretrained = None if location is None else str(_weight_file(location))
        quiet = _DropRandomInitNotice()
        logging.getLogger().addFilter(quiet)
        try:
            model = open_clip.create_model(spec.arch, pretrained=pretrained)
        finally:
            logging.getLogger().removeFilter(quiet)
        tokenizer = open_clip.get_tokenizer(spec.arch)
    model.requires_grad_(False)
    return Backbone(model, spec, tokenizer)
