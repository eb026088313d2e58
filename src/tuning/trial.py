"""One trial: the train stage's training code on a trial's params, reported every epoch, pruned or failed cleanly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
import torch
from optuna.trial import TrialState

from src.config import Params
from src.learn.engine import TrainingDiverged
from src.learn.training import TrainData, run_training
from src.tracking import runs as tracking
from src.tuning.search_space import suggest, trial_params
from src.tuning.study import HOST, HOST_ATTR, PID_ATTR, RUN_ATTR

METRIC = "val/score"  # val balanced accuracy of the better of the raw and EMA weights
STATE_TAG = "trial.state"
EPOCH_SECONDS_ATTR = "epoch_seconds"


class TrialFailed(RuntimeError):
    """A trial that cannot finish (NaN loss, out of memory): recorded as FAIL while the study goes on."""


def is_trial_failure(err: BaseException) -> bool:
    """NaN loss or out of memory: bad hyperparameters for this trial, not a broken study."""
    return isinstance(err, (TrainingDiverged, torch.OutOfMemoryError)) or "out of memory" in str(err).lower()


def fit_trial(trial: optuna.Trial, params: Params, data: TrainData) -> float:
    """Train with the train stage's code, report the metric every epoch, stop when the pruner says so."""

    epoch_seconds: list[float] = []

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        tracking.log_epoch(epoch, metrics)
        epoch_seconds.append(round(metrics["epoch_seconds"], 2))
        trial.set_user_attr(EPOCH_SECONDS_ATTR, epoch_seconds)  # what the epochs a pruned trial skipped would cost
        trial.report(metrics[METRIC], epoch)
        # after the last epoch there is nothing left to save: a trial that trained to the end completes
        if epoch < params.train.epochs and trial.should_prune():
            raise optuna.TrialPruned(f"{METRIC} {metrics[METRIC]:.4f} at epoch {epoch}")

    try:
        _, result = run_training(params, data, checkpoint_dir=None, on_epoch_end=on_epoch_end)
    except RuntimeError as err:
        if not is_trial_failure(err):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise TrialFailed(f"{type(err).__name__}: {err}") from err
    return result.best_metrics[METRIC]


@contextmanager
def trial_run(trial: optuna.Trial, parent_run_id: str) -> Iterator[None]:
    """A nested MLflow run `trial-<n>` tagged with how the trial ended; a pruned trial's run ends FINISHED."""
    pruned: optuna.TrialPruned | None = None
    tags = {"mlflow.parentRunId": parent_run_id, "optuna.trial": str(trial.number)}  # parent for worker threads
    with tracking.run(name=f"trial-{trial.number}", nested=True, tags=tags) as active:
        trial.set_user_attr(RUN_ATTR, active.info.run_id)
        try:
            yield
        except optuna.TrialPruned as err:
            pruned = err
        except BaseException:
            tracking.set_tags({STATE_TAG: TrialState.FAIL.name})
            raise
        tracking.set_tags({STATE_TAG: (TrialState.PRUNED if pruned else TrialState.COMPLETE).name})
    if pruned is not None:
        raise pruned


def objective(trial: optuna.Trial, base: Params, data: TrainData, parent_run_id: str) -> float:
    """One trial: its value is the best val/score (balanced accuracy) of the trial's training run."""
    trial.set_user_attr(HOST_ATTR, HOST)  # first, so a killed worker's trial can be recognised
    trial.set_user_attr(PID_ATTR, os.getpid())
    params = trial_params(base, suggest(trial, base.tune), base.tune)
    with trial_run(trial, parent_run_id):
        tracking.log_params(params)
        value = fit_trial(trial, params, data)
        tracking.log_metrics({f"best/{METRIC}": value})
    return value
