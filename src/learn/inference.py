"""Inference: rebuild a trained model from its checkpoint and classify image files into an ISIC 2018 Task 3 frame."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from src.config import CLASSES, ModelParams
from src.errors import UserError
from src.fileio import atomic_path, read_json, write_json
from src.learn.checkpoint import load_checkpoint, load_weights
from src.learn.model import Classifier, Probabilities, build_model
from src.prepare.imaging import ImageReadError, load_image

log = logging.getLogger(__name__)
# ISIC 2018 Task 3 submission columns, mapped to our (alphabetical) class order.
ISIC_COLUMNS = {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AKIEC": "akiec", "BKL": "bkl", "DF": "df", "VASC": "vasc"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
CHECKPOINT_FILE = "best.pt"  # the weights training kept, in the models folder
DECISION_FILE = "decision.json"  # written by evaluate beside best.pt


def load_trained(path: Path) -> tuple[Classifier, dict]:
    """Rebuild the model a checkpoint records (not today's params) and load its weights."""
    ckpt = load_checkpoint(path)
    model_params = ModelParams(**{**ckpt["config"]["model"], "pretrained": False, "weights": None})
    data = ckpt["config"]["data"]  # checkpoints from before colour constancy have no power: it was off
    model = build_model(model_params, data["image_size"], data.get("shades_of_gray_power"))
    load_weights(model, ckpt, path)
    return model.eval(), ckpt


def find_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            files.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    return files


def checkpoint_id(ckpt: dict) -> str:
    """Which training run and epoch made a checkpoint, so a decision is never applied to another model."""
    return f"{ckpt.get('mlflow_run_id', '?')}:{ckpt.get('epoch', '?')}"


def save_decision(path: Path, served: Probabilities, ckpt: dict) -> None:
    """The decision rule beside best.pt, so that `src.predict --checkpoint` applies what evaluate applied."""
    write_json(path, {**served.decision(), "checkpoint": checkpoint_id(ckpt)})


def load_decision(checkpoint: Path, ckpt: dict) -> dict:
    """The decision evaluate saved beside this checkpoint; plain argmax when evaluate has not run on it."""
    decision = read_json(Path(checkpoint).parent / DECISION_FILE)
    if decision.get("checkpoint") != checkpoint_id(ckpt):
        return {"tta": False, "temperature": 1.0, "offsets": None}
    return {"temperature": 1.0} | decision  # decisions saved before calibration have no temperature


def load_from_checkpoint(path: Path) -> tuple[torch.nn.Module, int]:
    """A Probabilities model rebuilt from a train checkpoint with the decision evaluate saved beside it,
    and its input size."""
    model, ckpt = load_trained(path)
    decision = load_decision(path, ckpt)
    if decision["offsets"] is None:
        log.warning(
            "no %s for %s (run evaluate): plain probabilities, no TTA, calibration or correction", DECISION_FILE, path
        )
    offsets = None if decision["offsets"] is None else torch.tensor(decision["offsets"])
    served = Probabilities(model, decision["tta"], offsets, decision["temperature"])
    return served.eval(), int(ckpt["config"]["data"]["image_size"])


def batches(files: list[Path], size: int, batch_size: int) -> Iterator[tuple[list[Path], np.ndarray, list[str]]]:
    """Decode files in batches with the evaluation preprocessing; unreadable files are reported, not fatal."""
    for start in range(0, len(files), batch_size):
        ok, arrays, errors = [], [], []
        for path in files[start : start + batch_size]:
            try:
                arrays.append(load_image(path, size))
                ok.append(path)
            except ImageReadError as err:
                errors.append(str(err))
        yield ok, (np.stack(arrays) if arrays else np.empty((0, size, size, 3), np.uint8)), errors


@torch.inference_mode()
def scored_batches(
    model: torch.nn.Module, files: list[Path], size: int, batch_size: int = 64
) -> Iterator[tuple[list[Path], np.ndarray, list[str]]]:
    """Per batch: the readable files, their class probabilities (CLASSES order), a message per unreadable file."""
    device = next(model.parameters(), torch.empty(0)).device
    steps = tqdm(batches(files, size, batch_size), total=-(-len(files) // batch_size), desc="classify", disable=None)
    for ok, images, errors in steps:
        probs = model(torch.from_numpy(images).to(device)).float().cpu().numpy() if ok else _NO_PROBS
        yield ok, probs, errors


_NO_PROBS = np.empty((0, len(CLASSES)), np.float32)


def probabilities(
    model: torch.nn.Module, files: list[Path], size: int, batch_size: int = 64
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Class probabilities (CLASSES order) of the readable files, those files, and a message per unreadable one."""
    read, parts, failures = [], [_NO_PROBS], []
    for ok, probs, errors in scored_batches(model, files, size, batch_size):
        read += ok
        parts.append(probs)
        failures += errors
    return read, np.concatenate(parts), failures


def submission(read: list[Path], probs: np.ndarray) -> pd.DataFrame:
    """Probabilities per file as ISIC 2018 Task 3 submission rows (image id, then the ISIC class columns)."""
    columns = [CLASSES.index(c) for c in ISIC_COLUMNS.values()]
    frame = pd.DataFrame(probs[:, columns], columns=list(ISIC_COLUMNS))
    frame.insert(0, "image", [p.stem for p in read])
    return frame


def classify(
    model: torch.nn.Module, files: list[Path], size: int, batch_size: int = 64
) -> tuple[pd.DataFrame, list[str]]:
    """Probabilities per readable file as an ISIC submission frame, and one message per unreadable file."""
    read, probs, failures = probabilities(model, files, size, batch_size)
    return submission(read, probs), failures


def predict_files(inputs: list[Path], output: Path, model: torch.nn.Module, size: int) -> int:
    """Write the submission CSV batch by batch (memory stays flat for any number of files; the file appears only
    when complete); returns how many files could not be read."""
    files = find_images(inputs)
    written = failed = 0
    with atomic_path(output) as tmp, tmp.open("w", newline="") as out:
        out.write(",".join(["image", *ISIC_COLUMNS]) + "\n")
        for read, probs, errors in scored_batches(model, files, size):
            submission(read, probs).to_csv(out, header=False, index=False)
            written, failed = written + len(read), failed + len(errors)
            for message in errors:
                log.error("skipped %s", message)
    log.info("wrote %d predictions to %s (%d unreadable)", written, output, failed)
    return failed
