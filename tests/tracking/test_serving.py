"""What the served model accepts: uint8 pixels or base64-encoded image files, and a clear 400-class error otherwise."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from PIL import Image

from src.prepare.imaging import load_image
from src.tracking.serving import IMAGE_COLUMN, encoded_examples, to_pixels

SIZE = 16


def encoded(img: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture
def photo(tmp_path) -> tuple[bytes, np.ndarray]:
    """A 40x30 RGB JPEG file's bytes and what predict makes of the file."""
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path, format="JPEG")
    return path.read_bytes(), load_image(path, SIZE)


def test_base64_files_decode_exactly_like_predict(photo):
    jpeg, expected = photo
    text = base64.b64encode(jpeg).decode("ascii")
    frame = pd.DataFrame({IMAGE_COLUMN: [text, base64.b64decode(text)]})  # text, or bytes from a binary column
    pixels = to_pixels(frame, SIZE)
    assert pixels.dtype == np.uint8 and pixels.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(pixels[0], expected)
    np.testing.assert_array_equal(pixels[1], expected)
    as_dict = to_pixels({IMAGE_COLUMN: np.array([text])}, SIZE)  # `{"inputs": {"image": [...]}}` arrives so
    np.testing.assert_array_equal(as_dict[0], expected)


def test_any_mode_pillow_reads_is_served_as_rgb():
    grey = Image.fromarray(np.full((20, 20), 200, dtype=np.uint8))
    palette = grey.convert("P")
    transparent = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # laid on white, as predict does
    frame = pd.DataFrame({IMAGE_COLUMN: [encoded(grey, "PNG"), encoded(palette, "GIF"), encoded(transparent, "PNG")]})
    pixels = to_pixels(frame, SIZE)
    assert (pixels[0] == 200).all() and (pixels[1] == 200).all() and (pixels[2] == 255).all()


def test_pixels_pass_through_and_round_trip_the_input_example(photo):
    _, expected = photo
    batch = np.stack([expected, expected])
    np.testing.assert_array_equal(to_pixels(batch, SIZE), batch)
    np.testing.assert_array_equal(to_pixels(batch.astype(np.int64).tolist(), SIZE), batch)  # JSON lists
    np.testing.assert_array_equal(to_pixels(encoded_examples(batch), SIZE), batch)  # PNG is lossless


@pytest.mark.parametrize(
    ("model_input", "message"),
    [
        (pd.DataFrame({IMAGE_COLUMN: ["not base64!"]}), "row 0 of column 'image': not base64"),
        (pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(b"plain text").decode()]}), "row 0 of column 'image': not a"),
        (pd.DataFrame({IMAGE_COLUMN: [""]}), "row 0 of column 'image': not a readable image"),
        (pd.DataFrame({IMAGE_COLUMN: [3]}), "row 0 of column 'image': int"),
        (pd.DataFrame({"pixels": ["x"]}), "send encoded images in a column 'image'"),
        (pd.DataFrame({IMAGE_COLUMN: []}), "column 'image' is empty"),
        (np.zeros((2, SIZE, SIZE), dtype=np.uint8), "expected \\(N, 16, 16, 3\\)"),
        (np.zeros((1, 8, 8, 3), dtype=np.uint8), "shape \\(1, 8, 8, 3\\)"),
        (np.full((1, SIZE, SIZE, 3), 300), "integers in 0..255"),
        ([[[[1, 2, 3]]], [[[1]]]], "ragged"),
    ],
)
def test_bad_input_is_an_invalid_parameter_error_that_says_what_is_wrong(model_input, message):
    with pytest.raises(MlflowException, match=message) as caught:
        to_pixels(model_input, SIZE)
    assert caught.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
    assert caught.value.get_http_status_code() == 400  # what `mlflow models serve` answers


def test_served_model_and_one_logged_before_it_load_back_alike(tmp_path):
    """Registries hold plain pytorch models logged before encoded input was served; both kinds load back."""
    import mlflow.pytorch
    import torch

    from src.config import ModelParams
    from src.errors import UserError
    from src.learn.model import Probabilities, build_model
    from src.tracking.runs import model_requirements
    from src.tracking.serving import load_explainable, load_served, log_served_model

    torch.manual_seed(0)
    model = Probabilities(build_model(ModelParams(name="test_vit", pretrained=False), 32), tta=False).eval()
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("serving")  # not the experiment id an earlier test left active in another store
    with mlflow.start_run():
        served_uri = log_served_model(model, images, model_requirements())
        older_uri = mlflow.pytorch.log_model(
            model, name="older", input_example=images, pip_requirements=model_requirements(), serialization_format="pt2"
        ).model_uri
    with torch.inference_mode():
        expected = model(torch.from_numpy(images)).numpy()
    for uri in (served_uri, older_uri):
        loaded, size = load_served(uri)
        assert size == 32
        with torch.inference_mode():
            np.testing.assert_allclose(loaded(torch.from_numpy(images)).numpy(), expected, atol=1e-5)
    assert mlflow.models.get_model_info(served_uri).metadata["image_size"] == 32
    for uri in (served_uri, older_uri):  # neither carries a checkpoint: no maps, and the error says what to do
        with pytest.raises(UserError, match="carries no checkpoint.*dvc repro evaluate.*--checkpoint"):
            load_explainable(uri)
