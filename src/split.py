"""Stage `split`: lesion- and duplicate-grouped, class-stratified train/val/test split plus the image cache.

Outputs (each written to a temp name; all renamed into place once every one is ready, the report last):
    paths.splits/{train,val,test}.csv   metadata columns + label (index into CLASSES), cache_row, dup_group
    paths.splits/isic2018_test.csv      when raw has isic2018_test/
    paths.cache/images.npy              uint8 (N, S, S, 3) from src.imaging.fit_square, metadata order
    paths.cache/isic2018_test.npy       the same for isic2018_test.csv
    paths.reports/split.json            counts, fractions, overlaps, duplicates, split_hash

dup_group: copies of one photo (src.dedup) share it, a photo without copies has its own; in
isic2018_test.csv it is the HAM10000 group that the image copies, or -1.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from src import cli
from src.config import CLASSES, DataParams, PathsParams, SplitParams
from src.fileio import atomic_path, write_json
from src.ingest.rawdata import IMAGES, ISIC_TEST, METADATA, DataError, image_path, read_metadata
from src.prepare.dedup import (
    MIN_CORRELATION,
    Pairs,
    components,
    duplicate_groups,
    fingerprint,
    match_reference,
    nearest_histogram,
)
from src.prepare.imaging import ImageReadError, fit_square

log = logging.getLogger(__name__)

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
POOL_MIN_IMAGES = 200  # below this, starting worker processes costs more than it saves
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


# ---- pure functions -------------------------------------------------------------------------------


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


# ---- decoding ---------------------------------------------------------------------------------------


def decode(path: Path, size: int) -> tuple[np.ndarray, np.uint64, np.ndarray]:
    """One decode of an image file: the model-sized pixels (src.imaging.fit_square), pHash and detail."""
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


def check_images_exist(raw_dir: Path, df: pd.DataFrame) -> None:
    """DataError when the metadata lists no images, or listing the rows whose image file is missing."""
    if df.empty:
        raise DataError(f"{raw_dir / METADATA}: lists no images")
    missing = [i for i in df["image_id"] if not image_path(raw_dir, i).is_file()]
    if missing:
        shown = ", ".join(f"{i}.jpg" for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(
            f"{raw_dir / METADATA}: {len(missing)} of {len(df)} listed images missing from {raw_dir / IMAGES}: {shown}"
        )


# ---- the stage ---------------------------------------------------------------------------------------


def _index_frame(df: pd.DataFrame, cache_rows: np.ndarray, dup_group: np.ndarray) -> pd.DataFrame:
    out = df.copy()
    out["label"] = out["dx"].map(CLASS_INDEX).astype(np.int64)
    out["cache_row"] = np.asarray(cache_rows, dtype=np.int64)
    out["dup_group"] = np.asarray(dup_group, dtype=np.int64)
    return out


def split(raw_dir: Path, params: SplitParams, data: DataParams, paths: PathsParams) -> dict:
    """Split raw_dir's images into train/val/test by lesion and duplicate group, cache pixels; the report."""
    raw_dir = Path(raw_dir)
    df = read_metadata(raw_dir / METADATA)
    check_images_exist(raw_dir, df)
    isic_dir = raw_dir / ISIC_TEST
    isic = None
    if isic_dir.is_dir():
        isic = read_metadata(isic_dir / METADATA)
        check_images_exist(isic_dir, isic)

    size = data.image_size
    report: dict = {"image_size": size, "seed": params.seed}
    with ExitStack() as outputs:  # every output is renamed into place only when all of them are ready
        tmp = outputs.enter_context(atomic_path(paths.cache / CACHE_FILE, ".npy"))
        files = [image_path(raw_dir, i) for i in df["image_id"]]
        ok, hashes, details, unreadable = build_cache(files, size, tmp, data.drop_unreadable, str(raw_dir))
        for reason in unreadable:
            log.warning("dropped unreadable image %s", reason)
        df = df[ok].reset_index(drop=True)
        report["unreadable_dropped"] = len(unreadable)
        if df.empty:
            raise DataError(f"{raw_dir / METADATA}: no readable images left to split")

        dup, pairs = duplicate_groups(hashes, details, params.duplicate_max_distance, keys=df["image_id"])
        groups = group_ids(df["lesion_id"], dup)
        df["split"] = assign_splits(df, groups, params)
        report["duplicates"] = _duplicate_report(df, dup, pairs, params)

        frames = {
            name: _index_frame(part.drop(columns="split"), part.index.to_numpy(), dup[part.index.to_numpy()])
            for name, part in ((name, df[df["split"] == name]) for name in SPLITS)
        }
        report["lesion_overlap"] = overlaps(frames, "lesion_id")
        report["dup_group_overlap"] = overlaps(frames, "dup_group")
        leaks = {k: v for k, v in {**report["lesion_overlap"], **report["dup_group_overlap"]}.items() if v}
        if leaks:  # a bug in the grouping, never a data problem
            raise RuntimeError(f"split leaks lesions or duplicate groups between splits: {leaks}")

        if isic is not None:
            isic_tmp = outputs.enter_context(atomic_path(paths.cache / ISIC_CACHE_FILE, ".npy"))
            isic_files = [image_path(isic_dir, i) for i in isic["image_id"]]
            ok_i, hashes_i, details_i, unreadable_i = build_cache(
                isic_files, size, isic_tmp, data.drop_unreadable, str(isic_dir)
            )
            isic = isic[ok_i].reset_index(drop=True)
            match = match_reference(hashes_i, details_i, hashes, details, params.duplicate_max_distance)
            frames[ISIC_SPLIT] = _index_frame(isic, np.arange(len(isic)), np.where(match >= 0, dup[match], -1))
            report[ISIC_SPLIT] = {
                "images": len(isic),
                "classes": class_counts(isic),
                "unreadable_dropped": len(unreadable_i),
                "copies_of_ham10000": int((match >= 0).sum()),
            }
            if (match >= 0).any():
                log.warning(
                    "%d %s images are copies of HAM10000 images (dup_group >= 0 in %s.csv)",
                    int((match >= 0).sum()),
                    ISIC_SPLIT,
                    ISIC_SPLIT,
                )
        else:
            for stale in (paths.splits / f"{ISIC_SPLIT}.csv", paths.cache / ISIC_CACHE_FILE):
                stale.unlink(missing_ok=True)

        digest = hashlib.sha256()
        for name, frame in frames.items():
            text = frame.to_csv(index=False).encode()
            if name in SPLITS:
                digest.update(f"{name}.csv\n".encode() + text)
            path = outputs.enter_context(atomic_path(paths.splits / f"{name}.csv"))
            path.write_bytes(text)
        report.update(_count_report(frames, params))
        report["split_hash"] = digest.hexdigest()
    write_json(paths.reports / REPORT_FILE, report)  # last, once the outputs it describes are in place
    log.info(
        "split %d images: %s; %d duplicate groups (%d across lesions); outputs in %s, %s",
        len(df),
        ", ".join(f"{s} {report['images'][s]}" for s in SPLITS),
        report["duplicates"]["groups"],
        report["duplicates"]["cross_lesion_groups"],
        paths.splits,
        paths.cache,
    )
    return report


def _duplicate_report(df: pd.DataFrame, dup: np.ndarray, pairs: Pairs, params: SplitParams) -> dict:
    sizes = np.bincount(dup)
    multi = sizes > 1
    lesions_per_group = df.groupby(dup)["lesion_id"].nunique().to_numpy()
    cross = lesions_per_group > 1
    return {
        "max_distance": params.duplicate_max_distance,
        "min_correlation": MIN_CORRELATION,
        "candidate_pairs": int(len(pairs.i)),
        "pairs": int(pairs.copies.sum()),
        "groups": int(multi.sum()),
        "images": int(sizes[multi].sum()),
        "largest_group": int(sizes.max()),
        "cross_lesion_groups": int(cross.sum()),
        "cross_lesion_images": int(sizes[cross].sum()),
        "nearest_hash_distance": nearest_histogram(pairs.nearest),
    }


def _count_report(frames: dict[str, pd.DataFrame], params: SplitParams) -> dict:
    total = sum(len(frames[s]) for s in SPLITS)
    whole = pd.concat([frames[s] for s in SPLITS])
    share = {c: n / total for c, n in class_counts(whole).items()}
    gap = max(
        abs(n / len(frames[s]) - share[c]) if len(frames[s]) else 1.0
        for s in SPLITS
        for c, n in class_counts(frames[s]).items()
    )
    return {
        "classes": {s: class_counts(frames[s]) for s in SPLITS},
        "images": {**{s: len(frames[s]) for s in SPLITS}, "total": total},
        "lesions": {s: int(frames[s]["lesion_id"].nunique()) for s in SPLITS},
        "fractions": {s: round(len(frames[s]) / total, 4) for s in SPLITS},
        "target_fractions": dict(zip(SPLITS, split_fractions(params).round(4).tolist(), strict=True)),
        "class_share_max_gap": round(gap, 4),
    }


def format_table(report: dict) -> str:
    """Class counts per split as a plain-text table."""
    names = [*SPLITS, *([ISIC_SPLIT] if ISIC_SPLIT in report else [])]
    counts = {**report["classes"], **({ISIC_SPLIT: report[ISIC_SPLIT]["classes"]} if ISIC_SPLIT in report else {})}
    width = max(len(n) for n in names) + 2
    lines = ["class".ljust(8) + "".join(n.rjust(width) for n in names)]
    for c in (*CLASSES, "total"):
        cells = [sum(counts[n].values()) if c == "total" else counts[n][c] for n in names]
        lines.append(c.ljust(8) + "".join(str(v).rjust(width) for v in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = cli.parser("Split HAM10000 into lesion-grouped train/val/test sets and cache the images.").parse_args(argv)

    def body() -> int:
        params = cli.load(args)
        report = split(params.paths.raw, params.split, params.data, params.paths)
        print(format_table(report))
        return 0

    return cli.run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
