"""The referral rule: decide the cases the model is sure of, refer the rest to a dermatologist.

Selective classification by the served confidence, the top class probability (Geifman and El-Yaniv 2017): a case
is decided when its confidence reaches the threshold. The risk-coverage curve says, for every threshold, which share
of cases is decided and the balanced accuracy of those; the threshold is the lowest one whose decided cases reach the
target on val, so that as many cases as possible are decided at that accuracy.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
REFER_ALL = 1.000001  # above any probability: the threshold when the target cannot be reached


def decided_balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, decided: np.ndarray) -> float:
    """Mean recall over the classes present among the labels, counting only decided cases; a class whose cases are
    all referred scores 0, so that referring a whole class never raises the score."""
    recalls = []
    for c in np.unique(labels):
        mine = decided & (labels == c)
        recalls.append(float((predicted[mine] == c).mean()) if mine.any() else 0.0)
    return float(np.mean(recalls)) if recalls else float("nan")


def risk_coverage(labels: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Per candidate threshold (each distinct confidence, highest coverage first): the share of cases decided and
    the balanced accuracy of those decided."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    rows = []
    for threshold in np.unique(confidence):
        decided = confidence >= threshold
        rows.append(
            {
                "threshold": float(threshold),
                "coverage": float(decided.mean()),
                "balanced_accuracy": decided_balanced_accuracy(labels, predicted, decided),
            }
        )
    return pd.DataFrame(rows, columns=["threshold", "coverage", "balanced_accuracy"])


def fit_threshold(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """The lowest confidence threshold whose decided cases reach `target` balanced accuracy on these cases, placed
    halfway to the next lower confidence so that no case sits on it (float noise between the paths that compute the
    probabilities cannot flip a decision); 0 where every case is decided, REFER_ALL where no threshold reaches it."""
    curve = risk_coverage(labels, probs)
    reaching = np.flatnonzero(curve["balanced_accuracy"].to_numpy() >= target)
    if not len(reaching):
        log.warning(
            "referral: no threshold reaches balanced accuracy %.3f on val (best %.3f): every case is referred",
            target,
            curve["balanced_accuracy"].max(),
        )
        return REFER_ALL
    first, thresholds = reaching[0], curve["threshold"].to_numpy()
    return 0.0 if first == 0 else float((thresholds[first - 1] + thresholds[first]) / 2)


def referral_summary(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Coverage and decided balanced accuracy at a threshold, and how many cases were decided."""
    decided = probs.max(axis=1) >= threshold
    return {
        "coverage": float(decided.mean()),
        "decided_balanced_accuracy": decided_balanced_accuracy(labels, probs.argmax(axis=1), decided),
        "decided": float(decided.sum()),
    }
