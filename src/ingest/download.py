"""Put HAM10000 into the normalised layout under paths.raw, whatever data.source names.

The layout is built in a staging folder beside paths.raw, checked, and only then swapped into place, so an
error never leaves a half-written data/raw. SOURCE.json in the result records how it was made; a rerun with
the same source and data that still verifies does nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from src.config import CLASSES, DataParams, PathsParams
from src.fileio import read_json, write_json
from src.ingest.rawdata import FULL_SIZE, ISIC_TEST, DataError, verify_raw
from src.ingest.sources import Fetched, build_layout, fetch_source
from src.ingest.synthetic import make_dataset

log = logging.getLogger(__name__)

SOURCE_FILE = "SOURCE.json"
REMOTE = ("kaggle", "isic", "dataverse")  # always the full dataset, so the image count is checked
ISIC_TEST_SIZE = 1512
CONFIG_KEYS = {
    "kaggle": ("kaggle_url", "kaggle_dataset"),
    "isic": ("isic_url",),
    "dataverse": ("dataverse_url", "dataverse_doi"),
    "local": ("local_path",),
    "synthetic": ("synthetic_lesions",),
}


def source_config(data: DataParams) -> dict:
    """The params that decide what paths.raw holds (recorded in SOURCE.json, compared on a rerun)."""
    values = data.model_dump(mode="json")
    config = {"source": data.source, **{key: values[key] for key in CONFIG_KEYS[data.source]}}
    if data.source == "local":
        config["local_path"] = str(Path(data.local_path).expanduser().resolve())
    if data.source != "synthetic":
        config["isic2018_test"] = data.isic2018_test
    if data.isic2018_test and data.source in ("kaggle", "dataverse"):
        config["isic_url"] = data.isic_url
    return config


def up_to_date(raw: Path, config: dict) -> bool:
    """Whether `raw` was built from `config` and still verifies (every image decodes, counts as recorded)."""
    record = read_json(raw / SOURCE_FILE)
    if record.get("config") != config:
        return False
    try:
        verify_raw(raw, expected=record["counts"]["images"])
        if config.get("isic2018_test"):
            verify_raw(raw / ISIC_TEST, expected=record["counts"][ISIC_TEST]["images"])
    except (DataError, KeyError, TypeError) as err:
        log.warning("%s: does not verify (%s); building it again", raw, err)
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staging(raw: Path) -> Iterator[Path]:
    """A fresh folder beside `raw`; on success it replaces `raw`, on any error it is removed."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{raw.name}.tmp-"
    for stale in raw.parent.glob(f"{prefix}*"):  # left by a killed run
        _remove(stale)
    stage = raw.parent / f"{prefix}{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        _remove(stage)
        raise
    old = raw.parent / f"{prefix}old-{uuid.uuid4().hex[:8]}"
    if raw.exists() or raw.is_symlink():
        os.replace(raw, old)
    os.replace(stage, raw)
    _remove(old)


def populate(data: DataParams, downloads: Path, stage: Path) -> Fetched:
    """Fetch data.source and write the raw layout into `stage`; return where it came from."""
    if data.source == "synthetic":
        if data.isic2018_test:
            log.warning("data.isic2018_test does not apply to the synthetic source; ignored")
        make_dataset(stage, n_lesions=data.synthetic_lesions)
        return Fetched([], {"generator": "src.ingest.synthetic.make_dataset", "n_lesions": data.synthetic_lesions})
    fetched = fetch_source(data, downloads)
    build_layout(fetched.inputs, stage, with_test=data.isic2018_test)
    return fetched


def summarize(df: pd.DataFrame) -> dict:
    counts = df["dx"].value_counts()
    return {
        "images": len(df),
        "lesions": int(df["lesion_id"].nunique()),
        "classes": {c: int(counts.get(c, 0)) for c in CLASSES},
    }


def count_layout(stage: Path, data: DataParams, expected: int | None, expected_test: int | None) -> dict:
    """Check the staged layout (and the full-dataset counts for remote sources); return its counts."""
    remote = data.source in REMOTE
    # sources' images were decoded as they were copied; generated ones are checked here
    df = verify_raw(stage, expected if remote else None, check_images=data.source == "synthetic")
    counts = summarize(df)
    if data.isic2018_test and data.source != "synthetic":
        counts[ISIC_TEST] = summarize(verify_raw(stage / ISIC_TEST, expected_test if remote else None, False))
    return counts


def source_record(data: DataParams, fetched: Fetched, counts: dict) -> dict:
    """SOURCE.json: how paths.raw was made, for reruns and for later stages (synthetic runs are tagged)."""
    return {
        "source": data.source,
        "synthetic": data.source == "synthetic",
        "full_dataset": data.source != "synthetic" and counts["images"] == FULL_SIZE,
        "config": source_config(data),
        "provenance": fetched.provenance,
        "md5": fetched.checksums,
        "counts": counts,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def download(
    data: DataParams,
    paths: PathsParams,
    expected_images: int | None = FULL_SIZE,
    expected_test_images: int | None = ISIC_TEST_SIZE,
) -> Path:
    """Build paths.raw from data.source unless it already holds that source's data; return paths.raw.

    The remote sources always serve the full dataset, so they must yield `expected_images` images
    (`expected_test_images` for the ISIC 2018 test set); tests pass the counts of their small archives.
    """
    raw = Path(paths.raw)
    config = source_config(data)
    if up_to_date(raw, config):
        log.info("%s: up to date (source %s); nothing to do", raw, data.source)
        return raw
    with staging(raw) as stage:
        fetched = populate(data, Path(paths.downloads), stage)
        counts = count_layout(stage, data, expected_images, expected_test_images)
        record = source_record(data, fetched, counts)
        write_json(stage / SOURCE_FILE, record)
    log.info(
        "%s: %d images of %d lesions from %s (%s)",
        raw,
        counts["images"],
        counts["lesions"],
        data.source,
        "full HAM10000" if record["full_dataset"] else "not the full dataset",
    )
    return raw
