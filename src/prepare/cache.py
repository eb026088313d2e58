"""Decoding image files once into the uint8 image cache, with their perceptual fingerprints for dedup."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from src.ingest.rawdata import DataError
from src.prepare.dedup import fingerprint
from src.prepare.imaging import ImageReadError, fit_square

POOL_MIN_IMAGES = 200  # below this, starting worker processes costs more than it saves


def decode(path: Path, size: int) -> tuple[np.ndarray, np.uint64, np.ndarray]:
    """One decode of an image file: the model-sized pixels (src.prepare.imaging.fit_square), pHash and detail."""
    try:
        with Image.open(path) as img:
            img.load()
            return fit_square(img, size), *fingerprint(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from err


def _decode_or_reason(path: Path, size: int) -> tuple[np.ndarray, np.uint64, np.ndarray] | str:
    try:
        return decode(path, size)
    except ImageReadError as err:
        return str(err)


def _decoded(files: list[Path], size: int) -> Iterator[tuple[np.ndarray, np.uint64, np.ndarray] | str]:
    """Decode in order; with worker processes when there are enough images and cores to pay off."""
    work = partial(_decode_or_reason, size=size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if len(files) < POOL_MIN_IMAGES or cores < 2:
        yield from map(work, files)
        return
    with multiprocessing.get_context("fork").Pool(min(cores, 8)) as pool:
        yield from pool.imap(work, files, chunksize=32)


def build_cache(
    files: list[Path], size: int, tmp: Path, drop_unreadable: bool, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Decode `files` into a (N, size, size, 3) uint8 .npy at `tmp` (unreadable rows removed).

    Returns (readable mask, pHashes, details, reasons for unreadable files) for the readable rows.
    Unreadable files raise DataError naming them unless `drop_unreadable`.
    """
    n = len(files)
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    hashes = np.zeros(n, dtype=np.uint64)
    details: np.ndarray | None = None
    ok = np.ones(n, dtype=bool)
    reasons: list[str] = []
    for row, result in enumerate(tqdm(_decoded(files, size), total=n, desc=f"decode {what}", unit="img")):
        if isinstance(result, str):
            ok[row] = False
            reasons.append(result)
            continue
        images[row], hashes[row], det = result
        if details is None:
            details = np.zeros((n, det.size), dtype=det.dtype)
        details[row] = det
    if reasons and not drop_unreadable:
        del images
        shown = "; ".join(reasons[:10]) + (f"; ... and {len(reasons) - 10} more" if len(reasons) > 10 else "")
        raise DataError(
            f"{len(reasons)} of {n} images of {what} are unreadable (set data.drop_unreadable=true to drop them): "
            f"{shown}"
        )
    if reasons:
        keep = np.flatnonzero(ok)
        compact = tmp.with_name(tmp.name + ".compact")
        out = np.lib.format.open_memmap(compact, mode="w+", dtype=np.uint8, shape=(len(keep), size, size, 3))
        for start in range(0, len(keep), 1024):
            out[start : start + 1024] = images[keep[start : start + 1024]]
        out.flush()
        del out, images
        os.replace(compact, tmp)
    else:
        images.flush()
        del images
    if details is None:
        details = np.zeros((n, 1), dtype=np.float16)
    return ok, hashes[ok], details[ok], reasons
