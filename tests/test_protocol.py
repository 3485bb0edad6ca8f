"""The wire format between web and worker, and the key names."""

import base64
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
    assert set(message) == {"id", "shape", "dtype", "deadline"}
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


def test_the_older_all_json_form_still_decodes() -> None:
    """Requests queued by a web tier from before the raw-bytes format."""
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    raw = _message(image=base64.b64encode(image.tobytes()).decode())
    np.testing.assert_array_equal(messages.decode_request(raw).image, image)
    np.testing.assert_array_equal(messages.decode_request(raw.decode()).image, image)


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


def _message(**overrides: object) -> bytes:
    message = {
        "id": "abc",
        "shape": [2, 2, 3],
        "dtype": "uint8",
        "image": base64.b64encode(bytes(12)).decode(),
        "deadline": time.time() + 10,
    }
    message.update(overrides)
    return json.dumps({k: v for k, v in message.items() if v is not None}).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        _message(image=None),
        _message(image="***"),
        _message(shape=[2, 2, 4]),
        _message(shape=[-2, -2, 3]),
        _message(dtype="object"),
        _message(dtype="float64"),
        _message(shape=[100000, 100000, 3]),
        b'{"id": "abc", "shape": [2, 2, 3], "dtype": "uint8", "deadline": 1}\n' + bytes(11),
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
    assert keys.queue == "q"
    assert keys.result("id1") == "q:result:id1"


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


def test_top_k_highest_first() -> None:
    probabilities = np.array([0.1, 0.4, 0.05, 0.3, 0.15], dtype=np.float32)
    labels = ["a", "b", "c", "d", "e"]
    best = top_k(probabilities, labels, k=3)
    assert [p["label"] for p in best] == ["b", "d", "e"]
    assert best[0]["probability"] == pytest.approx(0.4)
    assert isinstance(best[0]["probability"], float)
    assert len(top_k(probabilities, labels, k=10)) == 5


def test_heartbeats_ignore_fields_they_do_not_know() -> None:
    """A newer worker's heartbeat must not look dead to an older web server."""
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
    # An error, and a top-k answer from a worker that ignored the field: no vector.
    error = messages.decode_probabilities(messages.error_result("the model failed"))
    assert error == ({"success": False, "error": "the model failed"}, None)
    assert messages.decode_probabilities(messages.success_result([]))[1] is None
    with pytest.raises(messages.BadMessage):
        messages.decode_probabilities(raw[:-1])


def test_heartbeats_stay_readable_across_the_description_rename() -> None:
    """WorkerInfo.description was once called `model`. During a rolling upgrade
    an older web server, which requires `model`, reads a newer worker's beat,
    and an older worker's beat, with `model` only, reads here."""
    info = messages.WorkerInfo(description="ResNet50", batch_size=1, host="h", pid=1, at=1.0)
    written = json.loads(info.encode())
    assert written["model"] == written["description"] == "ResNet50"
    assert {"model", "batch_size", "host", "pid", "at"} <= written.keys()  # what older ones need
    older = {k: v for k, v in written.items() if k != "description"}
    assert messages.WorkerInfo.decode(json.dumps(older)) == info
    with pytest.raises(messages.BadMessage):
        messages.WorkerInfo.decode(json.dumps({"batch_size": 1, "host": "h", "pid": 1, "at": 1.0}))


def test_request_ids_are_128_random_bits_in_hex() -> None:
    """os.urandom, not uuid4 (a fifth of the cost; issue 23): 32 hex digits."""
    image = np.zeros((2, 2, 3), np.uint8)
    ids = {messages.ImageRequest.create(image, 1).id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
