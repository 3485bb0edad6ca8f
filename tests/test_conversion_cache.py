"""The conversion cache on its own: entries published whole, verified on every
read, corrupt ones removed, and one conversion for processes racing to build."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from keras_server.engines.conversion_cache import MANIFEST, MAX_IDLE_S, ConversionCache, key_of

INPUTS = {"model": "m", "precision": "int8"}


def make(calls: list[str], gate: threading.Event | None = None) -> Any:
    def write(directory: Path) -> dict[str, Any]:
        calls.append(threading.current_thread().name)
        if gate is not None:
            gate.wait(5)
        (directory / "model.bin").write_bytes(b"\x01" * 4096)
        (directory / "reference.npz").write_bytes(b"ref")
        return {"outputs": 2}

    return write


def rewrite(entry: Path, change: Any) -> None:
    manifest = json.loads((entry / MANIFEST).read_text())
    change(manifest)
    (entry / MANIFEST).write_text(json.dumps(manifest))


def test_key_depends_on_every_input() -> None:
    assert key_of(INPUTS) == key_of(dict(reversed(INPUTS.items())))
    assert key_of(INPUTS) != key_of({**INPUTS, "precision": "bf16"})


def test_build_then_get(tmp_path: Path) -> None:
    cache = ConversionCache(tmp_path / "cache")
    key = key_of(INPUTS)
    assert cache.get(key) is None
    calls: list[str] = []
    entry = cache.build(key, INPUTS, make(calls))
    assert entry.meta == {"outputs": 2}
    manifest = json.loads((entry.path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.bin", "reference.npz"}
    assert manifest["inputs"] == INPUTS
    again = cache.get(key)
    assert again is not None and again.path == entry.path
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".building")] == []


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda e: (e / "model.bin").write_bytes(b"\x01" * 4095 + b"\x02"), "checksum"),
        (lambda e: (e / "model.bin").write_bytes(b"\x01" * 10), "bytes"),
        (lambda e: (e / "reference.npz").unlink(), "missing"),
        (lambda e: (e / MANIFEST).write_text("{"), "unreadable manifest"),
        (lambda e: (e / MANIFEST).write_text('{"format": 0}'), "manifest format"),
        (lambda e: (e / MANIFEST).write_text("[1]"), "not a JSON object"),
        (lambda e: rewrite(e, lambda m: m["files"]["model.bin"].pop("bytes")), "size or checksum"),
        (lambda e: rewrite(e, lambda m: m["files"].update({"model.bin": 7})), "size or checksum"),
        (lambda e: rewrite(e, lambda m: m["files"].update({"../x": {}})), "not a file name"),
        (lambda e: rewrite(e, lambda m: m.update(meta=[])), "meta"),
    ],
)
def test_a_damaged_entry_is_removed_not_served(
    tmp_path: Path, damage: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = ConversionCache(tmp_path)
    key = key_of(INPUTS)
    entry = cache.build(key, INPUTS, make([]))
    damage(entry.path)
    assert cache.get(key) is None
    assert reason in caplog.text and "rebuilding it" in caplog.text
    assert not entry.path.exists()


def test_racing_builders_convert_once(tmp_path: Path) -> None:
    cache = ConversionCache(tmp_path)
    key = key_of(INPUTS)
    calls: list[str] = []
    gate = threading.Event()
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(cache.build(key, INPUTS, make(calls, gate)).path),
            name=f"builder-{i}",
        )
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1, "the second builder found the first one's entry"
    assert len(results) == 2 and results[0] == results[1]


def test_what_killed_builders_left_is_removed_by_the_next_build(tmp_path: Path) -> None:
    # kill -9 during a conversion leaves its scratch directory and lock file.
    cache = ConversionCache(tmp_path)
    key, other, busy = key_of(INPUTS), key_of({"model": "other"}), key_of({"model": "busy"})
    for name in (key, other, busy):
        (tmp_path / f".building-{name}-deadbeef").mkdir()
        (tmp_path / f".lock-{name}").touch()
    with (tmp_path / f".lock-{busy}").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live builder of another model
        cache.build(key, INPUTS, make([]))
        left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([key, f".building-{busy}-deadbeef", f".lock-{busy}"])


def test_entries_unused_for_long_are_removed_by_the_next_build(tmp_path: Path) -> None:
    cache = ConversionCache(tmp_path)
    old, used, new = (key_of({"model": name}) for name in ("old", "used", "new"))
    for key in (old, used):
        entry = cache.build(key, INPUTS, make([]))
        long_ago = time.time() - MAX_IDLE_S - 3600
        os.utime(entry.path / MANIFEST, (long_ago, long_ago))
    assert cache.get(used) is not None  # a read is a use
    cache.build(new, INPUTS, make([]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([used, new])
