"""The split stage's work: cache the raw images, find copies, split by lesion and copy group, write the index.

Outputs (each written to a temp name; all renamed into place once every one is ready, the report last):
    paths.splits/{train,val,test}.csv   metadata columns + label (index into CLASSES), cache_row, dup_group
    paths.splits/isic2018_test.csv      when raw has isic2018_test/
    paths.cache/images.npy              uint8 (N, S, S, 3) from src.prepare.imaging.fit_square, metadata order
    paths.cache/isic2018_test.npy       the same for isic2018_test.csv
    paths.reports/split.json            counts, fractions, overlaps, duplicates, split_hash

dup_group: copies of one photo (src.prepare.dedup) share it, a photo without copies has its own; in
isic2018_test.csv it is the HAM10000 group that the image copies, or -1.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd

from src.config import CLASSES, DataParams, PathsParams, SplitParams
from src.fileio import atomic_path, write_json
from src.ingest.rawdata import IMAGES, ISIC_TEST, METADATA, DataError, image_path, read_metadata
from src.prepare.assign import assign_splits, class_counts, group_ids, overlaps, split_fractions
from src.prepare.cache import build_cache
from src.prepare.dedup import MIN_CORRELATION, Pairs, duplicate_groups, match_reference, nearest_histogram
from src.prepare.index import CACHE_FILE, ISIC_CACHE_FILE, ISIC_SPLIT, REPORT_FILE, SPLITS, index_frame

log = logging.getLogger(__name__)


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


def _read_raw(raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The metadata of raw_dir and of its isic2018_test/ (None without one), every listed image present."""
    df = read_metadata(raw_dir / METADATA)
    check_images_exist(raw_dir, df)
    isic_dir = raw_dir / ISIC_TEST
    if not isic_dir.is_dir():
        return df, None
    isic = read_metadata(isic_dir / METADATA)
    check_images_exist(isic_dir, isic)
    return df, isic


def _cache_images(
    raw_dir: Path, df: pd.DataFrame, data: DataParams, tmp: Path
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, int]:
    """Decode df's images into the cache at `tmp`; the readable rows, their pHashes and details, how many dropped."""
    files = [image_path(raw_dir, i) for i in df["image_id"]]
    ok, hashes, details, unreadable = build_cache(files, data.image_size, tmp, data.drop_unreadable, str(raw_dir))
    for reason in unreadable:
        log.warning("dropped unreadable image %s", reason)
    df = df[ok].reset_index(drop=True)
    if df.empty:
        raise DataError(f"{raw_dir / METADATA}: no readable images left to split")
    return df, hashes, details, len(unreadable)


def _split_frames(
    df: pd.DataFrame, hashes: np.ndarray, details: np.ndarray, params: SplitParams
) -> tuple[dict[str, pd.DataFrame], np.ndarray, dict]:
    """Each split's index frame, every image's duplicate group, and the duplicate and overlap report."""
    dup, pairs = duplicate_groups(hashes, details, params.duplicate_max_distance, keys=df["image_id"])
    groups = group_ids(df["lesion_id"], dup)
    df["split"] = assign_splits(df, groups, params)
    report = {"duplicates": _duplicate_report(df, dup, pairs, params)}
    frames = {
        name: index_frame(part.drop(columns="split"), part.index.to_numpy(), dup[part.index.to_numpy()])
        for name, part in ((name, df[df["split"] == name]) for name in SPLITS)
    }
    report["lesion_overlap"] = overlaps(frames, "lesion_id")
    report["dup_group_overlap"] = overlaps(frames, "dup_group")
    leaks = {k: v for k, v in {**report["lesion_overlap"], **report["dup_group_overlap"]}.items() if v}
    if leaks:  # a bug in the grouping, never a data problem
        raise RuntimeError(f"split leaks lesions or duplicate groups between splits: {leaks}")
    return frames, dup, report


def _isic_frame(
    isic: pd.DataFrame,
    isic_dir: Path,
    data: DataParams,
    params: SplitParams,
    tmp: Path,
    reference: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[pd.DataFrame, dict]:
    """The ISIC 2018 test set cached at `tmp`, its copies of HAM10000 marked with their group; its report."""
    hashes, details, dup = reference
    isic_files = [image_path(isic_dir, i) for i in isic["image_id"]]
    ok_i, hashes_i, details_i, unreadable_i = build_cache(
        isic_files, data.image_size, tmp, data.drop_unreadable, str(isic_dir)
    )
    isic = isic[ok_i].reset_index(drop=True)
    match = match_reference(hashes_i, details_i, hashes, details, params.duplicate_max_distance)
    frame = index_frame(isic, np.arange(len(isic)), np.where(match >= 0, dup[match], -1))
    report = {
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
    return frame, report


def _write_index(frames: dict[str, pd.DataFrame], splits_dir: Path, outputs: ExitStack) -> str:
    """Each frame to a temp CSV that `outputs` renames into place; the hash of train/val/test."""
    digest = hashlib.sha256()
    for name, frame in frames.items():
        text = frame.to_csv(index=False).encode()
        if name in SPLITS:
            digest.update(f"{name}.csv\n".encode() + text)
        path = outputs.enter_context(atomic_path(splits_dir / f"{name}.csv"))
        path.write_bytes(text)
    return digest.hexdigest()


def split(raw_dir: Path, params: SplitParams, data: DataParams, paths: PathsParams) -> dict:
    """Split raw_dir's images into train/val/test by lesion and duplicate group, cache pixels; the report."""
    raw_dir = Path(raw_dir)
    df, isic = _read_raw(raw_dir)
    report: dict = {"image_size": data.image_size, "seed": params.seed}
    with ExitStack() as outputs:  # every output is renamed into place only when all of them are ready
        tmp = outputs.enter_context(atomic_path(paths.cache / CACHE_FILE, ".npy"))
        df, hashes, details, report["unreadable_dropped"] = _cache_images(raw_dir, df, data, tmp)
        frames, dup, found = _split_frames(df, hashes, details, params)
        report.update(found)
        if isic is not None:
            isic_tmp = outputs.enter_context(atomic_path(paths.cache / ISIC_CACHE_FILE, ".npy"))
            frames[ISIC_SPLIT], report[ISIC_SPLIT] = _isic_frame(
                isic, raw_dir / ISIC_TEST, data, params, isic_tmp, (hashes, details, dup)
            )
        else:
            for stale in (paths.splits / f"{ISIC_SPLIT}.csv", paths.cache / ISIC_CACHE_FILE):
                stale.unlink(missing_ok=True)
        split_hash = _write_index(frames, paths.splits, outputs)
        report.update(_count_report(frames, params))
        report["split_hash"] = split_hash
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
