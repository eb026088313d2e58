"""Shared fixtures: a tiny HAM10000-shaped dataset and params shrunk for the CPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from src.config import Params
from src.fileio import write_json
from src.ingest.download import SOURCE_FILE
from src.ingest.synthetic import make_dataset

os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A raw-layout dataset (metadata.csv + images/) with ~90 lesions and two planted duplicate photos."""
    out = tmp_path_factory.mktemp("raw")
    make_dataset(out, n_lesions=90, seed=1, duplicates=2)
    write_json(out / SOURCE_FILE, {"source": "synthetic", "synthetic": True})  # as the download stage records it
    return out


def make_tiny_params(root: Path) -> Params:
    """Params for a test_vit at 32 px writing everything under root."""
    base = Params()
    return base.model_copy(
        update={
            "paths": base.paths.model_copy(
                update={k: root / k for k in ("raw", "downloads", "splits", "cache", "models", "reports")}
            ),
            "data": base.data.model_copy(update={"source": "synthetic", "image_size": 32}),
            "model": base.model.model_copy(update={"name": "test_vit", "pretrained": False}),
            "train": base.train.model_copy(
                update={"epochs": 2, "batch_size": 16, "warmup_epochs": 0.5, "num_workers": 0, "threads": 2}
            ),
            "tracking": base.tracking.model_copy(update={"uri": f"sqlite:///{root / 'mlflow.db'}"}),
        }
    )


@pytest.fixture
def tiny_params(tmp_path) -> Params:
    """Params for a test_vit at 32 px writing everything under tmp_path."""
    return make_tiny_params(tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(db: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1 over the sqlite store `db` (artifacts proxied, under the db's folder);
    returns when it answers /health."""
    cmd = [
        *(str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # its own process group: the server runs its workers as child processes, and stopping it must stop them all
    proc = subprocess.Popen(
        cmd, cwd=db.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.5)
    stop_mlflow_server(proc, signal.SIGKILL)
    pytest.fail("mlflow server did not start within 120 s")


def stop_mlflow_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the server and its workers (SIGKILL: a crash), and wait until they are gone."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
