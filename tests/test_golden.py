"""Golden values computed by hand, where a plausible mistake in a paper's formula would pass other tests.

WinCLIP (Jeong et al., CVPR 2023, arXiv 2303.14814): the per-patch harmonic mean over the windows covering
a patch, the harmonic mean across scales of {image score, 2x2-window map, 3x3-window map}, the anomalous
entry of the softmax at temperature 0.07, and the class prototypes of the prompt ensemble.
PatchCore (Roth et al., CVPR 2022, arXiv 2106.08265): the image-score reweighting of Eq. 7.

Each expected number is worked out in the comment next to it. Each test was seen to fail with the mistake
named in its docstring injected into the scorer module (then removed).
"""

from __future__ import annotations

import math

import pytest
import torch

from vlad.prompts import TextEmbeddingCache
from vlad.scorers import winclip as winclip_module
from vlad.scorers.patchcore import PatchCore
from vlad.scorers.winclip import WinCLIP, coverage_matrix, harmonic_per_patch, window_indices


# -- WinCLIP ----------------------------------------------------------------------------------------------
def test_windows_of_a_2x3_grid():
    # patches numbered row-major: 0 1 2 / 3 4 5; the 2x2 windows at stride 1 start at patches 0 and 1
    assert window_indices((2, 3), 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5]]


def test_per_patch_harmonic_mean_over_covering_windows():
    """Mistakes caught: arithmetic (0.5) or geometric (0.4) mean instead of harmonic; dividing by all
    windows instead of the covering ones."""
    cov = coverage_matrix(window_indices((2, 3), 2), 6)
    scores = torch.tensor([[0.2, 0.8]])  # window 0 covers patches {0, 1, 3, 4}, window 1 covers {1, 2, 4, 5}
    # patches 0 and 3: only window 0 -> 0.2; patches 2 and 5: only window 1 -> 0.8
    # patches 1 and 4: both -> 2 / (1/0.2 + 1/0.8) = 2 / (5 + 1.25) = 0.32
    expected = torch.tensor([[0.2, 0.32, 0.8, 0.2, 0.32, 0.8]])
    torch.testing.assert_close(harmonic_per_patch(scores, cov), expected, rtol=1e-6, atol=1e-7)


def _stub_winclip(scales=(2, 3), grid=(3, 3)) -> WinCLIP:
    """A WinCLIP with only what ``_zero_shot`` needs, whose "class score" of an embedding is its first
    coordinate, so that every window's score is set by hand."""
    scorer = WinCLIP()
    scorer.scales_ = tuple(scales)
    n = grid[0] * grid[1]
    scorer.coverage_ = {k: coverage_matrix(window_indices(grid, k), n) for k in scales}
    scorer._class_scores = lambda emb: emb[..., 0]
    return scorer


def test_zero_shot_map_is_the_harmonic_mean_across_scales():
    """Mistakes caught: arithmetic mean of the scales; leaving the image score out; the per-scale maps
    averaged arithmetically."""
    scorer = _stub_winclip()
    image = torch.tensor([[0.5]])  # image score s = 0.5
    # 3x3 grid: four 2x2 windows (starting at patches 0, 1, 3, 4) and one 3x3 window covering all
    win2 = torch.tensor([[[1.0], [0.5], [0.5], [0.25]]])
    win3 = torch.tensor([[[0.25]]])
    feats = {"image": image, "patches": torch.zeros(1, 9, 4), "windows": {2: win2, 3: win3}}
    score, zs_map = scorer._zero_shot(feats)
    torch.testing.assert_close(score, torch.tensor([0.5]))
    # patch 0 (a corner, in window 0 only): 2x2 map 1.0, 3x3 map 0.25 -> 3 / (1/0.5 + 1/1 + 1/0.25) = 3/7
    # patch 4 (the centre, in all four): 2x2 map 4 / (1 + 2 + 2 + 4) = 4/9
    #   -> 3 / (2 + 9/4 + 4) = 3 / 8.25 = 4/11
    # patch 2 (a corner, in window 1 only): 2x2 map 0.5 -> 3 / (2 + 2 + 4) = 3/8
    torch.testing.assert_close(zs_map[0, 0], torch.tensor(3 / 7))
    torch.testing.assert_close(zs_map[0, 4], torch.tensor(4 / 11))
    torch.testing.assert_close(zs_map[0, 2], torch.tensor(3 / 8))


def test_class_score_is_the_anomalous_softmax_entry_at_temperature_007():
    """Mistakes caught: the normal entry (index 0) taken; temperature 1 (or T multiplied, not divided)."""
    scorer = WinCLIP()
    assert scorer.temperature == 0.07  # the paper's (CLIP's) temperature is the default
    # prototypes [normal, anomalous]: cosines with f = (1, 0) are 0.93 and 1.0
    t_normal = torch.tensor([0.93, math.sqrt(1 - 0.93**2)])
    scorer.text_prototypes_ = torch.stack([t_normal, torch.tensor([1.0, 0.0])])
    f = torch.tensor([[1.0, 0.0]])
    # softmax([0.93, 1.0] / 0.07)[1] = 1 / (1 + exp((0.93 - 1.0) / 0.07)) = 1 / (1 + e^-1) = 0.7310586
    torch.testing.assert_close(scorer._class_scores(f), torch.tensor([1 / (1 + math.exp(-1))]))


def test_class_prototypes_average_unit_sentence_embeddings(monkeypatch):
    """Each sentence embedding is normalised, the normalised ones are averaged per class and the mean is
    normalised again: CLIP's prompt-ensembling convention (Radford et al. 2021), which vlad follows.
    (anomalib and the caoyunkang/WinClip reproduction average the raw embeddings instead; the paper says
    only that the embeddings are averaged.)

    Mistakes caught: averaging raw embeddings (0.949, 0.316); no final normalisation (0.5, 0.5);
    the classes swapped."""
    monkeypatch.setattr(winclip_module, "text_cache", lambda cache=TextEmbeddingCache(): cache)  # isolated
    scorer = WinCLIP(object_name="part", weights="tiny").fit()
    dim = scorer.text_prototypes_.shape[1]
    raw = {"a good part.": [3.0, 0.0], "a fine part.": [0.0, 1.0], "a broken part.": [0.0, -2.0]}

    def fake_encode(sentences):
        out = torch.zeros(len(sentences), dim)
        out[:, :2] = torch.tensor([raw[s] for s in sentences])
        return out

    monkeypatch.setattr(scorer, "_encode_text", fake_encode)
    scorer.set_prompts({"normal_states": ["good {}", "fine {}"], "anomalous_states": ["broken {}"],
                        "templates": ["a {}."]})
    assert scorer.normal_sentences_ == ["a good part.", "a fine part."]
    # normal: (3, 0) -> (1, 0); (0, 1) -> (0, 1); mean (0.5, 0.5); normalised (1/sqrt 2, 1/sqrt 2)
    # anomalous: (0, -2) -> (0, -1)
    expected = torch.zeros(2, dim)
    expected[0, :2] = torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2)])
    expected[1, :2] = torch.tensor([0.0, -1.0])
    torch.testing.assert_close(scorer.text_prototypes_, expected, rtol=1e-6, atol=1e-7)


# -- PatchCore ----------------------------------------------------------------------------------------------
def test_patchcore_image_score_reweighting_eq7():
    """Eq. 7: s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*, where m_test* is
    the test patch farthest from the memory, m* its nearest memory patch, s* = ||m_test* - m*|| and
    N_b(m*) the b nearest memory patches of m* (m* itself included, as in anomalib's
    ``compute_anomaly_score``).

    Mistakes caught: distances measured from m* instead of m_test*; the softmax weight without "1 -";
    the best (not the worst) test patch; N_b taken around m_test* instead of m*; no reweighting."""
    scorer = PatchCore(num_neighbors=3)
    memory = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-1.5, -1.5]])
    queries = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])  # patch 0 sits on memory row 1; patch 1 is 1 from row 0
    dist = torch.tensor([[0.0, 1.0]])
    nn_idx = torch.tensor([[1, 0]])
    # m_test* = (0, -1), s* = 1, m* = row 0 = (0, 0); N_3(m*) = rows 0, 1, 2 (at 0, 1, 2 from m*; row 3 is at
    # 2.12). Distances from m_test* to them: 1, sqrt 2, 3.
    # s = (1 - e^1 / (e^1 + e^sqrt2 + e^3)) * 1 = 1 - 2.718282 / 26.917006 = 0.899012
    expected = 1 - math.e / (math.e + math.exp(math.sqrt(2)) + math.exp(3))
    got = scorer._image_scores(queries, dist, nn_idx, memory, (memory**2).sum(1))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.899012, abs=1e-6)
    # b = 1 is the plain maximum
    assert PatchCore(num_neighbors=1)._image_scores(queries, dist, nn_idx, memory, (memory**2).sum(1)).item() == 1.0
