"""Metrics (vlad.metrics) against scikit-learn, a hand-computed AUPRO and a naive MVTec-style AUPRO."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from vlad import metrics as M


def _sk_f1max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    return float(np.max(2 * p * r / np.maximum(p + r, 1e-12)))


@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_match_sklearn(ties):
    rng = np.random.default_rng(1 + ties)
    for _ in range(5):
        y = rng.random(200) < 0.35
        s = rng.normal(size=200) + y
        if ties:
            s = np.round(s * 2)  # many tied scores, across classes too
        got = M.image_metrics(s, y.astype(int))
        assert got["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert got["image_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert got["image_f1max"] == pytest.approx(_sk_f1max(y, s), abs=1e-12)
        assert M.auroc(s, y) == got["image_auroc"]
        assert M.average_precision(s, y) == got["image_ap"] and M.f1_max(s, y) == got["image_f1max"]


def test_pixel_metrics_match_sklearn_on_float32_maps():
    rng = np.random.default_rng(3)
    maps = rng.random((5, 24, 30), dtype=np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[1, 2:8, 3:9] = True
    masks[3, 10:20, 20:28] = True
    maps[masks] += 0.4
    got = M.pixel_metrics(maps, masks)
    y, s = masks.ravel(), maps.ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert got["pixel_f1max"] == pytest.approx(_sk_f1max(y, s), abs=1e-9)
    # a list of differently sized maps works too
    lst = M.pixel_metrics([maps[0], maps[1][:, :20], maps[3]], [masks[0], masks[1][:, :20], masks[3]])
    y2 = np.concatenate([masks[0].ravel(), masks[1][:, :20].ravel(), masks[3].ravel()])
    s2 = np.concatenate([maps[0].ravel(), maps[1][:, :20].ravel(), maps[3].ravel()])
    assert lst["pixel_auroc"] == pytest.approx(roc_auc_score(y2, s2), abs=1e-12)


def test_aupro_hand_computed():
    # One 4x4 image, one normal pixel row of 12 pixels and two regions: A (2 px) and B (2 px).
    #   region A scores 0.9, 0.9; region B scores 0.8, 0.1; normal pixels: one 0.85, eleven 0.0.
    # Thresholds from the top: t=0.9 -> PRO=(1+0)/2=0.5, FPR=0;  t=0.85 -> FPR=1/12, PRO 0.5;
    # t=0.8 -> PRO=(1+0.5)/2=0.75, FPR=1/12;  t=0.1 -> PRO=1, FPR=1/12; t=0 -> FPR=1.
    # Curve: (0,0)->(0,0.5)->(1/12,0.5)->(1/12,0.75)->(1/12,1)->(1,1): area up to 0.3 =
    # 0.5/12 + (0.3 - 1/12) * 1 ; normalised by 0.3.
    amap = np.zeros((4, 4))
    mask = np.zeros((4, 4), bool)
    amap[0, 0] = amap[0, 1] = 0.9
    mask[0, 0] = mask[0, 1] = True  # region A
    amap[3, 2], amap[3, 3] = 0.8, 0.1
    mask[3, 2] = mask[3, 3] = True  # region B
    amap[1, 3] = 0.85
    expected = (0.5 / 12 + (0.3 - 1 / 12)) / 0.3
    assert M.aupro(amap[None], mask[None]) == pytest.approx(expected, abs=1e-12)
    # up to FPR 0.05 (< 1/12) the curve is flat at PRO 0.5: area 0.05 * 0.5, normalised by 0.05 -> 0.5
    assert M.aupro(amap[None], mask[None], fpr_limit=0.05) == pytest.approx(0.5, abs=1e-12)
    pix = M.pixel_metrics(amap[None], mask[None])
    assert pix["pixel_aupro"] == pytest.approx(expected, abs=1e-12)
    assert pix["pixel_aupro05"] == pytest.approx(0.5, abs=1e-12)
    # a perfect map scores 1, an inverted one 0
    assert M.aupro(mask[None].astype(float), mask[None]) == pytest.approx(1.0)
    assert M.aupro(1.0 - mask[None].astype(float), mask[None]) == pytest.approx(0.0)


def test_aupro_regions_use_8_connectivity():
    # Region {a, b} (diagonal neighbours: one region under 8-connectivity, as MVTec AD) and region {c}.
    # The map hits a and c: PRO at t=1 is (1/2 + 1) / 2 = 0.75 (4-connectivity would give 2/3).
    # Curve (0,0) -> (0,0.75) -> (1,1): PRO at FPR 0.3 is 0.75 + 0.25 * 0.3.
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = mask[4, 4] = True
    amap = np.zeros((6, 6))
    amap[0, 0] = amap[4, 4] = 1.0
    expected = (0.3 * (0.75 + 0.75 + 0.25 * 0.3) / 2) / 0.3
    assert M.aupro(amap[None], mask[None]) == pytest.approx(expected, abs=1e-12)


def _naive_aupro(maps, masks, limit=0.3):
    """MVTec-style reference: one full sort of every pixel with per-pixel FPR/PRO increments."""
    n_ok = sum((~g).sum() for g in masks)
    labelled = [ndimage.label(g, np.ones((3, 3), int)) for g in masks]
    n_comp = sum(n for _, n in labelled)
    sc, fp, pr = [], [], []
    for m, g, (lab, n) in zip(maps, masks, labelled):
        inc = np.zeros(g.shape)
        for c in range(1, n + 1):
            inc[lab == c] = 1.0 / (lab == c).sum()
        sc.append(m.ravel())
        fp.append(np.where(g, 0.0, 1.0 / n_ok).ravel())
        pr.append(inc.ravel() / n_comp)
    sc, fp, pr = (np.concatenate(a) for a in (sc, fp, pr))
    o = np.argsort(-sc, kind="stable")
    sc, fpr, pro = sc[o], np.cumsum(fp[o]), np.cumsum(pr[o])
    keep = np.append(sc[1:] != sc[:-1], True)
    x = np.clip(np.concatenate([[0], fpr[keep], [1]]), 0, 1)
    y = np.clip(np.concatenate([[0], pro[keep], [1]]), 0, 1)
    k = np.searchsorted(x, limit, side="right")
    xi = np.append(x[:k], limit)
    yi = np.append(y[:k], np.interp(limit, x, y))  # x is sorted
    return float(np.sum(np.diff(xi) * (yi[1:] + yi[:-1]) / 2) / limit)


@pytest.mark.parametrize("ties", [False, True])
def test_aupro_matches_naive_full_sort(ties):
    rng = np.random.default_rng(7 + ties)
    maps = rng.normal(size=(6, 32, 32))
    masks = np.zeros(maps.shape, bool)
    masks[1, 3:9, 4:10] = True
    masks[2, 20:30, 2:5] = True
    masks[2, 1:3, 1:3] = True
    masks[4, 10:20, 10:20] = True
    maps[masks] += 1.0
    if ties:
        maps = np.round(maps * 2)
    assert M.aupro(maps, masks) == pytest.approx(_naive_aupro(maps, masks), abs=1e-10)
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(_naive_aupro(maps, masks, 1.0), abs=1e-10)
    low = _naive_aupro(maps, masks, 0.05)
    assert M.aupro(maps, masks, fpr_limit=0.05) == pytest.approx(low, abs=1e-10)
    assert M.pixel_metrics(maps, masks)["pixel_aupro05"] == pytest.approx(low, abs=1e-10)


def test_degenerate_cases_give_nan_and_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="vlad.metrics"):
        out = M.image_metrics([0.1, 0.5, 0.9], [0, 0, 0])
    assert all(math.isnan(v) for v in out.values())
    assert "only one class" in caplog.text
    assert math.isnan(M.auroc([0.1, 0.2], [1, 1]))
    maps = np.random.default_rng(0).random((2, 8, 8))
    pix = M.pixel_metrics(maps, np.zeros((2, 8, 8), bool))
    assert set(pix) == set(M.PIXEL_METRICS) and all(math.isnan(v) for v in pix.values())
    assert math.isnan(M.aupro(maps, np.zeros((2, 8, 8), bool)))
    assert math.isnan(M.aupro(maps, np.ones((2, 8, 8), bool)))  # no normal pixel


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="finite"):
        M.auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="expected 3 labels"):
        M.auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        M.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="resize the masks"):
        M.pixel_metrics(np.zeros((1, 8, 8)), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="one map per image score"):
        M.evaluate([0.1, 0.9], [0, 1], np.zeros((3, 8, 8)), np.zeros((3, 8, 8), bool))


def test_evaluate_keys():
    rng = np.random.default_rng(0)
    maps = rng.random((4, 16, 16))
    masks = np.zeros((4, 16, 16), bool)
    masks[2:, 4:8, 4:8] = True
    scores, labels = maps.max(axis=(1, 2)), np.array([0, 0, 1, 1])
    assert set(M.evaluate(scores, labels)) == set(M.IMAGE_METRICS)
    assert set(M.evaluate(scores, labels, maps, masks)) == set(M.IMAGE_METRICS + M.PIXEL_METRICS)
    assert set(M.evaluate(scores, labels, maps, None)) == set(M.IMAGE_METRICS)


def test_pixel_metrics_are_fast():
    # 40 maps of 256x256 (2.6 M pixels): ~0.1 s here; a loose bound that only catches a per-threshold loop.
    import time

    rng = np.random.default_rng(0)
    maps = rng.random((40, 256, 256), dtype=np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[::3, 100:140, 50:90] = True
    t0 = time.perf_counter()
    M.pixel_metrics(maps, masks)
    assert time.perf_counter() - t0 < 10.0


def test_seg_f1_pools_pixels_of_all_images_hand_computed():
    # Image A (4x4, anomalous): ground truth 4 pixels, the mask hits 3 of them and 1 normal pixel.
    # Image B (3x5, anomaly-free): the mask marks 2 pixels.  Pooled: TP 3, FP 1 + 2, FN 1
    # -> SegF1 = 2*3 / (2*3 + 3 + 1) = 0.6.  (Per-image mean: (0.75 + 0) / 2; good images left out: 0.75.)
    gt_a = np.zeros((4, 4), bool)
    gt_a[1:3, 1:3] = True
    pred_a = np.zeros((4, 4), bool)
    pred_a[1, 1] = pred_a[1, 2] = pred_a[2, 1] = True
    pred_a[0, 3] = True
    gt_b = np.zeros((3, 5), bool)
    pred_b = np.zeros((3, 5), bool)
    pred_b[0, 0] = pred_b[2, 4] = True
    assert M.seg_f1([pred_a, pred_b], [gt_a, gt_b]) == pytest.approx(0.6, abs=1e-12)
    assert M.seg_f1([pred_a, pred_b], [gt_a.astype(np.uint8) * 255, gt_b]) == pytest.approx(0.6)  # 0/255 masks
    assert M.seg_f1([gt_a, np.zeros((3, 5), bool)], [gt_a, gt_b]) == 1.0  # perfect masks
    assert M.seg_f1([~gt_a, np.zeros((3, 5), bool)], [gt_a, gt_b]) == 0.0


def test_seg_f1_degenerate_and_bad_inputs(caplog):
    with caplog.at_level(logging.WARNING, logger="vlad.metrics"):
        assert math.isnan(M.seg_f1(np.ones((2, 4, 4), bool), np.zeros((2, 4, 4), bool)))
    assert "no anomalous pixel" in caplog.text
    with pytest.raises(ValueError, match="resize the masks"):
        M.seg_f1(np.zeros((1, 4, 4), bool), np.zeros((1, 8, 8), bool))
    with pytest.raises(ValueError, match="0/1"):
        M.seg_f1(np.full((1, 4, 4), 0.7), np.ones((1, 4, 4), bool))


def test_rate_with_ci_is_clopper_pearson():
    # closed forms of the exact interval at the edges: 0 of n -> [0, 1 - (a/2)^(1/n)]; n of n -> [(a/2)^(1/n), 1]
    rate, low, high = M.rate_with_ci(0, 4)
    assert (rate, low) == (0.0, 0.0) and high == pytest.approx(1 - 0.025 ** 0.25, abs=1e-9)  # 0.6024
    rate, low, high = M.rate_with_ci(10, 10)
    assert rate == 1.0 and low == pytest.approx(0.025 ** 0.1, abs=1e-9) and high == 1.0
    # 1 of 4: lower bound 1 - (1 - a/2)^(1/n)
    assert M.rate_with_ci(1, 4)[1] == pytest.approx(1 - 0.975 ** 0.25, abs=1e-9)
    assert M.rate_with_ci(0, 4, confidence=0.9)[2] == pytest.approx(1 - 0.05 ** 0.25, abs=1e-9)
    assert all(math.isnan(v) for v in M.rate_with_ci(0, 0))
    with pytest.raises(ValueError, match="count <= n"):
        M.rate_with_ci(5, 4)


def test_decision_metrics_hand_computed():
    # 4 normal images, 1 flagged -> false-alarm rate 1/4; 3 anomalous, 1 labelled normal -> miss rate 1/3
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    pred = np.array([True, False, False, False, False, True, True])
    out = M.decision_metrics(pred, labels)
    assert out["false_alarm_rate"] == 0.25 and out["miss_rate"] == pytest.approx(1 / 3)
    assert (out["n_normal"], out["n_false_alarms"], out["n_anomalous"], out["n_missed"]) == (4, 1, 3, 1)
    assert out["false_alarm_rate_low"] == pytest.approx(1 - 0.975 ** 0.25, abs=1e-9)
    assert out["false_alarm_rate_low"] < 0.25 < out["false_alarm_rate_high"] < 1.0
    assert out["miss_rate_low"] < 1 / 3 < out["miss_rate_high"]
    assert "seg_f1" not in out
    # only normal images: the miss rate is undefined, not 0
    only_normal = M.decision_metrics([False, True], [0, 0])
    assert only_normal["false_alarm_rate"] == 0.5 and math.isnan(only_normal["miss_rate"])
    # with masks, SegF1 comes along
    gt = np.zeros((7, 4, 4), bool)
    gt[4:, 0, 0] = True
    assert M.decision_metrics(pred, labels, gt, gt)["seg_f1"] == 1.0
    with pytest.raises(ValueError, match="expected 7 values"):
        M.decision_metrics(pred[:3], labels)
    with pytest.raises(ValueError, match="one predicted mask per image"):
        M.decision_metrics(pred, labels, gt[:3], gt[:3])
