"""A job's archive (zip or tar, tar compressed or not): its files, safely.

Refused with an `ArchiveRefused` naming the problem (400: what is wrong with
it; 413: what is too large):

- more files than the job may take (413), or more bytes once unpacked than
  --max-archive-mb (413): a zip's counts and sizes come from its central
  directory, checked for every entry before one byte is inflated; a tar's
  from each header before its data is read;
- an entry that compresses better than MAX_RATIO to one (413): a zip bomb,
  seen in the central directory too;
- an absolute path, or one with a `..` part (400);
- an archive inside the archive, by its name or its first bytes (400);
- links, devices and encrypted entries (400).

zipfile stops inflating an entry at the size its directory declares (and
checks its CRC), so a lying header cannot inflate more than was allowed.
Folders, `__MACOSX/` and hidden files are skipped: they are not images.
"""

from __future__ import annotations

import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath, PureWindowsPath

# Images do not compress: a JPEG or PNG zips to about its own size. A ratio
# beyond this is a bomb, whatever the file claims to be.
MAX_RATIO = 100
# Below this an entry's ratio says nothing (a tiny file of one colour).
RATIO_FLOOR_BYTES = 64 * 1024
NESTED_SUFFIXES = (
    ".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".zst", ".7z", ".rar",
)  # fmt: skip
NESTED_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c",
                b"Rar!", b"\x28\xb5\x2f\xfd")  # fmt: skip


# What a corrupt archive makes zipfile, tarfile and their decompressors raise.
READ_ERRORS = (
    zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError, NotImplementedError,
    RuntimeError, zlib.error, lzma.LZMAError, struct.error,
)  # fmt: skip


class ArchiveRefused(Exception):
    """The archive is refused: `status` (400 or 413) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def files(data: bytes, max_files: int, max_bytes: int) -> Iterator[tuple[str, bytes]]:
    """(name, contents) of every file of the archive `data`, in its order;
    ArchiveRefused before anything is yielded when a zip is unacceptable,
    and as soon as it is found for a tar."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        yield from _zip_files(data, max_files, max_bytes)
        return
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")  # noqa: SIM115
    except READ_ERRORS as exc:
        raise ArchiveRefused(400, f"the archive is neither a zip nor a tar file ({exc})") from None
    with archive:
        yield from _tar_files(archive, max_files, max_bytes)


def _zip_files(data: bytes, max_files: int, max_bytes: int) -> Iterator[tuple[str, bytes]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except READ_ERRORS as exc:
        raise ArchiveRefused(400, f"the zip file cannot be read ({exc})") from None
    with archive:
        entries = [i for i in archive.infolist() if not i.is_dir()]
        for info in entries:
            _check_name(info.filename)
        kept = [i for i in entries if not _skipped(i.filename)]
        _check_count(len(kept), max_files)
        total = 0
        for info in kept:
            if info.flag_bits & 0x1:
                raise ArchiveRefused(400, f"archive entry {info.filename!r} is encrypted")
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > RATIO_FLOOR_BYTES and ratio > MAX_RATIO:
                raise ArchiveRefused(
                    413,
                    f"archive entry {info.filename!r} would inflate {ratio:.0f} times "
                    f"(more than {MAX_RATIO}): refused as a zip bomb",
                )
            total += info.file_size
            if total > max_bytes:
                raise _too_big(max_bytes)
        for info in kept:
            try:
                contents = archive.read(info)
            except READ_ERRORS as exc:
                raise ArchiveRefused(
                    400, f"archive entry {info.filename!r} cannot be read ({exc})"
                ) from None
            _check_nested(info.filename, contents)
            yield info.filename, contents


def _tar_files(
    archive: tarfile.TarFile, max_files: int, max_bytes: int
) -> Iterator[tuple[str, bytes]]:
    count = total = 0
    try:
        for member in archive:
            _check_name(member.name)
            if member.isdir():
                continue
            if not member.isfile():
                raise ArchiveRefused(
                    400, f"archive entry {member.name!r} is a link or a device, not a file"
                )
            if _skipped(member.name):
                continue
            count += 1
            _check_count(count, max_files)
            total += member.size
            if total > max_bytes:
                raise _too_big(max_bytes)
            extracted = archive.extractfile(member)
            contents = extracted.read() if extracted else b""
            _check_nested(member.name, contents)
            yield member.name, contents
    except READ_ERRORS as exc:
        raise ArchiveRefused(400, f"the tar file cannot be read ({exc})") from None


def _check_name(name: str) -> None:
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith("\\"):
        raise ArchiveRefused(400, f"archive entry {name!r} has an absolute path")
    if ".." in posix.parts or ".." in windows.parts:
        raise ArchiveRefused(400, f"archive entry {name!r} has a '..' in its path")


def _skipped(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _check_count(count: int, max_files: int) -> None:
    if count > max_files:
        raise ArchiveRefused(
            413, f"the archive holds more files than the job may take ({max_files})"
        )


def _too_big(max_bytes: int) -> ArchiveRefused:
    return ArchiveRefused(
        413, f"the archive unpacks to more than {max_bytes / 2**20:g} MB (--max-archive-mb)"
    )


def _check_nested(name: str, contents: bytes) -> None:
    nested = name.lower().endswith(NESTED_SUFFIXES) or contents.startswith(NESTED_MAGIC)
    if nested or contents[257:262] == b"ustar":
        raise ArchiveRefused(
            400, f"archive entry {name!r} is an archive: nested archives are refused"
        )
