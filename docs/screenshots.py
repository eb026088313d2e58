"""The guide's `mlflow ui` pictures, taken from a throwaway run: `python docs/screenshots.py` in the repository root.

It copies the project into a temporary folder as a fresh clone has it, runs the offline try-out there (`dvc exp run`
on synthetic data with a tiny ViT, as tests/conftest.py's `pipeline` fixture does), starts `mlflow server` over that
copy's mlflow.db, and has a headless Chromium (Playwright) photograph the evaluated run's page and its registered
version's page (with the model card). It writes docs/mlflow-run.png and docs/mlflow-model.png, at most 1200 px wide,
then stops the server and removes the copy (`--keep` keeps it; `--project DIR` reuses such a copy and skips the run,
to retake the pictures in half a minute). Needs a Chromium (`apt-get install chromium`; `--chromium PATH` or
$CHROMIUM for another one) and the dev dependencies (it reuses the test fixtures' helpers).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python docs/screenshots.py`: src and tests are importable from the root

from src.config import load_params  # noqa: E402
from src.tracking.registry import registered_name  # noqa: E402
from tests.conftest import (  # noqa: E402
    OFFLINE,
    answers_health,
    free_port,
    project_copy,
    project_env,
    stop_mlflow_server,
)

log = logging.getLogger(__name__)
WIDTH, HEIGHT = 1200, 1600  # the browser's window in pixels; each picture is cut above a heading, so shorter
# the UI's settings as a browser that has been used keeps them: the assistant panel closed (it opens itself on a first
# visit and covers a quarter of the page), the sidebar for model training rather than GenAI
UI_SETTINGS = """
localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
localStorage.setItem("mlflow.workflowType_v1", JSON.stringify("machine_learning"));
"""
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
METRIC = "test/balanced_accuracy"  # a metric only the evaluated run has: its name on the page means it rendered


@dataclass(frozen=True)
class Shot:
    """One picture: the UI address, a text whose presence means the page has rendered, the text above which the
    picture ends, and what to type into the run page's metric search."""

    name: str
    url: str
    ready: str
    until: str
    metric_filter: str = ""


class ScreenshotError(RuntimeError):
    """A step that failed, with what to look at."""


def run_tryout(work: Path) -> Path:
    """A clone-like copy of the project in `work` after the offline `dvc exp run`; returns the copy."""
    project_copy(work)
    log.info("dvc exp run %s in %s (a few minutes)", " ".join(OFFLINE), work)
    result = subprocess.run(
        ["dvc", "exp", "run", *OFFLINE], cwd=work, env=project_env(), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ScreenshotError(f"dvc exp run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return work


def start_server(db: Path, port: int, log_file: Path) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1 over the sqlite store `db`; returns once it answers /health."""
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    env = project_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with log_file.open("wb") as out:  # a file, not a pipe: a server logging every request would fill a pipe and stall
        proc = subprocess.Popen(cmd, cwd=db.parent, env=env, stdout=out, stderr=out, start_new_session=True)
    if answers_health(proc, port):  # ~20 s alone, longer on a busy machine
        return proc
    stop_mlflow_server(proc)
    tail = log_file.read_text(errors="replace")[-3000:]
    raise ScreenshotError(f"mlflow server did not start within 180 s (exit code {proc.returncode}); its log:\n{tail}")


def find_pages(server: str, params_file: Path) -> list[Shot]:
    """The pictures to take: the evaluated run's page and its registered version's page."""
    api = f"{server}/api/2.0/mlflow"
    tracking = load_params(params_file).tracking
    experiment = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": tracking.experiment}, timeout=10
    )
    experiment.raise_for_status()
    exp_id = experiment.json()["experiment"]["experiment_id"]
    found = requests.post(f"{api}/runs/search", json={"experiment_ids": [exp_id]}, timeout=10).json().get("runs", [])
    runs = [run for run in found if any(m["key"] == METRIC for m in run["data"].get("metrics", []))]
    if not runs:
        raise ScreenshotError(f"no run in experiment {tracking.experiment} has {METRIC}: did evaluate run?")
    run = runs[0]
    run_id = run["info"]["run_id"]
    name = registered_name(tracking, {t["key"]: t["value"] for t in run["data"]["tags"]})
    versions = requests.get(
        f"{api}/model-versions/search", params={"filter": f"name='{name}' and run_id='{run_id}'"}, timeout=10
    ).json()
    if not versions.get("model_versions"):
        raise ScreenshotError(f"run {run_id} registered no version of {name}")
    version = versions["model_versions"][0]["version"]
    return [
        Shot("mlflow-run.png", f"{server}/#/experiments/{exp_id}/runs/{run_id}", METRIC, "Parameters (", "test/"),
        Shot("mlflow-model.png", f"{server}/#/models/{name}/versions/{version}", "Model details", "Calibration"),
    ]


def shoot(shots: list[Shot], out: Path, chromium: str) -> list[Path]:
    """Each page in a headless Chromium, once its text is on it, cut above `until`, saved as a small PNG under `out`."""
    from playwright.sync_api import Error, sync_playwright

    saved = []
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        except Error as err:
            raise ScreenshotError(f"Chromium did not start ({chromium}): {err}") from err
        try:
            context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
            context.add_init_script(UI_SETTINGS)
            page = context.new_page()
            for shot in shots:
                log.info("%s: %s", shot.name, shot.url)
                try:
                    page.goto(shot.url)
                    page.get_by_text(shot.ready).first.wait_for(timeout=60_000)
                    if shot.metric_filter:
                        page.get_by_placeholder("Search metrics").fill(shot.metric_filter)
                    page.wait_for_timeout(2000)  # the UI polls, so the network never goes idle: let it settle
                    bottom = page.get_by_text(shot.until).first.bounding_box()
                except Error as err:
                    raise ScreenshotError(f"{shot.url}: {err.message.splitlines()[0]}") from err
                height = min(HEIGHT, round(bottom["y"]) - 10) if bottom else HEIGHT
                png = page.screenshot(clip={"x": 0, "y": 0, "width": WIDTH, "height": height})
                saved.append(save_small(png, out / shot.name))
        finally:
            browser.close()
    return saved


def save_small(png: bytes, path: Path) -> Path:
    """The screenshot at most WIDTH px wide in 256 colours (a page of text needs no more, in a fraction of the
    bytes), as an optimised PNG written under a temp name and renamed into place."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > WIDTH:
        image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    tmp = path.with_suffix(".tmp.png")
    image.quantize(colors=256, dither=Image.Dither.NONE).save(tmp, optimize=True)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go (default: docs/)")
    parser.add_argument("--project", type=Path, help="a project copy that already ran the try-out: skip the run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project copy and say where")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium") or "")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.chromium:
        print("error: no Chromium found: apt-get install chromium, or pass --chromium PATH", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="hmnist-screenshots-"))
    try:
        work = args.project.resolve() if args.project else run_tryout(tmp / "project")
        port = free_port()
        server = start_server(work / "mlflow.db", port, tmp / "mlflow-server.log")
        try:
            shots = find_pages(f"http://127.0.0.1:{port}", work / "params.yaml")
            saved = shoot(shots, args.out, args.chromium)
        finally:
            stop_mlflow_server(server)
    except (ScreenshotError, AssertionError, requests.RequestException) as err:  # AssertionError: project_copy's git
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            log.info("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for path in saved:
        print(f"{path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
