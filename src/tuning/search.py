"""The search: run, resume or join an Optuna study over the train stage's own training code.

Trials live in an Optuna RDB storage, so a study survives Ctrl-C or kill -9 (rerun the same command to go
on) and several workers on several machines can share one study. MLflow gets a parent run per study and a
nested run per trial; the best trial's values go to tune.best_params_path.
"""

from __future__ import annotations

import logging
from functools import partial

import optuna

from src.config import Params
from src.learn.training import load_train_data
from src.tracking import runs as tracking
from src.tuning.reporting import close_dead_trial_runs, progress, recorded_parent_run, report_study, study_run
from src.tuning.search_space import check_space, trial_params
from src.tuning.storage import TuneError, open_storage
from src.tuning.study import FINISHED, count_finished, fail_dead_trials, open_study
from src.tuning.trial import TrialFailed, objective

log = logging.getLogger(__name__)


def tune(
    params: Params, trials: int, timeout: float | None, study_name: str, storage: str, n_jobs: int = 1
) -> optuna.Study:
    """Run, resume or join the study until it holds `trials` finished trials; report the best one."""
    check_space(params)
    # tune.train_fraction subsamples the lesions and tune.image_size resizes the images while loading; loaded
    # first, so that a missing split fails before any study or tracking store is created
    data = load_train_data(trial_params(params, {}, params.tune), params.tune.image_size)
    study, created = open_study(params.tune, study_name, open_storage(storage))
    recorded = recorded_parent_run(study, created)  # a joiner waits: the creator also sets up the MLflow store
    dead = fail_dead_trials(study)
    tracking.connect(params.tracking)
    close_dead_trial_runs(dead)
    with study_run(study, params, storage, recorded) as parent_run_id:
        remaining = trials - count_finished(study)
        if remaining > 0:
            log.info(
                "study %s: %d of %d trials finished; running up to %d more",
                study_name,
                trials - remaining,
                trials,
                remaining,
            )
            study.optimize(
                partial(objective, base=params, data=data, parent_run_id=parent_run_id),
                n_trials=remaining,
                timeout=timeout,
                n_jobs=n_jobs,
                catch=(TrialFailed,),
                callbacks=[
                    fail_dead_workers,
                    optuna.study.MaxTrialsCallback(trials, states=FINISHED),
                    progress(trials),
                ],
            )
        else:
            log.info("study %s already holds %d finished trials (asked for %d)", study_name, trials - remaining, trials)
        best = report_study(study, params.tune)
    if best is None:
        raise TuneError(
            f"study {study_name}: no trial completed ({count_finished(study)} finished, all pruned or failed); "
            "see the log for why, e.g. narrow tune.lr"
        )
    return study


def fail_dead_workers(study: optuna.Study, _trial) -> None:
    """After each trial: the trial of a worker killed beside this one on this host ends FAIL now, and does not
    wait for the heartbeat's grace period (minutes) or stay RUNNING when the study ends first."""
    close_dead_trial_runs(fail_dead_trials(study, running_here=True))
