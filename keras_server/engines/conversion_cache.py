"""The conversion cache: converted models on disk, so a second start skips the work.

An entry is a directory named by the hash of everything its files depend on
(the model and its weights, the engine and precision, the versions of every
tool that took part, the input size and preprocessing, the calibration
images). Its `manifest.json` lists each file with its size and SHA-256, and
is written last: an entry is built in a scratch directory and renamed into
place in one step, so a reader sees a whole entry or none. On every read the
files are checked against the manifest; an entry that fails (a truncated
file, a flipped byte, a manifest from another format) is logged, deleted and
rebuilt, never served. Processes converting the same model at once take turns
on a lock file, so it is converted once. A stale entry is one whose inputs changed: its key
differs, so it is simply not found.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when the layout of an entry or what it holds changes.
FORMAT = 1
MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def key_of(inputs: Mapping[str, Any]) -> str:
    """The entry's name: a hash of everything its content depends on."""
    text = json.dumps({"format": FORMAT, **inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    path: Path  # the entry's directory
    meta: dict[str, Any]  # what the builder recorded beside the files

    def file(self, name: str) -> Path:
        return self.path / name


class CorruptEntry(Exception):
    """An entry whose files do not match its manifest."""


class ConversionCache:
    """Verified entries under `root` (`--cache-dir`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str) -> Entry | None:
        """The verified entry for `key`, or None (missing, or corrupt and removed)."""
        path = self.root / key
        if not path.exists():
            return None
        try:
            return _verify(path, key)
        except CorruptEntry as exc:
            log.warning("conversion cache entry %s is corrupt (%s): rebuilding it", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            return None

    def build(
        self, key: str, inputs: Mapping[str, Any], make: Callable[[Path], dict[str, Any]]
    ) -> Entry:
        """Run `make(directory)`, which writes the entry's files and returns its
        meta, then publish the entry atomically and return it verified.

        Processes building the same entry at once (workers of one cluster
        starting together) take turns on a lock file: the second finds the
        first one's entry instead of converting again."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f".lock-{key}").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            built = self.get(key)
            if built is not None:
                log.info("conversion cache entry %s was built meanwhile by another process", key)
                return built
            return self._build(key, inputs, make)

    def _build(
        self, key: str, inputs: Mapping[str, Any], make: Callable[[Path], dict[str, Any]]
    ) -> Entry:
        scratch = self.root / f".building-{key}-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        try:
            meta = make(scratch)
            write_manifest(scratch, key, inputs, meta)
            target = self.root / key
            try:
                os.rename(scratch, target)
            except OSError:
                # Another process published the same entry first: use theirs.
                log.info("conversion cache entry %s was built meanwhile by another process", key)
            entry = self.get(key)
            if entry is None:
                raise CorruptEntry(f"the entry {target} just built does not verify")
            return entry
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def write_manifest(directory: Path, key: str, inputs: Mapping[str, Any], meta: Mapping) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "format": FORMAT,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": dict(inputs),
        "files": files,
        "meta": dict(meta),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _verify(path: Path, key: str) -> Entry:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptEntry(f"unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptEntry(f"manifest format {manifest.get('format')!r}, expected {FORMAT}")
    if manifest.get("key") != key:
        raise CorruptEntry("the manifest names another key")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptEntry("the manifest lists no files")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptEntry(f"{name} is missing")
        if file.stat().st_size != expected.get("bytes"):
            raise CorruptEntry(f"{name} has {file.stat().st_size} bytes, not {expected['bytes']}")
        if file_sha256(file) != expected.get("sha256"):
            raise CorruptEntry(f"{name} does not match its checksum")
    return Entry(path=path, meta=manifest.get("meta", {}))
