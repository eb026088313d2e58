"""The train stage as one tracked run: fit (resuming if possible), keep the best model, log it all to MLflow."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from src.config import Params
from src.learn.checkpoint import load_checkpoint, save_checkpoint
from src.learn.engine import FitResult, select_device
from src.learn.precision import compute_description
from src.learn.training import (
    TrainData,
    load_train_data,
    resumable_checkpoint,
    run_config,
    run_training,
    write_reports,
)
from src.tracking import runs as tracking

log = logging.getLogger(__name__)


def _fit_and_save(params: Params, data: TrainData, checkpoint_dir: Path, resume: dict | None, run_id: str) -> FitResult:
    """Fit, save the model and reports, then log them: a tracking outage at the end loses nothing local."""
    paths = params.paths
    tracking.log_params(params)
    tracking.log_datasets({"train": data.train.frame, "val": data.val.frame}, paths.splits)
    _, result = run_training(params, data, checkpoint_dir, resume, tracking.log_epoch, extra={"mlflow_run_id": run_id})
    # the served model, with its TTA and prior correction, is logged by evaluate, which fits them on val
    best = load_checkpoint(checkpoint_dir / "best.pt")
    save_checkpoint(paths.models / "best.pt", {**best, "mlflow_run_id": run_id})
    write_reports(result, paths.reports)
    tracking.sync_epochs(run_id, result.history)  # epochs missed while the tracking server was away
    tracking.log_metrics({f"best/{k}": v for k, v in result.best_metrics.items() if k.startswith("val/")})
    outcome = {"best_epoch": result.best_epoch, "stopped_early": result.stopped_early}
    tracking.set_tags({**outcome, "best_weights": best.get("weights", "raw")})
    tracking.log_artifact(paths.reports / "train_history.csv")
    return result


def train(params: Params) -> dict[str, float]:
    """The train stage: fit (resuming if possible), write the best model and reports, log to MLflow."""
    paths = params.paths
    data = load_train_data(params)
    checkpoint_dir = paths.models / "checkpoints"
    resume = resumable_checkpoint(checkpoint_dir, run_config(params, data.image_size))
    if resume is None and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    tracking.connect(params.tracking)
    compute = compute_description(params.train.precision, select_device(params.train.device))
    log.info(
        "training in %s on %s (CPU units: %s)",
        compute["compute.precision"],
        compute["compute.device"],
        compute["compute.cpu_units"],
    )
    tags = {**tracking.provenance(paths), "stage": "train", **compute}
    try:
        with tracking.run(run_id=resume.get("mlflow_run_id") if resume else None, tags=tags) as active:
            result = _fit_and_save(params, data, checkpoint_dir, resume, active.info.run_id)
    except tracking.TrackingError:
        raise
    except tracking.OUTAGE as err:  # the server went away after training, e.g. while closing the run
        raise tracking.outage_error(err) from None
    log.info(
        "best epoch %d: val/score %.4f; model %s",
        result.best_epoch,
        result.best_metrics["val/score"],
        paths.models / "best.pt",
    )
    return result.best_metrics
