"""Metrics: the bootstrap intervals of balanced accuracy (one model, and the paired difference of two) resample
lesions, not images."""

import numpy as np
import pytest

from src.learn.metrics import balanced_accuracy, balanced_accuracy_difference, balanced_accuracy_interval


def _predictions(lesions: int, images_per_lesion: int, seed: int = 0):
    """One class and one right/wrong outcome per lesion, repeated for each of its images (as for the several
    photos of one lesion in HAM10000): 75% of lesions right."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 7, lesions)
    said = np.where(rng.random(lesions) < 0.75, label, (label + 1) % 7)
    repeat = np.repeat(np.arange(lesions), images_per_lesion)
    return label[repeat], np.eye(7)[said[repeat]], repeat


def test_the_interval_holds_the_estimate_narrows_with_more_lesions_and_is_reproducible():
    widths = []
    for lesions in (150, 1500):
        labels, probs, groups = _predictions(lesions, 1)
        low, high = balanced_accuracy_interval(labels, probs, groups)
        assert low < balanced_accuracy(labels, probs) < high
        assert (low, high) == balanced_accuracy_interval(labels, probs, groups)
        widths.append(high - low)
    assert widths[1] < 0.5 * widths[0]  # ~1/sqrt(10) of it


def test_images_of_one_lesion_count_once():
    """Five photos per lesion carry the information of one: resampled as lesions, the interval is as wide as for
    300 single-image lesions; resampled as if the 1,500 images were independent, it would be far too narrow."""
    labels, probs, lesions = _predictions(300, 5)
    low, high = balanced_accuracy_interval(labels, probs, lesions)
    naive_low, naive_high = balanced_accuracy_interval(labels, probs, np.arange(len(labels)))
    single_low, single_high = balanced_accuracy_interval(*_predictions(300, 1))
    assert high - low > 1.8 * (naive_high - naive_low)
    assert abs((high - low) - (single_high - single_low)) < 0.3 * (single_high - single_low)


def _fixing(labels: np.ndarray, probs: np.ndarray, lesions: np.ndarray, share: float) -> np.ndarray:
    """The same predictions with the wrong answers for a share of the lesions made right."""
    fixed = probs.copy()
    chosen = np.isin(lesions, np.flatnonzero(np.random.default_rng(1).random(lesions.max() + 1) < share))
    fixed[chosen] = np.eye(7)[labels[chosen]]
    return fixed


def test_the_paired_difference_sees_what_the_separate_intervals_cannot():
    labels, probs, lesions = _predictions(300, 3)
    better = _fixing(labels, probs, lesions, 0.15)  # about 0.04 more balanced accuracy, on some lesions only
    gain, low, high = balanced_accuracy_difference(labels, better, probs, lesions)
    assert gain == pytest.approx(balanced_accuracy(labels, better) - balanced_accuracy(labels, probs))
    assert 0 < low < gain < high
    # each model's own interval overlaps the other's: taken apart, the runs look alike
    assert (
        balanced_accuracy_interval(labels, better, lesions)[0] < balanced_accuracy_interval(labels, probs, lesions)[1]
    )
    assert balanced_accuracy_difference(labels, probs, better, lesions) == pytest.approx((-gain, -high, -low))


def test_the_same_predictions_differ_by_nothing():
    labels, probs, lesions = _predictions(100, 2)
    assert balanced_accuracy_difference(labels, probs, probs, lesions) == (0.0, 0.0, 0.0)
