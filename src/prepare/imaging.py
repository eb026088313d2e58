"""The one place that turns an image file into model-sized pixels (split cache and predict share it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
    """An image file that cannot be decoded."""


def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` and centre-crop a square: uint8 array (size, size, 3).

    Dermoscopy frames are 4:3 with the lesion centred, so a centre crop keeps the lesion and its
    proportions; squashing the frame would distort lesion shape, a diagnostic cue.
    """
    img = ImageOps.exif_transpose(img).convert("RGB")
    return np.asarray(ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC), dtype=np.uint8)


def load_image(path: Path | str, size: int) -> np.ndarray:
    """Decode an image file into a (size, size, 3) uint8 array; ImageReadError names the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return fit_square(img, size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from err
