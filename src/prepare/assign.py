"""Assigning images to train/val/test: whole groups (same lesion or same photo), stratified by diagnosis."""

from __future__ import annotations

import numpy as np
import pandas as pd

from src.config import CLASSES, SplitParams
from src.prepare.dedup import components
from src.prepare.index import CLASS_INDEX, SPLITS


def group_ids(lesion_ids: pd.Series | np.ndarray, dup_groups: np.ndarray) -> np.ndarray:
    """Split group per image: connected components of (same lesion_id) or (same duplicate group).

    Numbered in the order of each group's smallest lesion_id, so the numbering ignores row order.
    """
    lesion_ids = np.asarray(lesion_ids, dtype=str)
    rows = np.arange(len(lesion_ids))
    first_of_lesion = pd.Series(rows).groupby(pd.factorize(lesion_ids)[0]).transform("min").to_numpy()
    first_of_dup = pd.Series(rows).groupby(np.asarray(dup_groups)).transform("min").to_numpy()
    return components(
        len(rows), np.concatenate([rows, rows]), np.concatenate([first_of_lesion, first_of_dup]), keys=lesion_ids
    )


def split_fractions(params: SplitParams) -> np.ndarray:
    """Target fractions in SPLITS order (train gets the rest)."""
    return np.array([1.0 - params.val_fraction - params.test_fraction, params.val_fraction, params.test_fraction])


def assign_splits(df: pd.DataFrame, groups: np.ndarray, params: SplitParams) -> pd.Series:
    """Split name per row: whole groups, class proportions per split as close to the whole as they allow.

    Greedy: groups in a seeded shuffle, then largest first, each to the split whose per-class targets
    its images fall furthest below (relative shortfall, so the small splits get their share too).
    The result depends on the groups' ids and contents, not on row order.
    """
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    labels = df["dx"].map(CLASS_INDEX).to_numpy()
    counts = np.zeros((len(uniq), len(CLASSES)))
    np.add.at(counts, (inverse, labels), 1)
    target = split_fractions(params)[:, None] * counts.sum(axis=0)[None, :]
    inv_target = np.divide(1.0, target, out=np.zeros_like(target), where=target > 0)
    order = np.random.default_rng(params.seed).permutation(len(uniq))
    order = order[np.argsort(-counts.sum(axis=1)[order], kind="stable")]
    filled = np.zeros_like(target)
    choice = np.empty(len(uniq), dtype=np.int64)
    for g in order:
        shortfall = ((target - filled) * inv_target) @ counts[g]
        choice[g] = s = int(np.argmax(shortfall))
        filled[s] += counts[g]
    return pd.Series(np.asarray(SPLITS)[choice[inverse]], index=df.index, name="split")


def overlaps(frames: dict[str, pd.DataFrame], column: str) -> dict[str, int]:
    """How many values of `column` each pair of frames shares."""
    names = list(frames)
    return {
        f"{a}-{b}": len(set(frames[a][column]) & set(frames[b][column]))
        for k, a in enumerate(names)
        for b in names[k + 1 :]
    }


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    counts = df["dx"].value_counts()
    return {c: int(counts.get(c, 0)) for c in CLASSES}
