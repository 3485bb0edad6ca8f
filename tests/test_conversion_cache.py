"""The conversion cache on its own: entries published whole, verified on every
read, corrupt ones removed, and one conversion for processes racing to build."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from keras_server.engines.conversion_cache import MANIFEST, ConversionCache, key_of

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
