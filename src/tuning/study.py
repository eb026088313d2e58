"""The study that workers share: created or joined, trials of dead workers failed, finished trials counted."""

from __future__ import annotations

import logging
import os
import socket
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from src.config import TuneParams

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
HOST = socket.gethostname()
PARENT_RUN_ATTR, RUN_ATTR, HOST_ATTR, PID_ATTR = "mlflow_parent_run_id", "mlflow_run_id", "host", "pid"
CREATED_ATTR = "created_at"


def make_pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    """Successive halving (default), Hyperband, median or none; none pruned before warmup_epochs_before_pruning.

    Successive halving (asynchronous; with reduction_factor 3, rungs at 1, 3, 9 ... epochs where the best third
    goes on) spends a fraction of what unpruned trials would; the median pruner stops few trials before their
    middle epochs, and Hyperband also runs brackets whose first rung is the full budget.
    """
    first_rung = min(max(1, tune.warmup_epochs_before_pruning), tune.epochs)
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=tune.reduction_factor)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first_rung, max_resource=tune.epochs, reduction_factor=tune.reduction_factor
        )
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=tune.warmup_epochs_before_pruning)
    return optuna.pruners.NopPruner()


def open_study(tune: TuneParams, name: str, storage: optuna.storages.RDBStorage) -> tuple[optuna.Study, bool]:
    """Create the study, or load it (a resumed run, another worker); True when this worker created it.

    The creator samples with tune.seed, so a fresh single-worker study is reproducible; a worker that joins
    draws its own seed, so workers started together do not all propose the same first trials.
    """
    pruner = make_pruner(tune)
    try:  # creating is atomic: of several workers started at once, exactly one creates the study
        sampler = optuna.samplers.TPESampler(seed=tune.seed)
        study = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, pruner=pruner, direction="maximize"
        )
        study.set_user_attr(CREATED_ATTR, time.time())
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        sampler = optuna.samplers.TPESampler(seed=None)
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner), False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists but belongs to another user
        return True
    return True


def fail_dead_trials(study: optuna.Study, running_here: bool = False) -> list[FrozenTrial]:
    """Mark FAIL the RUNNING trials whose worker process on this host is gone (kill -9, crash, reboot).

    Workers on other hosts are covered by the storage heartbeat. Before this process starts a trial, a RUNNING
    trial carrying its own pid was left by an earlier process that had the same pid; once it runs trials
    (`running_here`), those are its own, alive.
    """
    dead = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get(PID_ATTR)
        mine = pid == os.getpid()
        if trial.user_attrs.get(HOST_ATTR) != HOST or pid is None or (mine and running_here):
            continue
        if not mine and pid_alive(pid):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:  # another live worker marked it between check and write
            continue
        log.warning("trial %d: its worker (pid %d) is gone; marked FAIL", trial.number, pid)
        dead.append(trial)
    return dead


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None
