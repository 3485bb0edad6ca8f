"""The Open Inference Protocol (v2) spoken to a real server process by a client
nobody here wrote: tritonclient's InferenceServerClient (HTTP), against
`run_keras_server.py --model sim` on the test Redis.

The simulated model's probabilities are a pure function of the pixels, so
each answer is checked against the same model run here on the same images."""

import base64
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import IMAGES, start_serving, stop, wait_until
from tritonclient.utils import InferenceServerException

from keras_server.broker.redis_server import RedisServer
from keras_server.engines.simulated import SimulatedModel
from keras_server.images import load_image
from keras_server.labels import imagenet_labels
from keras_server.settings import Settings

pytestmark = pytest.mark.slow  # every test talks to the module's server

FILES = [(IMAGES / name).read_bytes() for name in ("chelsea.png", "coffee.png", "rocket.jpg")]
MODEL = "sim"
MAX_IMAGES = 4


def expected(pixels: np.ndarray) -> np.ndarray:
    return SimulatedModel(0, 0).predict(pixels)


def decoded(files: list[bytes]) -> np.ndarray:
    return np.stack([load_image(f, (224, 224), 50_000_000) for f in files])


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[str]:
    """host:port of `--role all --model sim` (no sleeps), once a worker beats."""
    settings = Settings(redis_url=redis_server.url, queue_name=f"v2-{uuid.uuid4().hex[:8]}")
    process, base = start_serving(
        settings,
        "--model", "sim", "--sim-batch-ms", "0", "--sim-image-ms", "0",
        "--batch-size", "8", "--max-images", str(MAX_IMAGES),
    )  # fmt: skip
    try:
        yield base.removeprefix("http://")
    finally:
        stop(process)


@pytest.fixture
def client(server: str) -> Iterator[httpclient.InferenceServerClient]:
    triton = httpclient.InferenceServerClient(server, network_timeout=30)
    wait_until(triton.is_server_ready, what="the v2 server to be ready")
    yield triton
    triton.close()


def bytes_input(files: list[bytes], binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", [len(files)], "BYTES")
    if binary:
        # The files themselves, length-prefixed: tritonclient's default for BYTES.
        return tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
    # JSON carries only text: each file as base64.
    text = np.array([base64.b64encode(f) for f in files], dtype=np.object_)
    return tensor.set_data_from_numpy(text, binary_data=False)


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version="1")
    server = client.get_server_metadata()
    assert server["name"] == "keras-server"
    assert "classification" in server["extensions"]

    metadata = client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL
    assert metadata["versions"] == ["1"]
    inputs = {i["name"]: i for i in metadata["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES"
    assert inputs["pixels"] == {"name": "pixels", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}
    ]
    assert client.get_model_metadata(MODEL, model_version="1")["versions"] == ["1"]


def test_unknown_model_and_version_are_404(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("alexnet")
    assert unknown.value.status() == "404"
    assert "unknown model 'alexnet'" in unknown.value.message()
    with pytest.raises(InferenceServerException) as version:
        client.infer(MODEL, [bytes_input(FILES[:1], True)], model_version="7")
    assert version.value.status() == "404"
    assert "no version '7'" in version.value.message()
    assert not client.is_model_ready(MODEL, model_version="7")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_encoded_images(client: httpclient.InferenceServerClient, binary: bool) -> None:
    output = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer(MODEL, [bytes_input(FILES, binary)], outputs=[output], request_id="r1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (3, 1000)
    np.testing.assert_allclose(probabilities, expected(decoded(FILES)), rtol=1e-6)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (
        MODEL,
        "1",
        "r1",
    )


def test_infer_with_default_outputs(client: httpclient.InferenceServerClient) -> None:
    """No outputs named: tritonclient asks for every output, in binary."""
    result = client.infer(MODEL, [bytes_input(FILES[:1], True)])
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected(decoded(FILES[:1])), rtol=1e-6
    )


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_pixels(client: httpclient.InferenceServerClient, binary: bool) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    result = client.infer(MODEL, [tensor])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected(pixels), rtol=1e-6)


def test_infer_fp32_pixels(client: httpclient.InferenceServerClient) -> None:
    pixels = decoded(FILES[1:2]).astype(np.float32)
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    result = client.infer(MODEL, [tensor.set_data_from_numpy(pixels)], model_version="1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected(pixels), rtol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension(client: httpclient.InferenceServerClient, binary: bool) -> None:
    output = httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    result = client.infer(MODEL, [bytes_input(FILES[:2], True)], outputs=[output])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    labels = imagenet_labels()
    want = expected(decoded(FILES[:2]))
    for row, probabilities in zip(classes, want, strict=True):
        # tritonclient gives bytes from the binary form, str from JSON.
        parsed = [(i.decode() if isinstance(i, bytes) else i).split(":", 2) for i in row]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-probabilities, kind="stable")[:3])
        for score, index, label in parsed:
            assert label == labels[int(index)]
            assert float(score) == pytest.approx(probabilities[int(index)], abs=1e-6)


def test_bad_requests_answer_the_protocol_error(client: httpclient.InferenceServerClient) -> None:
    def refused(inputs: list[httpclient.InferInput], status: str, text: str) -> None:
        with pytest.raises(InferenceServerException) as failure:
            client.infer(MODEL, inputs)
        assert failure.value.status() == status
        assert text in failure.value.message()

    too_many = FILES * 2  # 6 > --max-images 4
    refused([bytes_input(too_many, True)], "413", "the limit is 4")
    wrong_type = httpclient.InferInput("image", [1], "INT32")
    refused([wrong_type.set_data_from_numpy(np.zeros(1, np.int32))], "400", "must be BYTES")
    small = httpclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
    refused([small.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))], "400", "shape")
    other = httpclient.InferInput("input_1", [1], "BYTES")
    refused([other.set_data_from_numpy(np.array([FILES[0]], np.object_))], "400", "unknown input")
    # The server is still fine.
    assert client.infer(MODEL, [bytes_input(FILES[:1], True)]).as_numpy("probabilities") is not None
