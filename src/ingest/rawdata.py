"""The normalised raw layout every source is turned into, and its checks.

data/raw/metadata.csv       lesion_id,image_id,dx,dx_type,age,sex,localization
data/raw/images/<image_id>.jpg
data/raw/isic2018_test/     the same layout for the ISIC 2018 Task 3 test set (optional)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from src.config import CLASSES
from src.errors import UserError

METADATA = "metadata.csv"
IMAGES = "images"
ISIC_TEST = "isic2018_test"
COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
REQUIRED = ("lesion_id", "image_id", "dx")
FULL_SIZE = 10015


class DataError(UserError, ValueError):
    """Data on disk that cannot be used; the message names the file and the problem."""


def image_path(raw_dir: Path, image_id: str) -> Path:
    return raw_dir / IMAGES / f"{image_id}.jpg"


def validate_metadata(df: pd.DataFrame, source: Path | str) -> pd.DataFrame:
    """Check columns, ids and labels; return the frame with the standard columns in order."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; expected {list(COLUMNS)}")
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = pd.NA
    df = df[list(COLUMNS)].copy()
    for col in REQUIRED:
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            rows = (df.index[empty][:5] + 2).tolist()
            raise DataError(f"{source}: empty {col} on line(s) {rows}")
    df["dx"] = df["dx"].astype(str).str.strip().str.lower()
    bad = sorted(set(df["dx"]) - set(CLASSES))
    if bad:
        raise DataError(f"{source}: unknown label(s) {bad} in column dx; known classes are {list(CLASSES)}")
    dupes = df["image_id"][df["image_id"].duplicated()]
    if len(dupes):
        raise DataError(f"{source}: image_id listed more than once: {sorted(set(dupes))[:5]}")
    return df.reset_index(drop=True)


def read_metadata(path: Path) -> pd.DataFrame:
    """Read and validate a normalised metadata CSV."""
    if not path.exists():
        raise DataError(f"{path}: metadata file not found; run `python -m src.download` first")
    try:
        df = pd.read_csv(path, dtype={"lesion_id": str, "image_id": str, "dx": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: malformed CSV ({err})") from None
    return validate_metadata(df, path)


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used (missing, unreadable, truncated), or None when it decodes."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # decodes every byte, fast
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"not a readable image ({err})"
    return None


def verify_raw(raw_dir: Path, expected: int | None = None, check_images: bool = True) -> pd.DataFrame:
    """Check a raw layout: valid metadata, an image per row (decoded when `check_images`), `expected` rows."""
    df = read_metadata(raw_dir / METADATA)
    ids = df["image_id"].tolist()
    if check_images:
        problems = {i: image_problem(image_path(raw_dir, i)) for i in tqdm(ids, desc="verify", disable=None)}
    else:
        problems = {i: None if image_path(raw_dir, i).is_file() else "missing" for i in ids}
    bad = {i: why for i, why in problems.items() if why}
    if bad:
        shown = "; ".join(f"{image_path(raw_dir, i).name}: {why}" for i, why in list(bad.items())[:5])
        raise DataError(f"{raw_dir / IMAGES}: {len(bad)} of {len(ids)} images in {METADATA} unusable: {shown}")
    if expected is not None and len(df) != expected:
        raise DataError(
            f"{raw_dir / METADATA}: {len(df)} images, expected {expected} (full HAM10000: {FULL_SIZE}); "
            "the source is incomplete"
        )
    return df
