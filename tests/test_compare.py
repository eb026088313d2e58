"""`python -m src.compare`: two models' predictions on the same images, from CSV files or real MLflow runs."""

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from src.compare import main
from src.config import CLASSES
from src.learn.metrics import balanced_accuracy_difference
from src.tracking.evaluate_run import predictions_frame


def _split(lesions: int = 200, per_lesion: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    label = np.repeat(rng.integers(0, len(CLASSES), lesions), per_lesion)
    lesion = np.repeat([f"HAM_{i:07d}" for i in range(lesions)], per_lesion)
    ids = [f"ISIC_{i:07d}" for i in range(len(label))]
    return pd.DataFrame({"image_id": ids, "lesion_id": lesion, "dx": [CLASSES[k] for k in label], "label": label})


def _predictions(split: pd.DataFrame, right: float, seed: int) -> pd.DataFrame:
    """A model that is right on about `right` of the lesions (all images of a lesion alike)."""
    rng = np.random.default_rng(seed)
    wins = split["lesion_id"].map({k: rng.random() < right for k in split["lesion_id"].unique()})
    said = np.where(wins, split["label"], (split["label"] + 1) % len(CLASSES))
    return predictions_frame(split, np.eye(len(CLASSES))[said] * 0.9 + 0.1 / len(CLASSES))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_csv_files_compare_with_a_paired_interval(tmp_path, capsys):
    split = _split()
    strong, weak = _predictions(split, 0.9, 1), _predictions(split, 0.5, 2)
    strong.to_csv(tmp_path / "a.csv", index=False)
    weak.to_csv(tmp_path / "b.csv", index=False)
    code, out, _ = _run(capsys, str(tmp_path / "a.csv"), str(tmp_path / "b.csv"))
    assert code == 0 and "A is better" in out and "400 images of 200 lesions" in out
    code, out, _ = _run(capsys, str(tmp_path / "b.csv"), str(tmp_path / "a.csv"), "--json")
    result = json.loads(out)
    expected = balanced_accuracy_difference(
        split["label"].to_numpy(), weak[list(CLASSES)].to_numpy(), strong[list(CLASSES)].to_numpy(), split["lesion_id"]
    )
    assert (result["difference"], result["ci_low"], result["ci_high"]) == pytest.approx(expected)
    assert result["ci_high"] < 0
    # rows in another order are the same images
    strong.sample(frac=1, random_state=0).to_csv(tmp_path / "shuffled.csv", index=False)
    code, out, _ = _run(capsys, str(tmp_path / "a.csv"), str(tmp_path / "shuffled.csv"), "--json")
    assert json.loads(out)["difference"] == 0 and json.loads(out)["agree"] == 1


def test_predictions_on_other_images_or_without_lesions_are_refused(tmp_path, capsys):
    split = _split()
    _predictions(split, 0.8, 1).to_csv(tmp_path / "a.csv", index=False)
    _predictions(split, 0.8, 1).iloc[:-3].to_csv(tmp_path / "fewer.csv", index=False)
    code, _, err = _run(capsys, str(tmp_path / "a.csv"), str(tmp_path / "fewer.csv"))
    assert code == 1 and "different images (3 only in the first" in err and "same split" in err
    _predictions(split, 0.8, 1).drop(columns="lesion_id").to_csv(tmp_path / "old.csv", index=False)
    code, _, err = _run(capsys, str(tmp_path / "a.csv"), str(tmp_path / "old.csv"))
    assert code == 1 and "old.csv: no column lesion_id" in err and "src.evaluate" in err


def test_runs_compare_through_their_logged_predictions(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)  # not the fluent API: its active experiment may belong to another test's store
    experiment = client.create_experiment("compare", artifact_location=(tmp_path / "artifacts").as_uri())
    split, runs = _split(), []
    for seed, right in ((1, 0.9), (2, 0.5)):
        _predictions(split, right, seed).to_csv(tmp_path / "predictions.csv", index=False)
        run_id = client.create_run(experiment).info.run_id
        client.log_artifact(run_id, str(tmp_path / "predictions.csv"), "evaluation")
        runs.append(run_id)
    code, out, _ = _run(capsys, *runs, "-S", f"tracking.uri={store}")
    assert code == 0 and "A is better" in out
    code, _, err = _run(capsys, runs[0], "0123456789abcdef", "-S", f"tracking.uri={store}")
    assert code == 1 and "0123456789abcdef: neither a predictions CSV nor an MLflow run" in err
    code, _, err = _run(capsys, *runs, "--split", "val", "-S", f"tracking.uri={store}")
    assert code == 1 and "evaluation/predictions_val.csv" in err
