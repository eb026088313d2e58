"""Where HAM10000 comes from: fetch a source's files into paths.downloads, then build the raw layout from them.

Every source ends as a list of inputs (folders, zip/tar archives) and the layout is recognised by the files
they hold, so a hand-downloaded Kaggle zip, an extracted folder, the ISIC files or an earlier data/raw all work:

    HAM10000_metadata.csv/.tab + ISIC_*.jpg anywhere                      Kaggle, Dataverse, HAM10000 folders
    metadata.csv + images/ISIC_*.jpg                                        an earlier data/raw
    ISIC2018_Task3_Training_GroundTruth.csv (+ LesionGroupings.csv) + ISIC_*.jpg           ISIC 2018 Task 3
    ISIC2018_Task3_Test_GroundTruth.csv or isic2018_test/metadata.csv      the ISIC 2018 test set (optional)

Images are looked up by file name anywhere in the inputs; the first copy wins, which drops the lower-case
duplicate folders of the Kaggle zip.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath

import pandas as pd
from tqdm import tqdm

from src.config import DataParams
from src.ingest.archive import Archive, is_archive, open_archive
from src.ingest.http import AuthRequired, DownloadError, fetch, file_md5, get_json
from src.ingest.rawdata import ISIC_TEST, METADATA, DataError, image_path, image_problem, validate_metadata

log = logging.getLogger(__name__)

ISIC_TRAIN_FILES = (
    "ISIC2018_Task3_Training_Input.zip",
    "ISIC2018_Task3_Training_GroundTruth.zip",
    "ISIC2018_Task3_Training_LesionGroupings.csv",
)
ISIC_TEST_FILES = ("ISIC2018_Task3_Test_Input.zip", "ISIC2018_Task3_Test_GroundTruth.zip")
DATAVERSE_STEMS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_metadata")
HAM_METADATA = ("ham10000_metadata.csv", "ham10000_metadata.tab", "ham10000_metadata.tsv")
ISIC_TRAIN_TRUTH = "isic2018_task3_training_groundtruth.csv"
ISIC_GROUPINGS = "isic2018_task3_training_lesiongroupings.csv"
ISIC_TEST_TRUTH = "isic2018_task3_test_groundtruth.csv"
# ISIC's diagnosis_confirm_type spelled as HAM10000's dx_type
CONFIRM_TYPES = {
    "histopathology": "histo",
    "serial imaging showing no change": "follow_up",
    "single image expert consensus": "consensus",
    "confocal microscopy with consensus dermoscopy": "confocal",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg")
PLAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # an image_id becomes a file name: nothing else


@dataclass(frozen=True)
class Fetched:
    """What a source handed over: inputs to build from, where they came from, and their MD5s."""

    inputs: list[Path]
    provenance: dict
    checksums: dict[str, str] = field(default_factory=dict)

    def __add__(self, other: Fetched) -> Fetched:
        provenance = {**self.provenance, "urls": self.provenance.get("urls", []) + other.provenance.get("urls", [])}
        return Fetched(self.inputs + other.inputs, provenance, {**self.checksums, **other.checksums})


# --- fetching -------------------------------------------------------------------------------------------


def kaggle_credentials() -> tuple[tuple[str, str] | None, str]:
    """Kaggle API credentials from KAGGLE_USERNAME/KAGGLE_KEY or kaggle.json, and where they came from."""
    user, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if user and key:
        return (user, key), "KAGGLE_USERNAME/KAGGLE_KEY"
    path = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle") / "kaggle.json"
    if not path.is_file():
        return None, ""
    try:
        token = json.loads(path.read_text())
        return (str(token["username"]), str(token["key"])), str(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DownloadError(f"{path}: not a Kaggle API token ({err}); expected username and key") from None


def _kaggle_auth_message(err: AuthRequired, origin: str) -> str:
    head = f"Kaggle refused the credentials from {origin}" if origin else "Kaggle wants credentials for this download"
    return (
        f"{err.url}: HTTP {err.status}: {head}. Create an API token at https://www.kaggle.com/settings "
        "(API > Create New Token), then either set KAGGLE_USERNAME and KAGGLE_KEY or save the token as "
        "~/.kaggle/kaggle.json (chmod 600); accept the dataset's rules on its Kaggle page if asked. "
        "Or use -S data.source=isic, dataverse or local"
    )


def fetch_kaggle(data: DataParams, downloads: Path) -> Fetched:
    """The Kaggle zip (anonymous, or with the user's API token when one is set up)."""
    url = f"{data.kaggle_url.rstrip('/')}/datasets/download/{data.kaggle_dataset}"
    dest = downloads / "kaggle" / f"{data.kaggle_dataset.rsplit('/', 1)[-1]}.zip"
    auth, origin = kaggle_credentials()
    try:
        fetch(url, dest, data.timeout_s, auth=auth)
    except AuthRequired as err:
        raise DownloadError(_kaggle_auth_message(err, origin)) from None
    return Fetched([dest], {"urls": [url]}, {dest.name: file_md5(dest)})


def _fetch_files(base_url: str, names: tuple[str, ...], folder: Path, timeout_s: float) -> Fetched:
    urls = [f"{base_url.rstrip('/')}/{name}" for name in names]
    paths = [fetch(url, folder / name, timeout_s) for url, name in zip(urls, names, strict=True)]
    return Fetched(paths, {"urls": urls}, {p.name: file_md5(p) for p in paths})


def fetch_isic(data: DataParams, downloads: Path) -> Fetched:
    """The ISIC 2018 Task 3 training files (and the test set with data.isic2018_test)."""
    names = ISIC_TRAIN_FILES + (ISIC_TEST_FILES if data.isic2018_test else ())
    return _fetch_files(data.isic_url, names, downloads / "isic", data.timeout_s)


def fetch_isic_test(data: DataParams, downloads: Path) -> Fetched:
    """The ISIC 2018 Task 3 test set alone (added to the other remote sources)."""
    return _fetch_files(data.isic_url, ISIC_TEST_FILES, downloads / "isic", data.timeout_s)


def _dataverse_files(listing: dict, url: str) -> dict[str, dict]:
    """The `dataFile` records of a dataset listing, by lower-case file stem."""
    try:
        files = listing["data"]["latestVersion"]["files"]
        records = [f["dataFile"] for f in files]
    except (KeyError, TypeError):
        raise DownloadError(f"{url}: unexpected answer (no data.latestVersion.files[].dataFile)") from None
    return {PurePosixPath(r.get("filename", "")).stem.lower(): r for r in records}


def _dataverse_download(base: str, record: dict) -> tuple[str, str, str | None]:
    """URL, file name and published MD5 of one data file."""
    url, name = f"{base}/api/access/datafile/{record['id']}", record["filename"]
    if record.get("originalFileFormat"):  # ingested table: the published MD5 is the uploaded original's
        url += "?format=original"
        name = record.get("originalFileName") or name
    checksum = record.get("checksum") or {}
    md5 = record.get("md5") or (checksum.get("value") if str(checksum.get("type", "")).upper() == "MD5" else None)
    return url, name, md5


def fetch_dataverse(data: DataParams, downloads: Path) -> Fetched:
    """The two image zips and the metadata of the Harvard Dataverse dataset, checked against their MD5s."""
    base = data.dataverse_url.rstrip("/")
    listing_url = f"{base}/api/datasets/:persistentId/?persistentId={data.dataverse_doi}"
    records = _dataverse_files(get_json(listing_url, data.timeout_s), listing_url)
    paths, urls, checksums = [], [listing_url], {}
    for stem in DATAVERSE_STEMS:
        if stem.lower() not in records:
            found = sorted(r.get("filename", "?") for r in records.values())
            raise DownloadError(f"{listing_url}: the dataset lists no {stem}.* (it lists {found})")
        url, name, md5 = _dataverse_download(base, records[stem.lower()])
        if not md5:
            log.warning("%s: Dataverse publishes no MD5 for %s; it is not checked", listing_url, name)
        path = fetch(url, downloads / "dataverse" / name, data.timeout_s, md5=md5)
        paths.append(path)
        urls.append(url)
        checksums[name] = md5 or file_md5(path)
    return Fetched(paths, {"urls": urls, "doi": data.dataverse_doi}, checksums)


def locate_local(data: DataParams) -> Fetched:
    """data.local_path as an input: a folder or an archive already on disk."""
    path = Path(data.local_path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data.local_path does not exist; point it at a HAM10000 folder or archive")
    checksums = {path.name: file_md5(path)} if path.is_file() else {}
    return Fetched([path], {"path": str(path.resolve())}, checksums)


def fetch_source(data: DataParams, downloads: Path) -> Fetched:
    """Fetch what data.source names into `downloads` (kept, so a rerun resumes) and return the inputs."""
    if data.source == "local":
        return locate_local(data)
    fetcher = {"kaggle": fetch_kaggle, "isic": fetch_isic, "dataverse": fetch_dataverse}[data.source]
    fetched = fetcher(data, downloads)
    if data.isic2018_test and data.source != "isic":
        fetched = fetched + fetch_isic_test(data, downloads)
    return fetched


# --- reading the inputs ---------------------------------------------------------------------------------


class Folder:
    """A folder (or just some of its files) read like an archive; files are copied out."""

    def __init__(self, path: Path, names: list[str] | None = None) -> None:
        self.path = path
        self.names = names or sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())

    def label(self, name: str) -> str:
        return str(self.path / name)

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def copy_out(self, pairs: list[tuple[str, Path]]) -> None:
        for name, target in tqdm(pairs, desc=f"copy {self.path.name}", unit="file", disable=None):
            target.parent.mkdir(parents=True, exist_ok=True)
            # Copied, never hard-linked: DVC makes cached files read-only, which through a link would
            # change the user's originals.
            shutil.copyfile(self.path / name, target)


Container = Folder | Archive


@dataclass(frozen=True)
class Entry:
    container: Container
    name: str

    @property
    def label(self) -> str:
        return self.container.label(self.name)

    def read(self) -> bytes:
        return self.container.read(self.name)


class Inputs:
    """Every file the inputs hold, by lower-case base name; archives found inside folders are read too."""

    def __init__(self, containers: list[Container]) -> None:
        self.containers = containers
        self._by_base: dict[str, list[Entry]] = {}
        for container in containers:
            for name in container.names:
                self._by_base.setdefault(PurePosixPath(name).name.lower(), []).append(Entry(container, name))

    def describe(self) -> str:
        return ", ".join(str(c.path) for c in self.containers)

    def files(self, base: str) -> list[Entry]:
        """Entries named `base` (any case), the shallowest first."""
        return sorted(self._by_base.get(base.lower(), []), key=lambda e: e.name.count("/"))

    @cached_property
    def images(self) -> dict[str, Entry]:
        """The first entry for each image file stem (image_id)."""
        found: dict[str, Entry] = {}
        for entries in self._by_base.values():
            for entry in entries:
                path = PurePosixPath(entry.name)
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    found.setdefault(path.stem, entry)
        return found


@contextmanager
def open_inputs(paths: list[Path]) -> Iterator[Inputs]:
    """Index folders and archives (checked for unsafe entries) and close the archives afterwards."""
    with ExitStack() as stack:
        containers: list[Container] = []
        for path in paths:
            if path.is_dir():
                folder = Folder(path)
                containers.append(folder)
                nested = [path / name for name in folder.names if is_archive(path / name)]
                containers += [stack.enter_context(open_archive(p)) for p in nested]
            elif is_archive(path):
                containers.append(stack.enter_context(open_archive(path)))
            elif path.is_file():  # a loose file, such as the ISIC lesion groupings or Dataverse's metadata
                containers.append(Folder(path.parent, [path.name]))
            else:
                raise DataError(f"{path}: not found")
        yield Inputs(containers)


def read_table(entry: Entry) -> pd.DataFrame:
    """A comma- or tab-separated table (Dataverse's ingested .tab quotes its strings), all columns as text."""
    raw = entry.read()
    first_line = raw[:4096].decode("utf-8-sig", "replace").partition("\n")[0]
    try:
        df = pd.read_csv(io.BytesIO(raw), sep="\t" if "\t" in first_line else ",", dtype=str, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{entry.label}: malformed table ({err})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


# --- converting metadata --------------------------------------------------------------------------------


def isic_metadata(truth: Entry, groupings: Entry | None) -> pd.DataFrame:
    """ISIC 2018 one-hot ground truth (+ lesion groupings) in the raw layout's columns."""
    gt = read_table(truth)
    if "image" not in gt.columns:
        raise DataError(f"{truth.label}: no 'image' column; expected image,MEL,NV,BCC,AKIEC,BKL,DF,VASC")
    classes = [c for c in gt.columns if c != "image"]
    try:
        ones = gt[classes].astype(float) == 1.0
    except ValueError as err:
        raise DataError(f"{truth.label}: label columns {classes} must hold 0/1 values ({err})") from None
    not_one_hot = ones.sum(axis=1) != 1
    if not_one_hot.any():
        lines = (gt.index[not_one_hot][:5] + 2).tolist()
        raise DataError(f"{truth.label}: line(s) {lines} do not have exactly one 1.0 among {classes}")
    image_id = gt["image"].str.strip()
    df = pd.DataFrame({"lesion_id": image_id, "image_id": image_id, "dx": ones.idxmax(axis=1).str.lower()})
    if groupings is not None:
        df = _add_groupings(df, groupings)
    return validate_metadata(df, truth.label)


def _add_groupings(df: pd.DataFrame, groupings: Entry) -> pd.DataFrame:
    table = read_table(groupings)
    needed = ["image", "lesion_id", "diagnosis_confirm_type"]
    if missing := [c for c in needed if c not in table.columns]:
        raise DataError(f"{groupings.label}: missing column(s) {missing}; expected {needed}")
    table = table.drop_duplicates("image").set_index("image")
    confirm = table["diagnosis_confirm_type"].str.strip()
    df["lesion_id"] = df["image_id"].map(table["lesion_id"]).fillna(df["image_id"])
    df["dx_type"] = df["image_id"].map(confirm.str.lower().map(CONFIRM_TYPES).fillna(confirm))
    return df


def main_metadata(found: Inputs) -> tuple[pd.DataFrame, str]:
    """The training metadata in the raw layout's columns, and the file it came from."""
    for base in HAM_METADATA:
        if entries := found.files(base):
            return validate_metadata(read_table(entries[0]), entries[0].label), entries[0].label
    normalised = [e for e in found.files(METADATA) if PurePosixPath(e.name).parent.name != ISIC_TEST]
    if normalised:
        return validate_metadata(read_table(normalised[0]), normalised[0].label), normalised[0].label
    if truth := found.files(ISIC_TRAIN_TRUTH):
        groupings = found.files(ISIC_GROUPINGS)
        return isic_metadata(truth[0], groupings[0] if groupings else None), truth[0].label
    raise DataError(
        f"{found.describe()}: no HAM10000 metadata found; expected HAM10000_metadata.csv (or .tab), "
        "metadata.csv, or ISIC2018_Task3_Training_GroundTruth.csv"
    )


def isic_test_metadata(found: Inputs) -> tuple[pd.DataFrame, str]:
    """The ISIC 2018 test-set metadata (lesion_id = image id: the test set publishes no groupings)."""
    if truth := found.files(ISIC_TEST_TRUTH):
        return isic_metadata(truth[0], None), truth[0].label
    normalised = [e for e in found.files(METADATA) if PurePosixPath(e.name).parent.name == ISIC_TEST]
    if normalised:
        return validate_metadata(read_table(normalised[0]), normalised[0].label), normalised[0].label
    raise DataError(
        f"{found.describe()}: data.isic2018_test is true but there is no ISIC2018_Task3_Test_GroundTruth.csv "
        f"(or {ISIC_TEST}/{METADATA})"
    )


# --- writing the layout ---------------------------------------------------------------------------------


def _image_sources(found: Inputs, df: pd.DataFrame, label: str) -> dict[str, Entry]:
    if df.empty:
        raise DataError(f"{label}: lists no images")
    odd = [i for i in df["image_id"] if not PLAIN_ID.match(i)]
    if odd:
        raise DataError(f"{label}: image_id(s) {odd[:5]} are not plain file names")
    missing = [i for i in df["image_id"] if i not in found.images]
    if missing:
        raise DataError(
            f"{label}: {len(missing)} of {len(df)} listed images are missing from {found.describe()}: {missing[:5]}"
        )
    return {i: found.images[i] for i in df["image_id"]}


def write_set(found: Inputs, df: pd.DataFrame, label: str, out: Path) -> None:
    """Copy the images `df` lists into out/images, check each decodes, and write out/metadata.csv."""
    sources = _image_sources(found, df, label)
    out.mkdir(parents=True, exist_ok=True)
    by_container: dict[int, list[tuple[str, Path]]] = {}
    for image_id, entry in sources.items():
        by_container.setdefault(id(entry.container), []).append((entry.name, image_path(out, image_id)))
    for container in found.containers:
        if pairs := by_container.get(id(container)):
            container.copy_out(pairs)
    problems = [
        f"{entry.label}: {why}"
        for image_id, entry in tqdm(sources.items(), desc="check images", disable=None)
        if (why := image_problem(image_path(out, image_id)))
    ]
    if problems:
        raise DataError(f"{len(problems)} unreadable image(s): " + "; ".join(problems[:5]))
    df.to_csv(out / METADATA, index=False)
    log.info("%d images of %d lesions from %s", len(df), df["lesion_id"].nunique(), label)


def build_layout(inputs: list[Path], out: Path, with_test: bool) -> None:
    """Write the raw layout under `out` (and out/isic2018_test when `with_test`) from the inputs."""
    with open_inputs(inputs) as found:
        df, label = main_metadata(found)
        write_set(found, df, label, out)
        if with_test:
            df, label = isic_test_metadata(found)
            write_set(found, df, label, out / ISIC_TEST)
