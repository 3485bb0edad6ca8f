"""The multipart reader of /predict: what requests, curl and browsers send,
and what werkzeug would say for the rest."""

import dataclasses
import io

import requests
from werkzeug.test import EnvironBuilder

from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.web.uploads import Upload, read_files

PHOTO = bytes(range(256)) * 4000 + b"\r\n--not-the-boundary\r\n"


def encoded(**kwargs: object) -> tuple[bytes, str]:
    prepared = requests.Request("POST", "http://x/predict", **kwargs).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def test_files_as_requests_sends_them() -> None:
    body, content_type = encoded(
        files=[("image", ("a.jpg", PHOTO)), ("image", ("b.jpg", b"second")), ("other", ("c", b""))]
    )
    assert read_files(body, content_type) == {
        "image": [Upload("a.jpg", PHOTO), Upload("b.jpg", b"second")],
        "other": [Upload("c", b"")],
    }


def test_a_plain_field_is_not_a_file() -> None:
    body, content_type = encoded(files={"x": ("x", b"1")}, data={"image": "not a file"})
    assert read_files(body, content_type) == {"x": [Upload("x", b"1")]}


def test_what_werkzeug_encodes_parses_the_same() -> None:
    builder = EnvironBuilder(method="POST", data={"image": (io.BytesIO(PHOTO), "p.png")})
    environ = builder.get_environ()
    files = read_files(environ["wsgi.input"].read(), environ["CONTENT_TYPE"])
    assert files == {"image": [Upload("p.png", PHOTO)]}


def test_not_multipart_is_no_files_and_broken_multipart_is_left_to_werkzeug() -> None:
    assert read_files(b'{"image": "x"}', "application/json") == {}
    assert read_files(b"", None) == {}
    assert read_files(b"--x\r\nnonsense", "multipart/form-data; boundary=x") is None
    body, content_type = encoded(files={"image": ("a.jpg", PHOTO)})
    assert read_files(body[: len(body) // 2], content_type) is None, "cut short"
    assert read_files(body, "multipart/form-data") is None, "no boundary"


def test_an_unread_body_is_drained_up_to_the_limit_and_past_it_the_answer_says_close(
    settings: Settings,
) -> None:
    """finish_body, in the app itself: a chunked body (no Content-Length)
    that a 404 left unread is read to its end within --max-upload-mb, and
    past it the answer says Connection: close; a body declared too large is
    not read at all."""
    client = create_app(dataclasses.replace(settings, max_upload_mb=1)).test_client()
    limit = 1024 * 1024
    for size, close in ((limit - 10, None), (limit + 10, "close")):
        stream = io.BytesIO(b"x" * size)
        answer = client.post(
            "/models/no-such-model/predict", input_stream=stream,
            headers={"Transfer-Encoding": "chunked", "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        assert answer.status_code == 404
        assert answer.headers.get("Connection") == close, size
        assert stream.tell() == min(size, limit + 1), "read to its end, or one byte past the limit"
    stream = io.BytesIO(b"x" * (limit + 10))
    answer = client.post(
        "/models/no-such-model/predict", input_stream=stream,
        headers={"Content-Length": str(limit + 10), "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert answer.headers.get("Connection") == "close"
    assert stream.tell() == 0
