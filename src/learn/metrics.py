"""Classification metrics (numpy/sklearn): balanced accuracy is the ISIC 2018 Task 3 metric."""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from src.config import CLASSES

MELANOMA = CLASSES.index("mel")
# A small validation split may lack a class the model predicts; balanced accuracy is still well defined.
warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")


def summary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy (mean per-class recall over the classes present)."""
    preds = probs.argmax(axis=1)
    return {
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, preds)),
    }


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean per-class recall of the argmax decision."""
    return float(skm.balanced_accuracy_score(labels, probs.argmax(axis=1)))


def _lesion_tallies(labels: np.ndarray, right: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group and class: images seen and images right (group: 0..G-1)."""
    seen = np.zeros((group.max() + 1, len(CLASSES)))
    np.add.at(seen, (group, labels), 1)
    hits = np.zeros_like(seen)
    np.add.at(hits, (group[right], labels[right]), 1)
    return seen, hits


def _tallied_balanced_accuracy(seen: np.ndarray, hits: np.ndarray, drawn: np.ndarray) -> float:
    """Mean per-class recall over the classes present in the drawn groups."""
    n, h = seen[drawn].sum(axis=0), hits[drawn].sum(axis=0)
    return float((h[n > 0] / n[n > 0]).mean())


def _lesion_bootstrap(statistic, groups: int, level: float, resamples: int) -> tuple[float, float]:
    """Percentile interval of statistic(drawn groups) over bootstrap samples of whole groups."""
    result = stats.bootstrap(
        (np.arange(groups),),
        statistic,
        n_resamples=resamples,
        vectorized=False,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(0),  # the same interval for the same predictions
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def balanced_accuracy_interval(
    labels: np.ndarray, probs: np.ndarray, groups: np.ndarray, level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Percentile bootstrap interval of balanced accuracy, resampling whole groups (lesions).

    Images of one lesion are not independent, so lesions are what is drawn; with ~20 images of the rarest
    classes in a split the interval is wide, and it says which differences between two runs mean anything.
    """
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    seen, hits = _lesion_tallies(labels, labels == probs.argmax(axis=1), group)
    return _lesion_bootstrap(partial(_tallied_balanced_accuracy, seen, hits), len(seen), level, resamples)


def balanced_accuracy_difference(
    labels: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    groups: np.ndarray,
    level: float = 0.95,
    resamples: int = 2000,
) -> tuple[float, float, float]:
    """Balanced accuracy of A minus that of B on the same images, with a paired lesion-bootstrap interval.

    Both models are scored on each bootstrap sample, so what the two get right together cancels: the interval of
    the difference is narrower than resampling the two runs apart would give, and it is what says whether A beats B.
    """
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    seen, hits_a = _lesion_tallies(labels, labels == probs_a.argmax(axis=1), group)
    _, hits_b = _lesion_tallies(labels, labels == probs_b.argmax(axis=1), group)

    def difference(drawn: np.ndarray) -> float:
        return _tallied_balanced_accuracy(seen, hits_a, drawn) - _tallied_balanced_accuracy(seen, hits_b, drawn)

    low, high = _lesion_bootstrap(difference, len(seen), level, resamples)
    return difference(np.arange(len(seen))), low, high


def _roc_auc(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    positive = labels == k
    if positive.all() or not positive.any():
        return float("nan")  # undefined with one class present
    return float(skm.roc_auc_score(positive, probs[:, k]))


def full_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Everything evaluate reports: summary, macro F1, ROC AUC, per-class precision/recall, melanoma."""
    preds = probs.argmax(axis=1)
    ks = list(range(len(CLASSES)))
    precision, recall, f1, _ = skm.precision_recall_fscore_support(labels, preds, labels=ks, zero_division=0)
    aucs = [_roc_auc(labels, probs, k) for k in ks]
    out = summary_metrics(labels, probs)
    out["macro_f1"] = float(np.mean(f1[np.bincount(labels, minlength=len(ks)) > 0]))
    out["macro_roc_auc"] = float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan")
    for k, name in enumerate(CLASSES):
        out[f"precision_{name}"], out[f"recall_{name}"] = float(precision[k]), float(recall[k])
        out[f"roc_auc_{name}"] = aucs[k]
    is_mel, said_mel = labels == MELANOMA, preds == MELANOMA
    out["melanoma_sensitivity"] = float((said_mel & is_mel).sum() / max(is_mel.sum(), 1))
    out["melanoma_specificity"] = float((~said_mel & ~is_mel).sum() / max((~is_mel).sum(), 1))
    return out


def confusion(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Confusion matrix, rows = actual, columns = predicted, in CLASSES order."""
    return skm.confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(len(CLASSES))))


def roc_curves(labels: np.ndarray, probs: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One-vs-rest ROC curve (fpr, tpr) per class present with both outcomes."""
    curves = {}
    for k, name in enumerate(CLASSES):
        positive = labels == k
        if positive.any() and not positive.all():
            fpr, tpr, _ = skm.roc_curve(positive, probs[:, k])
            curves[name] = (fpr, tpr)
    return curves
