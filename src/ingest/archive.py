"""Zip and tar archives read safely: every entry is checked first, and only chosen entries are copied out.

An archive with an absolute path, a `..` component, or a link that points outside it is refused as a whole
(zip-slip): such an entry is either an attack or a broken archive, and neither should become training data.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from src.ingest.rawdata import DataError

ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, KeyError)


class ArchiveError(DataError):
    """An archive that is corrupt, truncated or unsafe; the message names the archive and the entry."""


def is_archive(path: Path) -> bool:
    """Whether the name looks like a zip or tar archive."""
    name = path.name.lower()
    return name.endswith(ZIP_SUFFIXES + TAR_SUFFIXES)


def _unsafe(name: str) -> bool:
    """An entry name that would land outside the folder it is extracted into."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in posix.split("/")


def _escapes(entry: str, link: str) -> bool:
    """A link target, relative to the entry's folder, that leaves the archive's root."""
    posix = link.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        return True
    depth = len(PurePosixPath(entry).parent.parts)
    for part in posix.split("/"):
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            return True
    return False


class Archive:
    """An opened archive whose entries were all checked; `names` lists its regular files."""

    path: Path
    names: list[str]

    def label(self, name: str) -> str:
        return f"{self.path}:{name}"

    def _refuse(self, name: str, why: str) -> ArchiveError:
        return ArchiveError(f"{self.path}: refusing entry {name!r}: {why}; the archive was not extracted")

    def _corrupt(self, name: str | None, err: object) -> ArchiveError:
        where = f"entry {name!r}: " if name else ""
        return ArchiveError(
            f"{self.path}: {where}{err or type(err).__name__}; the archive is corrupt or truncated; "
            "delete it and download or copy it again"
        )

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def copy_out(self, pairs: list[tuple[str, Path]]) -> None:
        """Write each entry `name` to its `target` path (progress bar)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZipArchive(Archive):
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise self._corrupt(None, f"not a readable zip archive ({err})") from None
        try:
            self.names = [info.filename for info in self._zip.infolist() if self._check(info)]
        except BaseException:
            self._zip.close()
            raise

    def _check(self, info: zipfile.ZipInfo) -> bool:
        """Refuse unsafe entries; True for a regular file."""
        if _unsafe(info.filename):
            raise self._refuse(info.filename, "absolute path or '..' would write outside the target folder")
        if stat.S_ISLNK(info.external_attr >> 16):
            target = self.read(info.filename).decode("utf-8", "replace")
            if _escapes(info.filename, target):
                raise self._refuse(info.filename, f"symlink to {target!r} points outside the archive")
            return False
        return not info.is_dir()

    def read(self, name: str) -> bytes:
        try:
            return self._zip.read(name)
        except _READ_ERRORS as err:
            raise self._corrupt(name, err) from None

    def copy_out(self, pairs: list[tuple[str, Path]]) -> None:
        pairs = sorted(pairs, key=lambda pair: self._zip.getinfo(pair[0]).header_offset)  # read sequentially
        for name, target in tqdm(pairs, desc=f"extract {self.path.name}", unit="file", disable=None):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with self._zip.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except _READ_ERRORS as err:
                raise self._corrupt(name, err) from None

    def close(self) -> None:
        self._zip.close()


class TarArchive(Archive):
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tar = tarfile.open(path)  # noqa: SIM115 - kept open for the archive's lifetime, closed in close()
            members = self._tar.getmembers()
        except _READ_ERRORS as err:
            raise self._corrupt(None, f"not a readable tar archive ({err})") from None
        try:
            self._members = {m.name: m for m in members if self._check(m)}
        except BaseException:
            self._tar.close()
            raise
        self.names = list(self._members)

    def _check(self, member: tarfile.TarInfo) -> bool:
        """Refuse unsafe entries; True for a regular file or a hard link to one."""
        if _unsafe(member.name):
            raise self._refuse(member.name, "absolute path or '..' would write outside the target folder")
        if member.issym() and _escapes(member.name, member.linkname):
            raise self._refuse(member.name, f"symlink to {member.linkname!r} points outside the archive")
        if member.islnk() and _unsafe(member.linkname):
            raise self._refuse(member.name, f"hard link to {member.linkname!r} points outside the archive")
        return member.isfile() or member.islnk()

    def _open(self, name: str):
        handle = self._tar.extractfile(self._members[name])
        if handle is None:
            raise KeyError(f"{name} has no data")
        return handle

    def read(self, name: str) -> bytes:
        try:
            with self._open(name) as src:
                return src.read()
        except _READ_ERRORS as err:
            raise self._corrupt(name, err) from None

    def copy_out(self, pairs: list[tuple[str, Path]]) -> None:
        order = {name: i for i, name in enumerate(self.names)}  # archive order: no seeking back in a .tar.gz
        for name, target in tqdm(
            sorted(pairs, key=lambda pair: order[pair[0]]),
            desc=f"extract {self.path.name}",
            unit="file",
            disable=None,
        ):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with self._open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except _READ_ERRORS as err:
                raise self._corrupt(name, err) from None

    def close(self) -> None:
        self._tar.close()


def open_archive(path: Path) -> Archive:
    """Open a zip or tar archive after checking every entry; ArchiveError names the archive and entry."""
    if path.name.lower().endswith(ZIP_SUFFIXES):
        return ZipArchive(path)
    if path.name.lower().endswith(TAR_SUFFIXES) or tarfile.is_tarfile(path):
        return TarArchive(path)
    if zipfile.is_zipfile(path):
        return ZipArchive(path)
    raise ArchiveError(f"{path}: not a zip or tar archive")
