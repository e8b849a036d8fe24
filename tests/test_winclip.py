"""WinCLIP / WinCLIP+ on the tiny CLIP twin (96 px, 6x6 grid): window-path fidelity, maps, prompts, memory.

The fidelity tests (window == encode_image, batched == naive, non-flat maps) were each seen to fail with
the batch-first bug injected (window batches run as if sequence-first), then the bug was removed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import vlad
from vlad.errors import NotFittedError, VladError
from vlad.images import load_images
from vlad.ops import preprocess_batch
from vlad.prompts import PromptError
from vlad.scorers.winclip import WinCLIP, encode_text_trimmed, window_indices

from conftest import textured, with_defect


@pytest.fixture(scope="module")
def zs():
    """A fitted zero-shot WinCLIP (shared: tests deepcopy it before changing it)."""
    return vlad.create_scorer("winclip", object_name="gear", weights="tiny", batch_size=4).fit()


@pytest.fixture(scope="module")
def refs():
    return [textured(i) for i in range(3)]


@pytest.fixture(scope="module")
def plus(refs):
    return vlad.create_scorer("winclip", object_name="gear", weights="tiny", batch_size=4).fit(refs)


@pytest.fixture
def count_text(monkeypatch):
    """Counts the sentences WinCLIP sends to its CLIP text encoder."""
    seen = []
    real = WinCLIP._encode_text

    def counting(self, sentences):
        seen.append(len(sentences))
        return real(self, sentences)

    monkeypatch.setattr(WinCLIP, "_encode_text", counting)
    return seen


def _tokens(scorer, images):
    x = preprocess_batch(load_images(images), scorer.backbone_.spec.preprocess, "cpu", size=scorer.image_size_)
    with torch.inference_mode():
        return x, scorer.encoder_.embed(x)


# -- fidelity of the window path ------------------------------------------------------------------
def test_window_covering_whole_grid_reproduces_encode_image(zs):
    x, tok = _tokens(zs, [textured(5), textured(6)])
    n = zs.encoder_.grid[0] * zs.encoder_.grid[1]
    assert zs.encoder_.grid == (6, 6)
    with torch.inference_mode():
        ref = zs.backbone_.model.encode_image(x)
        win = zs.encoder_.encode_windows(tok, torch.arange(n)[None])[:, 0]
        full, _ = zs.encoder_.encode_full(tok)
    torch.testing.assert_close(win, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("k", [2, 3])
def test_batched_windows_equal_one_window_at_a_time(zs, k):
    _, tok = _tokens(zs, [textured(7), with_defect(textured(8))])
    idx = window_indices(zs.encoder_.grid, k)
    assert idx.shape == ((7 - k) ** 2, k * k)
    with torch.inference_mode():
        fast = zs.encoder_.encode_windows(tok, idx)
        naive = zs.encoder_.encode_windows_naive(tok, idx[::3])  # a third of the windows keeps it quick
    torch.testing.assert_close(fast[:, ::3], naive, rtol=1e-4, atol=1e-4 * naive.abs().max().item())
    # and the windows really differ from each other (the batch-first bug makes them all identical)
    assert fast.std(dim=1).mean() > 1e-2 * fast.abs().mean()


def test_maps_vary_across_the_image(zs):
    res = zs.predict([with_defect(textured(9)), textured(10)])
    assert res.anomaly_maps.shape == (2, 96, 96)
    for m in res.anomaly_maps:
        assert m.std() > 1e-3 * abs(m.mean())
    assert np.all((res.image_scores > 0) & (res.image_scores < 1))


def test_window_indices_cover_grid():
    idx = window_indices((15, 15), 2)
    assert idx.shape == (196, 4) and idx[0].tolist() == [0, 1, 15, 16] and idx[-1].tolist() == [208, 209, 223, 224]
    assert window_indices((15, 15), 3).shape == (169, 9)
    with pytest.raises(VladError, match="does not fit"):
        window_indices((6, 6), 7)


# -- prompts and the text cache ---------------------------------------------------------------------
def test_trimmed_text_encoding_equals_encode_text(zs):
    model, tok = zs.backbone_.model, zs.backbone_.tokenizer
    tokens = tok(["a photo of a gear.", "a close-up photo of the flawless gear without defect for visual inspection."])
    with torch.inference_mode():
        ref, fast = model.encode_text(tokens), encode_text_trimmed(model, tokens)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_repeat_construction_hits_the_text_cache(zs, count_text, tmp_path, monkeypatch):
    monkeypatch.setenv("VLAD_CACHE_DIR", str(tmp_path))
    again = vlad.create_scorer("winclip", object_name="gear", weights="tiny").fit()
    assert count_text == [] and again.text_stats_["encoded"] == 0
    torch.testing.assert_close(again.text_prototypes_, zs.text_prototypes_)
    assert not any(tmp_path.rglob("*")), "tiny/random text embeddings must never be cached on disk"


def test_edited_prompt_recomputes_only_itself(zs, count_text):
    s = copy.deepcopy(zs)
    normal_before = s.text_prototypes_[0].clone()
    s.set_prompts({"extra_anomalous_states": ["{} with a chipped tooth"]})
    # one new state x 21 templates = 21 sentences, 20 distinct (the paper's list repeats one template)
    assert sum(count_text) == 20 and s.text_stats_["encoded"] == 20
    assert len(s.anomalous_sentences_) == 5 * 21
    torch.testing.assert_close(s.text_prototypes_[0], normal_before)
    assert not torch.allclose(s.text_prototypes_[1], zs.text_prototypes_[1])
    s.set_prompts(object_name="gear")  # nothing changed: nothing encoded
    assert s.text_stats_["encoded"] == 0 and sum(count_text) == 20


def test_bad_prompts_raise_and_leave_scorer_unchanged(zs, tmp_path):
    s = copy.deepcopy(zs)
    bad = tmp_path / "bad.yaml"
    bad.write_text('anomalous_states: ["scratched"]\n')
    with pytest.raises(PromptError, match="exactly one"):
        s.set_prompts(bad)
    assert s.prompts is None and len(s.anomalous_sentences_) == 84
    with pytest.raises(PromptError, match="does not exist"):
        s.set_prompts(tmp_path / "missing.yaml")


def test_not_fitted_and_bad_parameters():
    with pytest.raises(NotFittedError):
        vlad.create_scorer("winclip", weights="tiny").predict([textured(0)])
    with pytest.raises(VladError, match="does not fit"):
        vlad.create_scorer("winclip", weights="tiny", scales=(7,)).fit()


# -- WinCLIP+ ------------------------------------------------------------------------------------
def test_reference_against_memory_containing_it_has_zero_few_shot_map(zs, plus, refs):
    z, p = zs.predict(refs[:1]), plus.predict(refs[:1])
    # WinCLIP+ map = (zero-shot + few-shot) / 2 and score = (zero-shot + max few-shot) / 2: few-shot part ~0
    np.testing.assert_allclose(2 * p.anomaly_maps, z.anomaly_maps, atol=1e-4)
    np.testing.assert_allclose(2 * p.image_scores, z.image_scores, atol=1e-4)
    novel = plus.predict([with_defect(textured(50))])
    assert novel.image_scores[0] > zs.predict([with_defect(textured(50))]).image_scores[0] / 2 + 1e-4


def test_incremental_equals_batch_and_remove_reference(zs, plus, refs):
    inc = copy.deepcopy(zs).add_references(refs[:1]).add_references(refs[1:])
    test = [with_defect(textured(60))]
    a, b = inc.predict(test), plus.predict(test)
    np.testing.assert_allclose(a.image_scores, b.image_scores, atol=1e-5)
    np.testing.assert_allclose(a.anomaly_maps, b.anomaly_maps, atol=1e-5)
    assert inc.list_references() == plus.list_references() and len(inc.list_references()) == 3
    inc.remove_reference(0)
    two = copy.deepcopy(zs).add_references(refs[1:])
    np.testing.assert_allclose(inc.predict(test).anomaly_maps, two.predict(test).anomaly_maps, atol=1e-5)


def test_leave_one_out_matches_scoring_against_the_others(zs, plus, refs):
    loo = plus.leave_one_out_scores()
    assert loo.shape == (3,)
    others = copy.deepcopy(zs).add_references([refs[0], refs[2]])
    np.testing.assert_allclose(loo[1], others.predict(refs[1:2]).image_scores[0], atol=1e-5)
    with pytest.raises(VladError, match="at least 2"):
        copy.deepcopy(zs).add_references(refs[:1]).leave_one_out_scores()


def test_save_load_round_trip_without_text_encoding(plus, tmp_path, count_text):
    s = copy.deepcopy(plus).set_prompts({"extra_normal_states": ["clean {}"]})
    count_text.clear()
    folder = s.save(tmp_path / "wc")
    loaded = vlad.scorers.base.load_scorer(folder)
    assert count_text == [], "loading must restore text embeddings, not recompute them"
    test = [with_defect(textured(70))]
    a, b = s.predict(test), loaded.predict(test)
    np.testing.assert_allclose(a.image_scores, b.image_scores, atol=1e-6)
    np.testing.assert_allclose(a.anomaly_maps, b.anomaly_maps, atol=1e-6)
    assert loaded.list_references() == s.list_references()
    assert loaded.prompt_set_.normal_states[-1] == "clean {}" and loaded.object_name == "gear"
