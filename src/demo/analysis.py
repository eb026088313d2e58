"""One uploaded image through the model, as the demo page shows it: calibrated probabilities, the triage flags and an
explanation map."""

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
from src.learn.triage import split_output
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
    referred: bool = False  # the top probability is below the referral threshold
    out_of_distribution: bool = False  # the OOD guard finds it unlike the training images
    ood_distance: float = float("nan")

    @property
    def predicted(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)


def analyse(model: torch.nn.Module, size: int, data: bytes) -> Analysis:
    """Decode the upload exactly as predict decodes a file (ImageReadError if it is no image), then classify and
    explain it."""
    image = load_image(io.BytesIO(data), size)
    batch = image[None].copy()  # writable: torch would warn about the decoder's read-only buffer
    with torch.inference_mode():
        probs, flags = split_output(model(torch.from_numpy(batch)).float().numpy())
    heat = explain_map(check_explainable(model), batch, classes=probs.argmax(axis=1))[0]
    return Analysis(
        probabilities={name: float(p) for name, p in zip(CLASSES, probs[0], strict=True)},
        image_png=_png(image),
        map_png=_png(overlay(image, heat)),
        referred=bool(flags["referred"].iloc[0]),
        out_of_distribution=bool(flags["out_of_distribution"].iloc[0]),
        ood_distance=float(flags["ood_distance"].iloc[0]),
    )


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The map in the jet colour scale blended over the image, as evaluate's gallery draws it."""
    colours = colormaps["jet"](heat)[..., :3] * 255
    return (image * (1 - MAP_OPACITY) + colours * MAP_OPACITY).round().astype(np.uint8)


def _png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
