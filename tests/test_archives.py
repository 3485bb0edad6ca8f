"""Hostile job archives and bodies (issue 29): a member larger than an image
refused from its header, every byte inflated counted (skipped members too),
a zip's entries counted before zipfile builds them (its end record, ZIP64's
too, and its central directory walked), zip symlinks refused, image fields
held to --max-upload-mb, and a job body over --max-job-upload-mb refused
naming that limit, streamed or declared; through Flask's test client on real
Redis and against a real server process."""

from __future__ import annotations

import dataclasses
import io
import random
import stat
import struct
import tarfile
import tracemalloc
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
from conftest import CHELSEA, start_web, stop
from flask.testing import FlaskClient

from bench.hostile_archives import entries_zip, zeros_tar_gz
from keras_server.broker.messages import Keys
from keras_server.settings import Settings
from keras_server.web import archives
from keras_server.web.app import create_app

MIB = 1 << 20


def post_job(client: FlaskClient, archive: bytes, name: str = "a", **fields: Any) -> Any:
    data = {"archive": (io.BytesIO(archive), name), **fields}
    return client.post("/jobs", data=data, content_type="multipart/form-data")


def tarred(entries: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def refused(settings: Settings, archive: bytes, **limits: Any) -> tuple[int, str]:
    client = create_app(dataclasses.replace(settings, **limits)).test_client()
    answer = post_job(client, archive)
    return answer.status_code, answer.get_json().get("error", "")


def test_a_member_larger_than_an_image_is_refused_from_its_header(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The 1 MB .tar.gz of a 900 MB member of zeros: refused from its header,
    nothing inflated (the reader's allocations stay far below the member)."""
    bomb = zeros_tar_gz("zeros.png", 900 * MIB)
    assert len(bomb) < 1.5 * MIB
    client = create_app(settings).test_client()
    tracemalloc.start()
    try:
        answer = post_job(client, bomb, "bomb.tar.gz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.status_code == 413, answer.get_json()
    error = answer.get_json()["error"]
    assert "'zeros.png'" in error
    assert "16 MB, --max-upload-mb" in error
    assert peak < 64 * MIB
    assert not redis_client.keys(Keys(settings.queue_name).tag + ":job*")


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w"])
def test_skipped_members_count_against_max_archive_mb(settings: Settings, mode: str) -> None:
    """Hidden files and __MACOSX/ are not images, but inflating them costs
    the same: four of 400 KB, with a 1 MB budget, are over it."""
    hidden = {f".hidden{i}": bytes(400 * 1024) for i in range(2)}
    hidden |= {f"__MACOSX/._{i}.png": bytes(400 * 1024) for i in range(2)}
    archive = tarred({**hidden, "cat.png": CHELSEA}, mode)
    status, error = refused(settings, archive, max_archive_mb=1.0)
    assert status == 413
    assert "--max-archive-mb" in error


def test_a_tar_is_read_no_further_than_its_budget() -> None:
    """Reading stops as soon as the budget is spent: one byte past it, the
    decompressed stream is not read on."""
    noise = random.Random(0).randbytes
    archive = tarred({".a": noise(MIB), ".b": noise(MIB), ".c": noise(MIB)})
    reads: list[int] = []

    class Counted(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            data = super().read(size)
            reads.append(len(data))
            return data

    with pytest.raises(archives.ArchiveRefused, match="--max-archive-mb") as refusal:
        list(archives.files(Counted(archive), 10, MIB + MIB // 2, 2 * MIB))
    assert refusal.value.status == 413
    assert sum(reads) < len(archive)  # the compressed file is not read to its end


def _zip64(entries: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A zip with ZIP64 end records, as zipfile writes them past 65535
    entries (the limit lowered while it writes)."""
    with monkeypatch.context() as patch:
        patch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data in entries.items():
                archive.writestr(name, data)
    return buffer.getvalue()


def _declaring(archive: bytes, entries: int) -> bytes:
    """`archive` (a zip) with its end record declaring `entries`."""
    at = archive.rindex(b"PK\x05\x06")
    record = bytearray(archive[at:])
    struct.pack_into("<HH", record, 8, entries, entries)
    return archive[:at] + bytes(record)


def test_a_zip_with_too_many_entries_is_refused_before_zipfile_builds_them(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hidden files are skipped, but zipfile would build every entry first:
    refused from the end record (ZIP64's too), or, when that record lies, by
    walking the directory, before zipfile.ZipFile is even opened."""
    many = entries_zip(2000)
    archives_ = (many, _zip64({f".{i}": b"" for i in range(200)}, monkeypatch),
                 _declaring(entries_zip(300), 1))  # fmt: skip
    opened: list[object] = []
    real = zipfile.ZipFile.__init__

    def watched(self: zipfile.ZipFile, *args: Any, **kwargs: Any) -> None:
        opened.append(args[0])
        real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(zipfile.ZipFile, "__init__", watched)
        for archive in archives_:
            status, error = refused(settings, archive, max_job_images=3)
            assert status == 413
            assert "more than 76 entries" in error
        assert not opened
        # The same zip within the limit is opened, and read.
        assert refused(settings, many, max_job_images=1000)[0] != 413
        assert opened


def test_a_zip_symlink_is_refused(settings: Settings) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("cat.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    status, error = refused(settings, buffer.getvalue())
    assert status == 400
    assert "'cat.png' is a link" in error


def test_an_image_field_is_held_to_max_upload_mb(settings: Settings) -> None:
    client = create_app(dataclasses.replace(settings, max_upload_mb=0.5)).test_client()
    data = {"image": [(io.BytesIO(CHELSEA), "a.png"), (io.BytesIO(bytes(MIB)), "big.png")]}
    answer = client.post("/jobs", data=data, content_type="multipart/form-data")
    assert answer.status_code == 413
    assert "'big.png'" in answer.get_json()["error"]
    assert "--max-upload-mb" in answer.get_json()["error"]


@pytest.mark.slow
def test_a_real_server_refuses_hostile_jobs_naming_the_limit(settings: Settings) -> None:
    """Against granian: a streamed (chunked) body over --max-job-upload-mb is a
    413 naming that limit, as is one that declares its length; the 900 MB
    member and the zip of many entries are refused; a good job is taken."""
    web, base = start_web(settings, "--model", "sim", "--max-job-upload-mb", "2")
    try:
        boundary = "b0undary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="archive"; '
            f'filename="a.tar"\r\n\r\n'
        ).encode()

        def chunked() -> Iterator[bytes]:
            yield head
            for _ in range(3):
                yield bytes(MIB)
            yield f"\r\n--{boundary}--\r\n".encode()

        kind = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        for body in (chunked(), b"".join(chunked())):
            answer = requests.post(base + "/jobs", data=body, headers=kind, timeout=30)
            assert answer.status_code == 413, answer.text
            assert "2 MB limit (--max-job-upload-mb)" in answer.json()["error"]
        bomb = zeros_tar_gz("zeros.png", 900 * MIB)
        answer = requests.post(base + "/jobs", files={"archive": ("b.tgz", bomb)}, timeout=30)
        assert answer.status_code == 413, answer.text
        assert "'zeros.png' is larger than an image may be" in answer.json()["error"]
        many = entries_zip(5000)
        answer = requests.post(base + "/jobs", files={"archive": ("m.zip", many)}, timeout=30)
        assert answer.status_code == 413, answer.text
        assert "entries" in answer.json()["error"]
        good = tarred({"cat.png": CHELSEA, ".DS_Store": b"x"})
        answer = requests.post(base + "/jobs", files={"archive": ("g.tgz", good)}, timeout=30)
        assert answer.status_code == 202, answer.text
    finally:
        stop(web)
