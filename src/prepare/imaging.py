"""The one place that turns an image file into model-sized pixels (split cache and predict share it)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
    """An image file that cannot be decoded."""


def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` and centre-crop a square: uint8 array (size, size, 3).

    Dermoscopy frames are 4:3 with the lesion centred, so a centre crop keeps the lesion and its
    proportions; squashing the frame would distort lesion shape, a diagnostic cue.
    """
    img = to_rgb(ImageOps.exif_transpose(img))
    return np.asarray(ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC), dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit and 32-bit grey scaled down (a plain convert would clip them to white),
    transparency laid on white (a plain convert keeps whatever colour the transparent pixels hold)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        return Image.fromarray(np.clip(pixels / top * 255 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: Path | str | BinaryIO, size: int) -> np.ndarray:
    """Decode an image file (a path or an open binary file) into a (size, size, 3) uint8 array; ImageReadError
    names the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return fit_square(img, size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from err
