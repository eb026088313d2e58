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
from src.learn.ood_guard import GUARD_FILE, load_guard, save_guard
from src.learn.triage import FLAG_COLUMNS, Triage, split_output
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


def save_decision(models: Path, triage: Triage, ckpt: dict) -> None:
    """The decision rule beside best.pt (and the OOD guard, when there is one), so that `src.predict --checkpoint`
    applies what evaluate applied."""
    decision = triage.decision()
    del decision["ood_threshold"]  # stored with the guard
    write_json(models / DECISION_FILE, {**decision, "checkpoint": checkpoint_id(ckpt)})
    (models / GUARD_FILE).unlink(missing_ok=True)  # a guard of an earlier model would no longer match
    if triage.guard is not None:
        save_guard(models / GUARD_FILE, triage.guard, checkpoint_id(ckpt))


def load_decision(checkpoint: Path, ckpt: dict) -> dict:
    """The decision evaluate saved beside this checkpoint; plain argmax when evaluate has not run on it."""
    decision = read_json(Path(checkpoint).parent / DECISION_FILE)
    if decision.get("checkpoint") != checkpoint_id(ckpt):
        return {"tta": False, "temperature": 1.0, "offsets": None}
    return {"temperature": 1.0} | decision  # decisions saved before calibration have no temperature


def load_from_checkpoint(path: Path) -> tuple[Triage, int]:
    """The served model rebuilt from a train checkpoint with the decision and guard evaluate saved beside it,
    and its input size."""
    model, ckpt = load_trained(path)
    decision = load_decision(path, ckpt)
    if decision["offsets"] is None:
        log.warning(
            "no %s for %s (run evaluate): plain probabilities, no TTA, calibration, correction, referral or guard",
            DECISION_FILE,
            path,
        )
    offsets = None if decision["offsets"] is None else torch.tensor(decision["offsets"])
    views = decision.get("tta_views", 8)  # decisions saved before the view count had all 8
    served = Probabilities(model, decision["tta"], offsets, decision["temperature"], views)
    guard = load_guard(Path(path).parent / GUARD_FILE, checkpoint_id(ckpt))
    return Triage(served, decision.get("referral_threshold"), guard).eval(), int(ckpt["config"]["data"]["image_size"])


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
    """Per batch: the readable files, the served answer (class probabilities in CLASSES order, then the triage
    flags where the model has them: see `split_output`), a message per unreadable file."""
    device = next(model.parameters(), torch.empty(0)).device
    steps = tqdm(batches(files, size, batch_size), total=-(-len(files) // batch_size), desc="classify", disable=None)
    for ok, images, errors in steps:
        answer = model(torch.from_numpy(images).to(device)).float().cpu().numpy() if ok else None
        yield ok, answer, errors


def probabilities(
    model: torch.nn.Module, files: list[Path], size: int, batch_size: int = 64
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Class probabilities (CLASSES order) of the readable files, those files, and a message per unreadable one."""
    read, parts, failures = [], [np.empty((0, len(CLASSES)), np.float32)], []
    for ok, answer, errors in scored_batches(model, files, size, batch_size):
        read += ok
        parts += [] if answer is None else [split_output(answer)[0]]
        failures += errors
    return read, np.concatenate(parts), failures


def submission(read: list[Path], answer: np.ndarray, flags: bool = True) -> pd.DataFrame:
    """A served answer per file as ISIC 2018 Task 3 submission rows (image id, then the ISIC class columns), then,
    unless `flags` is False, the triage columns (FLAG_COLUMNS)."""
    probs, triage = split_output(answer)
    columns = [CLASSES.index(c) for c in ISIC_COLUMNS.values()]
    frame = pd.DataFrame(probs[:, columns], columns=list(ISIC_COLUMNS))
    frame.insert(0, "image", [p.stem for p in read])
    return pd.concat([frame, triage], axis=1) if flags else frame


def classify(
    model: torch.nn.Module, files: list[Path], size: int, batch_size: int = 64
) -> tuple[pd.DataFrame, list[str]]:
    """The served answer per readable file as a submission frame with the triage columns, and one message per
    unreadable file."""
    frames, failures = [], []
    for read, answer, errors in scored_batches(model, files, size, batch_size):
        frames += [submission(read, answer)] if read else []
        failures += errors
    if not frames:
        return submission([], np.empty((0, len(CLASSES)), np.float32)), failures
    return pd.concat(frames, ignore_index=True), failures


def predict_files(inputs: list[Path], output: Path, model: torch.nn.Module, size: int, flags: bool = True) -> int:
    """Write the submission CSV batch by batch (memory stays flat for any number of files; the file appears only
    when complete); returns how many files could not be read. `flags`: also the triage columns (referred,
    out_of_distribution, ood_distance); without them the file is exactly an ISIC 2018 submission."""
    files = find_images(inputs)
    written = failed = 0
    with atomic_path(output) as tmp, tmp.open("w", newline="") as out:
        out.write(",".join(["image", *ISIC_COLUMNS, *(FLAG_COLUMNS if flags else ())]) + "\n")
        for read, answer, errors in scored_batches(model, files, size):
            if read:
                submission(read, answer, flags).to_csv(out, header=False, index=False)
            written, failed = written + len(read), failed + len(errors)
            for message in errors:
                log.error("skipped %s", message)
    log.info("wrote %d predictions to %s (%d unreadable)", written, output, failed)
    return failed
