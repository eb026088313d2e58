"""The train stage as one tracked run: fit (resuming if possible), keep the best model, log it all to MLflow."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from src.config import Params
from src.learn import distributed
from src.learn.checkpoint import RESUME_DIR, load_checkpoint, save_checkpoint
from src.learn.engine import FitResult
from src.learn.precision import compute_description
from src.learn.training import (
    TrainData,
    configure_threads,
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
    """The train stage: fit (resuming if possible), write the best model and reports, log to MLflow.

    Under torchrun every process runs this; rank 0 reads the resume checkpoint (and hands it to the others), and
    only rank 0 writes checkpoints, the model, reports and the MLflow run."""
    data = load_train_data(params)
    device = configure_threads(params)  # joins torchrun's process group when started by it
    try:
        if not distributed.is_main():
            run_training(params, data, None, distributed.broadcast(None))
            return {}
        return _train_main(params, data, device)
    finally:
        distributed.teardown()


def _train_main(params: Params, data: TrainData, device: torch.device) -> dict[str, float]:
    paths = params.paths
    checkpoint_dir = paths.models / RESUME_DIR
    resume = distributed.broadcast(resumable_checkpoint(checkpoint_dir, run_config(params, data.image_size)))
    if resume is None and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    tracking.connect(params.tracking)
    compute = compute_description(params.train.precision, device) | {"compute.processes": str(distributed.world_size())}
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
