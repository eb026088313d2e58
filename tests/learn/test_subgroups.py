"""Results by subgroup: every image and lesion in exactly one subgroup per grouping, intervals that narrow with more
lesions, and the flags."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from src.config import CLASSES
from src.ingest.synthetic import make_dataset
from src.learn.metrics import balanced_accuracy
from src.learn.subgroups import GROUPINGS, age_band, subgroup_columns, subgroup_table


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[pd.DataFrame, np.ndarray]:
    """The synthetic metadata as a split index (with labels), and predictions right for ~70% of images."""
    frame = make_dataset(tmp_path_factory.mktemp("raw"), n_lesions=150, seed=3)
    frame["label"] = frame["dx"].map({c: k for k, c in enumerate(CLASSES)})
    rng = np.random.default_rng(0)
    said = np.where(rng.random(len(frame)) < 0.7, frame["label"], (frame["label"] + 1) % len(CLASSES))
    return frame, np.eye(len(CLASSES))[said]


def lesions(n: int, first: int = 0, right: float = 0.75, **metadata) -> pd.DataFrame:
    """`n` single-image lesions spread evenly over the classes, the first `right` share of each class predicted
    right (the rest as the next class)."""
    label = np.arange(n) % len(CLASSES)
    correct = (np.arange(n) // len(CLASSES)) < right * (n // len(CLASSES))
    said = np.where(correct, label, (label + 1) % len(CLASSES))
    frame = pd.DataFrame({"lesion_id": [f"L{first + i}" for i in range(n)], "label": label, "said": said})
    return frame.assign(dx=[CLASSES[k] for k in label], **metadata)


def table_of(*parts: pd.DataFrame, **kwargs) -> pd.DataFrame:
    frame = pd.concat(parts, ignore_index=True)
    frame["image_id"] = [f"I{i}" for i in range(len(frame))]
    return subgroup_table(frame, np.eye(len(CLASSES))[frame["said"]], **kwargs)


def test_subgroups_add_up_to_the_split_in_images_and_lesions(generated):
    frame, probs = generated
    table = subgroup_table(frame, probs, min_site_lesions=25)
    overall = table.iloc[0]
    assert overall["grouping"] == "overall" and overall["images"] == len(frame)
    assert overall["lesions"] == frame["lesion_id"].nunique()
    assert overall["balanced_accuracy"] == pytest.approx(balanced_accuracy(frame["label"].to_numpy(), probs))
    assert list(dict.fromkeys(table["grouping"].iloc[1:])) == list(GROUPINGS)
    for grouping, rows in table.iloc[1:].groupby("grouping"):
        assert rows["images"].sum() == len(frame), grouping
        assert rows["lesions"].sum() == frame["lesion_id"].nunique(), grouping
        assert rows["subgroup"].is_unique
    assert list(table.loc[table["grouping"] == "age", "subgroup"]) == ["< 30", "30-49", "50-69", ">= 70"]
    assert "other" in set(table.loc[table["grouping"] == "localization", "subgroup"])  # sites under 25 lesions


def test_the_interval_narrows_with_more_lesions_at_the_same_accuracy():
    """Same accuracy per class, four times the lesions: a narrower interval around the same score."""
    table = table_of(lesions(56, sex="female"), lesions(224, first=56, sex="male")).set_index("subgroup")
    female, male = table.loc["female"], table.loc["male"]
    assert female["balanced_accuracy"] == pytest.approx(male["balanced_accuracy"]) == pytest.approx(0.75)
    for row in (female, male):
        assert row["ci_low"] < row["balanced_accuracy"] < row["ci_high"]
    assert male["ci_high"] - male["ci_low"] < 0.75 * (female["ci_high"] - female["ci_low"])  # ~1/2 of it
    assert female["flag"] == male["flag"] == ""


def test_flags_say_too_small_and_below():
    """Under 10 lesions or a single class: too small, whatever the score; an interval wholly under the overall
    score: below."""
    table = table_of(
        lesions(280, sex="female", age=40.0),
        lesions(70, first=280, right=0.0, sex="male", age=60.0),  # every lesion wrong
        lesions(7, first=350, sex="unknown", age=np.nan),  # too few lesions
        lesions(70, first=357, sex="female", age=80.0).query("label == 0"),  # a single class
    ).set_index(["grouping", "subgroup"])
    assert table.loc[("sex", "male"), "flag"] == "below"
    assert table.loc[("sex", "unknown"), "flag"] == "too small"
    assert table.loc[("age", ">= 70"), ["classes", "flag"]].tolist() == [1, "too small"]
    assert table.loc[("age", "unknown"), "lesions"] == 7
    assert table.loc[("sex", "female"), "flag"] == ""
    assert 0 < table.loc[("dx_type", "unknown"), "melanoma_sensitivity"] < 1  # no such column: all "unknown"


def test_age_bands_and_missing_metadata():
    ages = pd.Series([0, 29, 30, 49, 50, 69, 70, 85, None, "?"])
    assert age_band(ages).tolist() == [
        "< 30",
        "< 30",
        "30-49",
        "30-49",
        "50-69",
        "50-69",
        ">= 70",
        ">= 70",
        "unknown",
        "unknown",
    ]
    frame = pd.DataFrame(
        {
            "lesion_id": ["a", "a", "b", "c"],
            "sex": ["Male", "female", None, " "],  # lesion a's images disagree: its first image decides
            "localization": ["back", "back", "face", "back"],
        }
    )
    groups = subgroup_columns(frame, min_site_lesions=2)
    assert groups["sex"].tolist() == ["male", "male", "unknown", "unknown"]
    assert groups["localization"].tolist() == ["back", "back", "other", "back"]  # face: one lesion
    assert set(groups["dx_type"]) == {"unknown"}  # no such column: unknown, not an error


def test_melanoma_rates_are_undefined_without_cases():
    no_melanoma = lesions(70, sex="female").query(f"label != {CLASSES.index('mel')}")
    table = table_of(no_melanoma)
    assert np.isnan(table.iloc[0]["melanoma_sensitivity"])
    assert table.iloc[0]["melanoma_specificity"] == pytest.approx(58 / 60)  # 2 of the 10 df lesions said mel
