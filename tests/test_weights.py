"""Weight resolution policy: explicit path, $VLAD_WEIGHTS_DIR, offline error naming places and fix."""

from __future__ import annotations

import pytest
import torch

import vlad
from vlad.backbones import load_backbone, tiny_twin
from vlad.weights import WEIGHTS, get_spec, is_offline, resolve


def test_offline_error_names_model_places_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("VLAD_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(vlad.WeightsNotAvailableError) as info:
        resolve("vit_small_patch14_dinov2.lvd142m")
    msg = str(info.value)
    assert "vit_small_patch14_dinov2.lvd142m" in msg
    assert str(tmp_path / "vit_small_patch14_dinov2.lvd142m") in msg
    assert "offline" in msg
    assert "vlad weights download vit_small_patch14_dinov2.lvd142m" in msg and "VLAD_WEIGHTS_DIR" in msg


def test_offline_flag_read_at_call_time(monkeypatch):
    for flag in ("VLAD_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    assert not is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_offline()


def test_every_default_backbone_has_a_tiny_twin_and_preprocessing():
    for name, spec in WEIGHTS.items():
        assert spec.preprocess.size > 0 and len(spec.preprocess.mean) == 3
        assert get_spec(tiny_twin(name)).tiny


def test_unknown_backbone_lists_known():
    with pytest.raises(KeyError, match="wide_resnet50_2.tv_in1k"):
        get_spec("resnet9000")


def test_pretrained_loads_from_weights_dir_and_never_falls_back_to_random(monkeypatch, tmp_path):
    """A timm CNN saved into $VLAD_WEIGHTS_DIR/<name>/model.safetensors loads those exact weights."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    reference = timm.create_model("resnet18", pretrained=False)
    folder = tmp_path / "resnet18.tv_in1k"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "model.safetensors"))
    monkeypatch.setenv("VLAD_WEIGHTS_DIR", str(tmp_path))
    bb = load_backbone("resnet18.tv_in1k", weights="pretrained", out_indices=(2,))
    assert bb.pretrained
    got = dict(bb.model.named_parameters())["layer2.0.conv1.weight"]
    assert torch.equal(got, reference.layer2[0].conv1.weight)
    # the same folder passed explicitly
    bb2 = load_backbone("resnet18.tv_in1k", weights=str(folder), out_indices=(2,))
    assert torch.equal(dict(bb2.model.named_parameters())["layer2.0.conv1.weight"], got)


def test_explicit_missing_path_is_reported(tmp_path):
    with pytest.raises(vlad.WeightsNotAvailableError, match="weights_path="):
        resolve("resnet18.tv_in1k", weights_path=tmp_path / "nowhere")


def test_sha256_mismatch_is_rejected(monkeypatch, tmp_path):
    import dataclasses

    from vlad import weights as W

    folder = tmp_path / "resnet18.tv_in1k"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not the real file")
    spec = dataclasses.replace(W.WEIGHTS["resnet18.tv_in1k"], sha256={"model.safetensors": "0" * 64})
    monkeypatch.setitem(W.WEIGHTS, "resnet18.tv_in1k", spec)
    with pytest.raises(vlad.WeightsNotAvailableError, match="sha256 mismatch"):
        resolve("resnet18.tv_in1k", weights_path=folder)


def test_mae_loads_from_a_local_folder(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from vlad.backbones.mae import TINY_MAE_CFG

    torch.manual_seed(3)
    model = ViTMAEForPreTraining(ViTMAEConfig(**TINY_MAE_CFG))
    model.save_pretrained(tmp_path / "mae")
    bb = load_backbone("facebook/vit-mae-base", weights=str(tmp_path / "mae"))
    assert bb.pretrained and bb.model.config.hidden_size == 32
    assert torch.equal(bb.model.vit.embeddings.cls_token, model.vit.embeddings.cls_token)
