import numpy as np
import pytest
from skimage.measure import label as skimage_label
from sklearn.metrics import f1_score, precision_recall_curve, recall_score, roc_auc_score, roc_curve

from gaussad.metrics import (
    aupro,
    best_balanced_accuracy,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
    roc_points,
)


def random_labels_scores(seed, n=200, ties=False):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + labels
    if ties:
        scores = np.round(scores * 2) / 2
    return labels, scores


def random_masks_maps(seed, ties):
    """Small masks with many regions (one image defect-free) and maps, tied or continuous."""
    rng = np.random.default_rng(seed)
    masks = rng.random((4, 9, 11)) < 0.25
    masks[0] = False
    maps = rng.random(masks.shape) + 0.5 * masks
    if ties:
        maps = np.round(maps * 4) / 4
    return masks, maps


def brute_force_aupro(masks, maps, fpr_limit):
    """Reference: FPR and PRO at every distinct value, then a trapezoid cut at fpr_limit."""
    labelled = [skimage_label(mask, connectivity=2) for mask in masks]
    region_masks = [
        (index, regions == r)
        for index, regions in enumerate(labelled)
        for r in range(1, regions.max() + 1)
    ]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fpr = (predicted & ~masks).sum() / (~masks).sum()
        pro = np.mean([predicted[index][region].mean() for index, region in region_masks])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x1 >= fpr_limit:
            y_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
            area += (fpr_limit - x0) * (y0 + y_at_limit) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


# --- AUROC -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_image_auroc_matches_sklearn(seed, ties):
    labels, scores = random_labels_scores(seed, ties=ties)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_is_none_for_one_class():
    assert image_auroc([0, 0, 0], [0.1, 0.5, 0.2]) is None
    assert image_auroc([True, True], [0.1, 0.5]) is None


def test_image_auroc_rejects_bad_labels():
    with pytest.raises(ValueError, match="0/1"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("positives", [0.01, 0.5, 0.99])
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn_whatever_the_class_balance(positives, ties):
    """float32 scores, few or many positives, with and without ties."""
    rng = np.random.default_rng(int(positives * 100) + ties)
    labels = rng.random(5000) < positives
    scores = (rng.normal(size=5000) + labels).astype(np.float32)
    if ties:
        scores = np.round(scores * 3) / 3
    expected = roc_auc_score(labels, scores)
    assert image_auroc(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(labels.reshape(1, 50, 100), scores.reshape(1, 50, 100)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_matches_sklearn_on_flat_arrays(seed):
    masks, maps = random_masks_maps(seed, ties=bool(seed))
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_is_none_without_both_pixel_kinds():
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert pixel_auroc(np.zeros((2, 4, 4), bool), maps) is None
    assert pixel_auroc(np.ones((2, 4, 4), bool), maps) is None


def test_pixel_metrics_name_the_shapes_when_they_differ():
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        aupro(np.zeros((4, 4), bool), np.zeros((4, 4)))


# --- AUPRO -----------------------------------------------------------------------------


def two_region_masks():
    """One 10×10 image: region A = 2 diagonal pixels (one 8-connected region), region B = 3×6.

    80 normal pixels.
    """
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True
    masks[0, 4:7, 2:8] = True
    return masks


def test_aupro_of_perfect_map_is_one():
    masks = two_region_masks()
    masks = np.concatenate([masks, np.zeros_like(masks)])  # a defect-free image as well
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_of_constant_map_is_half_the_limit(fpr_limit):
    # One threshold only: the curve is the straight line from (0, 0) to (1, 1).
    masks = two_region_masks()
    assert aupro(masks, np.full(masks.shape, 0.7), fpr_limit) == pytest.approx(fpr_limit / 2)


def test_aupro_of_hand_built_map():
    masks = two_region_masks()
    maps = np.zeros(masks.shape)
    maps[masks & (np.arange(10)[:, None] < 2)] = 1.0  # region A fully
    maps[0, 9, :8] = 1.0  # 8 normal pixels: FPR 0.1
    maps[0, 4:7, 2:5] = 0.5  # half of region B (9 of 18 pixels)
    maps[0, 8, :8] = 0.5  # 8 more normal pixels: FPR 0.2
    # Curve: (0, 0), (0.1, 0.5), (0.2, 0.75), (1, 1); at FPR 0.3, PRO = 0.75 + 0.25 * 0.1 / 0.8.
    pro_at_limit = 0.75 + 0.25 * 0.1 / 0.8
    area = 0.1 * 0.5 / 2 + 0.1 * (0.5 + 0.75) / 2 + 0.1 * (0.75 + pro_at_limit) / 2
    assert area / 0.3 == pytest.approx(0.546875)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.546875, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed, fpr_limit):
    masks, maps = random_masks_maps(seed, ties=seed % 2 == 0)
    expected = brute_force_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_is_none_without_regions_or_normal_pixels():
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert aupro(np.zeros((2, 4, 4), bool), maps) is None
    assert aupro(np.ones((2, 4, 4), bool), maps) is None


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5])
def test_aupro_rejects_bad_fpr_limit(fpr_limit):
    masks = two_region_masks()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, masks.astype(float), fpr_limit)


# --- Thresholds ------------------------------------------------------------------------


def balanced_accuracy(labels, predicted):
    return (recall_score(labels, predicted) + recall_score(~labels, ~predicted)) / 2


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_f1_optimal_threshold_is_the_best_observed_score(seed, ties):
    labels, scores = random_labels_scores(seed, ties=ties)
    threshold, f1 = f1_optimal_threshold(labels, scores)
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert f1 == pytest.approx(best, abs=1e-12)
    assert f1_score(labels, scores >= threshold) == pytest.approx(f1, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_best_balanced_accuracy_is_the_best_observed_score(seed, ties):
    labels, scores = random_labels_scores(seed, ties=ties)
    threshold, accuracy = best_balanced_accuracy(labels, scores)
    best = max(balanced_accuracy(labels, scores >= t) for t in np.unique(scores))
    assert accuracy == pytest.approx(best, abs=1e-12)
    assert balanced_accuracy(labels, scores >= threshold) == pytest.approx(accuracy, abs=1e-12)


def test_thresholds_of_separable_scores_give_perfect_results():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert f1_optimal_threshold(labels, scores) == (0.8, 1.0)
    assert best_balanced_accuracy(labels, scores) == (0.8, 1.0)


@pytest.mark.parametrize("function", [f1_optimal_threshold, best_balanced_accuracy])
def test_thresholds_need_both_classes(function):
    with pytest.raises(ValueError, match="both"):
        function([1, 1, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_roc_points_and_f1_threshold_are_sklearns(seed, ties):
    """Against roc_curve(drop_intermediate=False), and the F1 maximum over precision_recall_curve
    (its first maximum, in its ascending threshold order)."""
    labels, scores = random_labels_scores(seed, ties=ties)
    for got, want in zip(roc_points(labels, scores), roc_curve(labels, scores, drop_intermediate=False)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    total = precision[:-1] + recall[:-1]
    f1 = np.divide(2 * precision[:-1] * recall[:-1], total, out=np.zeros_like(total), where=total > 0)
    assert f1_optimal_threshold(labels, scores) == pytest.approx((thresholds[np.argmax(f1)], f1.max()), abs=1e-12)
