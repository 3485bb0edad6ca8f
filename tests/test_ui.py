"""The upload page at `/`: served from package files, every URL in it relative,
nothing fetched from elsewhere, and named for assistive technology. A real
browser drives it in test_browser.py."""

import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from conftest import ROOT
from flask.testing import FlaskClient

Attributes = dict[str, str | None]


class Tags(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, Attributes]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def by_id(self, id_: str) -> tuple[str, Attributes]:
        found = [(tag, attrs) for tag, attrs in self.tags if attrs.get("id") == id_]
        assert len(found) == 1, f"one element with id {id_!r}"
        return found[0]


@pytest.fixture
def page(client: FlaskClient) -> Tags:
    return Tags(client.get("/").get_data(as_text=True))


def test_page_is_html_under_a_strict_policy(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_every_url_in_the_page_is_relative_and_served(client: FlaskClient, page: Tags) -> None:
    urls = {
        attrs[name]: tag
        for tag, attrs in page.tags
        for name in ("href", "src", "action")
        if attrs.get(name)
    }
    assert {"predict", "assets/app.js", "assets/style.css", "openapi.json"} <= set(urls)
    for url, tag in urls.items():
        # Relative URLs keep working when a proxy mounts the service under a sub-path.
        assert not re.match(r"^(/|[a-z]+:)", url), url
        if tag == "form":
            continue  # POST predict: test_web.py and test_openapi.py
        # Each names a route (readyz may well answer 503 here: no worker runs).
        assert client.get("/" + url).status_code != 404, url
    types = {
        "assets/app.js": "javascript",
        "assets/style.css": "text/css",
        "assets/favicon.svg": "image/svg+xml",
    }
    for url, kind in types.items():
        response = client.get("/" + url)
        assert (response.status_code, kind in response.mimetype) == (200, True), url


def test_nothing_is_fetched_from_elsewhere(client: FlaskClient) -> None:
    for url in ("/", "/assets/app.js", "/assets/style.css"):
        text = client.get(url).get_data(as_text=True)
        assert not re.search(r"https?:|@import|url\(", text), url


def test_the_picker_is_labelled_and_answers_are_announced(page: Tags) -> None:
    tag, picker = page.by_id("image")
    assert (tag, picker["type"], picker["name"]) == ("input", "file", "image")
    labels = [attrs for tag, attrs in page.tags if tag == "label" and attrs.get("for") == "image"]
    assert labels, "the file input has a label (the drop zone)"
    # The picker is hidden visually, never from the keyboard.
    assert "hidden" not in picker
    assert picker["class"] == "visually-hidden"
    assert page.by_id("status")[1]["aria-live"] == "polite"
    assert page.by_id("error")[1]["role"] == "alert"
    assert page.by_id("predictions")[1]["aria-live"] == "polite"
    assert "alt" in page.by_id("preview")[1]
    assert page.tags[0] == ("html", {"lang": "en"})


def test_package_files_are_found_from_any_directory(tmp_path: object) -> None:
    code = (
        "from keras_server.settings import Settings; from keras_server.web.app import create_app; "
        "c = create_app(Settings()).test_client(); "
        "codes = [c.get(u).status_code for u in ('/', '/assets/app.js', '/openapi.json')]; "
        "assert codes == [200] * 3, codes"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=60)


def test_the_model_menu_is_labelled_and_hidden_until_there_is_a_choice(page: Tags) -> None:
    """app.js fills and shows it when GET models lists several (test_browser.py)."""
    tag, menu = page.by_id("model")
    assert (tag, menu["name"]) == ("select", "model")
    labels = [attrs for tag, attrs in page.tags if tag == "label" and attrs.get("for") == "model"]
    assert labels, "the menu has a label"
    assert "hidden" in page.by_id("model-choice")[1]
