"""One uploaded image through the model, as the demo page shows it: calibrated probabilities and an explanation map."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from src.config import CLASSES
from src.learn.explain import DEFAULT_METHOD, METHODS, check_explainable, explain_map
from src.prepare.imaging import load_image

CLASS_NAMES = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
MAP_OPACITY = 0.45


@dataclass(frozen=True)
class Analysis:
    probabilities: dict[str, float]  # CLASSES order: what the served model returns for this image
    image_png: str  # base64 PNG of the image as the model saw it (decoded, resized)
    map_png: str  # base64 PNG of the same image with its explanation map (explain.DEFAULT_METHOD) laid over it
    map_method: str = METHODS[DEFAULT_METHOD]  # what drew the map, for its caption

    @property
    def predicted(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)


def analyse(model: torch.nn.Module, size: int, data: bytes) -> Analysis:
    """Decode the upload exactly as predict decodes a file (ImageReadError if it is no image), then classify and
    explain it."""
    image = load_image(io.BytesIO(data), size)
    batch = image[None].copy()  # writable: torch would warn about the decoder's read-only buffer
    with torch.inference_mode():
        probs = model(torch.from_numpy(batch)).float().numpy()[0]
    heat = explain_map(check_explainable(model), batch, classes=probs[None].argmax(axis=1))[0]
    return Analysis(
        probabilities={name: float(p) for name, p in zip(CLASSES, probs, strict=True)},
        image_png=_png(image),
        map_png=_png(overlay(image, heat)),
    )


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The map in the jet colour scale blended over the image, as evaluate's gallery draws it."""
    colours = colormaps["jet"](heat)[..., :3] * 255
    return (image * (1 - MAP_OPACITY) + colours * MAP_OPACITY).round().astype(np.uint8)


def _png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
