"""One upload through the model: the served probabilities, and the image and map the page shows."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from src.config import CLASSES, ModelParams
from src.demo.analysis import analyse, overlay
from src.learn.explain import DEFAULT_METHOD, explain_map
from src.learn.model import Probabilities, build_model
from src.prepare.imaging import ImageReadError, load_image


@pytest.fixture
def served():
    torch.manual_seed(0)
    classifier = build_model(ModelParams(name="test_vit", pretrained=False, patch_size=8), 32)
    return Probabilities(classifier, tta=True, temperature=1.7).eval()


def _jpeg(size=(60, 45)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_an_upload_gets_the_served_probabilities_and_a_map_at_the_model_size(served):
    data = _jpeg()
    result = analyse(served, 32, data)
    image = load_image(io.BytesIO(data), 32)  # decoded as predict decodes a file
    with torch.inference_mode():
        expected = served(torch.from_numpy(image[None])).numpy()[0]
    assert list(result.probabilities) == list(CLASSES)
    np.testing.assert_allclose(list(result.probabilities.values()), expected, atol=1e-6)
    assert result.predicted == CLASSES[int(expected.argmax())]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.image_png))))
    assert np.array_equal(shown, image)  # lossless: what the model saw
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.map_png))))
    assert drawn.shape == (32, 32, 3) and not np.array_equal(drawn, image)
    heat = explain_map(served.classifier, image[None].copy(), DEFAULT_METHOD, expected.argmax(keepdims=True))[0]
    assert np.array_equal(drawn, overlay(image, heat))  # the default method's map of the served prediction


def test_the_overlay_blends_the_map_into_the_image():
    image = np.full((4, 4, 3), 200, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    blended = overlay(image, heat)
    assert blended.dtype == np.uint8 and blended.shape == image.shape
    assert blended[0, 0, 0] > blended[0, 0, 2]  # the hottest point is red in the jet scale
    assert blended[3, 3, 2] > blended[3, 3, 0]  # the coldest blue


def test_a_file_that_is_no_image_is_an_image_read_error(served):
    with pytest.raises(ImageReadError):
        analyse(served, 32, b"these are notes, not a photo")
