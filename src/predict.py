"""Classify image files with the champion model (or a model URI or checkpoint) into an ISIC 2018 Task 3 CSV."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from src import cli
from src.errors import UserError
from src.fileio import write_text
from src.imaging import ImageReadError, load_image

log = logging.getLogger(__name__)
# ISIC 2018 Task 3 submission columns, mapped to our (alphabetical) class order.
ISIC_COLUMNS = {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AKIEC": "akiec", "BKL": "bkl", "DF": "df", "VASC": "vasc"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


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


def load_from_checkpoint(path: Path) -> tuple[torch.nn.Module, int]:
    """A Probabilities model rebuilt from a train checkpoint with the decision evaluate saved beside it,
    and its input size."""
    from src.evaluate import load_decision, load_trained
    from src.model import Probabilities

    model, ckpt = load_trained(path)
    decision = load_decision(path)
    if decision["offsets"] is None:
        log.warning("no decision.json beside %s (run evaluate): plain argmax without TTA or prior correction", path)
    offsets = None if decision["offsets"] is None else torch.tensor(decision["offsets"])
    return Probabilities(model, decision["tta"], offsets).eval(), int(ckpt["config"]["data"]["image_size"])


def load_from_mlflow(model_uri: str, tracking_uri: str) -> tuple[torch.nn.Module, int]:
    """The registered/logged model and its input size, read from the model's signature."""
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        info = mlflow.models.get_model_info(model_uri)
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except (MlflowException, OSError) as err:
        raise UserError(
            f"cannot load model {model_uri} from {tracking_uri}: {err}; run `dvc repro` to "
            "train and register one, or pass --checkpoint models/best.pt"
        ) from None
    size = int(info.signature.inputs.inputs[0].shape[1])
    return model, size


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
def classify(
    model: torch.nn.Module, files: list[Path], size: int, batch_size: int = 64
) -> tuple[pd.DataFrame, list[str]]:
    """Probabilities per readable file as an ISIC submission frame, and one message per unreadable file."""
    from src.config import CLASSES

    device = next(model.parameters(), torch.empty(0)).device
    rows, failures = [], []
    for ok, images, errors in batches(files, size, batch_size):
        failures += errors
        if ok:
            probs = model(torch.from_numpy(images).to(device)).float().cpu().numpy()
            rows += [(p.stem, *(probs[i, CLASSES.index(c)] for c in ISIC_COLUMNS.values())) for i, p in enumerate(ok)]
    return pd.DataFrame(rows, columns=["image", *ISIC_COLUMNS]), failures


def predict_files(inputs: list[Path], output: Path, model: torch.nn.Module, size: int) -> int:
    """Write the submission CSV; returns how many files could not be read."""
    frame, failures = classify(model, find_images(inputs), size)
    for message in failures:
        log.error("skipped %s", message)
    write_text(output, frame.to_csv(index=False))
    log.info("wrote %d predictions to %s (%d unreadable)", len(frame), output, len(failures))
    return len(failures)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("Classify images with the champion model; writes an ISIC 2018 Task 3 submission CSV.")
    p.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders")
    p.add_argument("-o", "--output", type=Path, default=Path("predictions.csv"), help="CSV to write")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", help="MLflow model URI (default: models:/<tracking.registered_model>@champion)")
    group.add_argument("--checkpoint", type=Path, help="a train checkpoint such as models/best.pt instead of MLflow")
    args = p.parse_args(argv)

    def body() -> int:
        params = cli.load(args)
        if args.checkpoint:
            model, size = load_from_checkpoint(args.checkpoint)
        else:
            from src.tracking import tracking_uri

            uri = args.model or f"models:/{params.tracking.registered_model}@champion"
            model, size = load_from_mlflow(uri, tracking_uri(params.tracking))
        failed = predict_files(args.inputs, args.output, model, size)
        print(args.output)
        return 2 if failed else 0

    return cli.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
