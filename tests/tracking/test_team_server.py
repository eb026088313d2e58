"""A tracking server for a team: `mlflow server` on a PostgreSQL backend store with proxied artifacts. `dvc exp run`
and a short tuning study log to it over HTTP only; another process reads runs, nested trials, artifacts and the
registry through the REST API, and `mlflow models serve` serves the champion from it."""

from __future__ import annotations

import base64

import pytest
import requests

from src.config import CLASSES
from tests.conftest import (
    OFFLINE,
    free_port,
    project_copy,
    run_ok,
    start_model_server,
    start_team_server,
    stop_mlflow_server,
)

pytestmark = pytest.mark.e2e
MODEL = "hmnist-vit-synthetic"  # the try-out's model name


@pytest.fixture(scope="module")
def team(postgres, tmp_path_factory):
    """The server, and a project copy whose pipeline and study logged only to it."""
    root = tmp_path_factory.mktemp("team")
    (root / "artifacts").mkdir()
    port = free_port()
    server = start_team_server(postgres.database("mlflow"), root / "artifacts", port)
    url = f"http://127.0.0.1:{port}"
    work = project_copy(root / "project")
    client = {"MLFLOW_TRACKING_URI": url}
    run_ok(["dvc", "exp", "run", *OFFLINE], work, timeout=900, env=client)
    quick = ["-S", "tune.epochs=1", "-S", "tune.pruner=none", "-S", "tune.image_size=16"]
    study = ["--storage", postgres.database("optuna"), "--study-name", "team-study"]
    run_ok(["python", "-m", "src.tune", "--trials", "2", *study, *quick], work, env=client)
    yield url, work, root / "artifacts"
    stop_mlflow_server(server)


def _api(url: str, endpoint: str, **query) -> dict:
    response = requests.get(f"{url}/api/2.0/mlflow/{endpoint}", params=query, timeout=30)
    assert response.ok, response.text
    return response.json()


def _runs(url: str) -> list[dict]:
    experiment = _api(url, "experiments/get-by-name", experiment_name="hmnist-vit")["experiment"]
    body = {"experiment_ids": [experiment["experiment_id"]], "max_results": 100}
    response = requests.post(f"{url}/api/2.0/mlflow/runs/search", json=body, timeout=30)
    assert response.ok, response.text
    return response.json()["runs"]


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_runs_trials_artifacts_and_registry_are_read_over_rest_from_another_process(team):
    url, work, artifacts = team
    runs = _runs(url)
    champion = _api(url, "registered-models/alias", name=MODEL, alias="champion")["model_version"]
    trained = next(r for r in runs if r["info"]["run_id"] == champion["run_id"])
    metrics = {m["key"] for m in trained["data"]["metrics"]}
    assert {"val/balanced_accuracy", "test/balanced_accuracy", "test/ece"} <= metrics
    assert {"git.commit", "data.split_hash"} <= set(_tags(trained))

    listed = _api(url, "artifacts/list", run_id=trained["info"]["run_id"], path="evaluation")
    assert "evaluation/reliability.png" in {f["path"] for f in listed["files"]}
    experiment_id = trained["info"]["experiment_id"]
    png = requests.get(
        f"{url}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{trained['info']['run_id']}/artifacts/"
        "evaluation/reliability.png",
        timeout=30,
    )
    assert png.ok and png.content.startswith(b"\x89PNG")  # proxied by the server from its artifact folder

    parent = next(r for r in runs if _tags(r).get("optuna.study") == "team-study")
    trials = [r for r in runs if _tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert sorted(_tags(r)["mlflow.runName"] for r in trials) == ["trial-0", "trial-1"]

    # clients wrote through HTTP only: no local store or artifact folder in the project, all in the server's
    assert not any((work / name).exists() for name in ("mlflow.db", "mlruns", "mlartifacts"))
    assert any(artifacts.rglob("reliability.png")) and any(artifacts.rglob("MLmodel"))


def test_the_champion_is_served_from_the_team_server(team, tmp_path):
    url, work, _ = team
    port = free_port()
    server = start_model_server(f"models:/{MODEL}@champion", url, tmp_path, port)  # from a folder with nothing in it
    try:
        image = next((work / "data/raw/images").glob("*.jpg"))
        encoded = base64.b64encode(image.read_bytes()).decode("ascii")
        response = requests.post(
            f"http://127.0.0.1:{port}/invocations", json={"inputs": {"image": [encoded]}}, timeout=60
        )
        assert response.ok, response.text
        (answer,) = response.json()["predictions"]  # the probabilities, then the triage flags
        assert sum(answer[name] for name in CLASSES) == pytest.approx(1, abs=1e-5)
        assert {"referred", "out_of_distribution", "ood_distance"} <= set(answer)
    finally:
        stop_mlflow_server(server)
