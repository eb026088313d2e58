"""Shared fixtures: a tiny HAM10000-shaped dataset and params shrunk for the CPU."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


# Store locations a test process leaves in its environment (MLflow's set_tracking_uri and set_registry_uri write
# them there); a command a test starts must get the store the test names, not the last one used in-process.
STORE_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def clean_environ() -> dict[str, str]:
    """This process's environment without the MLflow store variables."""
    return {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}


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
    return _start_healthy(cmd, db.parent, port, {})


def start_team_server(backend_uri: str, artifacts: Path, port: int) -> subprocess.Popen:
    """`mlflow server` as a team runs it: a database backend store, artifacts proxied into `artifacts` (clients
    send them over HTTP and never see that folder), on 127.0.0.1."""
    cmd = [
        *(str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend_uri),
        *("--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    return _start_healthy(cmd, artifacts.parent, port, {})


def start_model_server(model_uri: str, tracking_uri: str, cwd: Path, port: int) -> subprocess.Popen:
    """`mlflow models serve` of a registered model, as the README runs it; returns when it answers /health."""
    cmd = [
        *(str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    bin_dir = str(Path(sys.executable).parent)  # an activated venv: the server runs uvicorn from it
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return _start_healthy(cmd, cwd, port, {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": path})


def answers_health(proc: subprocess.Popen, port: int, seconds: float = 180) -> bool:
    """Poll the server's /health until it answers (True), it exits or `seconds` pass (generous: a busy 2-core
    machine starts a server slowly)."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return True
        except requests.RequestException:
            time.sleep(0.5)
    return False


def _start_healthy(cmd: list[str], cwd: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    env = {**clean_environ(), **env}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    # its own process group: the server runs its workers as child processes, and stopping it must stop them all
    log = cwd / f"server-{port}.log"  # not a pipe: a server that logs every request would fill it and stall
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    if answers_health(proc, port):
        return proc
    stop_mlflow_server(proc, signal.SIGKILL)
    pytest.fail(f"{' '.join(cmd[1:4])} did not start within 180 s: {log.read_text(errors='replace')[-2000:]}")


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


PROJECT_FILES = (
    "src",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".gitignore",
    ".dvcignore",
    ".dvc/config",
    ".dvc/.gitignore",
)
OFFLINE = [
    "-S",
    "data.source=synthetic",
    "-S",
    "model.name=test_vit",
    "-S",
    "data.image_size=32",
    "-S",
    "model.pretrained=false",
    "-S",
    "train.epochs=2",
]


def project_env() -> dict[str, str]:
    """The environment a user's shell gives the project's commands: the venv first, no tracking URI set."""
    env = {**clean_environ(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        DVC_NO_ANALYTICS="1",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    return env


def run_ok(
    cmd: list[str], cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command as a user would (`env` added to the environment); a non-zero exit fails the test with the
    output's tail."""
    env = project_env() | (env or {})
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def project_copy(work: Path) -> Path:
    """The project's files in `work`, committed to a new git repository, as a fresh clone has them."""
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / name)
    run_ok(["git", "init", "-q"], work)
    run_ok(["git", "add", "-A"], work)
    run_ok(["git", "commit", "-qm", "init"], work)
    return work


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """A fresh clone-like copy of the project after `dvc exp run` with the README's offline overrides and colour
    constancy on, so that evaluate, predict, the served model and the demo page must all apply it alike."""
    work = project_copy(tmp_path_factory.mktemp("clone"))
    run_ok(["dvc", "exp", "run", *OFFLINE, "-S", "data.color_constancy=shades_of_gray"], work, timeout=900)
    return work


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, or where Debian's `postgresql` package puts it (.ci/run installs it)."""
    debian = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    found = shutil.which(name) or (str(debian[0]) if debian else None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} not found: install PostgreSQL (Debian: apt-get install postgresql)")
    return found


class PostgresServer:
    """A running PostgreSQL server (trust authentication, user `tester`) that hands out fresh databases."""

    def __init__(self, port: int):
        self.port = port
        self.created = 0

    def database(self, prefix: str) -> str:
        """Create a new database named after `prefix` (unique in this server); its SQLAlchemy URL."""
        self.created += 1
        name = f"{prefix}_{self.created}"
        run_ok([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "tester", name], Path("/"))
        return f"postgresql+psycopg2://tester@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on 127.0.0.1 for this test session (initdb + pg_ctl). The server refuses to run as
    root, so as root it runs as the `postgres` user, in a folder of its own (pytest's temporary folders are closed
    to other users)."""
    root = Path(tempfile.mkdtemp(prefix="hmnist-postgres-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    run_ok([*as_user, postgres_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "tester"], root)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    ctl = [*as_user, postgres_bin("pg_ctl"), "-D", str(data), "-l", str(root / "server.log")]
    run_ok([*ctl, "-o", options, "-w", "-t", "120", "start"], root)
    try:
        yield PostgresServer(port)
    finally:
        subprocess.run([*ctl, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
