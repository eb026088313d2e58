"""The page's answers that need no model: no file chosen, a file over the size limit, no model registered."""

from __future__ import annotations

import io
import socket

from src import app
from src.demo.loading import ModelSource
from src.demo.page import MAX_UPLOAD_MB, create_app


def _client(tmp_path):
    source = ModelSource("models:/hmnist-vit@champion", f"sqlite:///{tmp_path / 'mlflow.db'}")  # no store there
    return create_app(source).test_client()


def test_without_a_model_the_page_says_so_and_offers_no_form(tmp_path):
    response = _client(tmp_path).get("/")
    page = response.get_data(as_text=True)
    assert response.status_code == 503
    assert "No model to serve yet" in page and "run `dvc repro` first" in page and 'id="image"' not in page
    assert "not a medical device" in page
    assert not (tmp_path / "mlflow.db").exists()


def test_a_post_without_a_file_is_a_400_that_says_so(tmp_path):
    response = _client(tmp_path).post("/", data={}, content_type="multipart/form-data")
    assert response.status_code == 400 and "Choose an image file first" in response.get_data(as_text=True)


def test_an_upload_over_the_limit_is_refused_before_it_is_read(tmp_path):
    huge = io.BytesIO(b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1))
    response = _client(tmp_path).post("/", data={"image": (huge, "big.tif")}, content_type="multipart/form-data")
    assert response.status_code == 413 and f"over {MAX_UPLOAD_MB} MB" in response.get_data(as_text=True)


def test_a_port_in_use_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app.main(["--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert "Address already in use" in err  # werkzeug's reason, then what to do
    assert f"error: cannot listen on 127.0.0.1:{port}; pass another --port or --host" in err
