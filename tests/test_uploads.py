"""The multipart reader of /predict: what requests, curl and browsers send,
and what werkzeug would say for the rest."""

import io

import requests
from werkzeug.test import EnvironBuilder

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
