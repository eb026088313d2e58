"""Promotion in a real MLflow registry (sqlite): a champion that cannot be rescored keeps its alias, and a
re-evaluated model never beats itself by the rounding of a tag."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from src.config import TrackingParams
from src.errors import UserError
from src.tracking.registry import register

METRIC = "test/balanced_accuracy"


class Constant(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True

    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("registry")
    return TrackingParams(uri=uri, registered_model="lesions")


def logged(score: float) -> tuple[str, str]:
    """A run with its test metric and a (trivial) model: (model URI, run id)."""
    with mlflow.start_run() as run:
        mlflow.log_metric(METRIC, score)
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=["mlflow"])
    return info.model_uri, run.info.run_id


def register_scored(store, score: float, split_hash: str, rescore) -> dict:
    uri, run_id = logged(score)
    provenance = {"data.source": "local", "data.synthetic": "false", "data.split_hash": split_hash}
    return register(uri, run_id, {METRIC: score}, provenance, store, METRIC, rescore)


def test_a_champion_that_cannot_be_rescored_keeps_its_alias_and_the_new_version_says_why(store):
    assert register_scored(store, 0.5, "split-a", rescore=None)["promoted"]

    def unloadable(uri):
        raise UserError(f"cannot load model {uri}")

    result = register_scored(store, 0.9, "split-b", rescore=unloadable)  # better, but on another split
    client = MlflowClient()
    assert not result["promoted"] and str(client.get_model_version_by_alias("lesions", "champion").version) == "1"
    new = client.get_model_version("lesions", "2")
    assert new.tags["promotion"] == (
        "champion v1: could not be scored on this split (UserError); not promoted (set the alias by hand)"
    )
    assert str(client.get_model_version_by_alias("lesions", "challenger").version) == "2"


def test_the_same_score_again_does_not_beat_the_champion_whatever_its_rounded_tag_says(store):
    register_scored(store, 0.561234, "split-a", rescore=None)
    result = register_scored(store, 0.561234, "split-a", rescore=None)  # the tag holds 0.5612
    assert not result["promoted"]
    tag = MlflowClient().get_model_version("lesions", "2").tags["promotion"]
    assert tag == f"{METRIC} 0.5612 does not beat champion v1 0.5612 (scored on this split)"
