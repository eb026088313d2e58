"""Entry point `python -m src.tune`: an Optuna study over the train stage's own training code.

Trials live in an Optuna RDB storage, so a study survives Ctrl-C or kill -9 (rerun the same command to go
on) and several workers on several machines can share one study. MLflow gets a parent run per study and a
nested run per trial; the best trial's values go to tune.best_params_path (and, with --apply, params.yaml).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import optuna
import sqlalchemy
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState
from ruamel.yaml import YAML
from ruamel.yaml.representer import RoundTripRepresenter

from src import cli
from src.config import Params, TuneParams, parse_params
from src.errors import UserError
from src.fileio import write_text
from src.learn.engine import TrainingDiverged
from src.learn.training import TrainData, load_train_data, run_training
from src.tracking import runs as tracking
from src.tuning.search_space import by_section, check_space, suggest, trial_params

log = logging.getLogger(__name__)
METRIC = "val/balanced_accuracy"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
HOST = socket.gethostname()
# A RUNNING trial whose worker (on any host) has not sent a heartbeat for GRACE_S seconds is marked FAIL.
HEARTBEAT_S, GRACE_S = 60, 300
PARENT_WAIT_S = 60  # how long after creating a study its creator has to record the MLflow parent run
PARENT_RUN_ATTR, RUN_ATTR, HOST_ATTR, PID_ATTR = "mlflow_parent_run_id", "mlflow_run_id", "host", "pid"
CREATED_ATTR = "created_at"
STATE_TAG = "trial.state"


class TuneError(UserError, RuntimeError):
    """A study that cannot be opened or has no result."""


class TrialFailed(RuntimeError):
    """A trial that cannot finish (NaN loss, out of memory): recorded as FAIL while the study goes on."""


# ---- storage and study ------------------------------------------------------------------------------


def shown(url: str) -> str:
    """A storage URL fit for logs and tags: the password masked."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def _engine_kwargs(url: str) -> dict:
    backend = url.partition(":")[0].partition("+")[0]
    if backend == "sqlite":  # concurrent workers wait for each other's writes instead of failing
        return {"connect_args": {"timeout": 60}}
    if backend in ("postgresql", "mysql"):  # an unreachable server fails in seconds, not minutes
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {}


def _rdb_storage(url: str) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
        )


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's RDB storage, with heartbeats so that trials of dead workers on any host end up FAIL."""
    try:
        try:
            return _rdb_storage(url)
        except sqlalchemy.exc.DBAPIError:  # workers started at once race to create the tables: once more
            time.sleep(1)
            return _rdb_storage(url)
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as err:
        reason = err.__cause__ if isinstance(err, ImportError) and err.__cause__ else err
        first_line = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
        raise TuneError(
            f"Optuna storage {shown(url)} cannot be opened ({first_line}); pass --storage with a reachable "
            "database URL (e.g. sqlite:///optuna.db, or postgresql://user:password@host/db with its driver "
            "installed)"
        ) from None


def make_pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    """Median (default), Hyperband or none; no trial is pruned before warmup_epochs_before_pruning epochs."""
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=tune.warmup_epochs_before_pruning)
    if tune.pruner == "hyperband":
        first_rung = min(max(1, tune.warmup_epochs_before_pruning), tune.epochs)
        return optuna.pruners.HyperbandPruner(min_resource=first_rung, max_resource=tune.epochs)
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


def fail_dead_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Mark FAIL the RUNNING trials whose worker process on this host is gone (kill -9, crash, reboot).

    Workers on other hosts are covered by the storage heartbeat. This process has started no trial yet,
    so a RUNNING trial carrying its own pid was left by an earlier process that had the same pid.
    """
    dead = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get(PID_ATTR)
        if trial.user_attrs.get(HOST_ATTR) != HOST or pid is None or (pid != os.getpid() and pid_alive(pid)):
            continue
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
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


# ---- one trial --------------------------------------------------------------------------------------


def is_trial_failure(err: BaseException) -> bool:
    """NaN loss or out of memory: bad hyperparameters for this trial, not a broken study."""
    return isinstance(err, (TrainingDiverged, torch.OutOfMemoryError)) or "out of memory" in str(err).lower()


def fit_trial(trial: optuna.Trial, params: Params, data: TrainData) -> float:
    """Train with the train stage's code, report the metric every epoch, stop when the pruner says so."""

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        tracking.log_epoch(epoch, metrics)
        trial.report(metrics[METRIC], epoch)
        if trial.should_prune():
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
    """One trial: its value is the best val/balanced_accuracy of the trial's training run."""
    trial.set_user_attr(HOST_ATTR, HOST)  # first, so a killed worker's trial can be recognised
    trial.set_user_attr(PID_ATTR, os.getpid())
    params = trial_params(base, suggest(trial, base.tune), base.tune)
    with trial_run(trial, parent_run_id):
        tracking.log_params(params)
        value = fit_trial(trial, params, data)
        tracking.log_metrics({f"best/{METRIC}": value})
    return value


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


# ---- reporting --------------------------------------------------------------------------------------


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


def report_study(study: optuna.Study, tune: TuneParams) -> FrozenTrial | None:
    """Log the best trial, the trial counts and the plots to the parent run; write the best params file."""
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in FINISHED}
    tracking.log_metrics({f"trials/{state}": n for state, n in counts.items()})
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


# ---- the study --------------------------------------------------------------------------------------


def tune(
    params: Params, trials: int, timeout: float | None, study_name: str, storage: str, n_jobs: int = 1
) -> optuna.Study:
    """Run, resume or join the study until it holds `trials` finished trials; report the best one."""
    check_space(params)
    study, created = open_study(params.tune, study_name, open_storage(storage))
    recorded = recorded_parent_run(study, created)  # a joiner waits: the creator also sets up the MLflow store
    dead = fail_dead_trials(study)
    tracking.connect(params.tracking)
    close_dead_trial_runs(dead)
    with study_run(study, params, storage, recorded) as parent_run_id:
        data = load_train_data(trial_params(params, {}, params.tune))  # train_fraction subsamples while loading
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
                callbacks=[optuna.study.MaxTrialsCallback(trials, states=FINISHED), progress(trials)],
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


# ---- params.yaml and the command line ---------------------------------------------------------------


class ParamsYamlRepresenter(RoundTripRepresenter):
    """Writes values as params.yaml spells them: `null`, and floats that YAML 1.1 readers (PyYAML) parse."""

    def represent_none(self, data: None):
        return self.represent_scalar("tag:yaml.org,2002:null", "null")

    def represent_float(self, data: float):
        text = repr(data)
        if "e" in text and "." not in text:  # PyYAML reads 1e-05 as a string, 1.0e-05 as a float
            text = text.replace("e", ".0e", 1)
        return self.represent_scalar("tag:yaml.org,2002:float", text)


ParamsYamlRepresenter.add_representer(type(None), ParamsYamlRepresenter.represent_none)
ParamsYamlRepresenter.add_representer(float, ParamsYamlRepresenter.represent_float)


def apply_to_params_file(path: Path, sections: dict[str, dict[str, float]]) -> None:
    """Write tuned values into a params file in place, keeping its comments and layout (atomic write)."""
    rt = YAML()  # round-trip: comments, key order and flow style survive
    rt.Representer = ParamsYamlRepresenter
    rt.width = 4096
    doc = rt.load(path.read_text()) or {}
    for section, values in sections.items():
        if doc.get(section) is None:
            doc[section] = {}
        doc[section].update(values)
    out = io.StringIO()
    rt.dump(doc, out)
    parse_params(yaml.safe_load(out.getvalue()), path)  # never leave a file the stages cannot read
    write_text(path, out.getvalue())


def next_command(sections: dict[str, dict[str, float]], applied: bool) -> str:
    if applied:
        return "params.yaml updated with the best trial; next: dvc repro"
    sets = " ".join(f"-S {s}.{k}={v!r}" for s, values in sections.items() for k, v in values.items())
    return f"next: dvc exp run {sets}\n  (or rerun with --apply to write them into params.yaml, then dvc repro)"


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(
        "Tune train.lr, train.weight_decay, train.clip_grad_norm and model.dropout with Optuna (bounds and "
        "per-trial budget in the tune: section of params.yaml), reusing the train stage's training code. "
        "Rerun the same command to resume an interrupted study; start it on several machines with the same "
        "--storage and --study-name to search in parallel. Writes the best trial to tune.best_params_path and "
        "logs an MLflow parent run for the study with a nested run per trial."
    )
    p.prog = "python -m src.tune"
    p.add_argument(
        "--trials",
        type=_positive(int),
        default=50,
        metavar="N",
        help="finished trials (complete, pruned or failed) the study should hold in total, counting "
        "earlier runs and other workers (default: 50)",
    )
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=None,
        metavar="SEC",
        help="start no new trial after SEC seconds (this worker only; rerun to go on)",
    )
    p.add_argument(
        "--study-name", default=None, metavar="NAME", help="Optuna study to create or join (default: tune.study_name)"
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna RDB storage URL (default: tune.storage, sqlite:///optuna.db); use a shared "
        "database such as postgresql://user:password@host/db for workers on several machines",
    )
    p.add_argument(
        "--n-jobs",
        type=_positive(int),
        default=1,
        metavar="K",
        help="trials run at once in this process, as threads sharing its device (default: 1); for "
        "several GPUs start one worker per GPU (CUDA_VISIBLE_DEVICES) instead",
    )
    p.add_argument(
        "--apply",
        action="store_true",
        help="also write the best values into the --params file (train.lr, train.weight_decay, "
        "train.clip_grad_norm, model.dropout), keeping its comments",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        params = cli.load(args)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our per-trial progress line replaces Optuna's
        study = tune(
            params,
            args.trials,
            args.timeout,
            args.study_name or params.tune.study_name,
            args.storage or params.tune.storage,
            args.n_jobs,
        )
        sections = by_section(study.best_params)
        if args.apply:
            apply_to_params_file(Path(args.params), sections)
        print(next_command(sections, args.apply))
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
