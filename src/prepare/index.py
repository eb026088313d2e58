"""The split index: split names, the files the split stage writes, and reading them back (train, evaluate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src.config import CLASSES, PathsParams
from src.ingest.rawdata import ISIC_TEST, DataError

SPLITS = ("train", "val", "test")
ISIC_SPLIT = ISIC_TEST
CACHE_FILE = "images.npy"
ISIC_CACHE_FILE = "isic2018_test.npy"
REPORT_FILE = "split.json"
INDEX_DTYPES = {
    "lesion_id": str,
    "image_id": str,
    "dx": str,
    "label": np.int64,
    "cache_row": np.int64,
    "dup_group": np.int64,
}
CLASS_INDEX = {c: k for k, c in enumerate(CLASSES)}


def cache_path(paths: PathsParams, name: str) -> Path:
    """The image cache that a split's `cache_row` column indexes."""
    return paths.cache / (ISIC_CACHE_FILE if name == ISIC_SPLIT else CACHE_FILE)


def read_split(paths: PathsParams, name: str) -> pd.DataFrame:
    """One split's index (train, val, test or isic2018_test) as written by this stage."""
    if name not in (*SPLITS, ISIC_SPLIT):
        raise ValueError(f"unknown split {name!r}; expected one of {[*SPLITS, ISIC_SPLIT]}")
    path = paths.splits / f"{name}.csv"
    if not path.exists():
        raise DataError(f"{path}: split index not found; run `python -m src.split` (or `dvc repro split`) first")
    return pd.read_csv(path, dtype=INDEX_DTYPES)


def index_frame(df: pd.DataFrame, cache_rows: np.ndarray, dup_group: np.ndarray) -> pd.DataFrame:
    out = df.copy()
    out["label"] = out["dx"].map(CLASS_INDEX).astype(np.int64)
    out["cache_row"] = np.asarray(cache_rows, dtype=np.int64)
    out["dup_group"] = np.asarray(dup_group, dtype=np.int64)
    return out
