"""Results by patient subgroup (sex, age band, anatomical site, diagnosis type): balanced accuracy with its
lesion-bootstrap interval, melanoma sensitivity and specificity, and a flag where a subgroup falls short."""

from __future__ import annotations

import numpy as np
import pandas as pd

from src.learn.metrics import MELANOMA, balanced_accuracy, balanced_accuracy_interval

UNKNOWN, OTHER = "unknown", "other"
AGE_BANDS = ((0, 30, "< 30"), (30, 50, "30-49"), (50, 70, "50-69"), (70, np.inf, ">= 70"))
GROUPINGS = ("sex", "age", "localization", "dx_type")
MIN_LESIONS = 10  # fewer lesions than this: flagged "too small", however the interval looks
MIN_SITE_LESIONS = 30  # sites with fewer lesions in the split are pooled into "other"
COLUMNS = (
    "grouping",
    "subgroup",
    "images",
    "lesions",
    "classes",
    "balanced_accuracy",
    "ci_low",
    "ci_high",
    "melanoma_sensitivity",
    "melanoma_specificity",
    "flag",
)


def _text(values: pd.Series) -> pd.Series:
    """Lower-case labels with blanks and NaN as "unknown"."""
    text = values.astype("string").str.strip().str.lower()
    return text.mask(text.isna() | (text == ""), UNKNOWN).astype(str)


def age_band(age: pd.Series) -> pd.Series:
    """Each age's band (< 30, 30-49, 50-69, >= 70), "unknown" where the age is missing."""
    years = pd.to_numeric(age, errors="coerce")
    bands = pd.Series(UNKNOWN, index=age.index, dtype=object)
    for low, high, name in AGE_BANDS:
        bands[(years >= low) & (years < high)] = name
    return bands


def subgroup_columns(frame: pd.DataFrame, min_site_lesions: int = MIN_SITE_LESIONS) -> pd.DataFrame:
    """Every image's subgroup per grouping, taken from its lesion's first image so that each lesion sits in exactly
    one subgroup (HAM10000 records metadata per lesion); sites with few lesions are pooled into "other"."""
    empty = pd.Series(pd.NA, index=frame.index)
    groups = pd.DataFrame(
        {
            "sex": _text(frame.get("sex", empty)),
            "age": age_band(frame.get("age", empty)),
            "localization": _text(frame.get("localization", empty)),
            "dx_type": _text(frame.get("dx_type", empty)),
        }
    )
    groups = groups.groupby(frame["lesion_id"].to_numpy()).transform("first")
    site_lesions = groups["localization"].groupby(frame["lesion_id"].to_numpy()).first().value_counts()
    rare = site_lesions.index[site_lesions < min_site_lesions]
    groups["localization"] = groups["localization"].where(~groups["localization"].isin(rare), OTHER)
    return groups


def melanoma_rates(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Melanoma sensitivity and specificity of the argmax decision, NaN where a subgroup has no case to measure."""
    is_mel, said_mel = labels == MELANOMA, probs.argmax(axis=1) == MELANOMA
    sensitivity = (said_mel & is_mel).sum() / is_mel.sum() if is_mel.any() else np.nan
    specificity = (~said_mel & ~is_mel).sum() / (~is_mel).sum() if (~is_mel).any() else np.nan
    return float(sensitivity), float(specificity)


def subgroup_row(labels: np.ndarray, probs: np.ndarray, lesions: np.ndarray, min_lesions: int) -> dict:
    """One subgroup's counts and scores; the interval only where there are two lesions to resample."""
    n_lesions = len(np.unique(lesions))
    low, high = balanced_accuracy_interval(labels, probs, lesions) if n_lesions > 1 else (np.nan, np.nan)
    sensitivity, specificity = melanoma_rates(labels, probs)
    classes = len(np.unique(labels))
    return {
        "images": len(labels),
        "lesions": n_lesions,
        "classes": classes,
        "balanced_accuracy": balanced_accuracy(labels, probs),
        "ci_low": low,
        "ci_high": high,
        "melanoma_sensitivity": sensitivity,
        "melanoma_specificity": specificity,
        "too_small": n_lesions < min_lesions or classes < 2,
    }


def _order(grouping: str, values: pd.Series) -> list[str]:
    """Age bands in age order; other groupings by size, with "other" and "unknown" last."""
    present = set(values)
    first = [band for *_, band in AGE_BANDS] if grouping == "age" else list(values.value_counts().index)
    last = [v for v in (OTHER, UNKNOWN) if v in present]
    return [v for v in first if v in present and v not in last] + last


def subgroup_table(
    frame: pd.DataFrame,
    probs: np.ndarray,
    min_lesions: int = MIN_LESIONS,
    min_site_lesions: int = MIN_SITE_LESIONS,
) -> pd.DataFrame:
    """The overall row, then one row per subgroup of each grouping; `frame` is the split index (label, lesion_id and
    the metadata columns), `probs` the served probabilities in its row order.

    The flag says "too small" where a subgroup has fewer than `min_lesions` lesions or a single class: balanced
    accuracy is the mean recall over the classes present (as for the overall score), so with one class it is only
    that class's recall. Otherwise "below" where the whole 95% interval lies below the overall balanced accuracy.
    The `classes` column says how many classes a subgroup's score averages.
    """
    labels, lesions = frame["label"].to_numpy(), frame["lesion_id"].to_numpy()
    overall = subgroup_row(labels, probs, lesions, min_lesions)
    rows = [{"grouping": "overall", "subgroup": "all", **overall}]
    groups = subgroup_columns(frame, min_site_lesions)
    for grouping in GROUPINGS:
        for value in _order(grouping, groups[grouping]):
            chosen = (groups[grouping] == value).to_numpy()
            row = subgroup_row(labels[chosen], probs[chosen], lesions[chosen], min_lesions)
            rows.append({"grouping": grouping, "subgroup": value, **row})
    table = pd.DataFrame(rows)
    below = table["ci_high"] < overall["balanced_accuracy"]
    table["flag"] = np.where(table.pop("too_small"), "too small", np.where(below, "below", ""))
    table.loc[0, "flag"] = ""
    return table[list(COLUMNS)]
