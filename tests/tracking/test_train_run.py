"""The train stage and its tracking server: a real `mlflow server` that goes away while training runs."""

from __future__ import annotations

import logging
import signal
import threading

import pytest
from mlflow.tracking import MlflowClient

from src.learn.checkpoint import load_checkpoint
from src.prepare.split import split
from src.tracking.runs import TrackingError
from src.tracking.train_run import train
from tests.conftest import free_port, make_tiny_params, start_mlflow_server, stop_mlflow_server


def _kill_when(path, proc, done: threading.Event) -> None:
    """SIGKILL the server as soon as `path` exists (the first epoch's checkpoint): no timing involved."""
    while not path.exists() and not done.wait(0.02):
        pass
    stop_mlflow_server(proc, signal.SIGKILL)


@pytest.mark.e2e
def test_a_tracking_outage_costs_no_training(synthetic_raw, tmp_path, caplog):
    """The server dies after epoch 1 and stays down: training goes on to the end, saves the model, and the stage
    fails with a clear message; with the server back, rerunning the stage logs what MLflow missed, no retraining."""
    port = free_port()
    params = make_tiny_params(tmp_path)
    params = params.model_copy(
        update={
            "paths": params.paths.model_copy(update={"raw": synthetic_raw}),
            "train": params.train.model_copy(update={"epochs": 3}),
            "tracking": params.tracking.model_copy(update={"uri": f"http://127.0.0.1:{port}"}),
        }
    )
    split(synthetic_raw, params.split, params.data, params.paths)
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    server, done = start_mlflow_server(db, port), threading.Event()
    killer = threading.Thread(target=_kill_when, args=(params.paths.models / "checkpoints" / "last.pt", server, done))
    killer.start()
    try:
        with pytest.raises(TrackingError, match="unreachable.*rerun `dvc repro`: training resumes"):
            train(params)
    finally:
        done.set()
        killer.join()
    assert load_checkpoint(params.paths.models / "best.pt")["epoch"] >= 1  # the model is saved
    assert load_checkpoint(params.paths.models / "checkpoints" / "last.pt")["epoch"] == 3  # all epochs trained
    assert "epoch 2: not logged to MLflow" in caplog.text

    server = start_mlflow_server(db, port)
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            metrics = train(params)  # what rerunning `dvc repro` does
        assert "resuming from epoch 3" in caplog.text and "epoch 1/3" not in caplog.text  # no training again
        run_id = load_checkpoint(params.paths.models / "best.pt")["mlflow_run_id"]
        client = MlflowClient(f"http://127.0.0.1:{port}")
        assert [m.step for m in client.get_metric_history(run_id, "val/balanced_accuracy")] == [1, 2, 3]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["best/val/score"] == pytest.approx(metrics["val/score"])
    finally:
        stop_mlflow_server(server)
