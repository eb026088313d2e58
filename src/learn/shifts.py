"""Acquisition shifts for the shift report: what another clinic's dermatoscope, camera or habits do to an image.

In the spirit of ImageNet-C (Hendrycks and Dietterich 2019), each shift has a few severities, and an image's
perturbation depends only on (SEED, shift, severity, the image's place in the subset): the same pixels in every run.
They act on the model-sized square the cache holds, with sizes (blur radius, hair width) relative to its side, so
that a 128 px and a 224 px model meet the same shift.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

SEED = 2019

Perturb = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _sign(rng: np.random.Generator) -> int:
    return int(rng.choice((-1, 1)))


def colour_cast(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """White balance off in a random direction: channel gains exp(strength * u), u a unit vector of zero sum (the
    brightness stays, the chromaticity moves)."""
    angle = rng.uniform(0, 2 * np.pi)
    u = np.cos(angle) * np.array([1, -1, 0]) / np.sqrt(2) + np.sin(angle) * np.array([1, 1, -2]) / np.sqrt(6)
    return _uint8(img * np.exp(strength * u))


def gamma(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Another tone curve: gamma exp(+-amount)."""
    return _uint8(255 * (img / 255) ** np.exp(amount * _sign(rng)))


def brightness(img: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Over- or under-exposure: all pixels times 1 +- amount."""
    return _uint8(img * (1 + amount * _sign(rng)))


def contrast(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Flatter lighting: the pixels pulled towards the image's mean by `factor`."""
    mean = img.mean(axis=(0, 1), keepdims=True)
    return _uint8(mean + (img - mean) * factor)


def defocus(img: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Out of focus: a Gaussian blur, sigma `radius` times the side (scipy's, exact for a sigma under a pixel)."""
    sigma = radius * img.shape[0]
    return _uint8(gaussian_filter(img.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect"))


def jpeg(img: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """Saved as JPEG at `quality`."""
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(buffer).convert("RGB"))


def low_resolution(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """A lower-resolution sensor: shrunk by `factor`, then scaled back up."""
    side = img.shape[0]
    small = Image.fromarray(img).resize((round(side / factor),) * 2, Image.Resampling.BILINEAR)
    return np.asarray(small.resize((side, side), Image.Resampling.BICUBIC))


def zoom(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Other magnification or framing: above 1 the centre enlarged, below 1 the image shrunk and the border
    continued by reflection (more of the surrounding skin)."""
    side = img.shape[0]
    if factor >= 1:
        crop = round(side / factor)
        start = (side - crop) // 2
        patch = Image.fromarray(img[start : start + crop, start : start + crop])
        return np.asarray(patch.resize((side, side), Image.Resampling.BICUBIC))
    inner = round(side * factor)
    small = np.asarray(Image.fromarray(img).resize((inner, inner), Image.Resampling.BICUBIC))
    before = (side - inner) // 2
    return np.pad(small, ((before, side - inner - before),) * 2 + ((0, 0),), mode="reflect")


def rotation(img: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Rotated by +-`degrees` (not a multiple of 90, which TTA covers), corners filled by reflection."""
    side = img.shape[0]
    margin = side // 2
    padded = Image.fromarray(np.pad(img, ((margin, margin), (margin, margin), (0, 0)), mode="reflect"))
    turned = np.asarray(padded.rotate(degrees * _sign(rng), resample=Image.Resampling.BICUBIC))
    return turned[margin : margin + side, margin : margin + side]


def hair(img: np.ndarray, strands: float, rng: np.random.Generator) -> np.ndarray:
    """Dark hairs across the image: `strands` curved strokes (quadratic Bezier curves) of dark brown to black,
    0.6-1.4% of the side wide (1-2 px at 128 px, as a hair of a 600 x 450 dermoscopy image shrinks to)."""
    side = img.shape[0]
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas)
    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(int(strands)):
        p0, p1, p2 = rng.uniform(-0.1, 1.1, size=(3, 2)) * side
        points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        shade = int(rng.integers(10, 60))
        colour = (shade + int(rng.integers(0, 25)), shade, max(0, shade - int(rng.integers(0, 15))))
        width = max(1, round(side * rng.uniform(0.006, 0.014)))
        draw.line([tuple(p) for p in points], fill=colour, width=width, joint="curve")
    return np.asarray(canvas)


def noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise: Gaussian, `sigma` grey levels."""
    return _uint8(img + rng.normal(0, sigma, img.shape))


@dataclass(frozen=True)
class Shift:
    name: str
    perturb: Perturb
    severities: tuple[float, ...]  # mild to strong
    unit: str  # how the report names a severity's value

    def setting(self, level: int) -> str:
        return f"{self.unit} {self.severities[level - 1]:g}"


SHIFTS: tuple[Shift, ...] = (
    Shift("colour_cast", colour_cast, (0.1, 0.2, 0.3), "log-gain"),
    Shift("gamma", gamma, (0.2, 0.4), "log-gamma +-"),
    Shift("brightness", brightness, (0.2, 0.4), "gain +-"),
    Shift("contrast", contrast, (0.7, 0.5), "contrast x"),
    Shift("defocus", defocus, (0.005, 0.01, 0.02), "blur radius / side"),
    Shift("jpeg", jpeg, (40, 20, 10), "quality"),
    Shift("low_resolution", low_resolution, (2, 3, 4), "downscale x"),
    Shift("zoom", zoom, (0.8, 1.25), "scale"),
    Shift("rotation", rotation, (15, 45), "degrees +-"),
    Shift("hair", hair, (5, 15), "strands"),
    Shift("noise", noise, (8, 16, 24), "sigma"),
)


def conditions() -> list[tuple[Shift, int]]:
    """Every (shift, severity level 1..n) the report scores, in a fixed order."""
    return [(shift, level) for shift in SHIFTS for level in range(1, len(shift.severities) + 1)]


def perturb_images(images: np.ndarray, shift: Shift, level: int, seed: int = SEED) -> np.ndarray:
    """A uint8 (N, S, S, 3) batch under one shift at one severity level; image i's randomness is its own,
    drawn from (seed, the shift's place in SHIFTS, level, i)."""
    which = SHIFTS.index(shift)
    value = shift.severities[level - 1]
    return np.stack(
        [
            shift.perturb(np.asarray(img), value, np.random.default_rng([seed, which, level, i]))
            for i, img in enumerate(images)
        ]
    )


def shift_subset(labels: np.ndarray, lesions: np.ndarray, per_class: int, seed: int = SEED) -> np.ndarray:
    """Indices of a fixed subset for the report: one image per lesion, at most `per_class` lesions per class
    (balanced accuracy weighs classes equally, so the common class needs no more images than the rare ones)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    first = order[np.unique(np.asarray(lesions)[order], return_index=True)[1]]  # a random image of each lesion
    chosen = []
    for label in np.unique(labels):
        of_class = np.sort(first[np.asarray(labels)[first] == label])
        chosen.append(rng.permutation(of_class)[:per_class])
    return np.sort(np.concatenate(chosen))
