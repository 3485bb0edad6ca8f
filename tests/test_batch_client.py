"""`keras-server classify`, the batch client, against real servers with the
simulated model: what it writes, what it skips and says, resuming from its
output, exit statuses naming the failures, and Retry-After from a full queue."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CHELSEA, COFFEE, ENV, ROCKET, ROOT, png_bytes, start_serving, stop
from PIL import Image

from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.client.batch import main
from keras_server.client.http import retry_after
from keras_server.processes import Child
from keras_server.settings import Settings

pytestmark = pytest.mark.slow


def sim_server(redis_server: RedisServer, *extra: str) -> tuple[Child, str]:
    settings = Settings(
        redis_url=redis_server.url, redis_url_given=True, queue_name=f"cl-{uuid.uuid4().hex[:8]}"
    )
    return start_serving(
        settings, "--model", "sim", "--sim-batch-ms", "2", "--sim-image-ms", "0", *extra
    )


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[str]:
    process, base = sim_server(redis_server)
    yield base
    stop(process)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder: three images (one a large photo, one in a subfolder), a text
    file, an empty .jpg and a hidden file."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "chelsea.png").write_bytes(CHELSEA)
    (folder / "sub" / "rocket.jpg").write_bytes(ROCKET)
    big = Image.new("RGB", (3000, 2000), (200, 30, 30))
    (folder / "big.jpg").write_bytes(png_bytes(big, "JPEG"))
    (folder / "notes.txt").write_text("not a photo")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / ".hidden.png").write_bytes(COFFEE)
    return folder


IMAGES = ("big.jpg", "chelsea.png", "sub/rocket.jpg")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_is_classified_into_json_lines(
    server: str, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.jsonl"
    status = main([str(photos), "--url", server, "--out", str(out), "--concurrency", "2"])
    err = capsys.readouterr().err
    assert status == 0, err
    records = lines(out)
    assert sorted(r["path"] for r in records) == [str(photos / name) for name in IMAGES]
    for record in records:
        assert record["success"] is True
        assert len(record["predictions"]) == 5
        assert {"label", "probability"} <= set(record["predictions"][0])
    # Non-images are skipped, each with why; hidden files silently.
    assert f"skipped {photos / 'notes.txt'}: not an image Pillow can read" in err
    assert f"skipped {photos / 'empty.jpg'}: empty file" in err
    assert ".hidden" not in err
    assert "3 classified, 0 failed, 2 skipped" in err
    top = records[0]["predictions"][0]["label"]
    assert top in err  # the summary counts top labels


def test_csv_output_and_several_images_per_request(
    server: str, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.csv"
    assert main([str(photos), "--url", server, "--out", str(out), "--batch", "3"]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == [str(photos / name) for name in IMAGES]
    for row in rows:
        assert row["success"] == "true"
        predictions = json.loads(row["predictions"])
        assert row["label"] == predictions[0]["label"]
        assert float(row["probability"]) == pytest.approx(predictions[0]["probability"])


def test_resume_skips_what_the_output_records_as_classified(
    server: str, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Successes already in the file are not sent again (their recorded label
    counts in the summary); a recorded failure is tried again; a line cut
    short by a killed run is ignored."""
    out = tmp_path / "results.jsonl"
    done = {"path": str(photos / "chelsea.png"), "success": True,
            "predictions": [{"label": "RECORDED-BEFORE", "probability": 1.0}]}  # fmt: skip
    failed = {"path": str(photos / "big.jpg"), "success": False, "error": "503: busy"}
    out.write_text(json.dumps(done) + "\n" + json.dumps(failed) + "\n" + '{"path": "/x", "succ')
    assert main([str(photos), "--url", server, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 images already classified" in err
    records = [json.loads(line) for line in out.read_text().splitlines()[3:]]
    # Only the two not yet classified were sent, and appended.
    assert sorted(r["path"] for r in records) == [
        str(photos / "big.jpg"), str(photos / "sub" / "rocket.jpg")]  # fmt: skip
    assert all(r["success"] for r in records)
    assert "RECORDED-BEFORE" in err
    assert "3 classified, 0 failed" in err
    # A second resume sends nothing.
    size = out.stat().st_size
    assert main([str(photos), "--url", server, "--out", str(out)]) == 0
    assert out.stat().st_size == size


def test_failed_images_exit_1_naming_them(
    server: str, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that looks like an image to the client but the server cannot
    decode is a failure: in the output, named at the end, exit status 1."""
    broken = photos / "broken.png"
    broken.write_bytes(CHELSEA[: len(CHELSEA) // 2])  # a PNG header, the pixels cut off
    out = tmp_path / "results.jsonl"
    assert main([str(photos), "--url", server, "--out", str(out), "--batch", "2"]) == 1
    err = capsys.readouterr().err
    assert "1 images failed:" in err
    assert f"{broken}: " in err
    by_path = {r["path"]: r for r in lines(out)}
    assert by_path[str(broken)]["success"] is False
    assert by_path[str(broken)]["error"]
    assert sum(r["success"] for r in by_path.values()) == 3


def test_the_command_exits_2_when_it_cannot_start(photos: Path, tmp_path: Path) -> None:
    """Through the `python -m keras_server classify` entry point: no images,
    or no server, is exit status 2 with the reason."""
    empty = tmp_path / "nothing"
    empty.mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "keras_server", "classify"]
    nothing = subprocess.run(
        [*command, str(empty), "--url", url], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert nothing.returncode == 2, nothing.stderr
    assert "python -m keras_server classify: error: no images to classify" in nothing.stderr
    down = subprocess.run(
        [*command, str(photos), "--url", url, "--retries", "0"], cwd=ROOT, env=ENV,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert down.returncode == 2, down.stderr
    assert f"GET {url}/models" in down.stderr


def test_retry_after_from_a_full_queue_is_honoured(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A queue of one, a worker taking one image at a time and 8 requests in
    flight: most requests meet a 503 with Retry-After: 1. Every image still
    succeeds, and every wait is at least the second asked for (the client's
    own first backoff is under half a second)."""
    process, base = sim_server(
        redis_server, "--max-queue", "1", "--batch-size", "1", "--sim-batch-ms", "100"
    )
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02}.png").write_bytes(png_bytes(Image.new("RGB", (32, 32), (i, 0, 0))))
    waits: list[float] = []
    out = tmp_path / "results.jsonl"
    try:
        status = main(
            [str(folder), "--url", base, "--out", str(out), "--concurrency", "8",
             "--batch", "1", "--retries", "50"],
            sleep=lambda s: (waits.append(s), time.sleep(s)),
        )  # fmt: skip
    finally:
        stop(process)
    assert status == 0
    assert len(lines(out)) == 12
    assert waits, "no request met a full queue"
    assert min(waits) >= 1.0


def test_retry_after_forms() -> None:
    assert retry_after("3") == 3.0
    assert retry_after(None) is None
    assert retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_explain_saves_an_overlay_next_to_each_result(
    server: str, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, overlays = tmp_path / "results.jsonl", tmp_path / "why"
    status = main([str(photos), "--url", server, "--out", str(out), "--explain", str(overlays)])
    assert status == 0, capsys.readouterr().err
    saved = sorted(p.name for p in overlays.iterdir())
    assert saved == [name.replace("/", "__") + ".explain.png" for name in IMAGES]
    for overlay in overlays.iterdir():
        with Image.open(overlay) as image:
            assert image.format == "PNG" and image.size == (224, 224)
