"""``weights="random"`` is reproducible and never touches the caller's global RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlad
from conftest import textured, with_defect
from vlad.backbones import load_backbone


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_real_size_backbones_agree_and_the_seed_matters():
    a = load_backbone("resnet18.tv_in1k", weights="random", out_indices=(2, 3)).model
    b = load_backbone("resnet18.tv_in1k", weights="random", out_indices=(2, 3)).model
    c = load_backbone("resnet18.tv_in1k", weights="random", seed=1, out_indices=(2, 3)).model
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


@pytest.mark.parametrize("name", ["tiny-cnn", "tiny-dino", "tiny-mae", "tiny-clip"])
def test_building_a_backbone_leaves_the_global_rng_alone(name):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    load_backbone(name, weights="random")
    assert torch.equal(torch.rand(4), expected)


def test_saved_random_weight_scorer_reloads_the_same_backbone(tmp_path):
    refs = [textured(i, size=64) for i in range(2)]
    test = [with_defect(textured(7, size=64), box=(20, 36, 20, 36))]
    scorer = vlad.create_scorer("patchcore", backbone="resnet18.tv_in1k", weights="random", image_size=64,
                                device="cpu").fit(refs)
    before = scorer.predict(test)
    torch.manual_seed(999)  # whatever the global RNG holds at load time must not matter
    loaded = vlad.load(str(scorer.save(tmp_path / "pc")))
    assert _same_weights(scorer.backbone_.model, loaded.backbone_.model)
    after = loaded.predict(test)
    np.testing.assert_allclose(after.image_scores, before.image_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["patchcore", "winclip", "spade", "maeday", "anomalydino"])
def test_random_state_seeds_a_random_weight_backbone(name):
    """The scorer's random_state is the seed of its random-weight backbone: the same seed builds the same
    backbone in two instances, another seed another one."""
    refs = [textured(i, size=64) for i in range(2)]

    def backbone(seed):
        scorer = vlad.create_scorer(name, weights="tiny", random_state=seed, device="cpu")
        scorer.fit(refs if scorer.requires_references else None)
        return scorer.model_ if hasattr(scorer, "model_") else scorer.backbone_.model

    a, b, c = backbone(0), backbone(0), backbone(3)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
