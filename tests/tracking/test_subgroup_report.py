"""The subgroup report from a split index and its predictions CSV: table, plot, and metric names MLflow takes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.utils.validation import _validate_metric_name

from src.config import CLASSES
from src.ingest.rawdata import DataError
from src.ingest.synthetic import make_dataset
from src.prepare.index import index_frame
from src.tracking.subgroup_report import metric_part, subgroup_report


def test_names_become_metric_names_mlflow_accepts():
    assert [metric_part(s) for s in ("< 30", ">= 70", "30-49", "lower extremity", "a/b", "..", "é")] == [
        "lt 30",
        "ge 70",
        "30-49",
        "lower extremity",
        "a-b",
        "_",
        "_",
    ]


def test_report_scores_the_predictions_csv_per_subgroup(tiny_params, tmp_path):
    frame = make_dataset(tmp_path / "raw", n_lesions=60, seed=2)
    index = index_frame(frame, np.arange(len(frame)), np.arange(len(frame)))
    tiny_params.paths.splits.mkdir(parents=True)
    index.to_csv(tiny_params.paths.splits / "val.csv", index=False)
    said = np.eye(len(CLASSES))[(index["label"] + np.arange(len(index)) % 2) % len(CLASSES)]  # half right
    predictions = pd.DataFrame(said, columns=list(CLASSES)).assign(image_id=index["image_id"])
    tiny_params.paths.reports.mkdir(parents=True)
    predictions.iloc[::-1].to_csv(tiny_params.paths.reports / "predictions_val.csv", index=False)  # any row order

    metrics = subgroup_report(tiny_params, "val")
    table = pd.read_csv(tiny_params.paths.reports / "subgroups_val.csv", keep_default_na=False)
    assert (tiny_params.paths.reports / "subgroups_val.png").stat().st_size > 0
    assert table.loc[0, "images"] == len(index) and table.loc[0, "balanced_accuracy"] == pytest.approx(0.5, abs=0.1)
    assert len(metrics) == len(table) - 1
    for name, value in metrics.items():
        _validate_metric_name(name)
        assert name.startswith("subgroup/val/") and name.endswith("/balanced_accuracy") and 0 <= value <= 1
    age = table[table["grouping"] == "age"].set_index("subgroup")["balanced_accuracy"]
    assert metrics["subgroup/val/age/lt 30/balanced_accuracy"] == pytest.approx(age["< 30"], abs=1e-4)

    predictions.iloc[1:].to_csv(tiny_params.paths.reports / "predictions_val.csv", index=False)
    with pytest.raises(DataError, match="no prediction for 1 images"):
        subgroup_report(tiny_params, "val")
