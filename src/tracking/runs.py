"""Talking to MLflow: runs, params, metrics, provenance and logged models (the registry is in registry.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import requests
import torch
import yaml
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from src.config import Params, PathsParams, TrackingParams, flatten
from src.errors import UserError
from src.fileio import read_json

log = logging.getLogger(__name__)
# MLflow's advice for tabular data; our inputs are uint8 image tensors and local index files.
warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
# Read once: mlflow.set_tracking_uri() writes this variable too, so a later read would see our own last URI.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


class TrackingError(UserError, RuntimeError):
    """The tracking server or store cannot be used."""


OUTAGE = (MlflowException, requests.RequestException, OSError)  # what a tracking server that went away raises
SYNC_KEY = "val/score"  # logged every epoch: which epochs a run holds
# For an HTTP store: MLflow retries a failing request 7 times with backoff (minutes); a training epoch should not
# wait that long for a server that is gone. Set by connect() unless the user set them.
HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def tracking_uri(tracking: TrackingParams) -> str:
    """MLFLOW_TRACKING_URI wins over params, as MLflow users expect."""
    return USER_TRACKING_URI or tracking.uri


def connect(tracking: TrackingParams) -> str:
    """Point MLflow at the store and experiment; an unreachable server fails within seconds."""
    uri = tracking_uri(tracking)
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_RETRY_ENV.items():
            os.environ.setdefault(key, value)
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
        except requests.RequestException as err:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({type(err).__name__}); start it, or set "
                "tracking.uri (or MLFLOW_TRACKING_URI) to sqlite:///mlflow.db for a local store"
            ) from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # else the registry keeps the first store a process used
    try:
        mlflow.set_experiment(tracking.experiment)
    except MlflowException as err:
        raise TrackingError(f"MLflow store {uri}: {err.message}") from None
    return uri


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _split_md5(paths: PathsParams) -> str:
    """The DVC hash of the split stage's output, when dvc.lock records one."""
    try:
        lock = yaml.safe_load(Path("dvc.lock").read_text())
        outs = lock["stages"]["split"]["outs"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return ""
    return next((o.get("md5", "") for o in outs if Path(o["path"]) == Path(paths.splits)), "")


def provenance(paths: PathsParams) -> dict[str, str]:
    """Tags that say exactly what produced a run: commit, dirty tree, data source and hashes."""
    source = read_json(paths.raw / "SOURCE.json")
    split = read_json(paths.reports / "split.json")
    return {
        "git.commit": _git("rev-parse", "HEAD") or "unknown",
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "data.source": str(source.get("source", "unknown")),
        "data.synthetic": str(source.get("source") == "synthetic").lower(),
        "data.split_hash": str(split.get("split_hash", "unknown")),
        "data.dvc_split_md5": _split_md5(paths) or "unknown",
    }


@contextmanager
def run(
    run_id: str | None = None, name: str | None = None, nested: bool = False, tags: dict[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Start (or reopen, for a resumed job) an MLflow run."""
    with mlflow.start_run(run_id=run_id, run_name=name, nested=nested, tags=tags) as active:
        yield active


def log_params(params: Params) -> None:
    flat = {k: "null" if v is None else v for k, v in flatten(params).items()}
    try:
        mlflow.log_params(flat)
    except MlflowException:  # a reopened run already has them (params are immutable)
        log.debug("params already logged for this run")


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    """Per-epoch metrics, stepped by epoch. A tracking outage does not stop training: the epoch is logged later
    by sync_epochs, from the history the checkpoint keeps."""
    try:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)
    except OUTAGE as err:
        log.warning("epoch %d: not logged to MLflow (%s); training goes on, it is logged at the end", epoch, brief(err))


def sync_epochs(run_id: str, history: list[dict]) -> int:
    """Log the epochs of `history` that the run lacks (missed during an outage); returns how many were missing.

    Raises TrackingError when the store is still unreachable: everything else is saved by then, and rerunning the
    stage resumes from the finished checkpoint, so only this logging is repeated.
    """
    client = MlflowClient()
    try:
        logged = {m.step for m in client.get_metric_history(run_id, SYNC_KEY)}
        missing = [h for h in history if h["epoch"] not in logged]
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, h["epoch"]) for h in missing for k, v in h.items() if k != "epoch"]
        for start in range(0, len(rows), 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=rows[start : start + 1000])
    except OUTAGE as err:
        raise outage_error(err) from None
    if missing:
        log.info("logged %d epochs that MLflow had missed", len(missing))
    return len(missing)


def brief(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def outage_error(err: BaseException) -> TrackingError:
    return TrackingError(
        f"MLflow tracking store {mlflow.get_tracking_uri()} is unreachable ({brief(err)}); models and reports are "
        "saved. Start the tracking server and rerun `dvc repro`: training resumes from models/checkpoints/last.pt "
        "without training again, and logs what MLflow missed"
    )


def log_metrics(metrics: dict[str, float]) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})


def set_tags(tags: dict[str, object]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_datasets(frames: dict[str, pd.DataFrame], index_dir: Path) -> None:
    """Each split's index as an MLflow dataset input (name, digest, schema, source path)."""
    for split, df in frames.items():
        ds = mlflow.data.from_pandas(df, source=str(Path(index_dir) / f"{split}.csv"), name=split, targets="dx")
        mlflow.log_input(ds, context=split)


def log_artifact(path: Path, folder: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=folder)


def model_requirements() -> list[str]:
    import timm

    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}", "numpy"]


def log_model(model: torch.nn.Module, example: np.ndarray, checkpoint_dir: Path) -> str:
    """Log the served model (uint8 images or base64 files in -> probabilities) with an input example, carrying the
    checkpoint and decision in `checkpoint_dir` that it was built from; its URI."""
    from src.tracking.serving import log_served_model

    return log_served_model(model, example, model_requirements(), checkpoint_dir)


def log_figure(fig, name: str) -> None:
    """A matplotlib figure as a PNG artifact of the active run (under plots/)."""
    mlflow.log_figure(fig, f"plots/{name}", save_kwargs={"dpi": 100, "bbox_inches": "tight"})


def close_run(run_id: str, status: str, tags: dict[str, object]) -> None:
    """Tag and end a run that its process left open (a killed tuning trial); a missing run is only logged."""
    client = MlflowClient()
    try:
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))
        client.set_terminated(run_id, status)
    except MlflowException as err:
        log.warning("could not close MLflow run %s: %s", run_id, err.message)
