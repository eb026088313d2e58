"""What a study reports: a log line per trial, the MLflow parent run, Optuna's plots and the best params file."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from src.config import Params, TuneParams
from src.fileio import write_text
from src.tracking import runs as tracking
from src.tuning.search_space import by_section
from src.tuning.storage import shown
from src.tuning.study import CREATED_ATTR, FINISHED, PARENT_RUN_ATTR, RUN_ATTR, best_trial, count_finished
from src.tuning.trial import EPOCH_SECONDS_ATTR, METRIC, STATE_TAG

log = logging.getLogger(__name__)
PARENT_WAIT_S = 300  # how long after creating a study its creator has to record the MLflow parent run (under load
# its first MLflow store setup took over 60 s once, and a worker that stopped waiting nested its trials elsewhere)


def progress(total: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """A study callback that logs each finished trial, the count towards `total` and the best so far."""

    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        best = best_trial(study)
        if trial.state == TrialState.COMPLETE:
            outcome = f"{METRIC} {trial.value:.4f}"
        else:
            outcome = f"after {trial.last_step or 0} epochs"
        log.info(
            "trial %d %s %s; %d of %d trials finished; best %s",
            trial.number,
            trial.state.name,
            outcome,
            count_finished(study),
            total,
            f"{best.value:.4f} (trial {best.number})" if best else "none yet",
        )

    return report


def recorded_parent_run(study: optuna.Study, created: bool) -> str | None:
    """The study's MLflow parent run id, None for a new study.

    A worker that joins a study created moments ago waits for the creator to record its run (and so to set
    up the MLflow store, which two processes must not do at once); a study whose creator died long ago
    gets a new parent run.
    """
    if created:
        return None
    deadline = study.user_attrs.get(CREATED_ATTR, 0) + PARENT_WAIT_S
    while (run_id := study.user_attrs.get(PARENT_RUN_ATTR)) is None and time.time() < deadline:
        time.sleep(1)
    if run_id is None:
        log.warning("study %s has no MLflow parent run recorded; starting one", study.study_name)
    return run_id


@contextmanager
def study_run(study: optuna.Study, params: Params, storage: str, run_id: str | None) -> Iterator[str]:
    """The study's MLflow parent run: created by the worker that created the study, reopened by the others.

    Its id is a study user attr, so a resumed run or another worker nests its trials under the same run.
    """
    tags = {
        **tracking.provenance(params.paths),
        "stage": "tune",
        "optuna.study": study.study_name,
        "optuna.storage": shown(storage),
    }
    with tracking.run(run_id=run_id, name=None if run_id else f"tune-{study.study_name}", tags=tags) as active:
        if run_id is None:
            study.set_user_attr(PARENT_RUN_ATTR, active.info.run_id)
        tracking.log_params(params)
        yield active.info.run_id


def close_dead_trial_runs(trials: list[FrozenTrial]) -> None:
    """End the MLflow runs that killed workers left RUNNING."""
    for trial in trials:
        if RUN_ATTR in trial.user_attrs:
            tracking.close_run(trial.user_attrs[RUN_ATTR], "KILLED", {STATE_TAG: TrialState.FAIL.name})


def log_plots(study: optuna.Study) -> None:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNG artifacts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    figures = {
        "optimization_history.png": plots.plot_optimization_history,
        "param_importances.png": plots.plot_param_importances,
        "parallel_coordinate.png": plots.plot_parallel_coordinate,
    }
    for name, plot in figures.items():
        try:
            with warnings.catch_warnings():  # experimental API; small studies make degenerate axes
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials
            log.warning("no %s: %s", name, err)
            continue
        tracking.log_figure(axes.figure, name)
        plt.close(axes.figure)


def best_params_doc(best: FrozenTrial, study_name: str) -> dict:
    """The best trial as a params.yaml-shaped mapping plus where it came from."""
    return {"study": study_name, "trial": best.number, "metric": METRIC, "value": best.value, **by_section(best.params)}


def write_best_params(best: FrozenTrial, study_name: str, path: Path) -> None:
    header = "# Best trial of the Optuna study (python -m src.tune); `--apply` copies train/model into params.yaml\n"
    write_text(path, header + yaml.safe_dump(best_params_doc(best, study_name), sort_keys=False))


def pruning_cost(study: optuna.Study, epochs: int) -> dict[str, float]:
    """Seconds the finished trials took, and what they would have taken had none been pruned.

    A pruned trial's skipped epochs are costed at its own mean epoch time, so the ratio is measured on the same
    machine and load as the study itself.
    """
    spent = unpruned = 0.0
    for trial in study.get_trials(deepcopy=False, states=FINISHED):
        seconds = trial.user_attrs.get(EPOCH_SECONDS_ATTR)
        if not seconds or trial.datetime_complete is None:
            continue
        took = (trial.datetime_complete - trial.datetime_start).total_seconds()
        spent += took
        unpruned += took + (epochs - len(seconds)) * sum(seconds) / len(seconds)
    return {"time/trials_s": spent, "time/unpruned_s": unpruned, "time/pruned_over_unpruned": spent / (unpruned or 1)}


def report_study(study: optuna.Study, tune: TuneParams) -> FrozenTrial | None:
    """Log the best trial, the trial counts, the time pruning saved and the plots to the parent run; write the
    best params file."""
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in FINISHED}
    tracking.log_metrics({f"trials/{state}": n for state, n in counts.items()})
    cost = pruning_cost(study, tune.epochs)
    tracking.log_metrics(cost)
    log.info(
        "trials: %s; they took %.1f min, %.1f min unpruned (x%.2f)",
        ", ".join(f"{n} {state}" for state, n in counts.items()),
        cost["time/trials_s"] / 60,
        cost["time/unpruned_s"] / 60,
        cost["time/pruned_over_unpruned"],
    )
    best = best_trial(study)
    if best is None:
        return None
    tracking.log_metrics({"best/value": best.value, "best/trial": best.number})
    sections = by_section(best.params)
    tracking.set_tags({f"best.{s}.{k}": v for s, values in sections.items() for k, v in values.items()})
    tracking.set_tags({"best.trial": best.number})
    log_plots(study)
    write_best_params(best, study.study_name, tune.best_params_path)
    tracking.log_artifact(tune.best_params_path)
    log.info("best trial %d: %s %.4f; written to %s", best.number, METRIC, best.value, tune.best_params_path)
    return best
