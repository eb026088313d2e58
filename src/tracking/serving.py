"""The served MLflow model: images in; out, per image, the class probabilities (columns in CLASSES order) and the
triage flags `referred`, `out_of_distribution` and `ood_distance` (src.learn.triage).

It takes either a batch of uint8 images already at the model's size (`{"inputs": [N][S][S][3]}`, preprocessed like
`src.prepare.imaging.load_image`) or encoded image files, base64 JPEG/PNG/any format Pillow reads, in a column
`image` (`{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}`), which it decodes exactly as
predict does. Bad input is an MLflow INVALID_PARAMETER_VALUE error, which `mlflow models serve` answers with a 400
naming the row and what is wrong. The model it runs is the exported `Triage` module (pt2), kept inside as
an `mlflow.pytorch` model. Beside it the model carries the train checkpoint and evaluate's decision rule (artifact
`checkpoint`): an export keeps no layers to hook, so explanation maps (predict --explain, the demo page) rebuild the
same model in eager form from those.
"""

from __future__ import annotations

import base64
import binascii
import io
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from src.config import CLASSES
from src.errors import UserError
from src.learn.inference import CHECKPOINT_FILE, DECISION_FILE, load_from_checkpoint
from src.learn.ood_guard import GUARD_FILE
from src.learn.triage import split_output
from src.prepare.imaging import ImageReadError, load_image

IMAGE_COLUMN = "image"
SRC = Path(__file__).resolve().parents[1]  # the package travels with the model, so any server can unpickle it


def bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_image(value: object, row: int, size: int) -> np.ndarray:
    """One encoded image (base64 text, or bytes as MLflow hands over a binary column) -> (size, size, 3) uint8."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise bad_input(f"row {row} of column '{IMAGE_COLUMN}': not base64 text; send base64 JPEG/PNG") from None
    if not isinstance(value, bytes | bytearray):
        raise bad_input(f"row {row} of column '{IMAGE_COLUMN}': {type(value).__name__}, expected base64 JPEG/PNG")
    try:
        return load_image(io.BytesIO(value), size)
    except ImageReadError as err:
        reason = str(err).split(": ", 1)[-1]
        raise bad_input(f"row {row} of column '{IMAGE_COLUMN}': {reason}") from None


def check_pixels(images: np.ndarray, size: int) -> np.ndarray:
    """A uint8 NHWC batch at the model's size, or a clear error."""
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise bad_input(f"pixel input of shape {images.shape}: expected (N, {size}, {size}, 3) uint8 images")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.number) or images.min() < 0 or images.max() > 255:
            raise bad_input("pixel input: values must be integers in 0..255")
        images = images.astype(np.uint8)
    return images


def to_pixels(model_input: object, size: int) -> np.ndarray:
    """Whatever the server parsed (DataFrame, dict of columns, array) -> a uint8 NHWC batch."""
    if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        model_input = pd.DataFrame({IMAGE_COLUMN: list(np.atleast_1d(model_input[IMAGE_COLUMN]))})
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise bad_input(f"columns {list(model_input.columns)}: send encoded images in a column '{IMAGE_COLUMN}'")
        column = model_input[IMAGE_COLUMN]
        if column.empty:
            raise bad_input(f"column '{IMAGE_COLUMN}' is empty")
        return np.stack([decode_image(value, row, size) for row, value in enumerate(column)])
    try:
        images = np.asarray(model_input)
    except ValueError:
        raise bad_input(f"pixel input is ragged: expected (N, {size}, {size}, 3) uint8 images") from None
    return check_pixels(images, size)


class ServedImages(mlflow.pyfunc.PythonModel):
    """The pyfunc that `mlflow models serve` runs; `model` is the exported Triage module."""

    # predict takes pixels or encoded files, which no single type hint describes; without this MLflow warns about
    # the missing hint in every process that imports this class (predict, evaluate)
    _skip_type_hint_validation = True

    def __init__(self, size: int):
        self.size = size
        self.model = None
        self.checkpoint_dir = None

    def load_context(self, context) -> None:
        import mlflow.pytorch

        self.model = mlflow.pytorch.load_model(context.artifacts["probabilities"], map_location="cpu")
        self.checkpoint_dir = context.artifacts.get("checkpoint")  # absent in models logged before maps

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = to_pixels(model_input, self.size)
        with torch.inference_mode():
            return answer_frame(self.model(torch.from_numpy(images)).numpy())


def answer_frame(answer: np.ndarray) -> pd.DataFrame:
    """The served answer with named columns: the classes' probabilities, then the triage flags."""
    probs, flags = split_output(answer)
    return pd.concat([pd.DataFrame(probs, columns=list(CLASSES)), flags], axis=1)


def encoded_examples(images: np.ndarray) -> pd.DataFrame:
    """The input example: the images as base64 PNG, the form a client most likely sends."""

    def png(image: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    return pd.DataFrame({IMAGE_COLUMN: [png(image) for image in images]})


def log_served_model(
    model: torch.nn.Module, example: np.ndarray, requirements: list[str], checkpoint_dir: Path | None = None
) -> str:
    """Log the served model (see the module docstring) to the active run; returns its URI. `checkpoint_dir` holds
    the train checkpoint and decision file that `model` was built from (carried for explanation maps).

    No signature: one signature cannot say "pixels or encoded files", and MLflow would refuse the other form. What
    each form must look like is checked by `to_pixels` instead, and the input size is in the model's metadata.
    """
    import mlflow.pytorch

    model = model.cpu().eval()
    size = int(example.shape[1])
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "probabilities"
        mlflow.pytorch.save_model(  # pt2 export traces with the example: it needs a batch >= 2
            model,
            exported,
            input_example=example,
            signature=infer_signature(example, output),
            pip_requirements=requirements,
            serialization_format="pt2",
        )
        artifacts = {"probabilities": str(exported)}
        if checkpoint_dir is not None:
            artifacts["checkpoint"] = str(_copy_checkpoint(Path(checkpoint_dir), Path(tmp) / "checkpoint"))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ServedImages(size),
            artifacts=artifacts,
            code_paths=[str(SRC)],
            input_example=encoded_examples(example),
            signature=False,
            pip_requirements=requirements,
            metadata={"image_size": size, "input": f"uint8 (N, {size}, {size}, 3) or column '{IMAGE_COLUMN}' base64"},
        )
    return info.model_uri


def _copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in (CHECKPOINT_FILE, DECISION_FILE, GUARD_FILE):
        if name != GUARD_FILE or (source / name).exists():  # evaluate fits no guard when evaluate.ood_keep is null
            shutil.copy2(source / name, target / name)
    return target


def load_explainable(model_uri: str) -> tuple[torch.nn.Module, int]:
    """The logged model rebuilt in eager form from the checkpoint it carries (the same weights and decision as
    its export), so attention can be recorded; a model logged without one is a UserError."""
    served = mlflow.pyfunc.load_model(model_uri)
    try:
        checkpoint_dir = getattr(served.unwrap_python_model(), "checkpoint_dir", None)
    except MlflowException:  # a plain pytorch model, registered before this pyfunc
        checkpoint_dir = None
    if checkpoint_dir is None:
        raise UserError(
            f"{model_uri} carries no checkpoint to draw attention maps from (logged before maps were added): rerun "
            "`dvc repro evaluate` to log it again, or pass --checkpoint models/best.pt"
        )
    return load_from_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE)


def load_served(model_uri: str) -> tuple[torch.nn.Module, int]:
    """The torch module and input size of a logged model: this module's pyfunc, or an older plain pytorch one."""
    import mlflow.pytorch

    info = mlflow.models.get_model_info(model_uri)
    if "pytorch" in info.flavors:  # registered before encoded input was served
        return mlflow.pytorch.load_model(model_uri, map_location="cpu"), int(info.signature.inputs.inputs[0].shape[1])
    served = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return served.model, served.size
