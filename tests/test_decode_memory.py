"""Decode memory is bounded: uploads small on the wire but huge once decoded
(16-bit, alpha, progressive JPEG, huge dimensions) cost a budget estimated
from their headers, and many at once get 503 with Retry-After, never an
out-of-memory server."""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from conftest import IMAGES, png_bytes, start_serving, stop
from PIL import Image

from keras_server.images import (
    DecodeBudget,
    DecoderBusy,
    ImageTooLarge,
    decode_cost,
    load_image,
)
from keras_server.processes import Child
from keras_server.settings import Settings
from keras_server.web.app import create_app

SIZE = (224, 224)
LIMIT = 50_000_000
MB = 1024 * 1024


def grey16(width: int, height: int, value: int = 0) -> Image.Image:
    ramp = np.full((height, width), value, dtype=np.uint16)
    return Image.fromarray(ramp)


def test_budget_refuses_when_spent_and_frees_on_exit() -> None:
    budget = DecodeBudget(100)
    with budget.reserve(60):
        with pytest.raises(DecoderBusy) as caught, budget.reserve(50):
            pass
        assert caught.value.status == 503
        with budget.reserve(40):
            assert budget.used == 100
    assert budget.used == 0
    with pytest.raises(ImageTooLarge, match="needs"), budget.reserve(101):
        pass


def test_an_image_bigger_than_the_whole_budget_is_413_and_frees_nothing() -> None:
    data = png_bytes(grey16(4000, 3000))
    budget = DecodeBudget(10 * MB)
    with pytest.raises(ImageTooLarge, match="decode memory"):
        load_image(data, SIZE, LIMIT, budget)
    assert budget.used == 0


def test_a_spent_budget_is_503_and_a_decode_gives_its_share_back() -> None:
    data = png_bytes(grey16(2000, 1500, 32768))
    budget = DecodeBudget(64 * MB)
    with budget.reserve(60 * MB), pytest.raises(DecoderBusy):
        load_image(data, SIZE, LIMIT, budget)
    out = load_image(data, SIZE, LIMIT, budget)
    assert budget.used == 0
    assert 120 <= int(out.mean()) <= 135, "mid-grey in 16 bits is mid-grey in 8 bits"


@pytest.mark.parametrize(
    ("image", "fmt", "params"),
    [
        (grey16(3000, 2000), "PNG", {}),
        (Image.new("RGBA", (3000, 2000), (1, 2, 3, 4)), "PNG", {}),
        (Image.new("P", (3000, 2000), 1), "GIF", {}),
        (Image.new("RGB", (3000, 2000), (9, 9, 9)), "JPEG", {"progressive": True}),
        (Image.new("RGB", (3000, 2000), (9, 9, 9)), "WEBP", {"lossless": True}),
    ],
    ids=["png16", "rgba", "gif", "progressive-jpeg", "webp"],
)
def test_cost_covers_at_least_the_decoded_pixels(
    image: Image.Image, fmt: str, params: dict
) -> None:
    with Image.open(io.BytesIO(png_bytes(image, fmt, **params))) as opened:
        declared = opened.size
        opened.draft(opened.mode, (448, 448))
        pixel_bytes = {"L": 1, "P": 1, "I;16": 2}.get(opened.mode, 4)
        assert decode_cost(opened, declared) >= opened.size[0] * opened.size[1] * pixel_bytes
    if params.get("progressive"):
        # A progressive JPEG keeps its whole-size coefficients, drafted or not.
        assert decode_cost(opened, declared) >= 3000 * 2000 * 3


@pytest.mark.slow
def test_large_images_are_reduced_to_the_same_picture() -> None:
    """The reduce-then-resize path keeps what a full-size resize shows:
    colours, transparency as white, 16-bit scaling and EXIF rotation."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    photo = Image.fromarray(base).resize((4000, 3000), Image.Resampling.BICUBIC)
    expected = np.asarray(photo.resize(SIZE, Image.Resampling.BICUBIC), dtype=np.float64)
    assert np.abs(load_image(png_bytes(photo), SIZE, LIMIT) - expected).mean() < 3

    clear = Image.new("RGBA", (4000, 3000), (255, 0, 0, 0))
    assert (load_image(png_bytes(clear), SIZE, LIMIT) == 255).all()

    palette = Image.new("P", (4000, 3000), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert (load_image(png_bytes(palette, transparency=0), SIZE, LIMIT) == 255).all()

    bright = grey16(4000, 3000, 65535)
    assert (load_image(png_bytes(bright), SIZE, LIMIT) == 255).all()

    halves = Image.new("RGB", (4000, 2000), (0, 0, 255))
    halves.paste((255, 0, 0), (0, 0, 2000, 2000))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: red on top
    out = load_image(png_bytes(halves, "JPEG", exif=exif.tobytes()), SIZE, LIMIT)
    assert out[20, 112, 0] > 200 and out[200, 112, 2] > 200


# -- a real server under concurrent worst-case uploads ------------------------


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def web_process(process: Child) -> int:
    """The pid that decodes uploads under --role all: the HTTP front's one
    worker process, a child of the front (granian's supervisor), itself a
    child of `process`."""
    children = psutil.Process(process.pid).children()
    front = next(c for c in children if "keras_server.web.front" in c.cmdline())
    (worker,) = front.children()
    return worker.pid


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """Each about 0.1-0.6 MB on the wire and 8000x6000 = 48 MP, inside the
    default 50 MP limit: 100 MB to 750 MB decoded."""
    big = (8000, 6000)
    return {
        "png16": png_bytes(grey16(*big)),
        "rgba": png_bytes(Image.new("RGBA", big, (10, 20, 30, 128))),
        "jpeg444": png_bytes(
            Image.new("RGB", big, (100, 150, 200)), "JPEG", progressive=True, subsampling=0
        ),
        "webp": png_bytes(Image.new("RGB", big, (1, 2, 3)), "WEBP", lossless=True),
        "photo": (IMAGES / "chelsea.png").read_bytes(),
    }


@pytest.mark.slow
def test_concurrent_decode_bombs_leave_the_server_up_and_bounded(
    settings: Settings, bombs: dict[str, bytes]
) -> None:
    budget_mb = 512
    process, base = start_serving(
        settings, "--role", "all", "--model", "sim", "--sim-batch-ms", "1",
        "--sim-image-ms", "0", "--decode-memory-mb", str(budget_mb), "--web-workers", "1",
    )  # fmt: skip
    try:
        assert requests.post(base + "/predict", files={"image": bombs["photo"]}).status_code == 200
        web = web_process(process)
        start_kb = vm_kb(web, "VmRSS")
        kinds = ["png16", "rgba", "jpeg444", "webp", "photo"] * 8
        barrier = threading.Barrier(len(kinds))

        def send(kind: str) -> tuple[str, int, Mapping[str, str], str]:
            barrier.wait()
            response = requests.post(base + "/predict", files={"image": bombs[kind]}, timeout=60)
            return kind, response.status_code, response.headers, response.text

        with ThreadPoolExecutor(len(kinds)) as pool:
            answers = list(pool.map(send, kinds))
        statuses = {}
        for kind, status, headers, text in answers:
            assert status in (200, 413, 503), f"{kind}: {status} {text}"
            if status == 503:
                assert headers.get("Retry-After"), text
                assert "retry" in text
            if kind == "webp":
                # 8000x6000 WebP: its decoder alone needs ~740 MB, more than the budget.
                assert status == 413, text
            statuses.setdefault(status, []).append(kind)
        assert 503 in statuses, "40 uploads at once must spend the budget"
        assert 200 in statuses
        growth_mb = (vm_kb(web, "VmHWM") - start_kb) / 1024
        # The budget bounds the decoded pixels; the rest is 40 uploads of at most
        # 0.6 MB held twice (multipart parsing), thread stacks and allocator slack.
        assert growth_mb < budget_mb + 160, f"peak grew {growth_mb:.0f} MB"
        assert process.poll() is None
        metrics = requests.get(base + "/metrics", timeout=10).text
        refused = next(
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("keras_server_decode_refused_total ")
        )
        assert refused == len(statuses[503])
        again = requests.post(base + "/predict", files={"image": bombs["png16"]}, timeout=60)
        assert again.status_code == 200, again.text
    finally:
        stop(process)


def test_every_route_that_decodes_keeps_to_the_budget(settings: Settings) -> None:
    """/predict, several images on /predict and a v2 infer share one budget:
    an image that could never fit is a 413 on each, nothing queued."""
    bomb = png_bytes(grey16(4000, 3000))
    tight = dataclasses.replace(settings, decode_memory_mb=10)
    client = create_app(tight).test_client()
    one = client.post(
        "/predict", data={"image": (io.BytesIO(bomb), "b.png")}, content_type="multipart/form-data"
    )
    assert one.status_code == 413
    assert "decode memory" in one.get_json()["error"]
    several = client.post(
        "/predict",
        data={"image": [(io.BytesIO(bomb), "b.png"), (io.BytesIO(bomb), "c.png")]},
        content_type="multipart/form-data",
    )
    assert [item["status"] for item in several.get_json()["results"]] == [413, 413]
    data = base64.b64encode(bomb).decode()
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}
    v2 = client.post("/v2/models/resnet50/infer", json={"inputs": [tensor]})
    assert v2.status_code == 413
    assert "decode memory" in v2.get_json()["error"]
