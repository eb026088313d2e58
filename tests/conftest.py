"""Shared fixtures: a tiny HAM10000-shaped dataset and params shrunk for the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from src.config import Params
from src.synthetic import make_dataset

os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A raw-layout dataset (metadata.csv + images/) with ~90 lesions and two planted duplicate photos."""
    out = tmp_path_factory.mktemp("raw")
    make_dataset(out, n_lesions=90, seed=1, duplicates=2)
    return out


@pytest.fixture
def tiny_params(tmp_path) -> Params:
    """Params for a test_vit at 32 px writing everything under tmp_path."""
    return Params().model_copy(
        update={
            "paths": Params().paths.model_copy(
                update={
                    k: tmp_path / k for k in ("raw", "downloads", "splits", "cache", "models", "reports")
                }
            ),
            "data": Params().data.model_copy(update={"source": "synthetic", "image_size": 32}),
            "model": Params().model.model_copy(update={"name": "test_vit", "pretrained": False}),
            "train": Params().train.model_copy(
                update={"epochs": 2, "batch_size": 16, "warmup_epochs": 0.5, "num_workers": 0, "threads": 2}
            ),
            "tracking": Params().tracking.model_copy(
                update={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
            ),
        }
    )
