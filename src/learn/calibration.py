"""Calibration: a temperature fitted on the validation split, and how far confidence is from accuracy.

A model that says 0.9 should be right 9 times in 10. Temperature scaling (Guo et al., 2017) divides the logits by
one number fitted on val to minimise the negative log-likelihood; it changes no argmax of a single view, so it
costs nothing in accuracy, and it is the calibration that holds up best on small validation sets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar

from src.learn.model import combine_views

BINS = 15  # the usual ECE binning (Guo et al.)
TEMPERATURE_RANGE = (0.05, 20.0)


def served_probs(view_logits: np.ndarray, temperature: float = 1.0, offsets: np.ndarray | None = None) -> np.ndarray:
    """What the served model answers for these (N, views, classes) logits: the one formula `Probabilities` runs."""
    logits = torch.from_numpy(np.ascontiguousarray(view_logits, dtype=np.float32))
    offsets_t = torch.zeros(logits.shape[-1]) if offsets is None else torch.as_tensor(offsets, dtype=torch.float32)
    return combine_views(logits, torch.tensor(temperature), offsets_t).numpy()


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature(view_logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises val NLL of the served probabilities (TTA views averaged after it)."""
    result = minimize_scalar(
        lambda log_t: nll(served_probs(view_logits, float(np.exp(log_t))), labels),
        bounds=tuple(np.log(TEMPERATURE_RANGE)),
        method="bounded",
        options={"xatol": 1e-3},
    )
    return round(float(np.exp(result.x)), 4)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Top-label ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins
    weighted by how many predictions fall in each."""
    table = reliability(probs, labels, bins)
    return float((table["count"] * (table["confidence"] - table["accuracy"]).abs()).sum() / max(len(labels), 1))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: the mean over images of the squared distance to the one-hot truth (0 is perfect)."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> pd.DataFrame:
    """Per non-empty confidence bin: mean confidence, accuracy and count (the reliability diagram's data)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = [
        {
            "bin": b,
            "lower": edges[b],
            "upper": edges[b + 1],
            "confidence": float(confidence[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
            "count": int((which == b).sum()),
        }
        for b in range(bins)
        if (which == b).any()
    ]
    return pd.DataFrame(rows, columns=["bin", "lower", "upper", "confidence", "accuracy", "count"])
