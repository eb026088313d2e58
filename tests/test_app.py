"""The demo page end to end: `python -m src.app` over the pipeline's registry, driven by a real headless Chromium
(Playwright): upload and drop images, read the probabilities and the map from the page, and the two clear messages."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import requests

from src.config import CLASSES
from src.learn.ood_probes import probe_images
from tests.conftest import REPO, free_port, project_env, stop_mlflow_server

pytestmark = pytest.mark.e2e
CHAMPION = "models:/hmnist-vit-synthetic@champion"  # the try-out registers its synthetic model under this name
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts"))  # screenshots kept after the run


def start_demo(cwd: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m src.app` as a user starts it; returns once the page answers."""
    port = free_port()
    env = project_env() | {"PYTHONPATH": str(cwd if (cwd / "src").exists() else REPO)}
    log = cwd / f"demo-{port}.log"
    with log.open("wb") as out:
        cmd = [sys.executable, "-m", "src.app", "--port", str(port), *args]
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            requests.get(url, timeout=60)  # the first request loads the model
            return proc, url
        except requests.RequestException:
            time.sleep(0.5)
    stop_mlflow_server(proc, signal.SIGKILL)
    pytest.fail(f"the demo page did not start: {log.read_text(errors='replace')[-2000:]}")


def chromium_path() -> str | None:
    """A system Chromium (Debian's `chromium`, which .ci/run installs); None lets Playwright use its own build."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        except Error as err:
            pytest.fail(
                f"no Chromium for the browser test: `apt-get install chromium` or `playwright install chromium` ({err})"
            )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def demo(pipeline):
    proc, url = start_demo(pipeline, "--model", CHAMPION)
    yield url
    stop_mlflow_server(proc)


def shown_probabilities(page) -> dict[str, float]:
    bars = page.locator(".bar")
    return {
        bars.nth(i).get_attribute("data-class"): float(bars.nth(i).get_attribute("data-probability"))
        for i in range(bars.count())
    }


def test_the_page_classifies_an_uploaded_or_dropped_image_like_evaluate(demo, browser, pipeline):
    expected = pd.read_csv(pipeline / "reports/predictions.csv").set_index("image_id")
    files = [pipeline / "data/raw/images" / f"{image_id}.jpg" for image_id in expected.index[:2]]
    page = browser.new_page()
    page.goto(demo)
    assert "not a medical device" in page.inner_text("#disclaimer")
    assert page.inner_text("#model").startswith("Model: hmnist-vit-synthetic version 1 (champion), run ")

    page.set_input_files("#image", str(files[0]))  # choosing a file sends the form
    page.wait_for_selector("#result")
    shown = shown_probabilities(page)
    assert list(shown) == list(CLASSES)
    for name in CLASSES:  # the calibrated probabilities evaluate reported for this image, TTA included
        assert shown[name] == pytest.approx(expected.loc[files[0].stem, name], abs=1e-5)
    assert files[0].name in page.inner_text("#result h2")
    decision = json.loads((pipeline / "models/decision.json").read_text())  # what the page says it applied
    assert ("8 flipped and rotated views" in page.inner_text("#decision")) == decision["tta"]
    assert ("with a temperature of" in page.inner_text("#decision")) == (decision["temperature"] != 1.0)
    top = max(shown, key=shown.get)
    assert page.get_attribute(".bar.top", "data-class") == top and f"({top})" in page.inner_text("#result h2")
    assert page.evaluate("document.getElementById('map').naturalWidth") == 32  # the map at the model's size
    assert page.locator("#ood").count() == int(expected.loc[files[0].stem, "out_of_distribution"])  # evaluate's flags
    referred = page.locator("#referred.refer").count() == 1
    assert referred == bool(expected.loc[files[0].stem, "referred"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-page.png"), full_page=True)

    # drag and drop: the page's script sends what was dropped
    encoded = base64.b64encode(files[1].read_bytes()).decode("ascii")
    dropped = page.evaluate_handle(
        """(b64) => { const t = new DataTransfer(); const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        t.items.add(new File([bytes], 'dropped.jpg', {type: 'image/jpeg'})); return t; }""",
        encoded,
    )
    with page.expect_navigation():
        page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    assert "dropped.jpg" in page.inner_text("#result h2")
    for name in CLASSES:
        assert shown_probabilities(page)[name] == pytest.approx(expected.loc[files[1].stem, name], abs=1e-5)
    page.close()


def test_a_photo_that_is_no_dermoscopy_is_flagged_plainly_as_evaluate_flagged_it(demo, browser, pipeline, tmp_path):
    probes = pd.read_csv(pipeline / "reports/ood.csv").set_index("name")
    flagged = probes.index[(probes["kind"] == "photo") & probes["flagged"].astype(bool)]
    assert len(flagged), "the guard flags none of the photographs"
    photo = tmp_path / f"{flagged[0]}.png"
    photo.write_bytes(next(data for _, name, data in probe_images() if name == flagged[0]))
    page = browser.new_page()
    page.goto(demo)
    with page.expect_navigation():
        page.set_input_files("#image", str(photo))
    assert "This does not look like a dermoscopy image." in page.inner_text("#ood")
    distance = float(page.inner_text("#ood").split("distance ")[1].split(" ")[0])
    assert distance == pytest.approx(probes.loc[flagged[0], "ood_distance"], abs=0.06)
    page.close()


def test_a_file_that_is_no_image_gets_a_clear_message(demo, browser, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("these are notes, not a photo")
    page = browser.new_page()
    page.goto(demo)
    with page.expect_navigation():
        page.set_input_files("#image", str(notes))
    assert "notes.jpg cannot be read as an image" in page.inner_text("#error")
    assert page.locator("#result").count() == 0
    assert page.locator("#image").count() == 1  # the form is still there for the next try
    page.close()


def test_without_a_registered_model_the_page_says_what_to_do(browser, tmp_path):
    (tmp_path / "params.yaml").write_text("")  # default params: sqlite:///mlflow.db, which does not exist here
    proc, url = start_demo(tmp_path)
    try:
        page = browser.new_page()
        response = page.goto(url)
        assert response.status == 503
        message = page.inner_text("#missing")
        assert "No model to serve yet" in message and "run `dvc repro` first" in message
        assert page.locator("#image").count() == 0
        assert "not a medical device" in page.inner_text("#disclaimer")
        page.close()
    finally:
        stop_mlflow_server(proc)
    assert not (tmp_path / "mlflow.db").exists()  # looking for a model created no empty store
