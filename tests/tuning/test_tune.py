"""Tuning: real Optuna SQLite studies and a real MLflow SQLite store, a tiny test_vit at 32 px."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import sqlalchemy
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from PIL import Image

from src import tune
from src.config import ConfigError, Params, TuneParams, flatten, load_params
from src.learn.data import load_split
from src.learn.engine import TrainingDiverged
from src.learn.training import load_train_data
from src.prepare.imaging import fit_square
from src.prepare.split import split
from src.tuning import reporting, search
from src.tuning import trial as tuning_trial
from src.tuning.params_file import apply_to_params_file
from src.tuning.search_space import SPACE, check_space, suggest, trial_params
from src.tuning.study import (
    CREATED_ATTR,
    HOST,
    HOST_ATTR,
    PARENT_RUN_ATTR,
    PID_ATTR,
    RUN_ATTR,
    fail_dead_trials,
    make_pruner,
)
from tests.conftest import clean_environ

REPO = Path(__file__).resolve().parents[2]
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


# ---- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def split_data(synthetic_raw, tmp_path_factory) -> Params:
    """The split stage's outputs for the shared synthetic dataset, at 32 px (made once per session)."""
    root = tmp_path_factory.mktemp("tune_split")
    base = Params()
    paths = base.paths.model_copy(update={k: root / k for k in ("splits", "cache", "reports")})
    data = base.data.model_copy(update={"source": "synthetic", "image_size": 32})
    split(synthetic_raw, base.split, data, paths)
    return base.model_copy(update={"paths": paths, "data": data})


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One MLflow store for the whole file: creating its tables costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('tune_mlflow') / 'mlflow.db'}"


@pytest.fixture
def tune_params(tiny_params, split_data, mlflow_uri, tmp_path, monkeypatch) -> Params:
    """tiny_params on the shared split, one CPU thread, and a 3-epoch search whose lr reaches 0.9.

    Learning rates near 1 never learn while small ones do, so the median pruner has something to prune.
    """
    monkeypatch.chdir(tmp_path)  # MLflow artifacts and relative paths stay in tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = tiny_params.paths.model_copy(
        update={k: getattr(split_data.paths, k) for k in ("splits", "cache", "reports")}
    )
    space = TuneParams(
        lr=(1e-4, 0.9),
        epochs=3,
        train_fraction=1.0,
        pruner="median",  # prunes some and completes most trials of a short study
        warmup_epochs_before_pruning=1,
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        study_name="test-study",
        best_params_path=tmp_path / "tune" / "best_params.yaml",
    )
    return tiny_params.model_copy(
        update={
            "paths": paths,
            "train": tiny_params.train.model_copy(update={"threads": 1}),  # 2 threads thrash on busy cores
            "tracking": tiny_params.tracking.model_copy(update={"uri": mlflow_uri}),
            "tune": space,
        }
    )


def _quick(params: Params) -> Params:
    """Two epochs at 16 px (below the 32 px cache), no pruning: for tests about the study's bookkeeping."""
    quick = {"epochs": 2, "pruner": "none", "image_size": 16}
    return params.model_copy(update={"tune": params.tune.model_copy(update=quick)})


def _overrides(params: Params, params_file: Path) -> list[str]:
    """`-S key=value` arguments that turn the params file into `params`."""
    current = flatten(load_params(params_file))
    return [
        arg
        for key, value in flatten(params).items()
        if current.get(key) != value
        for arg in ("-S", f"{key}={json.dumps(value)}")
    ]


def _write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


_TRIALS = "SELECT trial_id, state FROM trials"
_ATTRS = "SELECT trial_id, key, value_json FROM trial_user_attributes"


def _snapshot(storage: str) -> list[dict]:
    """Each trial's state and user attrs, read with SQL (sqlite3 for SQLite, so that polling creates nothing)."""
    if not storage.startswith("sqlite:///"):
        return _server_snapshot(storage)
    try:
        with closing(sqlite3.connect(storage.removeprefix("sqlite:///"), timeout=30)) as db:
            trials = {tid: {"state": state} for tid, state in db.execute(_TRIALS)}
            for tid, key, value in db.execute(_ATTRS):
                trials[tid][key] = json.loads(value)
    except sqlite3.OperationalError:  # not created yet
        return []
    return list(trials.values())


def _server_snapshot(storage: str) -> list[dict]:
    engine = sqlalchemy.create_engine(storage)
    try:
        with engine.connect() as db:
            trials = {tid: {"state": state} for tid, state in db.execute(sqlalchemy.text(_TRIALS))}
            for tid, key, value in db.execute(sqlalchemy.text(_ATTRS)):
                trials[tid][key] = json.loads(value)
    except sqlalchemy.exc.ProgrammingError:  # tables not created yet
        return []
    finally:
        engine.dispose()
    return list(trials.values())


def _start_worker(params_file: Path, cwd: Path, trials: int) -> subprocess.Popen:
    env = {**clean_environ(), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "src.tune", "--params", str(params_file), "--trials", str(trials)]
    log = cwd / f"worker-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        worker = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    worker.log = log  # type: ignore[attr-defined]
    return worker


def _wait_until(condition, workers: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if any(w.poll() is not None for w in workers) or time.monotonic() > deadline:
            logs = "\n".join(w.log.read_text() for w in workers)
            raise AssertionError(f"a worker exited or the wait timed out:\n{logs}")
        time.sleep(0.3)


def _study(params: Params) -> optuna.Study:
    return optuna.load_study(study_name=params.tune.study_name, storage=params.tune.storage)


def _trial_runs(params: Params, study: optuna.Study):
    mlflow.set_tracking_uri(params.tracking.uri)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent}'")


# ---- pure functions ---------------------------------------------------------------------------------


def test_suggest_and_trial_params_apply_values_and_budget(tune_params):
    trial = optuna.create_study().ask()
    values = suggest(trial, tune_params.tune)
    assert set(values) == set(SPACE) and values == trial.params
    for name, value in values.items():
        low, high = getattr(tune_params.tune, name)
        assert low <= value <= high
    params = trial_params(tune_params, values, tune_params.tune)
    assert (params.train.lr, params.train.weight_decay, params.train.clip_grad_norm, params.model.dropout) == (
        values["lr"],
        values["weight_decay"],
        values["clip_grad_norm"],
        values["dropout"],
    )
    assert (params.train.epochs, params.train.train_fraction, params.train.early_stopping_patience) == (3, 1.0, None)
    assert params.train.batch_size == tune_params.train.batch_size and tune_params.train.epochs == 2  # base kept


def test_trials_see_the_cached_images_resized_to_tune_image_size(tune_params):
    data = load_train_data(trial_params(tune_params, {}, tune_params.tune), 16)
    assert data.image_size == 16
    cached = load_split(tune_params.paths, "val").dataset
    np.testing.assert_array_equal(data.val.dataset[3][0].numpy(), fit_square(Image.fromarray(cached[3][0].numpy()), 16))
    image, label = data.train.dataset[0]
    assert image.shape == (16, 16, 3) and label == data.train.frame["label"].iloc[0]
    assert len(data.train.dataset) == len(data.train.frame)


def _epochs_run(pruner: optuna.pruners.BasePruner, epochs: int, trials: int) -> tuple[int, optuna.Study]:
    """Epochs a seeded study of learning curves spends under `pruner`: curve i rises to its own plateau."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0), pruner=pruner)
    spent = 0
    for _ in range(trials):
        trial = study.ask()
        plateau = trial.suggest_float("plateau", 0.2, 0.9)
        state = TrialState.COMPLETE
        for epoch in range(1, epochs + 1):
            spent += 1
            trial.report(plateau * (1 - 0.5**epoch), epoch)
            if epoch < epochs and trial.should_prune():
                state = TrialState.PRUNED
                break
        study.tell(trial, plateau * (1 - 0.5**epoch) if state == TrialState.COMPLETE else None, state=state)
    return spent, study


def test_successive_halving_stops_most_trials_at_its_first_rungs():
    """The default pruner stops most trials after 1 or 4 of 16 epochs; the median pruner lets most run on.

    TPE proposes ever better trials here, which successive halving promotes more often than a random order
    would (about 1 in 4): a pessimistic case.
    """
    tune = TuneParams()
    spent, study = _epochs_run(make_pruner(tune), tune.epochs, 50)
    median_spent, _ = _epochs_run(make_pruner(tune.model_copy(update={"pruner": "median"})), tune.epochs, 50)
    assert spent <= 0.35 * 50 * tune.epochs and spent < 0.5 * median_spent
    plateaus = [t.params["plateau"] for t in study.trials]
    assert study.best_trial.params["plateau"] >= sorted(plateaus)[-3]  # one of the three best curves finished


def test_search_space_outside_train_limits_is_a_config_error(tune_params):
    bad = tune_params.model_copy(update={"tune": tune_params.tune.model_copy(update={"lr": (1e-4, 1.5)})})
    with pytest.raises(ConfigError, match="train.lr"):
        check_space(bad)


def test_dead_workers_trials_fail_and_live_ones_keep_running():
    study = optuna.create_study()
    gone = subprocess.Popen(["true"])
    gone.wait()
    owners = {"dead": gone.pid, "alive": os.getppid(), "same pid as this process": os.getpid()}
    trials = {}
    for name, pid in owners.items():
        trials[name] = study.ask()
        trials[name].set_user_attr(HOST_ATTR, HOST)
        trials[name].set_user_attr(PID_ATTR, pid)
    elsewhere = study.ask()
    elsewhere.set_user_attr(HOST_ATTR, "another-host")
    elsewhere.set_user_attr(PID_ATTR, gone.pid)
    failed = {t.number for t in fail_dead_trials(study)}
    assert failed == {trials["dead"].number, trials["same pid as this process"].number}
    states = {t.number: t.state for t in study.trials}
    assert states[trials["alive"].number] == states[elsewhere.number] == TrialState.RUNNING


def test_workers_reuse_the_recorded_parent_run_and_do_not_wait_for_a_long_dead_creator(monkeypatch):
    study = optuna.create_study()
    study.set_user_attr(CREATED_ATTR, time.time() - 3600)  # its creator died before recording a run

    def no_waiting(seconds):
        raise AssertionError(f"waited {seconds} s for a creator that died an hour ago")

    monkeypatch.setattr(reporting.time, "sleep", no_waiting)
    assert reporting.recorded_parent_run(study, created=False) is None
    study.set_user_attr(PARENT_RUN_ATTR, "run-id")
    assert reporting.recorded_parent_run(study, created=False) == "run-id"
    assert reporting.recorded_parent_run(study, created=True) is None


def test_apply_keeps_comments_and_changes_only_tuned_keys(tmp_path):
    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    before = params_file.read_text().splitlines()
    best = {"train": {"lr": 1.2345e-05, "weight_decay": 0.0123, "clip_grad_norm": 2.5}, "model": {"dropout": 0.25}}
    apply_to_params_file(params_file, best)
    after = params_file.read_text().splitlines()
    assert len(after) == len(before)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert sorted(b.split(":")[0].strip() for _, b in changed) == ["clip_grad_norm", "dropout", "lr", "weight_decay"]
    assert all(("#" in a) == ("#" in b) for a, b in changed)  # an inline comment stays on its line
    applied = load_params(params_file)
    assert (applied.train.lr, applied.train.weight_decay, applied.train.clip_grad_norm, applied.model.dropout) == (
        1.2345e-05,
        0.0123,
        2.5,
        0.25,
    )


# ---- studies ------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_study_prunes_tracks_trials_and_applies_best(tune_params, tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    argv = ["--params", str(params_file), "--trials", "8", "--apply", *_overrides(tune_params, params_file)]
    assert tune.main(argv) == 0

    study = _study(tune_params)
    states = Counter(t.state.name for t in study.trials)
    assert len(study.trials) == 8 and states["PRUNED"] >= 1 and states["COMPLETE"] >= 5, states
    best = study.best_trial

    runs = _trial_runs(tune_params, study)
    assert sorted(runs["tags.mlflow.runName"]) == sorted(f"trial-{t.number}" for t in study.trials)
    by_name = runs.set_index("tags.mlflow.runName")
    client = MlflowClient()
    for trial in study.trials:
        run = by_name.loc[f"trial-{trial.number}"]
        assert run["tags.trial.state"] == trial.state.name
        assert run["params.train.lr"] == str(trial.params["lr"])
        history = client.get_metric_history(run["run_id"], "val/balanced_accuracy")
        assert [m.step for m in history] == sorted(trial.intermediate_values)
    parent = client.get_run(study.user_attrs[PARENT_RUN_ATTR])
    assert parent.data.tags["optuna.study"] == "test-study" and parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.metrics["best/value"] == pytest.approx(best.value)
    cost = parent.data.metrics  # each pruned trial's skipped epochs priced at its own epoch time
    assert 0 < cost["time/trials_s"] < cost["time/unpruned_s"] and cost["time/pruned_over_unpruned"] < 1
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {f"plots/{n}.png" for n in ("optimization_history", "param_importances", "parallel_coordinate")}

    written = yaml.safe_load(tune_params.tune.best_params_path.read_text())
    assert (written["study"], written["trial"], written["value"]) == ("test-study", best.number, best.value)
    assert written["train"]["lr"] == best.params["lr"] and written["model"]["dropout"] == best.params["dropout"]
    applied = load_params(params_file)
    assert (applied.train.lr, applied.train.clip_grad_norm, applied.model.dropout) == (
        best.params["lr"],
        best.params["clip_grad_norm"],
        best.params["dropout"],
    )
    assert "# Every section is validated" in params_file.read_text()  # comments kept
    assert "dvc repro" in capsys.readouterr().out


@pytest.mark.e2e
def test_workers_share_a_study_and_a_killed_study_resumes(tune_params, tmp_path):
    """Two workers start at once on one study; both are killed (-9) mid-trial; rerunning the command resumes.

    The workers ask for more trials than they can finish before the kill, however fast or slow the machine, and
    the resumed command asks for one more than the study then holds: no outcome depends on timing.
    """
    params = _quick(tune_params)
    params_file = _write_params(params, tmp_path / "params.yaml")
    storage = params.tune.storage
    workers = [_start_worker(params_file, tmp_path, 1000) for _ in range(2)]
    pids = {w.pid for w in workers}

    def both_in_a_trial_after_finishing_one() -> bool:
        # checked with the workers stopped, so they are killed in the state checked: not in the instant between a
        # new trial's creation and its pid attribute, when no process can tell whose trial it is
        for worker in workers:
            worker.send_signal(signal.SIGSTOP)
        snapshot = _snapshot(storage)
        finished = {t.get(PID_ATTR) for t in snapshot if t["state"] in FINISHED}
        running = {t.get(PID_ATTR) for t in snapshot if t["state"] == "RUNNING" and RUN_ATTR in t}
        ready = pids <= finished and pids <= running
        if not ready:
            for worker in workers:
                worker.send_signal(signal.SIGCONT)
        return ready

    try:
        _wait_until(both_in_a_trial_after_finishing_one, workers)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
    first = _study(params)
    completed = {t.number: t.value for t in first.trials if t.state == TrialState.COMPLETE}
    killed = [t for t in first.trials if t.state == TrialState.RUNNING]
    assert {t.user_attrs[PID_ATTR] for t in first.trials if t.state.is_finished()} == pids  # both added trials
    assert completed and killed

    trials = len(first.trials) + 1  # the killed trials are marked FAIL, then one more runs
    assert tune.main(["--params", str(params_file), "--trials", str(trials)]) == 0

    study = _study(params)
    states = {t.number: t.state for t in study.trials}
    assert sum(s.is_finished() for s in states.values()) == trials and TrialState.RUNNING not in states.values()
    assert all(states[t.number] == TrialState.FAIL for t in killed)
    assert {t.number: t.value for t in study.trials if t.number in completed} == completed
    runs = _trial_runs(params, study).set_index("run_id")  # every worker nested its trials under one parent
    assert set(runs.index) == {t.user_attrs[RUN_ATTR] for t in study.trials if RUN_ATTR in t.user_attrs}
    for trial in killed:
        if RUN_ATTR in trial.user_attrs:
            run = runs.loc[trial.user_attrs[RUN_ATTR]]
            assert (run["tags.trial.state"], run["status"]) == ("FAIL", "KILLED")


@pytest.mark.e2e
def test_three_workers_share_a_postgresql_study_and_a_killed_ones_trial_ends_fail(tune_params, tmp_path, postgres):
    """Three workers on one study in a real PostgreSQL server; one is killed (-9) in a trial after finishing one.
    The other two take the study to --trials N; the dead worker's trial ends FAIL; no trial number twice; every
    trial's MLflow run nested under the one parent run."""
    params = _quick(tune_params)
    postgres_url = postgres.database("optuna")
    study_setup = {"storage": postgres_url, "study_name": "shared-on-postgres"}
    params = params.model_copy(update={"tune": params.tune.model_copy(update=study_setup)})
    params_file = _write_params(params, tmp_path / "params.yaml")
    trials = 15  # enough that the victim finishes one and starts another long before the study is done
    workers = [_start_worker(params_file, tmp_path, trials) for _ in range(3)]
    victim = workers[0]

    def victim_in_a_trial_after_finishing_one() -> bool:
        snapshot = _snapshot(postgres_url)
        finished = {t.get(PID_ATTR) for t in snapshot if t["state"] in FINISHED}
        running = {t.get(PID_ATTR) for t in snapshot if t["state"] == "RUNNING" and RUN_ATTR in t}
        return victim.pid in finished and victim.pid in running

    try:
        _wait_until(victim_in_a_trial_after_finishing_one, workers)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    for worker in workers[1:]:
        assert worker.wait(timeout=600) == 0, worker.log.read_text()[-3000:]

    study = _study(params)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers)))  # each number once
    assert sum(t.state.is_finished() for t in study.trials) >= trials
    killed = [t for t in study.trials if t.user_attrs.get(PID_ATTR) == victim.pid and t.state == TrialState.FAIL]
    assert len(killed) == 1 and TrialState.RUNNING not in {t.state for t in study.trials}
    assert {t.user_attrs[PID_ATTR] for t in study.trials} == {w.pid for w in workers}
    runs = _trial_runs(params, study).set_index("run_id")  # all three workers nested their trials under one parent
    assert set(runs.index) == {t.user_attrs[RUN_ATTR] for t in study.trials if RUN_ATTR in t.user_attrs}
    assert (runs.loc[killed[0].user_attrs[RUN_ATTR], ["tags.trial.state", "status"]] == ["FAIL", "KILLED"]).all()


@pytest.mark.e2e
def test_diverged_or_out_of_memory_trials_fail_and_the_study_goes_on(tune_params, monkeypatch):
    failures = [TrainingDiverged("training loss is nan"), RuntimeError("CUDA out of memory. Tried to allocate")]
    real = tuning_trial.run_training

    def failing_first(*args, **kwargs):  # our training code, not Optuna or MLflow, is what fails here
        if failures:
            raise failures.pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning_trial, "run_training", failing_first)
    params = tune_params.model_copy(update={"tune": tune_params.tune.model_copy(update={"epochs": 1})})
    study = search.tune(params, 3, None, "failing", params.tune.storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    runs = _trial_runs(params, study).set_index("tags.mlflow.runName")
    assert [runs.loc[f"trial-{n}", "tags.trial.state"] for n in range(3)] == ["FAIL", "FAIL", "COMPLETE"]


@pytest.mark.parametrize(
    ("params_yaml", "argv", "expected"),
    [
        ("tune:\n  lrr: [0.001, 0.01]\n", [], "tune.lrr: unknown key"),
        ("tune:\n  lr: [0.01, 0.001]\n", [], "tune.lr: lower bound 0.01 must be below upper bound 0.001"),
        ("", ["--storage", "sqlite:////nonexistent/dir/x.db"], "Optuna storage sqlite:////nonexistent/dir/x.db"),
        ("", ["--storage", "postgresql://u:secret@127.0.0.1:1/db"], "Optuna storage postgresql://u:***@127.0.0.1:1/db"),
        ("", ["--storage", "not-a-url"], "Optuna storage not-a-url"),
    ],
)
def test_bad_input_is_a_clear_error(params_yaml, argv, expected, split_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params_file = tmp_path / "params.yaml"
    paths = {k: str(getattr(split_data.paths, k)) for k in ("splits", "cache", "reports")}
    params_file.write_text(yaml.safe_dump({"paths": paths}) + params_yaml)
    assert tune.main(["--params", str(params_file), "--trials", "1", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "secret" not in err
    assert not (tmp_path / "mlflow.db").exists()  # stopped before any trial, run or store (no clock: CI may be busy)


def test_a_study_without_split_data_fails_before_creating_any_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default params, and no data/splits here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("")
    assert tune.main(["--trials", "1"]) == 1
    assert "run `python -m src.split`" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["params.yaml"]  # no optuna.db, mlflow.db or tune/ left behind
