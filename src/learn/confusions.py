"""Error analysis: which classes each class is mistaken for, how often, and the images to look at first."""

from __future__ import annotations

import pandas as pd

EXAMPLES = 3  # image ids per confusion: the most confident mistakes, which are the most telling to look at


def top_confusions(predictions: pd.DataFrame, examples: int = EXAMPLES) -> pd.DataFrame:
    """Per (actual, predicted) pair with at least one mistake: count, share of the actual class, mean confidence
    in the wrong class, and example image ids (most confident first); sorted by class, then most common first.

    `predictions` has columns image_id, dx (actual), predicted and one probability column per class."""
    wrong = predictions[predictions["dx"] != predictions["predicted"]].copy()
    wrong["confidence"] = [row[row["predicted"]] for _, row in wrong.iterrows()]
    per_class = predictions["dx"].value_counts()
    rows = [
        {
            "actual": actual,
            "predicted": predicted,
            "count": len(group),
            "share_of_actual": round(len(group) / per_class[actual], 4),
            "mean_confidence": round(float(group["confidence"].mean()), 4),
            "examples": " ".join(group.sort_values("confidence", ascending=False)["image_id"].head(examples)),
        }
        for (actual, predicted), group in wrong.groupby(["dx", "predicted"])
    ]
    columns = ["actual", "predicted", "count", "share_of_actual", "mean_confidence", "examples"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["actual", "count"], ascending=[True, False], ignore_index=True)
