"""The wire format between web and worker, and the key names."""

import json
import time

import numpy as np
import pytest

from keras_server.broker import messages
from keras_server.engines.predictor import top_k


def test_request_round_trip_keeps_bytes_shape_and_dtype() -> None:
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    request = messages.ImageRequest.create(image, timeout=5)
    raw = messages.encode_request(request)
    header, newline, data = raw.partition(b"\n")
    message = json.loads(header)
    assert set(message) == {"format", "id", "shape", "dtype", "deadline"}
    assert message["format"] == messages.FORMAT
    assert message["shape"] == [224, 224, 3]
    assert message["dtype"] == "uint8"
    assert newline and data == image.tobytes(), "the pixels follow the header unencoded"
    decoded = messages.decode_request(raw)
    assert decoded.id == request.id
    assert decoded.deadline == pytest.approx(time.time() + 5, abs=1)
    np.testing.assert_array_equal(decoded.image, image)


def test_uint8_message_is_small() -> None:
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    raw = messages.encode_request(messages.ImageRequest.create(image, 1))
    assert len(raw) < 150_528 + 200  # the pixels themselves plus a short header


def test_a_request_of_another_format_is_refused_naming_it() -> None:
    np.testing.assert_array_equal(messages.decode_request(_message()).image, np.zeros((2, 2, 3)))
    with pytest.raises(messages.UnknownFormat, match="a request in message format 2; this server"):
        messages.decode_request(_message(format=messages.FORMAT + 1))
    with pytest.raises(messages.UnknownFormat, match="message format None"):
        messages.decode_request(_message(format=None))
    # All JSON, the image in base64: never a format of ours.
    with pytest.raises(messages.UnknownFormat):
        messages.decode_request(b'{"id": "abc", "shape": [1], "dtype": "uint8", "image": "AA=="}')


def test_an_image_with_newline_bytes_round_trips() -> None:
    image = np.full((2, 2, 3), ord("\n"), dtype=np.uint8)
    raw = messages.encode_request(messages.ImageRequest.create(image, 1))
    np.testing.assert_array_equal(messages.decode_request(raw).image, image)


def test_float32_round_trip() -> None:
    image = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 2, 3)
    decoded = messages.decode_request(
        messages.encode_request(messages.ImageRequest.create(image, 1))
    )
    np.testing.assert_array_equal(decoded.image, image)


def _message(data: bytes | None = bytes(12), **overrides: object) -> bytes:
    """A request's header (a field None: left out), then `data` (None: no newline)."""
    message = {
        "format": messages.FORMAT,
        "id": "abc",
        "shape": [2, 2, 3],
        "dtype": "uint8",
        # Fixed, not time-based: the ids of the parameters below must be the
        # same in every xdist worker that collects them.
        "deadline": 4_000_000_000.0,
    }
    message.update(overrides)
    header = json.dumps({k: v for k, v in message.items() if v is not None}).encode()
    return header if data is None else header + b"\n" + data


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        _message(data=None),
        _message(data=bytes(11)),
        _message(shape=[2, 2, 4]),
        _message(shape=[-2, -2, 3]),
        _message(dtype="object"),
        _message(dtype="float64"),
        _message(shape=[100000, 100000, 3]),
        b"not json\n" + bytes(12),
        b"[1, 2]\n" + bytes(12),
    ],
)
def test_malformed_requests_are_refused(raw: bytes) -> None:
    with pytest.raises(messages.BadMessage):
        messages.decode_request(raw)


def test_request_id_of_a_bad_message() -> None:
    assert messages.request_id_of(_message(dtype="object")) == "abc"
    assert messages.request_id_of(b"garbage") is None
    raw = messages.encode_request(
        messages.ImageRequest(id="xyz", image=np.zeros((2, 2, 3), np.uint8), deadline=1.0)
    )
    assert messages.request_id_of(raw.replace(b'"uint8"', b'"object"')) == "xyz"


def test_expiry() -> None:
    request = messages.ImageRequest(id="x", image=np.zeros(1, np.uint8), deadline=100.0)
    assert request.expired(now=100.5)
    assert not request.expired(now=99.0)


def test_keys_are_namespaced_by_queue() -> None:
    keys = messages.Keys("q")
    # One hash tag for every key of the queue (Redis Cluster: one slot).
    assert keys.queue == "{q}"
    assert keys.result("id1") == "{q}:result:id1"


def test_results_are_the_response_bodies() -> None:
    ok = messages.decode_result(messages.success_result([{"label": "tabby", "probability": 0.5}]))
    assert list(ok) == ["success", "predictions"]
    assert ok["success"] is True
    named = messages.decode_result(messages.success_result([], "flowers", "2"))
    assert named["model"] == {"name": "flowers", "version": "2"}
    assert messages.decode_result(messages.error_result("boom")) == {
        "success": False,
        "error": "boom",
    }


def test_an_answer_of_another_format_is_a_failure_naming_it() -> None:
    newer = json.loads(messages.success_result([{"label": "tabby", "probability": 0.5}]))
    newer["format"] = messages.FORMAT + 1
    expected = {
        "success": False,
        "error": "a worker answered in message format 2; "
        f"this server reads format {messages.FORMAT}",
    }
    assert messages.decode_result(json.dumps(newer)) == expected
    raw = messages.probabilities_result(np.ones(3, np.float32), [], "m", "1")
    header, _, vector = raw.partition(b"\n")
    unknown = json.dumps({**json.loads(header), "format": 2}).encode() + b"\n" + vector
    assert messages.decode_probabilities(unknown) == (expected, None)


def test_top_k_highest_first() -> None:
    probabilities = np.array([0.1, 0.4, 0.05, 0.3, 0.15], dtype=np.float32)
    labels = ["a", "b", "c", "d", "e"]
    best = top_k(probabilities, labels, k=3)
    assert [p["label"] for p in best] == ["b", "d", "e"]
    assert best[0]["probability"] == pytest.approx(0.4)
    assert isinstance(best[0]["probability"], float)
    assert len(top_k(probabilities, labels, k=10)) == 5


def test_heartbeats_ignore_fields_they_do_not_know() -> None:
    """A field added within a format is for whoever reads it."""
    info = messages.WorkerInfo(description="m", batch_size=1, host="h", pid=1, at=1.0, version="7")
    newer = json.loads(info.encode()) | {"gpu": "H100", "accelerator": "npu"}
    assert messages.WorkerInfo.decode(json.dumps(newer)) == info


def test_a_probabilities_request_says_so_and_only_then() -> None:
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    asking = messages.ImageRequest.create(image, 5, probabilities=True, classes=3)
    header = json.loads(messages.encode_request(asking).partition(b"\n")[0])
    assert (header["probabilities"], header["classes"]) == (True, 3)
    decoded = messages.decode_request(messages.encode_request(asking))
    assert (decoded.probabilities, decoded.classes) == (True, 3)
    plain = messages.decode_request(messages.encode_request(messages.ImageRequest.create(image, 5)))
    assert (plain.probabilities, plain.classes) == (False, 0)


def test_probabilities_answer_round_trip() -> None:
    vector = np.linspace(0, 1, 1000, dtype=np.float32)
    classes = [{"index": 999, "label": "toilet_tissue"}]
    raw = messages.probabilities_result(vector, classes, "resnet50", "2")
    header, decoded = messages.decode_probabilities(raw)
    np.testing.assert_array_equal(decoded, vector)
    assert header["classes"] == classes
    assert header["model"] == {"name": "resnet50", "version": "2"}
    # An error, and a top-k answer (web/inference.py refuses it): no vector.
    error = messages.decode_probabilities(messages.error_result("the model failed"))
    assert error == ({"success": False, "error": "the model failed"}, None)
    assert messages.decode_probabilities(messages.success_result([]))[1] is None
    with pytest.raises(messages.BadMessage):
        messages.decode_probabilities(raw[:-1])


def test_a_heartbeat_names_its_format_and_another_is_refused() -> None:
    info = messages.WorkerInfo(description="ResNet50", batch_size=1, host="h", pid=1, at=1.0)
    written = json.loads(info.encode())
    assert written["format"] == messages.FORMAT
    assert messages.WorkerInfo.decode(json.dumps(written)) == info
    with pytest.raises(messages.UnknownFormat, match="a heartbeat in message format 2"):
        messages.WorkerInfo.decode(json.dumps({**written, "format": 2}))
    with pytest.raises(messages.UnknownFormat, match="format None"):
        messages.WorkerInfo.decode(json.dumps({k: v for k, v in written.items() if k != "format"}))
    with pytest.raises(messages.BadMessage):
        messages.WorkerInfo.decode(json.dumps({"format": messages.FORMAT, "host": "h"}))


def test_request_ids_are_128_random_bits_in_hex() -> None:
    """os.urandom, not uuid4 (a fifth of the cost; issue 23): 32 hex digits."""
    image = np.zeros((2, 2, 3), np.uint8)
    ids = {messages.ImageRequest.create(image, 1).id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
