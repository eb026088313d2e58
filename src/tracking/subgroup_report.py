"""Results by subgroup: the served probabilities that evaluate wrote for val and test, scored per sex, age band,
site and diagnosis type (src.learn.subgroups); reports/subgroups.csv (test) and subgroups_val.csv, a forest plot of
each, and metrics `subgroup/<split>/<grouping>/<subgroup>/balanced_accuracy`."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd

from src.config import CLASSES, Params
from src.fileio import write_text
from src.ingest.rawdata import DataError
from src.learn.subgroups import subgroup_table
from src.prepare.index import read_split
from src.tracking.plots import subgroups_png

log = logging.getLogger(__name__)
# MLflow allows alphanumerics and `_ - . / space` in metric names; the age bands' signs are spelled out, and a `/`
# inside a subgroup would add a level to the name.
SIGNS = {">=": "ge", "<=": "le", ">": "gt", "<": "lt", "/": "-"}


def metric_part(text: str) -> str:
    """A subgroup or grouping name as MLflow accepts it in a metric name."""
    for sign, word in SIGNS.items():
        text = text.replace(sign, word)
    text = re.sub(r"[^A-Za-z0-9_\-. ]", "_", text).strip()
    return text if text.strip(".") else "_"  # "." or ".." would read as a path step, which MLflow refuses


def served_probabilities(frame: pd.DataFrame, predictions: pd.DataFrame, source: str) -> np.ndarray:
    """The predictions CSV's class probabilities in the split index's row order."""
    by_image = predictions.set_index("image_id")
    missing = frame.loc[~frame["image_id"].isin(by_image.index), "image_id"]
    if len(missing):
        raise DataError(f"{source}: no prediction for {len(missing)} images of the split, e.g. {missing.iloc[0]}")
    return by_image.loc[frame["image_id"], list(CLASSES)].to_numpy(dtype=np.float64)


def subgroup_metrics(table: pd.DataFrame, name: str) -> dict[str, float]:
    """Each subgroup's balanced accuracy under `subgroup/<split>/<grouping>/<subgroup>/balanced_accuracy`."""
    rows = table[table["grouping"] != "overall"]
    return {
        f"subgroup/{name}/{metric_part(r.grouping)}/{metric_part(r.subgroup)}/balanced_accuracy": float(
            r.balanced_accuracy
        )
        for r in rows.itertuples()
    }


def subgroup_report(params: Params, name: str) -> dict[str, float]:
    """Score the split's served predictions per subgroup; write its CSV and forest plot."""
    suffix = "" if name == "test" else f"_{name}"
    source = params.paths.reports / f"predictions{suffix}.csv"
    frame = read_split(params.paths, name)  # the index with the metadata columns; no image is read
    probs = served_probabilities(frame, pd.read_csv(source, dtype={"image_id": str}), str(source))
    table = subgroup_table(frame, probs)
    write_text(params.paths.reports / f"subgroups{suffix}.csv", table.to_csv(index=False, float_format="%.4f"))
    title = f"{name}: balanced accuracy by subgroup (95% lesion-bootstrap intervals)"
    subgroups_png(table, params.paths.reports / f"subgroups{suffix}.png", title)
    flagged = table[table["flag"] == "below"]
    log.info(
        "%s by subgroup: %d subgroups, %d too small, below overall: %s",
        name,
        len(table) - 1,
        int((table["flag"] == "too small").sum()),
        ", ".join(f"{r.grouping} {r.subgroup}" for r in flagged.itertuples()) or "none",
    )
    return subgroup_metrics(table, name)
