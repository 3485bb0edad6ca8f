"""The upload page in a real browser: headless Chromium (Debian's `chromium`,
installed before the tests by `make test`) driven by Playwright, against real servers: granian
(`--role web`) with a simulated-model worker thread, directly and through
nginx under a sub-path.

Screenshots are kept in $KERAS_SERVER_TEST_ARTIFACTS (default tests/artifacts/).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import http.server
import io
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import (
    IMAGES,
    ROOT,
    WorkerThread,
    make_worker,
    region_spec,
    start_web,
    stop,
    system_tool,
    wait_for_http,
)
from PIL import Image
from playwright.sync_api import BrowserContext, ConsoleMessage, Page, expect, sync_playwright

from keras_server.broker.messages import Keys
from keras_server.broker.redis_server import free_port
from keras_server.broker.request_queue import RequestQueue
from keras_server.engines.simulated import SimulatedModel
from keras_server.processes import Child
from keras_server.settings import Settings

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",  # we run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("KERAS_SERVER_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
CHELSEA = IMAGES / "chelsea.png"
COFFEE = IMAGES / "coffee.png"
NOT_AN_IMAGE = ROOT / "pyproject.toml"

# A drop, as a person makes it: enter, over, drop, carrying one file.
DROP = """([data, name, type]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type }));
  const zone = document.getElementById("dropzone");
  for (const kind of ["dragenter", "dragover", "drop"]) {
    zone.dispatchEvent(
      new DragEvent(kind, { dataTransfer: transfer, bubbles: true, cancelable: true }),
    );
  }
}"""

# What the page hands to fetch(): the image part of each FormData it sends.
CAPTURE_UPLOADS = """(() => {
  window.uploads = [];
  const send = window.fetch.bind(window);
  window.fetch = (url, options) => {
    if (options && options.body instanceof FormData) window.uploads.push(options.body.get("image"));
    return send(url, options);
  };
})()"""
LAST_UPLOAD = """async () => {
  const bytes = new Uint8Array(await window.uploads.at(-1).arrayBuffer());
  let text = "";
  for (const byte of bytes) text += String.fromCharCode(byte);
  return btoa(text);
}"""

SHOWN = """items => items.map((item) => ({
  label: item.querySelector(".prediction-label").textContent,
  raw: item.dataset.label,
  percent: item.querySelector(".prediction-percent").textContent,
  width: item.querySelector(".prediction-fill").style.width,
}))"""


@pytest.fixture(scope="session")
def chromium() -> str:
    return system_tool(CHROMIUM)


@pytest.fixture(scope="session")
def nginx() -> str:
    return system_tool("/usr/sbin/nginx")


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[BrowserContext]:
    with sync_playwright() as playwright:
        # Never `playwright install`: the browser is Debian's, with a fresh profile.
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            headless=True,
            args=FLAGS,
            viewport={"width": 960, "height": 720},
        )
        try:
            yield context
        finally:
            context.close()


@dataclass
class Watched:
    """A page, with what its console complained about and every URL it asked for."""

    page: Page
    errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def unexpected_errors(self) -> list[str]:
        # An API error is a failed load to Chromium's console, and is expected.
        expected = ("the server responded with a status of 400", "status of 401")
        return [e for e in self.errors if not any(text in e for text in expected)]


@pytest.fixture
def watched(browser: BrowserContext) -> Watched:
    page = browser.new_page()
    page.set_default_timeout(30_000)
    seen = Watched(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            seen.errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
    page.on("request", lambda request: seen.urls.append(request.url))
    return seen


@dataclass
class Server:
    url: str  # ends with "/"
    process: Child


@pytest.fixture
def web(settings: Settings) -> Iterator[Server]:
    """`run_keras_server.py --role web` (granian) on the test's queue."""
    process, base = start_web(settings, "--web-workers", "1")
    try:
        yield Server(base + "/", process)
    finally:
        stop(process)


@pytest.fixture
def worker(settings: Settings) -> Iterator[WorkerThread]:
    with WorkerThread(make_worker(settings, SimulatedModel(20, 1))) as running:
        yield running


@pytest.fixture
def proxy(nginx: str, web: Server, tmp_path: Path) -> Iterator[Server]:
    """nginx mounting the web server under /classifier/, as a shared host might."""
    port = free_port()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy"))
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log warn;
        daemon off;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            {temp}
            fastcgi_temp_path {prefix}/fastcgi; uwsgi_temp_path {prefix}/uwsgi;
            scgi_temp_path {prefix}/scgi;
            server {{
                listen 127.0.0.1:{port};
                client_max_body_size 16m;
                # In memory: nginx's workers may not write to the test's directory.
                client_body_buffer_size 16m;
                location /classifier/ {{
                    proxy_pass {web.url};
                }}
            }}
        }}
        """
    )
    process = Child("nginx", [nginx, "-p", str(prefix), "-c", str(conf)], prefix / "nginx.log")
    process.start()
    url = f"http://127.0.0.1:{port}/classifier/"
    try:
        wait_for_http(url + "healthz", process)
        yield Server(url, process)
    finally:
        stop(process)


def api(server: Server, path: Path) -> dict:
    """What the API itself answers for this file: the page must show the same."""
    with path.open("rb") as f:
        return requests.post(server.url + "predict", files={"image": f}, timeout=30).json()


def assert_shows(page: Page, predictions: list[dict]) -> None:
    """Five bars with labels and percentages, as the API answered."""
    expect(page.locator(".prediction")).to_have_count(5)
    shown = page.locator(".prediction").evaluate_all(SHOWN)
    assert [s["raw"] for s in shown] == [p["label"] for p in predictions]
    for row, prediction in zip(shown, predictions, strict=True):
        probability = prediction["probability"]
        assert row["label"] == prediction["label"].replace("_", " ")
        assert row["percent"].endswith("%")
        if row["percent"] == "<0.1%":
            assert probability < 0.001
        else:
            assert float(row["percent"][:-1]) == pytest.approx(probability * 100, abs=0.05)
        assert float(row["width"][:-1]) == pytest.approx(probability * 100, abs=1e-3)


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


def test_keyboard_pick_drop_and_an_api_error(
    watched: Watched, web: Server, worker: WorkerThread
) -> None:
    page = watched.page
    # Playwright turns file-chooser interception on asynchronously when the
    # first listener arrives; one from the start beats the key press to it.
    page.on("filechooser", lambda chooser: None)
    page.goto(web.url)
    expect(page).to_have_title("Image classifier · keras-server")

    # Keyboard only: Tab reaches the hidden file input, its focus shows on
    # the drop zone, and Enter opens the file chooser.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "image"
    outline = page.locator("#dropzone").evaluate("zone => getComputedStyle(zone).outlineStyle")
    assert outline != "none"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(CHELSEA)
    assert_shows(page, api(web, CHELSEA)["predictions"])
    preview = page.locator("#preview")
    expect(preview).to_have_attribute("alt", "Preview of chelsea.png")
    assert preview.evaluate("img => img.naturalWidth") == Image.open(CHELSEA).width
    screenshot(page, "upload-page-results-keyboard.png")

    # Dropped on the drop zone.
    png = base64.b64encode(COFFEE.read_bytes()).decode()
    page.evaluate(DROP, [png, COFFEE.name, "image/png"])
    expected = api(web, COFFEE)["predictions"]
    expect(page.locator(".prediction").first).to_have_attribute("data-label", expected[0]["label"])
    assert_shows(page, expected)
    expect(preview).to_have_attribute("alt", "Preview of coffee.png")

    # Picked, but not an image: the API's own words are shown, nothing else.
    page.locator("#image").set_input_files(NOT_AN_IMAGE)
    answer = api(web, NOT_AN_IMAGE)
    assert answer["success"] is False
    expect(page.locator("#error")).to_contain_text(answer["error"])
    expect(page.locator("#error")).to_contain_text("HTTP 400")
    expect(page.locator(".prediction")).to_have_count(0)
    expect(page.locator("#preview-figure")).to_be_hidden()
    screenshot(page, "upload-page-error.png")

    assert watched.unexpected_errors() == []
    origin = web.url
    assert all(u.startswith((origin, "blob:" + origin)) for u in watched.urls), watched.urls


def test_a_server_that_went_away(watched: Watched, web: Server) -> None:
    page = watched.page
    page.goto(web.url)
    stop(web.process)
    page.locator("#image").set_input_files(CHELSEA)
    expect(page.locator("#error")).to_contain_text("Could not reach the server")
    expect(page.locator(".prediction")).to_have_count(0)
    screenshot(page, "upload-page-unreachable.png")


def test_through_nginx_under_a_sub_path(
    watched: Watched, web: Server, worker: WorkerThread, proxy: Server
) -> None:
    page = watched.page
    page.goto(proxy.url.rstrip("/"))  # nginx redirects to the trailing slash
    assert page.url == proxy.url

    page.locator("#image").set_input_files(CHELSEA)
    assert_shows(page, api(proxy, CHELSEA)["predictions"])
    screenshot(page, "upload-page-results.png")  # the one in README (docs/screenshot.png)
    link = page.locator("a[href='openapi.json']").evaluate("a => a.href")
    assert link == proxy.url + "openapi.json"
    assert requests.get(link, timeout=5).json()["openapi"].startswith("3.")

    # The web server goes; nginx answers with its own HTML page, which the
    # page reports as such.
    stop(web.process)
    page.locator("#image").set_input_files(COFFEE)
    expect(page.locator("#error")).to_contain_text("The server answered 502 Bad Gateway")
    screenshot(page, "upload-page-behind-nginx-502.png")

    # Every request stayed under the mount point: the page's URLs are relative.
    origin = proxy.url.removesuffix("classifier/")
    first, *rest = watched.urls
    assert first == proxy.url.rstrip("/")
    assert all(u.startswith((proxy.url, "blob:" + origin)) for u in rest), rest


class Relabelled(SimulatedModel):
    """The simulated model under other class names, so the page shows which
    model answered."""

    def __init__(self) -> None:
        super().__init__(0, 0)
        self.labels = [f"other_{i}" for i in range(len(self.labels))]


def test_a_choice_of_models(watched: Watched, settings: Settings, tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        'default = "sim"\n[models.sim]\nmodel = "sim"\n[models.other]\nmodel = "sim"\n'
    )
    default = make_worker(dataclasses.replace(settings, model="sim"), SimulatedModel(0, 0))
    other = make_worker(dataclasses.replace(settings, model="other"), Relabelled())
    other.queue = RequestQueue(
        other.queue.shard, Keys.for_model(settings.queue_name, "other", "sim")
    )
    process, base = start_web(settings, "--web-workers", "1", "--models-file", str(models))
    try:
        with WorkerThread(default), WorkerThread(other):
            page = watched.page
            page.goto(base + "/")
            menu = page.locator("#model")
            expect(menu).to_be_visible()
            assert menu.locator("option").all_text_contents() == ["sim (default)", "other"]
            expect(page.get_by_label("Model")).to_have_value("sim")

            page.locator("#image").set_input_files(CHELSEA)
            expect(page.locator(".prediction")).to_have_count(5)
            first = page.locator(".prediction").first
            expect(first).not_to_have_attribute("data-label", re.compile("^other_"))

            menu.select_option("other")
            page.locator("#image").set_input_files(CHELSEA)
            expect(page.locator(".prediction").first).to_have_attribute(
                "data-label", re.compile("^other_")
            )
            screenshot(page, "upload-page-model-choice.png")
    finally:
        stop(process)
    posts = [u.removeprefix(base) for u in watched.urls if u.endswith("predict")]
    # With a menu, the image goes to the model named in it, the default too.
    assert posts == ["/models/sim/predict", "/models/other/predict"]
    assert watched.unexpected_errors() == []


def test_one_model_offers_no_menu(watched: Watched, web: Server) -> None:
    page = watched.page
    page.goto(web.url)
    page.wait_for_load_state("networkidle")  # GET models answered
    expect(page.locator("#model-choice")).to_be_hidden()


def test_several_files_become_a_job_with_its_progress(
    watched: Watched, web: Server, worker: WorkerThread, tmp_path: Path
) -> None:
    """Three files chosen at once: one POST jobs, then the job's progress and
    each image's top class (or its error) in the order chosen."""
    page = watched.page
    page.goto(web.url)
    page.wait_for_load_state("networkidle")
    broken = tmp_path / "broken.png"
    broken.write_bytes((IMAGES / "chelsea.png").read_bytes()[:300])
    files = [IMAGES / "chelsea.png", broken, IMAGES / "rocket.jpg"]
    page.set_input_files("#image", [str(f) for f in files])
    expect(page.locator("#status")).to_have_text("Done: 2 of 3 classified, 1 failed.")
    rows = page.locator(".job-item")
    expect(rows).to_have_count(3)
    assert rows.locator(".job-name").all_text_contents() == [f.name for f in files]
    expect(rows.nth(1)).to_have_class(re.compile(r"\bfailed\b"))
    answers = rows.locator(".job-answer").all_text_contents()
    assert answers[0].endswith("%")
    assert answers[2].endswith("%")
    assert any(url.endswith("/jobs") for url in watched.urls)
    assert not any(url.endswith("/predict") for url in watched.urls)
    screenshot(page, "job.png")
    assert watched.unexpected_errors() == []


KEY = "browser-test-key-0123456789abcdef"


@pytest.fixture
def keyed_web(settings: Settings, tmp_path: Path) -> Iterator[Server]:
    """`--role web` with `--api-keys`."""
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    process, base = start_web(settings, "--web-workers", "1", "--api-keys", str(keys))
    try:
        yield Server(base + "/", process)
    finally:
        stop(process)


def test_the_page_asks_for_a_key_when_the_server_needs_one(
    watched: Watched, keyed_web: Server, worker: WorkerThread
) -> None:
    page = watched.page
    page.goto(keyed_web.url)
    key_form = page.locator("#key-form")
    expect(key_form).to_be_hidden()

    # The API says 401: the page shows its words and asks for a key.
    page.locator("#image").set_input_files(CHELSEA)
    expect(key_form).to_be_visible()
    expect(page.locator("#error")).to_contain_text("HTTP 401")
    expect(page.locator("#error")).to_contain_text("an API key is required")
    expect(page.locator("#key-hint")).to_have_text("This server needs an API key.")
    expect(page.locator("#api-key")).to_be_focused()
    screenshot(page, "upload-page-asks-for-a-key.png")

    # A wrong key: asked again.
    page.locator("#api-key").fill("not-the-key-0123456789abcdef")
    page.locator("#api-key").press("Enter")
    expect(page.locator("#key-hint")).to_contain_text("not accepted")
    expect(page.locator("#error")).to_contain_text("not valid")
    expect(page.locator(".prediction")).to_have_count(0)

    # The right key: the refused file is sent again, and answered.
    page.locator("#api-key").fill(KEY)
    page.get_by_role("button", name="Use this key").click()
    with CHELSEA.open("rb") as f:
        expected = requests.post(
            keyed_web.url + "predict", files={"image": f}, headers={"X-API-Key": KEY}, timeout=30
        ).json()
    assert_shows(page, expected["predictions"])
    expect(key_form).to_be_hidden()

    # The next file goes with the key at once.
    page.locator("#image").set_input_files(COFFEE)
    expect(page.locator("#preview")).to_have_attribute("alt", "Preview of coffee.png")
    expect(page.locator(".prediction")).to_have_count(5)
    expect(key_form).to_be_hidden()
    screenshot(page, "upload-page-with-a-key.png")

    # The key is kept in the page's memory only: no storage, no URL.
    stored = page.evaluate("JSON.stringify([localStorage, sessionStorage, document.cookie])")
    assert KEY not in stored
    assert all(KEY not in url for url in watched.urls)


def test_a_large_photo_is_shrunk_before_upload(
    watched: Watched, web: Server, worker: WorkerThread, tmp_path: Path
) -> None:
    """A 3000x2000 photo taken sideways (EXIF orientation 6) goes up as an
    upright JPEG no smaller than twice the model's input (224x224) each way."""
    photo = tmp_path / "sideways.jpg"
    halves = Image.new("RGB", (3000, 2000), (0, 0, 255))
    halves.paste((255, 0, 0), (0, 0, 1500, 2000))  # red on the left: on top once upright
    exif = Image.Exif()
    exif[0x0112] = 6
    halves.save(photo, quality=95, exif=exif.tobytes())

    page = watched.page
    page.add_init_script(CAPTURE_UPLOADS)
    page.goto(web.url)
    page.locator("#image").set_input_files(photo)
    expect(page.locator(".prediction")).to_have_count(5)
    upload = base64.b64decode(page.evaluate(LAST_UPLOAD))
    assert len(upload) < photo.stat().st_size / 4
    with Image.open(io.BytesIO(upload)) as shrunk:
        assert shrunk.format == "JPEG"
        assert shrunk.size == (448, 672)
        top, bottom = shrunk.getpixel((224, 100)), shrunk.getpixel((224, 572))
    assert top[0] > 200 and top[2] < 60, f"top should be red, got {top}"
    assert bottom[2] > 200 and bottom[0] < 60, f"bottom should be blue, got {bottom}"
    assert watched.unexpected_errors() == []


# -- CORS: the API called from a page of another origin -------------------------

CORS_KEY = "cors-browser-key-0123456789abcdef"

# fetch() from the page: the answer's status, body and the headers CORS lets
# a script read; a refused call is the TypeError the browser throws.
FETCH = """async ([url, options]) => {
  try {
    const answer = await fetch(url, options);
    const headers = {};
    for (const name of ["Retry-After", "RateLimit-Remaining", "WWW-Authenticate"]) {
      headers[name] = answer.headers.get(name);
    }
    return { status: answer.status, body: await answer.json(), headers };
  } catch (error) {
    return { failed: String(error) };
  }
}"""
PREDICT = (
    "async ([url, key, png]) => {\n  const call = " + FETCH + ";\n"
    """  const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
  const form = new FormData();
  form.append("image", new Blob([bytes], { type: "image/png" }), "chelsea.png");
  return await call([url, {
    method: "POST", body: form, headers: { "X-API-Key": key, "X-Priority": "1" },
  }]);
}"""
)
INFER = (
    "async ([url, key, png]) => {\n  const call = " + FETCH + ";\n"
    """  const body = JSON.stringify({ inputs: [
    { name: "image", datatype: "BYTES", shape: [1], data: [png] },
  ] });
  return await call([url, {
    method: "POST", body,
    headers: { Authorization: "Bearer " + key, "Content-Type": "application/json" },
  }]);
}"""
)


class PageServer:
    """A page on an origin of its own (another port): an empty HTML page."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        (directory / "index.html").write_text("<!doctype html><title>elsewhere</title>")
        handler = functools.partial(QuietHandler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_another_origin_calls_the_api(
    browser: BrowserContext, settings: Settings, worker: WorkerThread, tmp_path: Path
) -> None:
    """A page on an allowed origin calls /predict and /v2 infer with fetch(),
    with a key (a preflight each), reads a 429's Retry-After and a 401's
    challenge; a page on another origin is refused by the browser."""
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{CORS_KEY} name=browser rate=1/h burst=2\n")
    png = base64.b64encode(CHELSEA.read_bytes()).decode()
    with PageServer(tmp_path / "allowed") as allowed, PageServer(tmp_path / "other") as other:
        process, base = start_web(
            settings, "--web-workers", "1", "--api-keys", str(keys),
            "--cors-origins", allowed.origin,
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(allowed.origin + "/")
            predicted = page.evaluate(PREDICT, [base + "/predict", CORS_KEY, png])
            assert predicted["status"] == 200, predicted
            assert len(predicted["body"]["predictions"]) == 5
            assert predicted["headers"]["RateLimit-Remaining"] == "1"

            inferred = page.evaluate(INFER, [base + "/v2/models/resnet50/infer", CORS_KEY, png])
            assert inferred["status"] == 200, inferred
            assert inferred["body"]["outputs"][0]["shape"] == [1, 1000]

            # Over the quota: the page reads the 429, its body and its delay.
            over = page.evaluate(PREDICT, [base + "/predict", CORS_KEY, png])
            assert over["status"] == 429, over
            assert "over its quota" in over["body"]["error"]
            assert int(over["headers"]["Retry-After"]) > 3000
            wrong = page.evaluate(PREDICT, [base + "/predict", "not-the-key-0123456789", png])
            assert wrong["status"] == 401, wrong
            assert wrong["headers"]["WWW-Authenticate"].startswith("Bearer")

            # The same calls from an origin not allowed: the browser refuses them.
            page.goto(other.origin + "/")
            refused = page.evaluate(PREDICT, [base + "/predict", CORS_KEY, png])
            assert refused == {"failed": "TypeError: Failed to fetch"}
            refused = page.evaluate(INFER, [base + "/v2/models/resnet50/infer", CORS_KEY, png])
            assert refused == {"failed": "TypeError: Failed to fetch"}
        finally:
            log = stop(process)
    # The refused origin's preflights were answered, without CORS headers, and
    # never reached a route: the key's quota was not touched by them.
    assert "OPTIONS /predict 200" in log
    assert CORS_KEY not in log


# Each cell's colour on the canvas, row by row.
CANVAS_CELLS = """canvas => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const cells = [];
  for (let i = 0; i < data.length; i += 4) cells.push([data[i], data[i + 1], data[i + 2]]);
  return cells;
}"""


@pytest.fixture
def region_worker(settings: Settings, region_model: Path) -> Iterator[WorkerThread]:
    """A keras worker serving conftest's model that reads the top-left quadrant alone."""
    from keras_server.engines.keras_engine import load_classifier

    classifier = load_classifier(region_spec(region_model))  # type: ignore[arg-type]
    with WorkerThread(make_worker(settings, classifier)) as running:
        yield running


def test_explain_draws_the_heat_map_over_the_photo(
    watched: Watched, web: Server, region_worker: WorkerThread
) -> None:
    from keras_server.serving.explain import colours

    page = watched.page
    page.goto(web.url)
    page.evaluate(CAPTURE_UPLOADS)
    expect(page.locator("#explain-panel")).to_be_hidden()
    page.locator("#image").set_input_files(CHELSEA)
    expect(page.locator(".prediction")).to_have_count(2)
    expect(page.locator("#explain")).to_be_visible()
    page.locator("#explain").click()
    expect(page.locator("#explanation")).to_be_visible()
    # What the API answers for the upload the page sent (shrunk: a JPEG).
    sent = base64.b64decode(page.evaluate(LAST_UPLOAD))
    answer = requests.post(web.url + "explain", files={"image": sent}, timeout=60).json()
    explanation = answer["explanation"]
    heat = np.array(explanation["heatmap"])
    # The model reads the top-left quadrant alone: the map says so.
    assert heat[:4, :4].max() == 1 and heat[4:, :].max() == heat[:, 4:].max() == 0
    canvas = page.locator("#heatmap")
    expect(canvas).to_be_visible()
    assert canvas.evaluate("c => [c.width, c.height]") == [8, 8]
    # The page draws the API's map in the server's colours, row by row.
    drawn = canvas.evaluate(CANVAS_CELLS)
    np.testing.assert_allclose(np.array(drawn), colours(heat).round().reshape(-1, 3), atol=1)
    # Stretched over the photo exactly.
    box = canvas.bounding_box()
    photo = page.locator("#preview").bounding_box()
    assert box and photo
    assert [round(box[k]) for k in ("x", "y", "width", "height")] == [
        round(photo[k]) for k in ("x", "y", "width", "height")
    ]
    legend = page.locator("#explain-legend")
    expect(legend).to_contain_text(f"Where the model looked for “{explanation['class']['label']}”")
    expect(legend).to_contain_text("8 \u00d7 8")  # "8 x 8" with a multiplication sign
    page.locator("#explain-opacity").fill("25")
    expect(canvas).to_have_css("opacity", "0.25")
    page.locator("#explain-opacity").fill("60")
    expect(canvas).to_have_css("opacity", "0.6")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The one in docs/api.md (docs/explain.png): the whole page, legend included.
    page.screenshot(path=str(ARTIFACTS / "explain.png"), full_page=True)

    # A new image clears the explanation until it is asked for again.
    page.locator("#image").set_input_files(COFFEE)
    expect(page.locator("#explanation")).to_be_hidden()
    expect(canvas).to_be_hidden()
    expect(page.locator("#explain")).to_be_visible()
    assert watched.unexpected_errors() == []
