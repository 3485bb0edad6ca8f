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

The cache does not grow without bound: every read of an entry marks it used
(its manifest's mtime), and every build first removes, under each key's lock
so that nothing in use goes, the entries unused for MAX_IDLE_S (those of old
tool versions, of old weights, of models no longer served), and what builders
killed mid-conversion left (their scratch directories and lock files). A
holder removes its lock file on release; whoever locks a file checks it is
still the one in the directory, so a removed lock file never locks anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when the layout of an entry or what it holds changes.
FORMAT = 1
MANIFEST = "manifest.json"
# An entry not read for this long is removed by the next build.
MAX_IDLE_S = 30 * 24 * 3600
_SCRATCH, _LOCK = ".building-", ".lock-"


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
            entry = _verify(path, key)
        except CorruptEntry as exc:
            log.warning("conversion cache entry %s is corrupt (%s): rebuilding it", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            return None
        with contextlib.suppress(OSError):  # a read-only cache is still read
            os.utime(path / MANIFEST)  # used now: see MAX_IDLE_S
        return entry

    def build(
        self, key: str, inputs: Mapping[str, Any], make: Callable[[Path], dict[str, Any]]
    ) -> Entry:
        """Run `make(directory)`, which writes the entry's files and returns its
        meta, then publish the entry atomically and return it verified.

        Processes building the same entry at once (workers of one cluster
        starting together) take turns on a lock file: the second finds the
        first one's entry instead of converting again."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked(key):
            built = self.get(key)
            if built is not None:
                log.info("conversion cache entry %s was built meanwhile by another process", key)
                return built
            self._sweep(key)
            return self._build(key, inputs, make)

    @contextlib.contextmanager
    def _locked(self, key: str, wait: bool = True) -> Iterator[bool]:
        """Hold `key`'s lock (True), or, with wait=False, False at once when
        another process holds it. The lock file is removed on release."""
        path = self.root / f"{_LOCK}{key}"
        while True:
            with path.open("a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                except BlockingIOError:
                    yield False
                    return
                try:
                    current = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
                except FileNotFoundError:
                    current = False
                if not current:
                    continue  # its holder removed it on release: lock the new one
                try:
                    yield True
                finally:
                    path.unlink(missing_ok=True)
                return

    def _sweep(self, building: str) -> None:
        """Remove, under each key's lock, what dead builders left and the entries
        unused for MAX_IDLE_S (see the module's docstring). `building`'s lock is
        held already."""
        keys: dict[str, list[Path]] = {}
        for path in self.root.iterdir():
            key = path.name
            for prefix in (_SCRATCH, _LOCK):
                if key.startswith(prefix):
                    key = key.removeprefix(prefix).split("-")[0]
            keys.setdefault(key, []).append(path)
        stale = time.time() - MAX_IDLE_S
        for key, paths in keys.items():
            try:
                if key == building:
                    _remove_scratch(paths)
                    continue
                with self._locked(key, wait=False) as held:
                    if not held:
                        continue  # being built right now
                    _remove_scratch(paths)
                    entry = self.root / key
                    if entry in paths and _last_used(entry) < stale:
                        log.info(
                            "conversion cache: removing %s, unused for %d days",
                            entry,
                            MAX_IDLE_S // 86400,
                        )
                        shutil.rmtree(entry, ignore_errors=True)
            except OSError as exc:
                log.warning("conversion cache: could not clean up %s (%s)", key, exc)

    def _build(
        self, key: str, inputs: Mapping[str, Any], make: Callable[[Path], dict[str, Any]]
    ) -> Entry:
        scratch = self.root / f"{_SCRATCH}{key}-{uuid.uuid4().hex[:8]}"
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


def _remove_scratch(paths: list[Path]) -> None:
    for path in paths:
        if path.name.startswith(_SCRATCH):
            log.info("conversion cache: removing %s, left by a builder that died", path)
            shutil.rmtree(path, ignore_errors=True)


def _last_used(entry: Path) -> float:
    try:
        return (entry / MANIFEST).stat().st_mtime
    except OSError:  # no manifest: not an entry, or a broken one
        return entry.stat().st_mtime


def _verify(path: Path, key: str) -> Entry:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CorruptEntry(f"unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise CorruptEntry("the manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise CorruptEntry(f"manifest format {manifest.get('format')!r}, expected {FORMAT}")
    if manifest.get("key") != key:
        raise CorruptEntry("the manifest names another key")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptEntry("the manifest lists no files")
    meta = manifest.get("meta", {})
    if not isinstance(meta, dict):
        raise CorruptEntry("the manifest's meta is not a JSON object")
    for name, expected in files.items():
        if name in ("", ".", "..", MANIFEST) or Path(name).name != name:
            raise CorruptEntry(f"the manifest lists {name!r}, not a file name of the entry")
        if not (
            isinstance(expected, dict)
            and isinstance(expected.get("bytes"), int)
            and isinstance(expected.get("sha256"), str)
        ):
            raise CorruptEntry(f"the manifest's record of {name} lacks its size or checksum")
        file = path / name
        if not file.is_file():
            raise CorruptEntry(f"{name} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CorruptEntry(f"{name} has {file.stat().st_size} bytes, not {expected['bytes']}")
        if file_sha256(file) != expected["sha256"]:
            raise CorruptEntry(f"{name} does not match its checksum")
    return Entry(path=path, meta=meta)
