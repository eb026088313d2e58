"""The benchmark's images: a real folder or generated HAM10000-like JPEGs, decoded into a cache as split does."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from src.benchmark.options import BenchOptions
from src.config import CLASSES
from src.errors import UserError
from src.ingest.synthetic import make_dataset
from src.learn.inference import IMAGE_SUFFIXES
from src.prepare.imaging import ImageReadError, load_image

log = logging.getLogger(__name__)


def find_image_files(folder: Path) -> list[Path]:
    """Image files of `folder`/images, or of `folder` itself (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    root = folder / "images" if (folder / "images").is_dir() else folder
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {folder}: no image files in {root}")
    return files


def read_labels(folder: Path, files: list[Path], seed: int = 0) -> np.ndarray:
    """Class indices from a metadata CSV (image_id, dx) in `folder`; random ones for images it does not list."""
    known: dict[str, int] = {}
    for csv in sorted(Path(folder).glob("*.csv")):
        try:
            df = pd.read_csv(csv, usecols=["image_id", "dx"], dtype=str)
        except (ValueError, OSError):
            continue
        known.update(
            {i: CLASSES.index(d) for i, d in zip(df["image_id"], df["dx"].str.lower(), strict=True) if d in CLASSES}
        )
    rng = np.random.default_rng(seed)
    return np.array([known.get(p.stem, int(rng.integers(len(CLASSES)))) for p in files], dtype=np.int64)


def benchmark_images(opts: BenchOptions, workdir: Path) -> tuple[list[Path], np.ndarray, str]:
    """Files, labels and a description: the real folder when given, otherwise generated HAM10000-like JPEGs."""
    if opts.images is not None:
        files = find_image_files(opts.images)[: opts.max_images]
        return files, read_labels(opts.images, files), str(opts.images)
    raw = workdir / "raw"
    make_dataset(raw, n_lesions=max(len(CLASSES), math.ceil(opts.max_images / 2)), seed=0, duplicates=0)
    files = find_image_files(raw)[: opts.max_images]
    return files, read_labels(raw, files), "synthetic"


def build_cache(files: list[Path], size: int, path: Path) -> list[int]:
    """Decode `files` with load_image (as the split stage does) into a uint8 (N, S, S, 3) .npy; the rows kept."""
    arrays, kept = [], []
    for i, f in enumerate(files):
        try:
            arrays.append(load_image(f, size))
            kept.append(i)
        except ImageReadError as err:
            log.warning("skipped %s", err)
    if not arrays:
        raise UserError("no readable images for the benchmark")
    np.save(path, np.stack(arrays))
    return kept
