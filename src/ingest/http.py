"""HTTP downloads that resume a `.part` file with Range requests, show progress, and fail with a clear message."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

from src.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ATTEMPTS = 3  # tries per download; each retry resumes, and only after the last one made progress
OFFLINE_HINT = (
    "no network? use -S data.source=local -S data.local_path=<folder or archive of HAM10000>, "
    "or -S data.source=synthetic for a small generated dataset"
)
Auth = tuple[str, str] | None


class DownloadError(UserError):
    """A download that failed; the message names the URL and what to do."""


class AuthRequired(DownloadError):
    """The server answered 401/403."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"{url}: HTTP {status} (credentials needed or refused)")
        self.url, self.status = url, status


class _Interrupted(Exception):
    """The body stopped before its announced end."""


def _reason(err: Exception) -> str:
    """The useful part of a requests error, e.g. '[Errno 111] Connection refused'."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    return found.group(0).strip() if found else (text[:200] or type(err).__name__)


def _snippet(resp: requests.Response) -> str:
    """The start of an error body (servers often say why there), on one line."""
    try:
        text = resp.raw.read(300, decode_content=True).decode("utf-8", "replace")
    except (urllib3.exceptions.HTTPError, OSError, ValueError):
        return ""
    text = " ".join(text.split())
    return f": {text}" if text else ""


def _open(url: str, timeout_s: float, auth: Auth = None, headers: dict | None = None) -> requests.Response:
    """GET `url` streaming; network and HTTP errors become DownloadError."""
    try:
        resp = requests.get(url, stream=True, timeout=(timeout_s, timeout_s), auth=auth, headers=headers)
    except requests.Timeout:
        raise DownloadError(f"{url}: no answer within {timeout_s:g} s (data.timeout_s); {OFFLINE_HINT}") from None
    except requests.RequestException as err:
        raise DownloadError(f"{url}: cannot connect ({_reason(err)}); {OFFLINE_HINT}") from None
    if resp.status_code in (401, 403):
        resp.close()
        raise AuthRequired(url, resp.status_code)
    if resp.status_code >= 400 and resp.status_code != 416:
        detail = _snippet(resp)
        resp.close()
        raise DownloadError(f"{url}: HTTP {resp.status_code} {resp.reason}{detail}")
    return resp


def get_json(url: str, timeout_s: float) -> dict:
    """GET a JSON document."""
    with _open(url, timeout_s, headers={"Accept": "application/json"}) as resp:
        try:
            return resp.json()
        except ValueError:
            raise DownloadError(f"{url}: expected JSON, got {resp.text[:100]!r}") from None


def file_md5(path: Path) -> str:
    """MD5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(8 * CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _total_from_content_range(resp: requests.Response) -> int | None:
    found = re.search(r"/(\d+)\s*$", resp.headers.get("Content-Range", ""))
    return int(found.group(1)) if found else None


def _body(resp: requests.Response) -> Iterator[bytes]:
    """The body as it arrives, so that a dropped connection keeps every byte already received."""
    if not hasattr(resp.raw, "read1"):  # urllib3 < 2.3: whole chunks only
        yield from resp.iter_content(CHUNK)
        return
    while chunk := resp.raw.read1(CHUNK):
        yield chunk


def _fetch_once(url: str, part: Path, timeout_s: float, auth: Auth) -> None:
    """One GET into `part`, resuming from its size; raises _Interrupted when the body ends early."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # Range offsets count encoded bytes: ask for none
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with _open(url, timeout_s, auth, headers) as resp:
        if resp.status_code == 416:  # nothing left to send: complete if the sizes agree
            if _total_from_content_range(resp) == offset:
                return
            log.info("%s: the server cannot resume from byte %d; downloading from the start", url, offset)
            part.unlink()
            return _fetch_once(url, part, timeout_s, auth)
        if offset and resp.status_code != 206:
            log.info("%s: the server ignored the Range request; downloading from the start", url)
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with (
            open(part, "ab" if offset else "wb") as f,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-5], disable=None) as bar,
        ):
            try:
                for chunk in _body(resp):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as err:
                raise _Interrupted(_reason(err)) from None
        if total is not None and part.stat().st_size < total:
            raise _Interrupted(f"got {part.stat().st_size} of {total} bytes")


def _download(url: str, dest: Path, timeout_s: float, auth: Auth) -> None:
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, ATTEMPTS + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch_once(url, part, timeout_s, auth)
            break
        except _Interrupted as err:
            got = part.stat().st_size if part.exists() else 0
            if attempt == ATTEMPTS or got <= before:
                raise DownloadError(
                    f"{url}: the download stopped ({err}); {got} bytes are kept in {part}: "
                    "run the stage again to resume"
                ) from None
            log.warning("%s: the download stopped (%s); resuming from byte %d", url, err, got)
    os.replace(part, dest)


def fetch(url: str, dest: Path, timeout_s: float, auth: Auth = None, md5: str | None = None) -> Path:
    """Download `url` to `dest` unless it is already there (resuming `dest.part`), then check its MD5."""
    if dest.exists():
        log.info("%s: already downloaded", dest)
    else:
        log.info("downloading %s -> %s", url, dest)
        _download(url, dest, timeout_s, auth)
    if md5:
        actual = file_md5(dest)
        if actual != md5.lower():
            dest.unlink()
            raise DownloadError(
                f"{dest}: MD5 {actual} does not match the {md5} published for {url}; "
                "the file was deleted: run the stage again to download it afresh"
            )
    return dest
