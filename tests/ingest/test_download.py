"""The download stage against a real HTTP server on 127.0.0.1 serving small archives packed like each source."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest

from src.config import DataParams, PathsParams
from src.download import main
from src.ingest.archive import ArchiveError
from src.ingest.download import SOURCE_FILE, download
from src.ingest.http import DownloadError
from src.ingest.rawdata import COLUMNS, ISIC_TEST, DataError
from src.ingest.synthetic import make_dataset

KAGGLE_PATH = "/api/v1/datasets/download/kmader/skin-cancer-mnist-ham10000"
DOI = "doi:10.7910/DVN/DBW86T"
ONE_HOT = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


# --- a small HTTP server with Range, dropped connections and auth ---------------------------------------


@dataclass
class Served:
    """What the server serves and how it misbehaves; `requests` records (path, Range, Authorization)."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    require_auth: str | None = None
    cut_after: int | None = None
    ignore_range: bool = False
    requests: list[tuple[str, str | None, str | None]] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        state: Served = self.server.state  # type: ignore[attr-defined]
        path, wanted = unquote(self.path), self.headers.get("Range")
        state.requests.append((path, wanted, self.headers.get("Authorization")))
        if state.require_auth and self.headers.get("Authorization") != state.require_auth:
            return self._reply(401, b'{"message": "Unauthorized"}')
        if path not in state.files:
            return self._reply(404, b"not found")
        body, start = state.files[path], 0
        if wanted and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(body):
                return self._reply(416, b"", {"Content-Range": f"bytes */{len(body)}"})
        headers = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if start else {}
        self._reply(206 if start else 200, body[start:], headers, limit=state.cut_after)

    def _reply(self, status: int, body: bytes, headers: dict | None = None, limit: int | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:limit])  # with a limit, the connection closes before the announced end

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    state = Served()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = state  # type: ignore[attr-defined]
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_kaggle_token(monkeypatch, tmp_path):
    """Never read the developer's own Kaggle token."""
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))


# --- small datasets packed like each source -------------------------------------------------------------


@dataclass(frozen=True)
class Ham:
    df: pd.DataFrame
    images: dict[str, bytes]

    def csv(self, sep: str = ",", quoting: int = csv.QUOTE_MINIMAL) -> bytes:
        return self.df.to_csv(index=False, sep=sep, quoting=quoting).encode()

    def halves(self) -> tuple[dict[str, bytes], dict[str, bytes]]:
        ids = list(self.images)
        mid = len(ids) // 2
        return {i: self.images[i] for i in ids[:mid]}, {i: self.images[i] for i in ids[mid:]}


def _generate(root: Path, n_lesions: int, seed: int, prefix: str = "ISIC_9") -> Ham:
    df = make_dataset(root, n_lesions=n_lesions, seed=seed, duplicates=1)
    images = {i: (root / "images" / f"{i}.jpg").read_bytes() for i in df["image_id"]}
    renamed = {i: prefix + i[len("ISIC_9") :] for i in images}
    df["image_id"] = df["image_id"].map(renamed)
    return Ham(df, {renamed[i]: data for i, data in images.items()})


@pytest.fixture(scope="module")
def ham(tmp_path_factory) -> Ham:
    return _generate(tmp_path_factory.mktemp("ham"), n_lesions=14, seed=3)


@pytest.fixture(scope="module")
def isic_test(tmp_path_factory) -> Ham:
    return _generate(tmp_path_factory.mktemp("isic_test"), n_lesions=8, seed=4, prefix="ISIC_8")


def zip_bytes(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def kaggle_entries(ham: Ham) -> dict[str, bytes]:
    """The Kaggle layout: two image folders, their lower-case duplicates, the metadata and hmnist CSVs."""
    entries: dict[str, bytes] = {}
    for part, images in enumerate(ham.halves(), start=1):
        for folder in (f"HAM10000_images_part_{part}", f"ham10000_images_part_{part}"):
            entries.update({f"{folder}/{i}.jpg": data for i, data in images.items()})
    entries["HAM10000_metadata.csv"] = ham.csv()
    entries["hmnist_8_8_L.csv"] = b"pixel0000,pixel0001,label\n12,34,2\n"
    return entries


def one_hot(ham: Ham) -> bytes:
    table = pd.DataFrame({"image": ham.df["image_id"]})
    for name in ONE_HOT:
        table[name] = (ham.df["dx"] == name.lower()).astype(float)
    return table.to_csv(index=False).encode()


def isic_files(ham: Ham, test: Ham) -> dict[str, bytes]:
    confirm = {"histo": "histopathology", "follow_up": "serial imaging showing no change"}
    groupings = pd.DataFrame(
        {
            "image": ham.df["image_id"],
            "lesion_id": ham.df["lesion_id"],
            "diagnosis_confirm_type": ham.df["dx_type"].map(confirm),
        }
    )
    train_input = {f"ISIC2018_Task3_Training_Input/{i}.jpg": data for i, data in ham.images.items()}
    train_input["ISIC2018_Task3_Training_Input/LICENSE.txt"] = b"CC BY-NC 4.0"
    train_input["ISIC2018_Task3_Training_Input/ATTRIBUTION.txt"] = b"HAM10000"
    truth = "ISIC2018_Task3_{}_GroundTruth/ISIC2018_Task3_{}_GroundTruth.csv"
    return {
        "ISIC2018_Task3_Training_Input.zip": zip_bytes(train_input),
        "ISIC2018_Task3_Training_GroundTruth.zip": zip_bytes({truth.format("Training", "Training"): one_hot(ham)}),
        "ISIC2018_Task3_Training_LesionGroupings.csv": groupings.to_csv(index=False).encode(),
        "ISIC2018_Task3_Test_Input.zip": zip_bytes(
            {f"ISIC2018_Task3_Test_Input/{i}.jpg": d for i, d in test.images.items()}
        ),
        "ISIC2018_Task3_Test_GroundTruth.zip": zip_bytes({truth.format("Test", "Test"): one_hot(test)}),
    }


def dataverse_files(ham: Ham, ingested: bool) -> dict[str, bytes]:
    """The native API listing and the data files behind it, by request path."""
    part_1, part_2 = (zip_bytes({f"{i}.jpg": data for i, data in half.items()}) for half in ham.halves())
    tab, original = ham.csv("\t", csv.QUOTE_NONNUMERIC), ham.csv()
    records = [
        {"id": 11, "filename": "HAM10000_images_part_1.zip", "md5": hashlib.md5(part_1).hexdigest()},
        {
            "id": 12,
            "filename": "HAM10000_images_part_2.zip",
            "checksum": {"type": "MD5", "value": hashlib.md5(part_2).hexdigest()},
        },
        {"id": 13, "filename": "HAM10000_metadata.tab", "md5": hashlib.md5(tab).hexdigest()},
        {"id": 99, "filename": "ISIC2018_Task3_Test_Images.zip", "md5": "0" * 32},  # listed, not needed
    ]
    files = {"/api/access/datafile/11": part_1, "/api/access/datafile/12": part_2, "/api/access/datafile/13": tab}
    if ingested:  # the published MD5 is the original upload's, served with ?format=original
        records[2].update(
            originalFileFormat="text/csv",
            originalFileName="HAM10000_metadata.csv",
            md5=hashlib.md5(original).hexdigest(),
        )
        files["/api/access/datafile/13?format=original"] = original
    listing = {"status": "OK", "data": {"latestVersion": {"files": [{"dataFile": r} for r in records]}}}
    files[f"/api/datasets/:persistentId/?persistentId={DOI}"] = json.dumps(listing).encode()
    return files


# --- helpers --------------------------------------------------------------------------------------------


def setup(tmp_path: Path, **data: object) -> tuple[DataParams, PathsParams]:
    paths = PathsParams(raw=tmp_path / "data" / "raw", downloads=tmp_path / "data" / "downloads")
    return DataParams(timeout_s=5, **data), paths


def assert_layout(raw: Path, ham: Ham) -> dict:
    """`raw` holds exactly `ham` in the normalised layout; returns SOURCE.json."""
    got = pd.read_csv(raw / "metadata.csv", dtype=str)
    assert tuple(got.columns) == COLUMNS
    assert sorted(got["image_id"]) == sorted(ham.df["image_id"])
    by_id = got.set_index("image_id")
    assert (by_id.loc[ham.df["image_id"], "dx"].to_numpy() == ham.df["dx"].to_numpy()).all()
    assert sorted(p.name for p in (raw / "images").iterdir()) == sorted(f"{i}.jpg" for i in ham.images)
    for image_id, data in ham.images.items():
        assert (raw / "images" / f"{image_id}.jpg").read_bytes() == data
    assert not list(raw.parent.glob(f".{raw.name}.tmp-*")), "staging folder left behind"
    return json.loads((raw / SOURCE_FILE).read_text()) if (raw / SOURCE_FILE).exists() else {}


def assert_nothing_built(paths: PathsParams) -> None:
    assert not Path(paths.raw).exists()
    assert not list(Path(paths.raw).parent.glob("*.tmp-*"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- each source end to end -----------------------------------------------------------------------------


def test_kaggle_zip_into_layout_and_rerun_does_nothing(server, ham, tmp_path, caplog):
    archive = zip_bytes(kaggle_entries(ham))
    server.files[KAGGLE_PATH] = archive
    data, paths = setup(tmp_path, source="kaggle", kaggle_url=f"{server.url}/api/v1")

    raw = download(data, paths, expected_images=len(ham.df))

    record = assert_layout(raw, ham)
    assert record["source"] == "kaggle" and not record["synthetic"] and not record["full_dataset"]
    assert record["md5"] == {"skin-cancer-mnist-ham10000.zip": hashlib.md5(archive).hexdigest()}
    assert record["provenance"]["urls"] == [f"{server.url}{KAGGLE_PATH}"]
    assert record["counts"]["images"] == len(ham.df)
    assert (Path(paths.downloads) / "kaggle" / "skin-cancer-mnist-ham10000.zip").read_bytes() == archive

    server.requests.clear()
    stamp = (raw / "metadata.csv").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="src.ingest.download"):
        download(data, paths, expected_images=len(ham.df))
    assert server.requests == []
    assert (raw / "metadata.csv").stat().st_mtime_ns == stamp
    assert "up to date" in caplog.text


def test_remote_source_must_hold_the_full_dataset(server, ham, tmp_path):
    server.files[KAGGLE_PATH] = zip_bytes(kaggle_entries(ham))
    data, paths = setup(tmp_path, source="kaggle", kaggle_url=f"{server.url}/api/v1")
    with pytest.raises(DataError, match=rf"{len(ham.df)} images, expected 10015"):
        download(data, paths)
    assert_nothing_built(paths)


def test_kaggle_401_explains_credentials_then_uses_them(server, ham, tmp_path, monkeypatch):
    server.files[KAGGLE_PATH] = zip_bytes(kaggle_entries(ham))
    server.require_auth = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    data, paths = setup(tmp_path, source="kaggle", kaggle_url=f"{server.url}/api/v1")

    with pytest.raises(DownloadError, match="HTTP 401.*KAGGLE_USERNAME and KAGGLE_KEY.*kaggle.json"):
        download(data, paths, expected_images=len(ham.df))
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "wrong")
    with pytest.raises(DownloadError, match="refused the credentials from KAGGLE_USERNAME/KAGGLE_KEY"):
        download(data, paths, expected_images=len(ham.df))
    assert_nothing_built(paths)

    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    token = tmp_path / "kaggle-config" / "kaggle.json"
    token.parent.mkdir()
    token.write_text(json.dumps({"username": "alice", "key": "s3cret"}))
    assert_layout(download(data, paths, expected_images=len(ham.df)), ham)
    assert server.requests[-1][2] == server.require_auth


def test_isic_with_test_set(server, ham, isic_test, tmp_path):
    server.files.update({f"/2018/{name}": data for name, data in isic_files(ham, isic_test).items()})
    data, paths = setup(tmp_path, source="isic", isic_url=f"{server.url}/2018", isic2018_test=True)

    raw = download(data, paths, expected_images=len(ham.df), expected_test_images=len(isic_test.df))

    record = assert_layout(raw, ham)
    got = pd.read_csv(raw / "metadata.csv", dtype=str).set_index("image_id").loc[ham.df["image_id"]]
    assert (got["lesion_id"].to_numpy() == ham.df["lesion_id"].to_numpy()).all()
    assert set(got["dx_type"]) == {"histo"}
    assert got[["age", "sex", "localization"]].isna().all().all()
    assert_layout(raw / ISIC_TEST, isic_test)
    test = pd.read_csv(raw / ISIC_TEST / "metadata.csv", dtype=str)
    assert (test["lesion_id"] == test["image_id"]).all()
    assert record["counts"][ISIC_TEST]["images"] == len(isic_test.df)
    assert len(record["provenance"]["urls"]) == len(record["md5"]) == 5


@pytest.mark.parametrize("ingested", [False, True], ids=["tab", "ingested-original"])
def test_dataverse_checks_md5s(server, ham, tmp_path, ingested):
    server.files.update(dataverse_files(ham, ingested))
    data, paths = setup(tmp_path, source="dataverse", dataverse_url=server.url, dataverse_doi=DOI)

    record = assert_layout(download(data, paths, expected_images=len(ham.df)), ham)

    assert record["provenance"]["doi"] == DOI
    assert not any(path.endswith("/99") for path, _, _ in server.requests)
    metadata = "HAM10000_metadata.csv" if ingested else "HAM10000_metadata.tab"
    assert sorted(record["md5"]) == sorted(["HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip", metadata])


def test_dataverse_md5_mismatch_is_an_error(server, ham, tmp_path):
    files = dataverse_files(ham, ingested=False)
    files["/api/access/datafile/11"] += b"tampered"
    server.files.update(files)
    data, paths = setup(tmp_path, source="dataverse", dataverse_url=server.url, dataverse_doi=DOI)

    with pytest.raises(DownloadError, match=r"HAM10000_images_part_1\.zip: MD5 \w+ does not match"):
        download(data, paths, expected_images=len(ham.df))
    assert_nothing_built(paths)
    assert not (Path(paths.downloads) / "dataverse" / "HAM10000_images_part_1.zip").exists()


def test_synthetic_source_is_marked(tmp_path):
    data, paths = setup(tmp_path, source="synthetic", synthetic_lesions=14)
    raw = download(data, paths)
    record = json.loads((raw / SOURCE_FILE).read_text())
    assert record["source"] == "synthetic" and record["synthetic"] and not record["full_dataset"]
    assert record["counts"]["images"] == len(pd.read_csv(raw / "metadata.csv"))


# --- local folders and archives -------------------------------------------------------------------------


def write_tree(root: Path, entries: dict[str, bytes]) -> Path:
    for name, data in entries.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def tar_bytes(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def ham_folder_entries(ham: Ham) -> dict[str, bytes]:
    """The layout of /work/shared/ham10000: HAM10000_metadata.csv + images/."""
    return {"HAM10000_metadata.csv": ham.csv(), **{f"images/{i}.jpg": d for i, d in ham.images.items()}}


LOCAL_LAYOUTS = {
    "ham-folder": lambda ham, test, root: write_tree(root / "ham10000", ham_folder_entries(ham)),
    "kaggle-folder": lambda ham, test, root: write_tree(root / "kaggle", kaggle_entries(ham)),
    "kaggle-zip": lambda ham, test, root: (
        write_tree(root, {"kaggle.zip": zip_bytes(kaggle_entries(ham))}) / "kaggle.zip"
    ),
    "ham-tar-gz": lambda ham, test, root: (
        write_tree(root, {"ham.tar.gz": tar_bytes(ham_folder_entries(ham))}) / "ham.tar.gz"
    ),
    "isic-downloads": lambda ham, test, root: write_tree(root / "isic", isic_files(ham, test)),
}


@pytest.mark.parametrize("layout", list(LOCAL_LAYOUTS))
def test_local_layouts(ham, isic_test, tmp_path, layout):
    local = LOCAL_LAYOUTS[layout](ham, isic_test, tmp_path / "input")
    data, paths = setup(tmp_path, source="local", local_path=local)

    record = assert_layout(download(data, paths), ham)

    assert record["provenance"] == {"path": str(local.resolve())}
    assert record["counts"]["images"] == len(ham.df) and not record["full_dataset"]
    assert bool(record["md5"]) == local.is_file()


def test_rebuild_replaces_old_layout_only_when_it_verifies(ham, tmp_path):
    local = write_tree(tmp_path / "input", ham_folder_entries(ham))
    data, paths = setup(tmp_path, source="synthetic", synthetic_lesions=14)
    download(data, paths)
    broken = write_tree(tmp_path / "broken", {**ham_folder_entries(ham), "HAM10000_metadata.csv": b"a,b\n1,2\n"})

    with pytest.raises(DataError, match=r"HAM10000_metadata\.csv: missing column"):
        download(data.model_copy(update={"source": "local", "local_path": broken}), paths)
    assert json.loads((Path(paths.raw) / SOURCE_FILE).read_text())["source"] == "synthetic"

    assert_layout(download(data.model_copy(update={"source": "local", "local_path": local}), paths), ham)


# --- failures are clear and leave nothing behind --------------------------------------------------------


def test_interrupted_download_resumes_with_range(server, ham, tmp_path):
    archive = zip_bytes(kaggle_entries(ham))
    server.files[KAGGLE_PATH] = archive
    server.cut_after = len(archive) // 5
    data, paths = setup(tmp_path, source="kaggle", kaggle_url=f"{server.url}/api/v1")
    part = Path(paths.downloads) / "kaggle" / "skin-cancer-mnist-ham10000.zip.part"

    with pytest.raises(DownloadError, match="run the stage again to resume"):
        download(data, paths, expected_images=len(ham.df))
    assert part.stat().st_size == 3 * server.cut_after  # each of three tries resumed where the last stopped
    assert [r for _, r, _ in server.requests] == [None, f"bytes={server.cut_after}-", f"bytes={2 * server.cut_after}-"]
    assert_nothing_built(paths)

    server.cut_after = None
    assert_layout(download(data, paths, expected_images=len(ham.df)), ham)
    assert server.requests[-1][1] == f"bytes={3 * (len(archive) // 5)}-"
    assert not part.exists()


def test_restarts_cleanly_when_server_ignores_range(server, ham, tmp_path):
    server.files[KAGGLE_PATH] = zip_bytes(kaggle_entries(ham))
    server.ignore_range = True
    data, paths = setup(tmp_path, source="kaggle", kaggle_url=f"{server.url}/api/v1")
    write_tree(Path(paths.downloads) / "kaggle", {"skin-cancer-mnist-ham10000.zip.part": b"stale bytes" * 10})

    assert_layout(download(data, paths, expected_images=len(ham.df)), ham)
    assert server.requests[0][1] == "bytes=110-"


def test_truncated_archive_is_a_clear_error(server, ham, tmp_path):
    archive = zip_bytes(kaggle_entries(ham))
    server.files[KAGGLE_PATH] = archive[: len(archive) // 2]
    data, paths = setup(tmp_path, source="kaggle", kaggle_url=f"{server.url}/api/v1")

    with pytest.raises(ArchiveError, match=r"skin-cancer-mnist-ham10000\.zip: not a readable zip.*truncated"):
        download(data, paths, expected_images=len(ham.df))
    assert_nothing_built(paths)


def test_corrupt_entry_names_it(ham, tmp_path):
    entries = ham_folder_entries(ham)
    archive = bytearray(zip_bytes(entries, zipfile.ZIP_STORED))
    victim = next(iter(ham.images))
    at = archive.find(ham.images[victim]) + len(ham.images[victim]) // 2
    archive[at] ^= 0xFF
    local = write_tree(tmp_path, {"ham.zip": bytes(archive)}) / "ham.zip"
    data, paths = setup(tmp_path, source="local", local_path=local)

    with pytest.raises(ArchiveError, match=rf"ham\.zip: entry 'images/{victim}\.jpg': Bad CRC-32"):
        download(data, paths)
    assert_nothing_built(paths)


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/evil-absolute.txt", "images/../../evil.txt"])
def test_zip_slip_is_refused(ham, tmp_path, evil):
    local = write_tree(tmp_path, {"ham.zip": zip_bytes({**ham_folder_entries(ham), evil: b"owned"})}) / "ham.zip"
    data, paths = setup(tmp_path, source="local", local_path=local)

    with pytest.raises(ArchiveError, match=rf"ham\.zip: refusing entry '{re.escape(evil)}'"):
        download(data, paths)
    assert_nothing_built(paths)
    assert not (tmp_path.parent / "evil.txt").exists() and not Path("/tmp/evil-absolute.txt").exists()


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside"])
def test_tar_symlink_out_of_the_archive_is_refused(ham, tmp_path, target):
    archive = tar_bytes(ham_folder_entries(ham), links={"images/link.jpg": target})
    local = write_tree(tmp_path, {"ham.tar.gz": archive}) / "ham.tar.gz"
    data, paths = setup(tmp_path, source="local", local_path=local)

    with pytest.raises(ArchiveError, match=rf"refusing entry 'images/link\.jpg': symlink to '{re.escape(target)}'"):
        download(data, paths)
    assert_nothing_built(paths)


def test_unreachable_server_fails_fast(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api/v1"
    data, paths = setup(tmp_path, source="kaggle", kaggle_url=url)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=rf"{re.escape(url)}.*cannot connect.*data\.source=local"):
        download(data, paths)
    assert time.monotonic() - start < 60  # no retry schedule for a refused connection; 60 s holds on a busy machine
    assert_nothing_built(paths)


def test_unknown_label_names_the_file(ham, tmp_path):
    bad = ham.df.copy()
    bad.loc[0, "dx"] = "melanocytic-ish"
    local = write_tree(tmp_path / "input", {**ham_folder_entries(ham), "HAM10000_metadata.csv": bad.to_csv().encode()})
    data, paths = setup(tmp_path, source="local", local_path=local)

    with pytest.raises(DataError, match=r"input/HAM10000_metadata\.csv: unknown label\(s\) \['melanocytic-ish'\]"):
        download(data, paths)
    assert_nothing_built(paths)


def test_missing_and_unreadable_images_are_named(ham, tmp_path):
    missing, broken = list(ham.images)[:2]
    entries = ham_folder_entries(ham)
    del entries[f"images/{missing}.jpg"]
    local = write_tree(tmp_path / "input", entries)
    data, paths = setup(tmp_path, source="local", local_path=local)
    with pytest.raises(
        DataError, match=rf"HAM10000_metadata\.csv: 1 of {len(ham.df)} listed images are missing.*{missing}"
    ):
        download(data, paths)

    entries[f"images/{missing}.jpg"] = ham.images[missing]
    entries[f"images/{broken}.jpg"] = ham.images[broken][:200]
    write_tree(local, entries)
    with pytest.raises(DataError, match=rf"1 unreadable image\(s\): .*{broken}\.jpg: not a readable image"):
        download(data, paths)
    assert_nothing_built(paths)


def test_cli_reports_errors_without_traceback(ham, tmp_path, capsys):
    local = write_tree(tmp_path / "input", {"HAM10000_metadata.csv": ham.csv()})
    params = tmp_path / "params.yaml"
    params.write_text(f"paths:\n  raw: {tmp_path / 'raw'}\n  downloads: {tmp_path / 'downloads'}\n")
    args = ["--params", str(params)]

    assert main([*args, "-S", "data.source=local", "-S", f"data.local_path={local}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing from" in err and "Traceback" not in err

    assert main([*args, "-S", "data.source=synthetic", "-S", "data.synthetic_lesions=14"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "raw")
