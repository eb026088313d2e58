"""A small generated dataset in the raw layout with a learnable class signal (offline trials, tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from src.config import CLASSES
from src.ingest.rawdata import COLUMNS, IMAGES, METADATA

# Imbalanced like HAM10000 (nv dominates) but with enough lesions per class to split three ways.
CLASS_SHARE = np.array([0.08, 0.09, 0.12, 0.07, 0.14, 0.42, 0.08])
IMAGE_WH = (80, 60)
LOCATIONS = ("back", "trunk", "face", "lower extremity", "upper extremity", "abdomen")


def lesion_image(rng: np.random.Generator, class_index: int) -> np.ndarray:
    """A skin-toned frame with a blob whose hue and shape depend on the class, plus noise."""
    w, h = IMAGE_WH
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2 + rng.normal(0, 4), h / 2 + rng.normal(0, 3)
    radius = 10 + 2 * (class_index % 3) + rng.normal(0, 1.5)
    stretch = 1.0 + 0.35 * (class_index % 2)
    inside = (((xx - cx) / stretch) ** 2 + (yy - cy) ** 2) < radius**2
    img = np.empty((h, w, 3), np.float32)
    img[:] = (224, 180, 160)
    angle = 2 * np.pi * class_index / len(CLASSES)
    blob = 110 + 70 * np.array([np.cos(angle), np.cos(angle + 2.1), np.cos(angle + 4.2)])
    img[inside] = blob
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(out_dir: Path, n_lesions: int = 240, seed: int = 0, duplicates: int = 2) -> pd.DataFrame:
    """Write metadata.csv and JPEGs for `n_lesions` lesions (1-3 images each) under `out_dir`.

    `duplicates` extra rows re-use an existing photo under a new lesion_id, as HAM10000 does,
    so the split's duplicate detection has something to find.
    """
    rng = np.random.default_rng(seed)
    (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    labels = rng.choice(len(CLASSES), size=n_lesions, p=CLASS_SHARE)
    labels[: len(CLASSES)] = np.arange(len(CLASSES))  # every class present
    rows, pixels = [], {}
    for lesion, label in enumerate(labels):
        sex, age, site = rng.choice(["male", "female"]), float(rng.integers(5, 18) * 5), rng.choice(LOCATIONS)
        for _ in range(int(rng.integers(1, 4))):
            image_id = f"ISIC_{9000000 + len(rows):07d}"
            pixels[image_id] = lesion_image(rng, int(label))
            rows.append((f"HAM_{lesion:07d}", image_id, CLASSES[label], "histo", age, sex, site))
    for k in range(duplicates):
        src = rows[int(rng.integers(len(rows)))]
        image_id = f"ISIC_{9000000 + len(rows):07d}"
        pixels[image_id] = pixels[src[1]]
        rows.append((f"HAM_{n_lesions + k:07d}", image_id, *src[2:]))
    for image_id, arr in pixels.items():
        Image.fromarray(arr).save(out_dir / IMAGES / f"{image_id}.jpg", quality=92)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.to_csv(out_dir / METADATA, index=False)
    return df
