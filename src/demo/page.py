"""The demo page as a Flask app: one form, one result. Flask comes with MLflow already, and a page this small needs
no front-end framework: it works without JavaScript (a little script adds drag and drop)."""

from __future__ import annotations

import logging

from flask import Flask, render_template, request

from src.config import CLASSES
from src.demo.analysis import CLASS_NAMES, analyse
from src.demo.loading import ModelSource
from src.errors import UserError
from src.prepare.imaging import ImageReadError

log = logging.getLogger(__name__)
MAX_UPLOAD_MB = 20


def create_app(source: ModelSource) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_MB * 1024 * 1024

    def page(status: int = 200, **shown):
        try:
            loaded = source.get()
            model, decision, missing = loaded.description, loaded.module.decision(), None
        except UserError as err:
            model, decision, missing = None, None, str(err)
            status = 503 if status == 200 else status
        html = render_template(
            "page.html",
            model=model,
            decision=decision,
            missing=missing,
            classes=CLASSES,
            names=CLASS_NAMES,
            max_mb=MAX_UPLOAD_MB,
            **shown,
        )
        return html, status

    @app.get("/")
    def index():
        return page()

    @app.post("/")
    def classify():
        upload = request.files.get("image")
        if upload is None or not upload.filename:
            return page(400, error="Choose an image file first.")
        data = upload.read()
        try:
            result = source.run(lambda model: analyse(model.module, model.size, data))
        except ImageReadError as err:
            reason = str(err).split(": ", 1)[-1]
            return page(400, error=f"{upload.filename} cannot be read as an image ({reason}). Upload a JPEG or PNG.")
        except UserError:
            return page()  # no model: the page says why
        log.info("classified %s: %s %.3f", upload.filename, result.predicted, result.probabilities[result.predicted])
        return page(result=result, filename=upload.filename)

    @app.errorhandler(413)
    def too_large(_):
        return page(413, error=f"That file is over {MAX_UPLOAD_MB} MB. Upload a smaller image.")

    return app
