"""Two models' predictions on the same images, compared: the difference in balanced accuracy with a paired
lesion-bootstrap interval. Either side is a predictions CSV that evaluate wrote, or the MLflow run that logged it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from src.config import CLASSES
from src.errors import UserError
from src.learn.metrics import balanced_accuracy, balanced_accuracy_difference

ARTIFACTS = {"test": "evaluation/predictions.csv", "val": "evaluation/predictions_val.csv"}
NEEDED = ["image_id", "lesion_id", "dx", *CLASSES]


class ComparisonError(UserError, ValueError):
    """Predictions that cannot be compared; the message says which and what to do."""


def _read_logged(run_id: str, split: str, tracking_uri: str) -> tuple[pd.DataFrame, str]:
    """The predictions the run logged for the split, and where they came from."""
    with tempfile.TemporaryDirectory(prefix="compare-") as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=ARTIFACTS[split], dst_path=folder, tracking_uri=tracking_uri
            )
        except (MlflowException, OSError) as err:
            raise ComparisonError(
                f"{run_id}: neither a predictions CSV nor an MLflow run with {ARTIFACTS[split]} in {tracking_uri} "
                f"({type(err).__name__}). Give a run that `python -m src.evaluate` finished (runs evaluated before "
                "predictions were logged have none), or the path of its reports/predictions.csv"
            ) from None
        return pd.read_csv(path), f"run {run_id}: {ARTIFACTS[split]}"


def load_predictions(ref: str, split: str, tracking_uri: str) -> pd.DataFrame:
    """Predictions by image id, from a CSV path or an MLflow run id."""
    frame, source = (pd.read_csv(ref), ref) if Path(ref).is_file() else _read_logged(ref, split, tracking_uri)
    missing = [c for c in NEEDED if c not in frame.columns]
    if missing:
        raise ComparisonError(
            f"{source}: no column {', '.join(missing)}; predictions from an older evaluate lack lesion_id: "
            "run `python -m src.evaluate` again to write them"
        )
    return frame.set_index("image_id")


def align(first: pd.DataFrame, second: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    """The second frame in the first's image order; both must hold the same images with the same labels."""
    only = first.index.difference(second.index), second.index.difference(first.index)
    if len(only[0]) or len(only[1]):
        raise ComparisonError(
            f"{names[0]} and {names[1]} were scored on different images ({len(only[0])} only in the first, e.g. "
            f"{list(only[0][:2])}; {len(only[1])} only in the second): a paired comparison needs the same split "
            "(same data and split params, see the runs' data hash); evaluate both models on one split"
        )
    second = second.loc[first.index]
    if not (second["dx"] == first["dx"]).all() or not (second["lesion_id"] == first["lesion_id"]).all():
        raise ComparisonError(f"{names[0]} and {names[1]} give other labels or lesions for the same images")
    return second


def compare(first: pd.DataFrame, second: pd.DataFrame, names: tuple[str, str]) -> dict[str, float]:
    """Balanced accuracy of each and of first minus second, with its paired 95% interval over lesions."""
    second = align(first, second, names)
    labels = first["dx"].map({c: k for k, c in enumerate(CLASSES)}).to_numpy()
    probs = [frame[list(CLASSES)].to_numpy() for frame in (first, second)]
    difference, low, high = balanced_accuracy_difference(labels, *probs, first["lesion_id"].to_numpy())
    return {
        "images": len(first),
        "lesions": first["lesion_id"].nunique(),
        "first": balanced_accuracy(labels, probs[0]),
        "second": balanced_accuracy(labels, probs[1]),
        "difference": difference,
        "ci_low": low,
        "ci_high": high,
        "agree": float(np.mean(probs[0].argmax(axis=1) == probs[1].argmax(axis=1))),
    }


def verdict(result: dict[str, float], names: tuple[str, str]) -> str:
    """One line a reader can act on: which is better, or that the data cannot tell."""
    # The bootstrap resamples images, not training: two seeds of one recipe have been told apart by it (README).
    caveat = "on these images (one run each: another seed of the same recipe can differ as much)"
    if result["ci_low"] > 0:
        return f"{names[0]} is better {caveat}: the 95% interval of the difference lies above 0"
    if result["ci_high"] < 0:
        return f"{names[1]} is better {caveat}: the 95% interval of the difference lies below 0"
    return "no difference shown: the 95% interval of the difference holds 0 (more images, or more runs, would tell)"
