"""The error table: who is mistaken for whom, how often, and the most confident mistakes first."""

from __future__ import annotations

import pandas as pd

from src.learn.confusions import top_confusions


def test_confusions_are_counted_per_pair_with_the_most_confident_examples_first():
    rows = [
        ("a", "mel", "nv", 0.9),
        ("b", "mel", "nv", 0.6),
        ("c", "mel", "nv", 0.7),
        ("d", "mel", "bkl", 0.5),
        ("e", "mel", "mel", 0.8),
        ("f", "nv", "mel", 0.55),
        ("g", "nv", "nv", 0.99),
    ]
    frame = pd.DataFrame(rows, columns=["image_id", "dx", "predicted", "p"])
    for cls in ("mel", "nv", "bkl"):  # the probability of each class: p on the predicted one
        frame[cls] = [p if pred == cls else (1 - p) / 2 for pred, p in zip(frame["predicted"], frame["p"], strict=True)]
    table = top_confusions(frame.drop(columns="p"), examples=2)
    assert table[["actual", "predicted", "count"]].values.tolist() == [
        ["mel", "nv", 3],
        ["mel", "bkl", 1],
        ["nv", "mel", 1],
    ]
    first = table.iloc[0]
    assert first["examples"] == "a c" and first["share_of_actual"] == 0.6
    assert first["mean_confidence"] == round((0.9 + 0.6 + 0.7) / 3, 4)
