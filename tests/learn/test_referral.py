import numpy as np
import pytest

from src.learn.referral import REFER_ALL, decided_balanced_accuracy, fit_threshold, referral_summary, risk_coverage


def confident_when_right(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities whose top class is right more often the more confident it is."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, n)
    confidence = rng.uniform(0.2, 1.0, n)
    right = rng.uniform(size=n) < confidence
    predicted = np.where(right, labels, (labels + rng.integers(1, 7, n)) % 7)
    probs = np.full((n, 7), 0.0)
    probs[np.arange(n), predicted] = confidence
    rest = (1 - confidence) / 6
    probs += np.where(probs == 0, rest[:, None], 0)
    return labels, probs


def test_the_threshold_fitted_on_val_meets_its_target_there():
    labels, probs = confident_when_right()
    for target in (0.7, 0.8, 0.9):
        threshold = fit_threshold(labels, probs, target)
        summary = referral_summary(labels, probs, threshold)
        assert summary["decided_balanced_accuracy"] >= target
        assert 0 < summary["coverage"] < 1
        # and it decides as many cases as possible: one more case (the next lower confidence) misses the target
        lower = probs.max(axis=1)[probs.max(axis=1) < threshold].max()
        assert referral_summary(labels, probs, lower)["decided_balanced_accuracy"] < target


def test_a_higher_target_decides_fewer_cases_and_no_case_sits_on_the_threshold():
    labels, probs = confident_when_right()
    low, high = fit_threshold(labels, probs, 0.7), fit_threshold(labels, probs, 0.9)
    assert referral_summary(labels, probs, high)["coverage"] < referral_summary(labels, probs, low)["coverage"]
    assert not np.isclose(probs.max(axis=1), high, atol=1e-7).any()


def test_an_unreachable_target_refers_every_case_and_a_reached_one_refers_none():
    labels, probs = confident_when_right()
    always_wrong = (labels + 1) % 7
    assert fit_threshold(always_wrong, probs, 0.5) == REFER_ALL
    assert referral_summary(labels, probs, REFER_ALL)["coverage"] == 0
    perfect = np.eye(7)[labels] * 0.9 + 0.1 / 7
    assert fit_threshold(labels, perfect, 0.99) == 0.0


def test_referring_a_whole_class_scores_zero_for_it():
    labels = np.array([0, 0, 1, 1])
    predicted = np.array([0, 0, 1, 0])
    assert decided_balanced_accuracy(labels, predicted, np.array([True, True, False, False])) == 0.5
    assert decided_balanced_accuracy(labels, predicted, np.ones(4, bool)) == pytest.approx(0.75)


def test_the_curve_runs_from_every_case_decided_down():
    labels, probs = confident_when_right()
    curve = risk_coverage(labels, probs)
    assert curve["coverage"].iloc[0] == 1.0 and curve["coverage"].is_monotonic_decreasing
    assert curve["balanced_accuracy"].iloc[0] == pytest.approx(
        decided_balanced_accuracy(labels, probs.argmax(1), np.ones(len(labels), bool))
    )
