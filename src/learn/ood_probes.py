"""Images that are no dermoscopy at all, to measure the OOD guard on: real photographs that scikit-learn and
scikit-image ship in their package data (so every run scores the same pixels, offline), and generated screenshots,
text and flat colour, the non-images a demo page receives."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

# scikit-image's photographs (skimage.data): people, animals, objects, textures, microscopy, a fundus photograph
SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "cat",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "brick",
    "grass",
    "gravel",
    "coins",
    "moon",
    "clock",
)
FLAT_COLOURS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "red": (200, 30, 30),
    "blue": (30, 60, 200),
    "skin": (224, 172, 154),
}


def probe_images() -> list[tuple[str, str, bytes]]:
    """(kind, name, PNG bytes) per probe image; kind is `photo` (real photographs) or `generated`."""
    photos = [(f"sklearn_{name}", image) for name, image in _sklearn_photos()]
    photos += [(f"skimage_{name}", _rgb(getattr(_skimage_data(), name)())) for name in SKIMAGE_PHOTOS]
    generated = [("screenshot", _screenshot()), ("text", _text_page()), ("chart", _chart())]
    generated += [(f"flat_{name}", np.full((225, 300, 3), rgb, np.uint8)) for name, rgb in FLAT_COLOURS.items()]
    return [("photo", n, _png(i)) for n, i in photos] + [("generated", n, _png(i)) for n, i in generated]


def _sklearn_photos() -> list[tuple[str, np.ndarray]]:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    names = [name.rsplit("/", 1)[-1].removesuffix(".jpg") for name in bunch.filenames]
    return list(zip(names, bunch.images, strict=True))


def _skimage_data():
    import skimage.data

    return skimage.data


def _rgb(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.uint8) * 255 if image.dtype == bool else image
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def _drawn(draw_on: Callable[[ImageDraw.ImageDraw], None], background=(255, 255, 255)) -> np.ndarray:
    canvas = Image.new("RGB", (400, 300), background)
    draw_on(ImageDraw.Draw(canvas))
    return np.asarray(canvas)


def _screenshot() -> np.ndarray:
    """A desktop window: title bar, sidebar, buttons and lines of text."""

    def draw(d: ImageDraw.ImageDraw) -> None:
        d.rectangle((0, 0, 400, 28), fill=(45, 62, 80))
        d.text((10, 8), "Inbox - Mail", fill=(255, 255, 255))
        d.rectangle((0, 28, 90, 300), fill=(236, 239, 242))
        for row in range(8):
            d.text((8, 40 + 30 * row), f"Folder {row}", fill=(40, 40, 40))
            d.text((100, 40 + 30 * row), f"Meeting notes {row}: agenda and minutes", fill=(20, 20, 20))
        d.rectangle((300, 260, 390, 290), fill=(21, 101, 192))
        d.text((320, 268), "Send", fill=(255, 255, 255))

    return _drawn(draw)


def _text_page() -> np.ndarray:
    def draw(d: ImageDraw.ImageDraw) -> None:
        for row in range(22):
            d.text((12, 6 + 13 * row), "Lorem ipsum dolor sit amet, consectetur adipiscing elit " * 2, fill=(0, 0, 0))

    return _drawn(draw)


def _chart() -> np.ndarray:
    def draw(d: ImageDraw.ImageDraw) -> None:
        d.line((40, 260, 380, 260), fill=(0, 0, 0), width=2)
        d.line((40, 20, 40, 260), fill=(0, 0, 0), width=2)
        for k, height in enumerate((120, 200, 90, 160, 220, 60)):
            d.rectangle((60 + 52 * k, 260 - height, 95 + 52 * k, 260), fill=(230, 120, 20))

    return _drawn(draw)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()
