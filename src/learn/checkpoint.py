"""Checkpoints are plain dicts (tensors, numbers, strings) saved atomically and loaded with weights_only."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from src.errors import UserError
from src.fileio import atomic_path

RESUME_DIR = "checkpoints"  # in the models folder: training's state after every epoch (not a DVC output)
LAST_FILE = "last.pt"  # in RESUME_DIR: what a stopped run resumes from


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by save_checkpoint; a missing or corrupt file is a CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found; run `python -m src.train` (or `dvc repro train`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: corrupt or not a checkpoint ({err}); delete it and retrain") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model'/'config' entries)")
    return state


def load_weights(model: torch.nn.Module, state: dict, path: Path) -> None:
    """Load a checkpoint's weights; a different architecture is a clear error, not a shape traceback."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        made_for = state.get("config", {}).get("model", {}).get("name", "?")
        raise CheckpointError(
            f"{path}: weights do not fit this model (checkpoint made for model {made_for!r}): "
            f"{str(err).splitlines()[0]}"
        ) from err
