"""End to end: `dvc exp run` of all four stages on synthetic data in a clean copy of the repo, then a real
`mlflow server` over the resulting store, queried through its REST API, and a DVC remote a fresh clone pulls from."""

from __future__ import annotations

import base64
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from src.config import CLASSES, TrackingParams
from src.prepare.imaging import load_image
from src.tracking.runs import TrackingError, connect
from tests.conftest import free_port, run_ok, start_mlflow_server, start_model_server, stop_mlflow_server

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def test_all_stages_ran_and_wrote_metrics_and_plots(pipeline):
    split = json.loads((pipeline / "reports/split.json").read_text())
    assert split["lesion_overlap"] and not any(split["lesion_overlap"].values())
    assert json.loads((pipeline / "reports/train.json").read_text())["epochs_run"] == 2
    evaluation = json.loads((pipeline / "reports/evaluate.json").read_text())
    assert 0 <= evaluation["test/balanced_accuracy"] <= 1
    shown = json.loads(run_ok(["dvc", "metrics", "show", "--json"], pipeline).stdout)
    assert "test/balanced_accuracy" in json.dumps(shown)
    for plot in (
        "train_history.csv",
        "confusion.csv",
        "roc.csv",
        "confusion_matrix.png",
        "roc_curves.png",
        "shift.png",
    ):
        assert (pipeline / "reports" / plot).stat().st_size > 0
    shift = pd.read_csv(pipeline / "reports/shift.csv")  # the shift report ran in the evaluate stage
    assert evaluation["shift/test/score"] == pytest.approx(shift["balanced_accuracy"].iloc[1:].mean(), abs=1e-4)
    plots = json.loads(run_ok(["dvc", "plots", "show", "--json"], pipeline).stdout)["data"]
    drawn = plots["acquisition shifts"][0]["content"]["data"]["values"]  # dvc.yaml's plot of the shift report
    assert [row["condition"] for row in drawn] == shift["condition"].tolist()
    assert len(plots["referral"][0]["content"]["data"]["values"]) == len(
        pd.read_csv(pipeline / "reports/risk_coverage.csv")
    )
    status = run_ok(["dvc", "status"], pipeline).stdout
    assert "up to date" in status, status


def test_champion_predicts_like_evaluate(pipeline):
    expected = pd.read_csv(pipeline / "reports/predictions.csv")
    model = "models:/hmnist-vit-synthetic@champion"  # trained on synthetic data: never under the real name
    run_ok([sys.executable, "-m", "src.predict", "data/raw/images", "-o", "submission.csv", "--model", model], pipeline)
    got = pd.read_csv(pipeline / "submission.csv").set_index("image").loc[expected["image_id"]]
    for ours, theirs in (("MEL", "mel"), ("NV", "nv"), ("BCC", "bcc"), ("VASC", "vasc")):
        np.testing.assert_allclose(got[ours].to_numpy(), expected[theirs].to_numpy(), atol=1e-5)
    for flag in ("referred", "out_of_distribution"):  # the triage flags evaluate wrote
        assert got[flag].tolist() == expected[flag].tolist(), flag


@pytest.fixture(scope="module")
def server(pipeline):
    port = free_port()
    proc = start_mlflow_server(pipeline / "mlflow.db", port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)


def test_server_shows_runs_metrics_and_registered_model(server):
    api = f"{server}/api/2.0/mlflow"
    exp = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "hmnist-vit"}, timeout=10)
    exp_id = exp.json()["experiment"]["experiment_id"]
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [exp_id]}, timeout=10).json()["runs"]
    assert len(runs) == 1
    run = runs[0]
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"val/balanced_accuracy", "train/loss", "test/balanced_accuracy", "test/macro_roc_auc"} <= metrics
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["data.source"] == "synthetic" and tags["data.synthetic"] == "true"
    assert len(tags["git.commit"]) == 40
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.name"] == "test_vit"
    history = requests.get(
        f"{api}/metrics/get-history",
        params={"run_id": run["info"]["run_id"], "metric_key": "val/balanced_accuracy"},
        timeout=10,
    )
    assert [m["step"] for m in history.json()["metrics"]] == [1, 2]
    alias = requests.get(
        f"{api}/registered-models/alias", params={"name": "hmnist-vit-synthetic", "alias": "champion"}, timeout=10
    ).json()["model_version"]
    assert alias["run_id"] == run["info"]["run_id"]
    version_tags = {t["key"]: t["value"] for t in alias["tags"]}  # a handful, not every metric
    assert {"data.source", "data.split_hash", "test/balanced_accuracy", "promotion"} <= set(version_tags)
    assert len(version_tags) <= 10 and version_tags["promotion"].startswith("first model")
    real = requests.get(f"{api}/registered-models/get", params={"name": "hmnist-vit"}, timeout=10)
    assert real.status_code == 404  # the real-data name holds no synthetic model
    artifacts = requests.get(
        f"{api}/artifacts/list", params={"run_id": run["info"]["run_id"], "path": "evaluation"}, timeout=10
    ).json()
    assert any(f["path"].endswith("confusion_matrix.png") for f in artifacts.get("files", []))


@pytest.fixture(scope="module")
def served(pipeline, tmp_path_factory):
    """`mlflow models serve` of the champion as the README runs it, from another folder than the repository (the
    model carries the code it needs)."""
    port = free_port()
    elsewhere = tmp_path_factory.mktemp("serve")
    store = f"sqlite:///{pipeline / 'mlflow.db'}"
    proc = start_model_server("models:/hmnist-vit-synthetic@champion", store, elsewhere, port)
    yield f"http://127.0.0.1:{port}/invocations"
    stop_mlflow_server(proc)


def test_served_model_takes_pixels_or_base64_files_and_answers_400_to_bad_input(pipeline, served):
    expected = pd.read_csv(pipeline / "reports/predictions.csv").head(4)
    files = [pipeline / "data/raw/images" / f"{image_id}.jpg" for image_id in expected["image_id"]]
    encoded = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]
    pixels = np.stack([load_image(f, 32) for f in files])
    for body in (
        {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
        {"inputs": {"image": encoded}},
        {"inputs": pixels.tolist()},
    ):
        answer = requests.post(served, json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        got = pd.DataFrame(answer.json()["predictions"])  # a record per image: probabilities, then the flags
        assert list(got.columns) == [*CLASSES, "referred", "out_of_distribution", "ood_distance"]
        np.testing.assert_allclose(got[list(CLASSES)], expected[list(CLASSES)].to_numpy(), atol=1e-5)
        assert got["referred"].tolist() == expected["referred"].tolist()
        assert got["out_of_distribution"].tolist() == expected["out_of_distribution"].tolist()
        np.testing.assert_allclose(got["ood_distance"], expected["ood_distance"], rtol=1e-4)

    text = base64.b64encode(b"not an image").decode("ascii")
    for body, says in (
        ({"dataframe_split": {"columns": ["image"], "data": [[encoded[0]], [text]]}}, "row 1 of column 'image'"),
        ({"dataframe_split": {"columns": ["image"], "data": [["%%%"]]}}, "not base64"),
        ({"inputs": pixels[:, :16].tolist()}, "expected (N, 32, 32, 3)"),
    ):
        answer = requests.post(served, json=body, timeout=60)
        assert answer.status_code == 400 and says in answer.json()["message"], answer.text


def test_unreachable_tracking_server_fails_fast():
    start = time.time()
    with pytest.raises(TrackingError, match="unreachable"):
        connect(TrackingParams(uri=f"http://127.0.0.1:{free_port()}"))
    # one health check, no retries: MLflow's own retry schedule would take minutes; 60 s holds on a busy machine
    assert time.time() - start < 60


def test_a_fresh_clone_pulls_data_and_model_from_a_dvc_remote_with_nothing_to_rerun(pipeline, tmp_path):
    """`dvc push` to a directory remote; a fresh `git clone` + `dvc pull` has the raw data, the split cache and the
    model, `dvc status` is clean and `dvc repro` runs nothing."""
    team = tmp_path / "team"  # a copy: the session's pipeline stays as other tests expect it
    shutil.copytree(pipeline, team, symlinks=True)
    remote = tmp_path / "remote"
    run_ok(["dvc", "remote", "add", "-d", "shared", str(remote)], team)
    run_ok(["git", "add", "-A"], team)
    run_ok(["git", "commit", "-qm", "pipeline results, remote"], team)
    run_ok(["dvc", "push"], team)

    clone = tmp_path / "clone"
    run_ok(["git", "clone", "-q", str(team), str(clone)], tmp_path)
    assert not (clone / "models/best.pt").exists()
    run_ok(["dvc", "pull"], clone)
    for path in ("data/raw/metadata.csv", "data/splits/test.csv", "data/cache/images.npy", "models/best.pt"):
        assert (clone / path).read_bytes() == (pipeline / path).read_bytes(), path
    assert "up to date" in run_ok(["dvc", "status"], clone).stdout
    repro = run_ok(["dvc", "repro"], clone).stdout
    assert "Running stage" not in repro and "up to date" in repro, repro
