"""Anomaly-detection metrics: ranking metrics (image AUROC / AP / F1-max, pixel AUROC / AP / F1-max,
AUPRO at FPR 0.3 and 0.05) and decision metrics (false-alarm and miss rates, SegF1).

All metrics are *exact* (no threshold binning) and fast enough for whole benchmark splits: the pixel
metrics sort the normal pixels once (``np.sort``, no argsort) and the anomalous pixels once, then read
every count they need with ``np.searchsorted``. Hundreds of 512x512 maps take a few seconds on 2 cores.

* AUROC equals :func:`sklearn.metrics.roc_auc_score` (ties count one half, Mann-Whitney U).
* AP equals :func:`sklearn.metrics.average_precision_score` (step-wise sum, no interpolation).
* F1-max is the best F1 over all thresholds (it is always reached at an anomalous sample's score).
* AUPRO follows the MVTec AD evaluation (Bergmann et al., IJCV 2021, "The MVTec Anomaly Detection
  Dataset"): each connected component of the ground-truth masks (8-connectivity,
  ``scipy.ndimage.label`` with a 3x3 structure) is one region; PRO(t) is the mean over all regions of
  the fraction of the region's pixels scoring >= t; FPR(t) is the fraction of all normal pixels (of all
  images) scoring >= t. The PRO-vs-FPR curve over every distinct threshold is integrated with the
  trapezoidal rule up to FPR 0.3 (linear interpolation at 0.3) and divided by 0.3, so a perfect map
  scores 1. ``pixel_aupro05`` is the same curve integrated up to FPR 0.05 and divided by 0.05: the
  low-false-positive AU-PRO that MVTec AD 2 (Heckler-Kram et al., 2025, arXiv:2503.21622) reports.

Decision metrics judge binary outputs (a detector's labels and masks at its own thresholds), not a
ranking:

* False-alarm rate: the fraction of normal images labelled anomalous; miss rate: the fraction of
  anomalous images labelled normal; each with an exact (Clopper-Pearson) binomial confidence interval
  (:func:`rate_with_ci`, via ``scipy.stats.binomtest``).
* SegF1 (MVTec AD 2's segmentation F1): one F1 = 2 TP / (2 TP + FP + FN) over the pixels of *all* test
  images pooled (anomaly-free images included: every pixel a mask marks on them is a false positive),
  for binary masks thresholded at one threshold. This is our reading of the MVTec AD 2 paper's SegF1
  (the pixel-level F1 of the binarised anomaly maps on the test set); the paper's text and evaluation
  server code were not available to check the pooling against, so a per-image mean would be a
  different metric.

Degenerate inputs (only one class present, no anomalous pixel) give NaN and a logged warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, stats

from vlad.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro05")
DECISION_METRICS = ("false_alarm_rate", "miss_rate", "seg_f1")
DEFAULT_FPR_LIMIT = 0.3
#: MVTec AD 2's low-false-positive AU-PRO integration limit (``pixel_aupro05``)
LOW_FPR_LIMIT = 0.05
_STRUCTURE = np.ones((3, 3), dtype=int)  # 8-connectivity, as MVTec AD's evaluation code


# -- input checks ---------------------------------------------------------------------------------
def _as_scores(scores, what: str) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.dtype not in (np.float32, np.float64):  # keep float32 maps float32: sorting is ~2x faster
        arr = arr.astype(np.float64)
    arr = arr.reshape(-1)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InvalidArgumentError(f"{what}: expected finite values, got {bad} NaN/inf of {arr.size}; check the scorer output")
    return arr


def _as_labels(labels, n: int, what: str) -> np.ndarray:
    arr = np.asarray(labels).reshape(-1)
    if arr.size != n:
        raise InvalidArgumentError(f"{what}: expected {n} labels (one per score), got {arr.size}")
    if arr.dtype != np.bool_:
        uniq = np.unique(arr)
        if not np.isin(uniq, (0, 1)).all():
            raise InvalidArgumentError(f"{what}: labels must be 0/1 or bool, got values {uniq[:10].tolist()}")
        arr = arr.astype(bool)
    return arr


class _Split:
    """Scores split by class and sorted ascending: ``neg`` (normal) and ``pos`` (anomalous)."""

    def __init__(self, neg_sorted: np.ndarray, pos_sorted: np.ndarray):
        self.neg = neg_sorted
        self.pos = pos_sorted

    @classmethod
    def from_scores(cls, scores: np.ndarray, labels: np.ndarray) -> _Split:
        return cls(np.sort(scores[~labels]), np.sort(scores[labels]))

    def degenerate(self, what: str) -> bool:
        if self.neg.size == 0 or self.pos.size == 0:
            logger.warning("%s: only one class present (%d normal, %d anomalous); metric is NaN",
                           what, self.neg.size, self.pos.size)
            return True
        return False

    def pos_thresholds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distinct anomalous scores, descending, with TP(score >= u) and FP(score >= u)."""
        uniq, counts = np.unique(self.pos, return_counts=True)  # ascending
        uniq, counts = uniq[::-1], counts[::-1]
        tp = np.cumsum(counts)
        fp = self.neg.size - np.searchsorted(self.neg, uniq, side="left")
        return uniq, tp.astype(np.float64), fp.astype(np.float64)

    def auroc(self) -> float:
        lo = np.searchsorted(self.neg, self.pos, side="left")
        hi = np.searchsorted(self.neg, self.pos, side="right")
        wins = lo.sum(dtype=np.float64) + 0.5 * (hi - lo).sum(dtype=np.float64)
        return float(wins / (float(self.pos.size) * float(self.neg.size)))

    def ap(self) -> float:
        _, tp, fp = self.pos_thresholds()
        recall_step = np.diff(np.concatenate([[0.0], tp])) / self.pos.size
        return float(np.sum(recall_step * tp / (tp + fp)))

    def f1max(self) -> float:
        _, tp, fp = self.pos_thresholds()
        return float(np.max(2.0 * tp / (tp + fp + self.pos.size)))


# -- image metrics --------------------------------------------------------------------------------
def auroc(scores, labels) -> float:
    """Area under the ROC curve; NaN (with a warning) if only one class is present."""
    s = _as_scores(scores, "auroc scores")
    split = _Split.from_scores(s, _as_labels(labels, s.size, "auroc"))
    return math.nan if split.degenerate("auroc") else split.auroc()


def average_precision(scores, labels) -> float:
    """Average precision (as scikit-learn); NaN (with a warning) if only one class is present."""
    s = _as_scores(scores, "average_precision scores")
    split = _Split.from_scores(s, _as_labels(labels, s.size, "average_precision"))
    return math.nan if split.degenerate("average_precision") else split.ap()


def f1_max(scores, labels) -> float:
    """Best F1 score over all thresholds; NaN (with a warning) if only one class is present."""
    s = _as_scores(scores, "f1_max scores")
    split = _Split.from_scores(s, _as_labels(labels, s.size, "f1_max"))
    return math.nan if split.degenerate("f1_max") else split.f1max()


def image_metrics(scores, labels) -> dict[str, float]:
    """``image_auroc``, ``image_ap``, ``image_f1max`` for ``(N,)`` scores and 0/1 labels."""
    s = _as_scores(scores, "image scores")
    split = _Split.from_scores(s, _as_labels(labels, s.size, "image labels"))
    if split.degenerate("image metrics"):
        return dict.fromkeys(IMAGE_METRICS, math.nan)
    return {"image_auroc": split.auroc(), "image_ap": split.ap(), "image_f1max": split.f1max()}


# -- pixel metrics --------------------------------------------------------------------------------
def _map_list(maps, what: str) -> list[np.ndarray]:
    if isinstance(maps, np.ndarray) or hasattr(maps, "detach"):
        arr = np.asarray(maps.detach().cpu() if hasattr(maps, "detach") else maps)
        if arr.ndim == 2:
            return [arr]
        if arr.ndim != 3:
            raise InvalidArgumentError(f"{what}: expected (N, H, W) or a list of (H, W) arrays, got shape {arr.shape}")
        return list(arr)
    out = [np.asarray(m) for m in maps]
    for i, m in enumerate(out):
        if m.ndim != 2:
            raise InvalidArgumentError(f"{what}[{i}]: expected an (H, W) array, got shape {m.shape}")
    return out


def _gather_pixels(maps, masks) -> tuple[list[np.ndarray], list[np.ndarray]]:
    map_list = _map_list(maps, "maps")
    mask_list = _map_list(masks, "masks")
    if len(map_list) != len(mask_list):
        raise InvalidArgumentError(f"expected one mask per map, got {len(map_list)} maps and {len(mask_list)} masks")
    for i, (m, g) in enumerate(zip(map_list, mask_list)):
        if m.shape != g.shape:
            raise InvalidArgumentError(
                f"map {i} is {m.shape} but its mask is {g.shape}; resize the masks to the map resolution "
                "(nearest neighbour, e.g. vlad.data.load_mask(path, size=map.shape)) first"
            )
    return map_list, [np.asarray(g) > 0 for g in mask_list]


def aupro(maps, masks, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (see module docstring).

    Args:
        maps: ``(N, H, W)`` array or list of ``(H_i, W_i)`` anomaly maps.
        masks: ground truth of the same shapes (nonzero = anomalous).
        fpr_limit: integrate PRO over FPR in ``[0, fpr_limit]`` and divide by ``fpr_limit``.

    Returns:
        AUPRO in [0, 1]; NaN (with a warning) when there is no anomalous region or no normal pixel.
    """
    map_list, mask_list = _gather_pixels(maps, masks)
    return _aupro(map_list, mask_list, fpr_limit, neg_sorted=None)


def _aupro(map_list, mask_list, fpr_limit, neg_sorted) -> float:
    return _aupro_at(_pro_curve(map_list, mask_list, neg_sorted), fpr_limit)


def _aupro_at(curve: tuple[np.ndarray, np.ndarray] | None, fpr_limit: float) -> float:
    """The PRO curve's area up to ``fpr_limit``, divided by ``fpr_limit``; NaN for no curve."""
    if not 0.0 < fpr_limit <= 1.0:
        raise InvalidArgumentError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if curve is None:
        return math.nan
    xs, ys = curve
    return float(_trapezoid_until(xs, ys, fpr_limit) / fpr_limit)


def _pro_curve(map_list, mask_list, neg_sorted) -> tuple[np.ndarray, np.ndarray] | None:
    """The exact PRO-vs-FPR polyline ``(xs, ys)`` from (0, 0) to (1, 1); None (with a warning) when
    there is no anomalous region or no normal pixel."""
    pos_scores, pos_weights, sizes = [], [], []
    for m, g in zip(map_list, mask_list):
        if not g.any():
            continue
        lab, n = ndimage.label(g, structure=_STRUCTURE)
        region_sizes = np.bincount(lab.ravel())[1:]
        sel = lab > 0
        pos_scores.append(_as_scores(m[sel], "maps"))
        pos_weights.append(1.0 / region_sizes[lab[sel] - 1])
        sizes.append(n)
    n_regions = int(sum(sizes))
    if neg_sorted is None:
        neg_parts = [_as_scores(m[~g], "maps") for m, g in zip(map_list, mask_list)]
        neg_sorted = np.sort(np.concatenate(neg_parts)) if neg_parts else np.zeros(0)
    if n_regions == 0 or neg_sorted.size == 0:
        logger.warning("aupro: %d anomalous regions and %d normal pixels; metric is NaN", n_regions, neg_sorted.size)
        return None
    scores = np.concatenate(pos_scores)
    weights = np.concatenate(pos_weights) / n_regions
    order = np.argsort(-scores, kind="stable")
    scores, weights = scores[order], weights[order]
    # distinct anomalous thresholds u_0 > u_1 > ...; PRO(u_j) = summed weights of pixels >= u_j
    last = np.concatenate([scores[1:] != scores[:-1], [True]])
    uniq = scores[last]
    pro = np.cumsum(weights)[last]
    n_neg = float(neg_sorted.size)
    fpr_ge = (neg_sorted.size - np.searchsorted(neg_sorted, uniq, side="left")) / n_neg  # FPR(score >= u)
    fpr_gt = (neg_sorted.size - np.searchsorted(neg_sorted, uniq, side="right")) / n_neg  # just above u
    pro_before = np.concatenate([[0.0], pro[:-1]])
    # The curve over *all* distinct thresholds (normal ones too): PRO stays flat while only normal
    # pixels cross the threshold, so it is exactly the polyline
    # (0,0) -> (fpr_gt[0], 0) -> (fpr_ge[0], pro[0]) -> (fpr_gt[1], pro[0]) -> ... -> (1, 1).
    xs = np.empty(2 * uniq.size + 2)
    ys = np.empty_like(xs)
    xs[0], ys[0] = 0.0, 0.0
    xs[1:-1:2], ys[1:-1:2] = fpr_gt, pro_before
    xs[2:-1:2], ys[2:-1:2] = fpr_ge, pro
    xs[-1], ys[-1] = 1.0, 1.0
    ys = np.minimum(ys, 1.0)  # float round-off of the weight sums
    return xs, ys


def _trapezoid_until(xs: np.ndarray, ys: np.ndarray, limit: float) -> float:
    """Trapezoidal area under the polyline (xs non-decreasing) for x in [0, limit]."""
    k = int(np.searchsorted(xs, limit, side="right"))  # xs[:k] <= limit
    x = xs[:k]
    y = ys[:k]
    if k < xs.size and x[-1] < limit:  # interpolate the point at the limit
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        x = np.append(x, limit)
        y = np.append(y, y_lim)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def pixel_metrics(maps, masks, fpr_limit: float = DEFAULT_FPR_LIMIT) -> dict[str, float]:
    """``pixel_auroc``, ``pixel_ap``, ``pixel_f1max``, ``pixel_aupro`` (up to ``fpr_limit``) and
    ``pixel_aupro05`` (up to :data:`LOW_FPR_LIMIT`) over all pixels of all maps.

    Args:
        maps: ``(N, H, W)`` array or list of ``(H_i, W_i)`` anomaly maps.
        masks: ground-truth masks of the same shapes (nonzero = anomalous; normal images all zero).
        fpr_limit: AUPRO integration limit.
    """
    map_list, mask_list = _gather_pixels(maps, masks)
    neg = np.concatenate([_as_scores(m[~g], "maps") for m, g in zip(map_list, mask_list)])
    pos = np.concatenate([_as_scores(m[g], "maps") for m, g in zip(map_list, mask_list)])
    neg.sort()  # in place: the one big sort (fresh arrays from concatenate)
    pos.sort()
    split = _Split(neg, pos)
    if split.degenerate("pixel metrics"):
        return dict.fromkeys(PIXEL_METRICS, math.nan)
    curve = _pro_curve(map_list, mask_list, neg_sorted=neg)  # one curve, integrated at both limits
    return {
        "pixel_auroc": split.auroc(),
        "pixel_ap": split.ap(),
        "pixel_f1max": split.f1max(),
        "pixel_aupro": _aupro_at(curve, fpr_limit),
        "pixel_aupro05": _aupro_at(curve, LOW_FPR_LIMIT),
    }


def evaluate(
    scores,
    labels,
    maps: np.ndarray | Sequence[np.ndarray] | None = None,
    masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
) -> dict[str, float]:
    """Every metric at once: image metrics always, pixel metrics when ``maps`` and ``masks`` are given.

    Args:
        scores: ``(N,)`` image scores (higher = more anomalous).
        labels: ``(N,)`` 0/1 or bool, 1 = anomalous.
        maps: ``(N, H, W)`` or a list of ``(H_i, W_i)`` anomaly maps, or None.
        masks: ground-truth masks shaped like ``maps``, or None (image-level data: no pixel metrics).
        fpr_limit: AUPRO integration limit (0.3 as in MVTec AD).

    Returns:
        ``{"image_auroc", "image_ap", "image_f1max"}`` plus, with masks,
        ``{"pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro05"}``; NaN where undefined.
    """
    result = image_metrics(scores, labels)
    if maps is not None and masks is not None:
        n_scores, n_maps = np.asarray(scores).reshape(-1).size, len(maps)
        if n_maps != n_scores:
            raise InvalidArgumentError(f"expected one map per image score, got {n_maps} maps for {n_scores} scores")
        result.update(pixel_metrics(maps, masks, fpr_limit))
    return result


# -- decision metrics -----------------------------------------------------------------------------
def rate_with_ci(count: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """``count / n`` with its exact (Clopper-Pearson) binomial confidence interval.

    Args:
        count: how many of the ``n`` trials came out positive (e.g. normal images flagged).
        n: number of trials.
        confidence: coverage of the interval.

    Returns:
        ``(rate, low, high)``; three NaN when ``n`` is 0.
    """
    count, n = int(count), int(n)
    if not 0 <= count <= n:
        raise InvalidArgumentError(f"expected 0 <= count <= n, got count={count}, n={n}")
    if n == 0:
        return math.nan, math.nan, math.nan
    ci = stats.binomtest(count, n).proportion_ci(confidence_level=confidence, method="exact")
    return count / n, float(ci.low), float(ci.high)


def _as_decisions(values, n: int, what: str) -> np.ndarray:
    arr = np.asarray(values).reshape(-1)
    if arr.size != n:
        raise InvalidArgumentError(f"{what}: expected {n} values, got {arr.size}")
    if arr.dtype != np.bool_:
        if not np.isin(np.unique(arr), (0, 1)).all():
            raise InvalidArgumentError(f"{what}: expected bool or 0/1 decisions, got values {np.unique(arr)[:10].tolist()}")
        arr = arr.astype(bool)
    return arr


def seg_f1(pred_masks, masks) -> float:
    """MVTec AD 2's SegF1: the F1 of binary masks over the pixels of all images pooled.

    ``TP``, ``FP`` and ``FN`` are summed over every pixel of every image (anomaly-free images included,
    so a mask on a good image costs false positives), then ``F1 = 2 TP / (2 TP + FP + FN)``.

    Args:
        pred_masks: ``(N, H, W)`` or a list of ``(H_i, W_i)`` bool (or 0/1) predicted masks.
        masks: ground truth of the same shapes (nonzero = anomalous).

    Returns:
        SegF1 in [0, 1]; NaN (with a warning) when the ground truth has no anomalous pixel.
    """
    pred_list, mask_list = _gather_pixels(pred_masks, masks)
    tp = fp = fn = 0
    for i, (p, g) in enumerate(zip(pred_list, mask_list)):
        p = _as_decisions(p, g.size, f"pred_masks[{i}]").reshape(g.shape)
        tp += int(np.count_nonzero(p & g))
        fp += int(np.count_nonzero(p & ~g))
        fn += int(np.count_nonzero(~p & g))
    if tp + fn == 0:
        logger.warning("seg_f1: the ground truth has no anomalous pixel; metric is NaN")
        return math.nan
    return 2.0 * tp / (2.0 * tp + fp + fn)


def decision_metrics(pred_labels, labels, pred_masks=None, masks=None, confidence: float = 0.95) -> dict[str, float]:
    """How binary decisions fare: image false-alarm and miss rates (with intervals) and SegF1.

    Args:
        pred_labels: ``(N,)`` bool (or 0/1) decisions, True = labelled anomalous.
        labels: ``(N,)`` ground truth, 1 = anomalous.
        pred_masks: predicted binary masks (``(N, H, W)`` or a list), or None.
        masks: ground-truth masks of the same shapes, or None (then no ``seg_f1``).
        confidence: coverage of the Clopper-Pearson intervals.

    Returns:
        ``false_alarm_rate`` (normal images labelled anomalous / normal images) and ``miss_rate``
        (anomalous images labelled normal / anomalous images), each with ``_low`` / ``_high`` interval
        bounds; the counts ``n_normal``, ``n_false_alarms``, ``n_anomalous``, ``n_missed``; and, with
        both mask sets, ``seg_f1``. Rates are NaN when their class is absent.
    """
    truth = _as_labels(labels, np.asarray(labels).size, "labels")
    pred = _as_decisions(pred_labels, truth.size, "pred_labels")
    n_normal, n_anomalous = int((~truth).sum()), int(truth.sum())
    n_false_alarms, n_missed = int((pred & ~truth).sum()), int((~pred & truth).sum())
    out: dict[str, float] = {"n_normal": n_normal, "n_false_alarms": n_false_alarms,
                             "n_anomalous": n_anomalous, "n_missed": n_missed}
    for key, count, n in (("false_alarm_rate", n_false_alarms, n_normal), ("miss_rate", n_missed, n_anomalous)):
        out[key], out[f"{key}_low"], out[f"{key}_high"] = rate_with_ci(count, n, confidence)
    if pred_masks is not None and masks is not None:
        n_masks = len(pred_masks)
        if n_masks != truth.size:
            raise InvalidArgumentError(f"expected one predicted mask per image, got {n_masks} masks for {truth.size} labels")
        out["seg_f1"] = seg_f1(pred_masks, masks)
    return out
