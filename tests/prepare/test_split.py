"""Stage `split`: grouping, stratification, determinism, the cache, bad data and the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from src.config import CLASSES, DataParams, PathsParams, SplitParams
from src.ingest.rawdata import DataError
from src.ingest.synthetic import make_dataset
from src.prepare import cache as cache_module
from src.prepare.assign import assign_splits, group_ids
from src.prepare.imaging import load_image
from src.prepare.index import SPLITS, cache_path, read_split
from src.prepare.split import format_table, split
from src.split import main

SIZE = 32
DATA = DataParams(source="synthetic", image_size=SIZE)
PARAMS = SplitParams()


def _paths(root: Path) -> PathsParams:
    return PathsParams(raw=root / "raw", splits=root / "splits", cache=root / "cache", reports=root / "reports")


def _index(paths: PathsParams) -> pd.DataFrame:
    return pd.concat([read_split(paths, s).assign(split=s) for s in SPLITS], ignore_index=True)


@pytest.fixture(scope="module")
def done(synthetic_raw, tmp_path_factory) -> tuple[PathsParams, dict]:
    """The stage run once on the shared synthetic dataset."""
    paths = _paths(tmp_path_factory.mktemp("split"))
    return paths, split(synthetic_raw, PARAMS, DATA, paths)


@pytest.fixture
def small_raw(tmp_path) -> Path:
    """A private, small raw dataset that a test may damage."""
    raw = tmp_path / "raw"
    make_dataset(raw, n_lesions=20, seed=3, duplicates=1)
    return raw


# ---- grouping --------------------------------------------------------------------------------------


def test_no_lesion_or_duplicate_group_in_two_splits(done):
    paths, report = done
    index = _index(paths)
    assert index.groupby("lesion_id")["split"].nunique().max() == 1
    assert index.groupby("dup_group")["split"].nunique().max() == 1
    assert all(v == 0 for v in report["lesion_overlap"].values())
    assert all(v == 0 for v in report["dup_group_overlap"].values())
    assert set(report["lesion_overlap"]) == {"train-val", "train-test", "val-test"}


def test_planted_duplicates_are_found_and_kept_together(done, synthetic_raw):
    paths, report = done
    index = _index(paths).set_index("image_id")
    digest = {i: hashlib.sha256((synthetic_raw / "images" / f"{i}.jpg").read_bytes()).hexdigest() for i in index.index}
    by_content = pd.Series(digest).groupby(pd.Series(digest)).groups
    planted = [list(ids) for ids in by_content.values() if len(ids) > 1]
    assert len(planted) == 2  # make_dataset(duplicates=2)
    for ids in planted:
        assert index.loc[ids, "dup_group"].nunique() == 1
        assert index.loc[ids, "split"].nunique() == 1
        assert index.loc[ids, "lesion_id"].nunique() == 2  # planted under a new lesion id
    dup = report["duplicates"]
    assert (dup["groups"], dup["images"], dup["cross_lesion_groups"]) == (2, 4, 2)
    assert dup["candidate_pairs"] > dup["pairs"]  # hash look-alikes were rejected by the detail check


def test_group_ids_join_lesions_and_duplicates():
    lesions = np.array(["L3", "L1", "L2", "L3", "L4"])
    dups = np.array([0, 1, 2, 3, 1])  # rows 1 and 4 are copies: L1 and L4 become one group
    groups = group_ids(lesions, dups)
    assert groups[0] == groups[3] and groups[1] == groups[4]
    assert len(set(groups)) == 3
    assert groups[1] == 0  # numbered by smallest lesion id: L1 first


# ---- stratification and determinism -----------------------------------------------------------------


def _random_groups(n_groups: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    share = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    dx = rng.choice(CLASSES, size=n_groups, p=share)
    sizes = rng.choice([1, 1, 1, 2, 2, 3, 4], size=n_groups)
    groups = np.repeat(np.arange(n_groups), sizes)
    return pd.DataFrame({"dx": np.repeat(dx, sizes)}), groups


def _max_gap(df: pd.DataFrame, assigned: pd.Series) -> float:
    whole = df["dx"].value_counts(normalize=True)
    return max(
        (df.loc[assigned == s, "dx"].value_counts(normalize=True).reindex(whole.index, fill_value=0) - whole)
        .abs()
        .max()
        for s in SPLITS
    )


def test_class_proportions_per_split_are_close_to_the_whole():
    df, groups = _random_groups(4000, seed=0)
    assigned = assign_splits(df, groups, PARAMS)
    assert _max_gap(df, assigned) < 0.01
    fractions = assigned.value_counts(normalize=True)
    assert fractions["train"] == pytest.approx(0.70, abs=0.01)
    assert fractions["val"] == pytest.approx(0.15, abs=0.01)
    assert fractions["test"] == pytest.approx(0.15, abs=0.01)
    assert pd.Series(groups).groupby(assigned.to_numpy()).nunique().sum() == len(set(groups))  # groups kept whole


def test_class_proportions_on_the_synthetic_data(done):
    paths, report = done
    index = _index(paths)
    assert report["class_share_max_gap"] < 0.1
    assert _max_gap(index, index["split"]) == pytest.approx(report["class_share_max_gap"], abs=1e-3)
    for s in SPLITS:  # every class reaches every split, so per-class metrics exist on val and test
        assert min(report["classes"][s].values()) > 0
    assert report["fractions"]["train"] == pytest.approx(0.7, abs=0.07)


def test_assignment_ignores_row_order():
    df, groups = _random_groups(500, seed=1)
    assigned = assign_splits(df, groups, PARAMS)
    perm = np.random.default_rng(2).permutation(len(df))
    shuffled = assign_splits(df.iloc[perm], groups[perm], PARAMS)
    assert shuffled.sort_index().equals(assigned)


def test_same_seed_same_csvs_and_another_seed_another_split(done, synthetic_raw, tmp_path):
    paths, report = done
    again = _paths(tmp_path / "again")
    assert split(synthetic_raw, PARAMS, DATA, again)["split_hash"] == report["split_hash"]
    for s in SPLITS:
        assert (again.splits / f"{s}.csv").read_bytes() == (paths.splits / f"{s}.csv").read_bytes()
    other = _paths(tmp_path / "other")
    assert (
        split(synthetic_raw, PARAMS.model_copy(update={"seed": 7}), DATA, other)["split_hash"] != report["split_hash"]
    )
    assert read_split(other, "test")["image_id"].tolist() != read_split(paths, "test")["image_id"].tolist()


def test_split_hash_is_the_sha256_of_the_three_csvs(done):
    paths, report = done
    digest = hashlib.sha256()
    for s in SPLITS:
        digest.update(f"{s}.csv\n".encode() + (paths.splits / f"{s}.csv").read_bytes())
    assert report["split_hash"] == digest.hexdigest()
    assert json.loads((paths.reports / "split.json").read_text()) == report


# ---- the cache ----------------------------------------------------------------------------------------


def test_cache_rows_are_the_images_of_the_index(done, synthetic_raw):
    paths, report = done
    cache = np.load(cache_path(paths, "train"), mmap_mode="r")
    index = _index(paths)
    assert cache.dtype == np.uint8 and cache.shape == (report["images"]["total"], SIZE, SIZE, 3)
    assert sorted(index["cache_row"]) == list(range(len(cache)))
    meta = pd.read_csv(synthetic_raw / "metadata.csv")
    assert index.set_index("cache_row").sort_index()["image_id"].tolist() == meta["image_id"].tolist()
    for row in index.sample(12, random_state=0).itertuples():
        expected = load_image(synthetic_raw / "images" / f"{row.image_id}.jpg", SIZE)
        np.testing.assert_array_equal(cache[row.cache_row], expected)
        assert CLASSES[row.label] == row.dx


def test_worker_processes_give_the_same_cache(done, synthetic_raw, tmp_path, monkeypatch):
    paths, _ = done
    monkeypatch.setattr(cache_module, "POOL_MIN_IMAGES", 1)
    pooled = _paths(tmp_path)
    split(synthetic_raw, PARAMS, DATA, pooled)
    np.testing.assert_array_equal(np.load(cache_path(pooled, "val")), np.load(cache_path(paths, "val")))


def test_isic2018_test_is_cached_and_its_copies_of_ham10000_are_marked(small_raw, tmp_path):
    isic = small_raw / "isic2018_test"
    meta = make_dataset(isic, n_lesions=8, seed=9, duplicates=0)
    copied = meta["image_id"].iloc[0]
    ham_image = pd.read_csv(small_raw / "metadata.csv")["image_id"].iloc[5]
    shutil.copy(small_raw / "images" / f"{ham_image}.jpg", isic / "images" / f"{copied}.jpg")
    paths = _paths(tmp_path)
    report = split(small_raw, PARAMS, DATA, paths)
    test = read_split(paths, "isic2018_test")
    assert len(test) == len(meta) == report["isic2018_test"]["images"]
    assert report["isic2018_test"]["copies_of_ham10000"] == 1
    ham = _index(paths).set_index("image_id")
    assert test.set_index("image_id")["dup_group"].to_dict() == {
        i: (ham.loc[ham_image, "dup_group"] if i == copied else -1) for i in meta["image_id"]
    }
    cache = np.load(cache_path(paths, "isic2018_test"))
    assert cache.shape == (len(meta), SIZE, SIZE, 3)
    np.testing.assert_array_equal(
        cache[test["cache_row"].iloc[3]], load_image(isic / "images" / f"{test['image_id'].iloc[3]}.jpg", SIZE)
    )
    assert "isic2018_test" in format_table(report)


# ---- bad data -------------------------------------------------------------------------------------------


def test_unreadable_image_fails_naming_the_file(small_raw, tmp_path):
    bad = pd.read_csv(small_raw / "metadata.csv")["image_id"].iloc[4]
    (small_raw / "images" / f"{bad}.jpg").write_bytes(b"not a jpeg")
    paths = _paths(tmp_path)
    with pytest.raises(DataError, match=rf"1 of \d+ images .*unreadable.*drop_unreadable.*{bad}\.jpg"):
        split(small_raw, PARAMS, DATA, paths)
    assert not paths.cache.exists() or not list(paths.cache.iterdir())  # no cache, no temp files left
    assert not (paths.reports / "split.json").exists()


def test_unreadable_image_is_dropped_when_allowed(small_raw, tmp_path):
    meta = pd.read_csv(small_raw / "metadata.csv")
    bad = meta["image_id"].iloc[4]
    jpeg = small_raw / "images" / f"{bad}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated
    paths = _paths(tmp_path)
    report = split(small_raw, PARAMS, DATA.model_copy(update={"drop_unreadable": True}), paths)
    assert report["unreadable_dropped"] == 1
    index = _index(paths)
    assert bad not in set(index["image_id"]) and len(index) == len(meta) - 1
    cache = np.load(cache_path(paths, "train"))
    assert len(cache) == len(meta) - 1
    for row in index.itertuples():  # rows after the dropped one moved up, and still match
        np.testing.assert_array_equal(
            cache[row.cache_row], load_image(small_raw / "images" / f"{row.image_id}.jpg", SIZE)
        )


def _rewrite(raw: Path, edit) -> None:
    meta = pd.read_csv(raw / "metadata.csv")
    edit(meta).to_csv(raw / "metadata.csv", index=False)


BAD_METADATA = {
    "missing column": (lambda m: m.drop(columns="dx"), r"missing column\(s\) \['dx'\]"),
    "unknown label": (lambda m: m.assign(dx=m["dx"].where(m.index != 2, "melanoma")), r"unknown label.*'melanoma'"),
    "empty lesion_id": (
        lambda m: m.assign(lesion_id=m["lesion_id"].where(m.index != 3, "")),
        r"empty lesion_id on line",
    ),
    "duplicated image_id": (lambda m: pd.concat([m, m.iloc[[1]]]), r"image_id listed more than once"),
    "missing image": (
        lambda m: pd.concat([m, m.iloc[[0]].assign(image_id="ISIC_0000404")]),
        r"1 of \d+ listed images missing from .*images: ISIC_0000404\.jpg",
    ),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_bad_metadata_is_a_clear_error_naming_the_file(case, small_raw, tmp_path):
    edit, message = BAD_METADATA[case]
    _rewrite(small_raw, edit)
    with pytest.raises(DataError, match=message) as err:
        split(small_raw, PARAMS, DATA, _paths(tmp_path))
    assert str(small_raw / "metadata.csv") in str(err.value)


def test_malformed_csv_is_a_clear_error(small_raw, tmp_path):
    with open(small_raw / "metadata.csv", "a") as f:
        f.write('HAM_1,"ISIC_1,bkl\n')  # unterminated quote
    with pytest.raises(DataError, match=r"metadata\.csv: malformed CSV"):
        split(small_raw, PARAMS, DATA, _paths(tmp_path))


def test_missing_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"metadata\.csv: metadata file not found"):
        split(tmp_path / "nowhere", PARAMS, DATA, _paths(tmp_path))


def test_read_split_says_how_to_make_the_index(tmp_path):
    with pytest.raises(DataError, match=r"val\.csv: split index not found; run `python -m src\.split`"):
        read_split(_paths(tmp_path), "val")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        read_split(_paths(tmp_path), "dev")


# ---- CLI --------------------------------------------------------------------------------------------------


def _params_file(tmp_path: Path, raw: Path) -> Path:
    paths = {k: str(v) for k, v in _paths(tmp_path).model_dump().items()}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"paths": {**paths, "raw": str(raw)}, "data": {"image_size": SIZE}}))
    return path


def test_main_writes_outputs_and_prints_the_table(small_raw, tmp_path, capsys):
    assert main(["--params", str(_params_file(tmp_path, small_raw)), "-S", "split.seed=3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["class", *SPLITS]
    assert json.loads((tmp_path / "reports" / "split.json").read_text())["seed"] == 3
    assert all((tmp_path / "splits" / f"{s}.csv").exists() for s in SPLITS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["-S", "split.val_fraction=0.6", "-S", "split.test_fraction=0.35"], "must sum to less than 0.9"),
        (["-S", "split.nope=1"], "unknown key"),
        (["-S", "paths.raw=/nonexistent/raw"], "metadata file not found"),
    ],
)
def test_main_reports_errors_in_one_line(overrides, message, small_raw, tmp_path, capsys):
    assert main(["--params", str(_params_file(tmp_path, small_raw)), *overrides]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
