"""A job's archive (zip or tar, tar plain or gzip, bzip2 or xz compressed),
read from a file (the spooled upload): its files, one at a time, safely.

Refused with an `ArchiveRefused` naming the problem (400: what is wrong with
it; 413: what is too large):

- more entries than the job may take: its files (--max-job-images) and, all
  kinds counted, ENTRIES_PER_FILE entries per file it may take plus
  SPARE_ENTRIES (413). A zip's entries are counted from its end of central
  directory record (ZIP64 included) and then by walking the directory, before
  zipfile builds one entry (it builds them all at once); a tar's as its
  headers are read, since tarfile keeps every one;
- a file larger than one image may be (--max-upload-mb), from its header,
  before it is read (413), hidden files included;
- more bytes inflated than --max-archive-mb (413): every byte counts, the
  tar headers and the members skipped (a compressed tar inflates what it
  seeks past) included; reading stops as soon as it is over. A zip's declared
  sizes are summed first, then the bytes actually inflated are counted;
- an entry that compresses better than MAX_RATIO to one (413): a zip bomb,
  seen in the central directory;
- an absolute path, or one with a `..` part (400);
- an archive inside the archive, by its name or its first bytes (400);
- links (a zip's too: a Unix mode of S_IFLNK in its external attributes),
  devices, sparse files and encrypted entries (400);
- a tar header extension (pax, GNU long name) over MAX_HEADER_BYTES, an
  xz stream needing more than LZMA_MEMLIMIT to decompress, or a zip
  central directory over CENTRAL_BYTES_PER_ENTRY per entry allowed (413).

Only one file's bytes are in memory at a time (at most --max-upload-mb).
Folders, `__MACOSX/` and hidden files are skipped: they are not images.
"""

from __future__ import annotations

import _compression
import bz2
import gzip
import io
import lzma
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath, PureWindowsPath
from typing import IO, NamedTuple

# Images do not compress: a JPEG or PNG zips to about its own size. A ratio
# beyond this is a bomb, whatever the file claims to be.
MAX_RATIO = 100
# Below this an entry's ratio says nothing (a tiny file of one colour).
RATIO_FLOOR_BYTES = 64 * 1024
# Entries of every kind an archive may hold per file the job may take, and a
# few more: a macOS zip holds each image's `__MACOSX/._` twin and its folders.
ENTRIES_PER_FILE = 4
SPARE_ENTRIES = 64
# A zip's central directory entry is 46 bytes and its name and extra fields:
# names longer than about 900 bytes are not a photo library's.
CENTRAL_BYTES_PER_ENTRY = 1024
# A pax header or GNU long name is read whole by tarfile: a path and a few
# attributes take a few kilobytes.
MAX_HEADER_BYTES = 1 << 20
# xz -9 needs 65 MB to decompress; a stream may declare a dictionary of 1.5 GB.
LZMA_MEMLIMIT = 72 << 20
# Bytes read at a time from a member.
CHUNK = 64 * 1024
NESTED_SUFFIXES = (
    ".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".zst", ".7z", ".rar",
)  # fmt: skip
NESTED_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c",
                b"Rar!", b"\x28\xb5\x2f\xfd")  # fmt: skip

# The zip records read before zipfile is let in (APPNOTE 4.3.12-4.3.16).
END_OF_DIRECTORY = struct.Struct("<4s4H2LH")
ZIP64_LOCATOR = struct.Struct("<4sLQL")
ZIP64_END_OF_DIRECTORY = struct.Struct("<4sQ2H2L4Q")
CENTRAL_ENTRY = struct.Struct("<4s4B4HL2L5H2L")

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


def files(
    source: IO[bytes], max_files: int, max_bytes: int, max_file_bytes: int
) -> Iterator[tuple[str, bytes]]:
    """(name, contents) of every file of the archive in the seekable file
    `source`, in its order: at most `max_files` files of at most
    `max_file_bytes` each, `max_bytes` inflated in all. ArchiveRefused before
    anything is yielded when a zip is unacceptable, and as soon as it is
    found for a tar."""
    limits = _Limits(max_files, max_bytes, max_file_bytes)
    try:
        directory = _zip_directory(source)
    except READ_ERRORS as exc:
        raise ArchiveRefused(400, f"the zip file cannot be read ({exc})") from None
    if directory is not None:
        yield from _zip_files(source, directory, limits)
        return
    yield from _tar_files(source, limits)


class _Limits(NamedTuple):
    files: int
    bytes: int
    file_bytes: int

    @property
    def entries(self) -> int:
        return ENTRIES_PER_FILE * self.files + SPARE_ENTRIES


# -- zip --------------------------------------------------------------------


class _Directory(NamedTuple):
    """A zip's central directory: the entries its end record declares, where
    it starts and its size in bytes."""

    entries: int
    start: int
    size: int


def _zip_directory(source: IO[bytes]) -> _Directory | None:
    """The central directory as zipfile will find it (Python 3.11's
    _EndRecData and _RealGetContents: the end record at the very end, else
    the last one in the final 64 KiB; its ZIP64 record just before the ZIP64
    locator), or None when `source` is not a zip."""
    source.seek(0, os.SEEK_END)
    length = source.tell()
    if length < END_OF_DIRECTORY.size:
        return None
    tail_start = max(length - (1 << 16) - END_OF_DIRECTORY.size, 0)
    source.seek(tail_start)
    tail = source.read()
    last = len(tail) - END_OF_DIRECTORY.size
    if tail.startswith(b"PK\x05\x06", last) and tail.endswith(b"\0\0"):
        at = last
    else:
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at > last:
            return None
    _, _, _, here, total, size, _, _ = END_OF_DIRECTORY.unpack_from(tail, at)
    record = tail_start + at
    entries, start = max(here, total), record - size
    zip64 = record - ZIP64_LOCATOR.size - ZIP64_END_OF_DIRECTORY.size
    if zip64 >= 0:
        source.seek(record - ZIP64_LOCATOR.size)
        if source.read(4) == b"PK\x06\x07":
            source.seek(zip64)
            data = source.read(ZIP64_END_OF_DIRECTORY.size)
            if data.startswith(b"PK\x06\x06") and len(data) == ZIP64_END_OF_DIRECTORY.size:
                fields = ZIP64_END_OF_DIRECTORY.unpack(data)
                entries, size = max(fields[6], fields[7]), fields[8]
                start = zip64 - size
    return _Directory(entries, start, size)


def _zip_files(
    source: IO[bytes], directory: _Directory, limits: _Limits
) -> Iterator[tuple[str, bytes]]:
    _check_entries(directory.entries, limits)
    if directory.size > CENTRAL_BYTES_PER_ENTRY * limits.entries:
        raise ArchiveRefused(
            413,
            f"the zip's central directory is {directory.size} bytes, more than "
            f"{CENTRAL_BYTES_PER_ENTRY} per entry the archive may hold ({limits.entries})",
        )
    _check_entries(_walk_directory(source, directory, limits.entries), limits)
    try:
        archive = zipfile.ZipFile(source)
    except READ_ERRORS as exc:
        raise ArchiveRefused(400, f"the zip file cannot be read ({exc})") from None
    with archive:
        kept = _zip_kept(archive.infolist(), limits)
        total = 0
        for info in kept:
            try:
                contents = _read(archive.open(info), info.filename, limits, total)
            except READ_ERRORS as exc:
                raise ArchiveRefused(
                    400, f"archive entry {info.filename!r} cannot be read ({exc})"
                ) from None
            total += len(contents)
            _check_nested(info.filename, contents)
            yield info.filename, contents
            del contents  # not held while the next file is read


def _walk_directory(source: IO[bytes], directory: _Directory, limit: int) -> int:
    """How many entries zipfile will build from the directory (or more than
    `limit`, counting stops there), whatever its end record declared."""
    if directory.start < 0:
        return 0  # zipfile refuses it
    source.seek(directory.start)
    count = walked = 0
    while walked < directory.size and count <= limit:
        header = source.read(CENTRAL_ENTRY.size)
        if len(header) < CENTRAL_ENTRY.size or not header.startswith(b"PK\x01\x02"):
            break  # zipfile refuses it
        count += 1
        variable = sum(CENTRAL_ENTRY.unpack(header)[12:15])  # name, extra, comment
        walked += CENTRAL_ENTRY.size + variable
        source.seek(variable, os.SEEK_CUR)
    return count


def _zip_kept(infos: list[zipfile.ZipInfo], limits: _Limits) -> list[zipfile.ZipInfo]:
    """The entries to read, once every entry passed the checks that its
    central directory record allows."""
    for info in infos:
        _check_name(info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _not_a_file(info.filename)
    entries = [i for i in infos if not i.is_dir()]
    for info in entries:
        _check_file_size(info.filename, info.file_size, limits)
    kept = [i for i in entries if not _skipped(i.filename)]
    _check_count(len(kept), limits)
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
        if total > limits.bytes:
            raise _too_big(limits.bytes)
    return kept


# -- tar --------------------------------------------------------------------


class _Inflated:
    """The decompressed tar stream as tarfile reads it: its position (every
    byte inflated, read or sought past) is refused beyond the archive's
    budget, before a seek past it inflates anything; while a header is read
    (`headers`), reading more than MAX_HEADER_BYTES is refused."""

    def __init__(self, stream: IO[bytes], max_bytes: int) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.position = 0
        self.headers = False
        self.header_bytes = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.max_bytes - self.position + 1
        if self.headers:
            self.header_bytes += size
            if self.header_bytes > MAX_HEADER_BYTES:
                raise ArchiveRefused(
                    413,
                    f"a tar header is larger than {MAX_HEADER_BYTES / 2**20:g} MB "
                    "(a pax header or long name)",
                )
        data = self.stream.read(min(size, self.max_bytes - self.position + 1))
        self.position += len(data)
        if self.position > self.max_bytes:
            raise _too_big(self.max_bytes)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            raise ValueError("a tar stream is read from its start")
        target = offset if whence == os.SEEK_SET else self.position + offset
        if target > self.max_bytes:
            raise _too_big(self.max_bytes)
        self.position = self.stream.seek(target)
        return self.position

    def tell(self) -> int:
        return self.position

    def start_header(self) -> None:
        self.headers, self.header_bytes = True, 0


def _decompressed(source: IO[bytes]) -> IO[bytes]:
    """The tar inside `source`, by its first bytes: gzip, bzip2, xz or none."""
    source.seek(0)
    magic = source.read(6)
    source.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=source, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(source)
    if magic.startswith(b"\xfd7zXZ\x00"):
        # lzma.LZMAFile takes no memlimit; this is its reader, with one.
        reader = _compression.DecompressReader(
            source, lzma.LZMADecompressor, trailing_error=lzma.LZMAError,
            format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT,
        )  # fmt: skip
        return io.BufferedReader(reader)
    return source


def _tar_files(source: IO[bytes], limits: _Limits) -> Iterator[tuple[str, bytes]]:
    decompressed = _decompressed(source)
    try:
        yield from _tar_members(_Inflated(decompressed, limits.bytes), limits)
    finally:
        if decompressed is not source:
            decompressed.close()  # its decompressor's memory, now


def _tar_members(stream: _Inflated, limits: _Limits) -> Iterator[tuple[str, bytes]]:
    try:
        stream.start_header()
        archive = tarfile.open(fileobj=stream, mode="r:")  # type: ignore[call-overload]  # noqa: SIM115
    except READ_ERRORS as exc:
        raise _unreadable(exc, "the archive is neither a zip nor a tar file") from None
    count = entries = 0
    try:
        with archive:
            while True:
                stream.start_header()
                member = archive.next()
                stream.headers = False
                if member is None:
                    break
                entries += 1
                _check_entries(entries, limits)
                _check_name(member.name)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise _not_a_file(member.name)
                if member.issparse():
                    raise ArchiveRefused(400, f"archive entry {member.name!r} is a sparse file")
                _check_file_size(member.name, member.size, limits)
                if stream.position + member.size > limits.bytes:
                    raise _too_big(limits.bytes)
                if _skipped(member.name):
                    continue
                count += 1
                _check_count(count, limits)
                extracted = archive.extractfile(member)
                contents = _read(extracted, member.name, limits) if extracted else b""
                _check_nested(member.name, contents)
                yield member.name, contents
                del contents  # not held while the next file is read
    except READ_ERRORS as exc:
        raise _unreadable(exc, "the tar file cannot be read") from None


# -- both -------------------------------------------------------------------


def _read(member: IO[bytes], name: str, limits: _Limits, inflated: int = 0) -> bytes:
    """The member's bytes, read a chunk at a time and counted: at most
    one file's limit, and the archive's budget less what was `inflated`."""
    chunks, size = [], 0
    with member:
        while chunk := member.read(CHUNK):
            size += len(chunk)
            _check_file_size(name, size, limits)
            if inflated + size > limits.bytes:
                raise _too_big(limits.bytes)
            chunks.append(chunk)
    return b"".join(chunks)


def _check_name(name: str) -> None:
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith("\\"):
        raise ArchiveRefused(400, f"archive entry {name!r} has an absolute path")
    if ".." in posix.parts or ".." in windows.parts:
        raise ArchiveRefused(400, f"archive entry {name!r} has a '..' in its path")


def _skipped(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _check_entries(count: int, limits: _Limits) -> None:
    if count > limits.entries:
        raise ArchiveRefused(
            413,
            f"the archive holds more than {limits.entries} entries, folders and hidden "
            f"files included ({ENTRIES_PER_FILE} per file the job may take, and "
            f"{SPARE_ENTRIES} more)",
        )


def _check_count(count: int, limits: _Limits) -> None:
    if count > limits.files:
        raise ArchiveRefused(
            413, f"the archive holds more files than the job may take ({limits.files})"
        )


def _check_file_size(name: str, size: int, limits: _Limits) -> None:
    if size > limits.file_bytes:
        raise ArchiveRefused(
            413,
            f"archive entry {name!r} is larger than an image may be "
            f"({limits.file_bytes / 2**20:g} MB, --max-upload-mb)",
        )


def _too_big(max_bytes: int) -> ArchiveRefused:
    return ArchiveRefused(
        413, f"the archive inflates to more than {max_bytes / 2**20:g} MB (--max-archive-mb)"
    )


def _unreadable(exc: BaseException, what: str) -> ArchiveRefused:
    if isinstance(exc, lzma.LZMAError) and "memory usage limit" in str(exc).lower():
        return ArchiveRefused(
            413, f"the xz stream needs more than {LZMA_MEMLIMIT >> 20} MB to decompress"
        )
    return ArchiveRefused(400, f"{what} ({exc})")


def _not_a_file(name: str) -> ArchiveRefused:
    return ArchiveRefused(400, f"archive entry {name!r} is a link or a device, not a file")


def _check_nested(name: str, contents: bytes) -> None:
    nested = name.lower().endswith(NESTED_SUFFIXES) or contents.startswith(NESTED_MAGIC)
    if nested or contents[257:262] == b"ustar":
        raise ArchiveRefused(
            400, f"archive entry {name!r} is an archive: nested archives are refused"
        )
