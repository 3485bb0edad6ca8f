"""The v2 protocol over gRPC (--grpc-port), spoken by a client nobody here
wrote: tritonclient's gRPC InferenceServerClient, against real server
processes on the test Redis:

- `--role all --model sim --grpc-port P`: health, metadata, BYTES, UINT8 and
  FP32 tensors (raw, as tritonclient sends them, and typed contents), the
  classification extension, INVALID_ARGUMENT, NOT_FOUND, a message past
  --max-upload-mb, and the calls counted on the HTTP front's /metrics;
- `--role web --model sim --grpc-port P --api-keys FILE --max-queue 1` with
  no worker: UNAUTHENTICATED, keys from the metadata, the client's deadline
  as the request's (DEADLINE_EXCEEDED), UNAVAILABLE for a full queue.

The simulated model's probabilities are a pure function of the pixels, so
each answer is checked against the same model run here on the same images.
This module never imports keras_server.rpc's generated code: it would
clash with tritonclient's in protobuf's one descriptor pool (both define the
package `inference`); the server runs in its own process anyway.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from conftest import IMAGES, start, start_serving, stop, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.engines.simulated import SimulatedModel
from keras_server.images import load_image
from keras_server.labels import imagenet_labels
from keras_server.processes import Child
from keras_server.rpc import codegen
from keras_server.settings import Settings, SettingsError, load_settings

FILES = [(IMAGES / name).read_bytes() for name in ("chelsea.png", "coffee.png", "rocket.jpg")]
MODEL = "sim"
MAX_IMAGES = 4
KEY = "grpc-test-key-0123456789"
LIMITED = "grpc-limited-key-0123456789"


def expected(pixels: np.ndarray) -> np.ndarray:
    return SimulatedModel(0, 0).predict(pixels)


def decoded(files: list[bytes]) -> np.ndarray:
    return np.stack([load_image(f, (224, 224), 50_000_000) for f in files])


def code(failure: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(failure.value.status()).removeprefix("StatusCode.")


def connect(port: int, process: Child) -> grpcclient.InferenceServerClient:
    """A client once the gRPC front answers (it starts beside the HTTP front)."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")

    def live() -> bool:
        assert process.alive(), process.log_tail()
        try:
            return bool(client.is_server_live())
        except InferenceServerException:
            return False

    wait_until(live, timeout=60, what="the gRPC front")
    return client


@pytest.fixture(scope="module")
def served(redis_server: RedisServer) -> Iterator[tuple[Child, str, int]]:
    """`--role all --model sim --grpc-port P` (no sleeps): process, HTTP base, gRPC port."""
    settings = Settings(redis_url=redis_server.url, queue_name=f"grpc-{uuid.uuid4().hex[:8]}")
    port = free_port()
    process, base = start_serving(
        settings,
        "--model", "sim", "--sim-batch-ms", "0", "--sim-image-ms", "0",
        "--batch-size", "8", "--max-images", str(MAX_IMAGES), "--max-upload-mb", "2",
        "--grpc-port", str(port),
    )  # fmt: skip
    try:
        yield process, base, port
    finally:
        stop(process)


@pytest.fixture(scope="module")
def client(served: tuple[Child, str, int]) -> Iterator[grpcclient.InferenceServerClient]:
    process, _, port = served
    triton = connect(port, process)
    wait_until(triton.is_server_ready, what="the gRPC server to be ready")
    yield triton
    triton.close()


def image_input(files: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [len(files)], "BYTES")
    return tensor.set_data_from_numpy(np.array(files, dtype=np.object_))


def test_the_generated_code_is_what_protoc_makes_of_the_proto() -> None:
    # In a process of its own: protoc run inside this one, beside the
    # protobuf runtime other tests loaded, crashed it (a segfault in upb).
    check = subprocess.run(
        [sys.executable, "-m", "keras_server.rpc.codegen", "--check"],
        cwd=codegen.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_the_grpc_port_cannot_be_the_http_port() -> None:
    with pytest.raises(SettingsError, match="--grpc-port=5000"):
        load_settings(["--grpc-port", "5000", "--port", "5000"], environ={})


@pytest.mark.slow
def test_a_grpc_port_in_use_stops_the_command(redis_server: RedisServer) -> None:
    """No second server on a taken port (no SO_REUSEPORT): the gRPC front
    exits, saying why, and --role web with it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start(
            "--role", "web", "--model", "sim", "--port", str(free_port()),
            "--grpc-port", str(port), "--redis-url", redis_server.url,
        )  # fmt: skip
        try:
            assert process.wait(timeout=90) == 1
        finally:
            process.stop()
    output = process.output()
    assert f"gRPC cannot listen on 127.0.0.1:{port}" in output, output[-3000:]
    assert "the gRPC front exited (status 1): stopping" in output


@pytest.mark.slow
def test_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version="1")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "keras-server"
    assert "classification" in server["extensions"]

    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["name"] == MODEL
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "keras"
    inputs = {i["name"]: i for i in metadata["inputs"]}
    assert inputs["image"] == {"name": "image", "datatype": "BYTES", "shape": ["-1"]}
    assert inputs["pixels"] == {
        "name": "pixels",
        "datatype": "UINT8",
        "shape": ["-1", "224", "224", "3"],
    }
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "1000"]}
    ]
    versioned = client.get_model_metadata(MODEL, model_version="1", as_json=True)
    assert versioned["versions"] == ["1"]


@pytest.mark.slow
def test_unknown_model_and_version_are_not_found(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("alexnet")
    assert code(unknown) == "NOT_FOUND"
    assert "unknown model 'alexnet'" in unknown.value.message()
    with pytest.raises(InferenceServerException) as version:
        client.infer(MODEL, [image_input(FILES[:1])], model_version="7")
    assert code(version) == "NOT_FOUND"
    assert "no version '7'" in version.value.message()
    with pytest.raises(InferenceServerException) as ready:
        client.is_model_ready(MODEL, model_version="7")
    assert code(ready) == "NOT_FOUND"


@pytest.mark.slow
def test_a_pinned_version_is_answered_on_its_own_queue(
    client: grpcclient.InferenceServerClient,
) -> None:
    """model_version pins the request to that version's queue (issue 22):
    its workers claim it there and the answer names it."""
    result = client.infer(MODEL, [image_input(FILES[:1])], model_version="1")
    assert result.get_response().model_version == "1"


@pytest.mark.slow
def test_infer_encoded_images(client: grpcclient.InferenceServerClient) -> None:
    output = grpcclient.InferRequestedOutput("probabilities")
    result = client.infer(MODEL, [image_input(FILES)], outputs=[output], request_id="r1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (3, 1000)
    np.testing.assert_allclose(probabilities, expected(decoded(FILES)), rtol=1e-6)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "r1")


@pytest.mark.slow
def test_priority_and_timeout_parameters(client: grpcclient.InferenceServerClient) -> None:
    """Triton's `priority` and `timeout` parameters, as int64 (KServe's proto
    has no uint64_param: tritonclient's `priority=`, a uint64, is refused)."""
    stub = client._client_stub
    request = _typed_request("image", "BYTES", [1])
    request.inputs[0].contents.bytes_contents.append(FILES[0])
    request.parameters["priority"].int64_param = 2
    request.parameters["timeout"].int64_param = 10_000_000
    answer = stub.ModelInfer(request, timeout=30)
    assert len(answer.raw_output_contents[0]) == 4 * 1000
    request.parameters["priority"].int64_param = 3
    with pytest.raises(grpc.RpcError) as failure:
        stub.ModelInfer(request, timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "from 1 (the highest) to 2" in failure.value.details()
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL, [image_input(FILES[:1])], priority=2)
    assert code(refused) == "INVALID_ARGUMENT"
    assert "int64_param" in refused.value.message()


@pytest.mark.slow
def test_infer_with_default_outputs(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer(MODEL, [image_input(FILES[:1])])
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected(decoded(FILES[:1])), rtol=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_infer_pixels(client: grpcclient.InferenceServerClient, datatype: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    sent = pixels if datatype == "UINT8" else pixels.astype(np.float32)
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), datatype)
    result = client.infer(MODEL, [tensor.set_data_from_numpy(sent)])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected(sent), rtol=1e-6)


def _typed_request(name: str, datatype: str, shape: list[int]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


@pytest.mark.slow
def test_infer_typed_contents(client: grpcclient.InferenceServerClient) -> None:
    """Tensors in `contents` rather than raw bytes (what other clients send),
    through tritonclient's own stub and messages."""
    stub = client._client_stub
    files = _typed_request("image", "BYTES", [2])
    files.inputs[0].contents.bytes_contents.extend(FILES[:2])
    answer = stub.ModelInfer(files, timeout=30)
    probabilities = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(2, 1000)
    np.testing.assert_allclose(probabilities, expected(decoded(FILES[:2])), rtol=1e-6)

    pixels = np.random.default_rng(2).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    typed = _typed_request("pixels", "UINT8", [1, 224, 224, 3])
    typed.inputs[0].contents.uint_contents.extend(pixels.ravel().tolist())
    answer = stub.ModelInfer(typed, timeout=30)
    probabilities = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(1, 1000)
    np.testing.assert_allclose(probabilities, expected(pixels), rtol=1e-6)

    typed.inputs[0].contents.uint_contents[0] = 256
    with pytest.raises(Exception, match=r"0\.\.255") as refused:
        stub.ModelInfer(typed, timeout=30)
    assert refused.value.code().name == "INVALID_ARGUMENT"  # type: ignore[attr-defined]


def test_contents_beside_raw_input_contents_is_invalid_argument(
    client: grpcclient.InferenceServerClient,
) -> None:
    """The protocol forbids a tensor's data in both places, as Triton does."""
    both = _typed_request("image", "BYTES", [1])
    both.inputs[0].contents.bytes_contents.append(FILES[0])
    both.raw_input_contents.append(len(FILES[0]).to_bytes(4, "little") + FILES[0])
    with pytest.raises(grpc.RpcError) as refused:
        client._client_stub.ModelInfer(both, timeout=30)
    assert refused.value.code().name == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    details = refused.value.details()  # type: ignore[attr-defined]
    assert "contents" in details and "raw_input_contents" in details


@pytest.mark.slow
def test_classification_extension(client: grpcclient.InferenceServerClient) -> None:
    output = grpcclient.InferRequestedOutput("probabilities", class_count=3)
    result = client.infer(MODEL, [image_input(FILES[:2])], outputs=[output])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    labels = imagenet_labels()
    want = expected(decoded(FILES[:2]))
    for row, probabilities in zip(classes, want, strict=True):
        parsed = [item.decode().split(":", 2) for item in row]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-probabilities, kind="stable")[:3])
        for score, index, label in parsed:
            assert label == labels[int(index)]
            assert float(score) == pytest.approx(probabilities[int(index)], abs=1e-6)


@pytest.mark.slow
def test_bad_requests_are_invalid_argument(client: grpcclient.InferenceServerClient) -> None:
    def refused(inputs: list[grpcclient.InferInput], text: str, status: str) -> None:
        with pytest.raises(InferenceServerException) as failure:
            client.infer(MODEL, inputs)
        assert code(failure) == status
        assert text in failure.value.message()

    too_many = FILES[2:] * 5  # 5 > --max-images 4
    refused([image_input(too_many)], "the limit is 4", "INVALID_ARGUMENT")
    wrong_type = grpcclient.InferInput("image", [1], "INT32")
    refused(
        [wrong_type.set_data_from_numpy(np.zeros(1, np.int32))], "must be BYTES", "INVALID_ARGUMENT"
    )
    small = grpcclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
    refused(
        [small.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))], "shape", "INVALID_ARGUMENT"
    )
    other = grpcclient.InferInput("input_1", [1], "BYTES")
    refused(
        [other.set_data_from_numpy(np.array([FILES[0]], np.object_))],
        "unknown input",
        "INVALID_ARGUMENT",
    )
    refused([image_input([b"not an image"])], "element 0", "INVALID_ARGUMENT")
    # Past --max-upload-mb (2 MB): grpcio refuses the message before we parse it.
    refused([image_input([bytes(2_200_000)])], "", "RESOURCE_EXHAUSTED")
    # The server is still fine.
    assert client.infer(MODEL, [image_input(FILES[:1])]).as_numpy("probabilities") is not None


@pytest.mark.slow
def test_grpc_calls_are_counted_on_the_http_front(
    served: tuple[Child, str, int], client: grpcclient.InferenceServerClient
) -> None:
    client.infer(MODEL, [image_input(FILES[:1])])
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("no-such-model")
    text = requests.get(served[1] + "/metrics", timeout=10).text

    def counted(labels: str) -> float:
        found = re.search(rf"^keras_server_grpc_requests_total\{{{labels}\}} (\S+)$", text, re.M)
        assert found, text[-2000:]
        return float(found.group(1))

    # Labelled with the model and version that answered; "" for a call no model answered.
    assert counted('code="OK",method="ModelInfer",model="sim",version="1"') >= 1
    assert counted('code="NOT_FOUND",method="ModelMetadata",model="",version=""') >= 1
    seconds = 'method="ModelInfer",model="sim",version="1"'
    assert re.search(rf"^keras_server_grpc_request_seconds_count\{{{seconds}\}} ", text, re.M)


# Codes a request of any shape may get; never INTERNAL or UNKNOWN (a bug).
FUZZ_CODES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
PIXELS_SHAPE = [1, 224, 224, 3]


@st.composite
def infer_requests(draw: st.DrawFn) -> service_pb2.ModelInferRequest:
    """ModelInferRequests of every shape, mostly wrong: names, datatypes,
    shapes, raw and typed contents, outputs and their parameters."""
    request = service_pb2.ModelInferRequest(
        model_name=draw(st.sampled_from([MODEL, MODEL, "alexnet", ""])),
        model_version=draw(st.sampled_from(["", "", "1", "7"])),
        id=draw(st.text(max_size=8)),
    )
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["image", "pixels", "input_1", ""])),
            datatype=draw(st.sampled_from(["BYTES", "UINT8", "FP32", "INT32", "FP16", ""])),
            shape=draw(
                st.one_of(
                    st.just(PIXELS_SHAPE),
                    st.lists(st.integers(-2, 2**40), max_size=5),
                    st.lists(st.integers(0, 3), max_size=2),
                )
            ),
        )
        contents = draw(st.sampled_from(["raw", "bytes", "uint", "fp32", "none"]))
        if contents == "raw":
            request.raw_input_contents.append(draw(st.binary(max_size=4096)))
        elif contents == "bytes":
            tensor.contents.bytes_contents.extend(
                draw(st.lists(st.binary(max_size=64), max_size=3))
            )
        elif contents == "uint":
            tensor.contents.uint_contents.extend(
                draw(st.lists(st.integers(0, 2**32 - 1), max_size=8))
            )
        elif contents == "fp32":
            tensor.contents.fp32_contents.extend(
                draw(st.lists(st.floats(width=32, allow_nan=True), max_size=8))
            )
        if draw(st.booleans()):
            tensor.parameters["shared_memory_region"].string_param = "r"
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(["probabilities", "logits"])))
        parameter = output.parameters[draw(st.sampled_from(["classification", "binary_data"]))]
        kind = draw(st.sampled_from(["int64", "bool", "string", "none"]))
        if kind == "int64":
            parameter.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif kind == "bool":
            parameter.bool_param = draw(st.booleans())
        elif kind == "string":
            parameter.string_param = draw(st.text(max_size=4))
    return request


@pytest.mark.slow
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=infer_requests())
def test_any_infer_request_is_answered_or_refused_never_a_bug(
    client: grpcclient.InferenceServerClient, request: service_pb2.ModelInferRequest
) -> None:
    try:
        client._client_stub.ModelInfer(request, timeout=30)
        status, details = "OK", ""
    except grpc.RpcError as error:
        status, details = error.code().name, error.details()  # type: ignore[attr-defined]
    assert status in FUZZ_CODES, f"{status}: {details}"


# -- --role web, API keys, no worker ------------------------------------------


@pytest.fixture(scope="module")
def guarded(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Child, int]]:
    """`--role web` with --grpc-port and --api-keys, on a queue no worker
    serves, holding at most one request: process, gRPC port."""
    keys = Path(tmp_path_factory.mktemp("keys")) / "keys"
    keys.write_text(f"{KEY}\n{LIMITED} name=grpc-client rate=1/h burst=2\n")
    settings = Settings(redis_url=redis_server.url, queue_name=f"grpc-{uuid.uuid4().hex[:8]}")
    port = free_port()
    process, _ = start_serving(
        settings,
        "--role", "web", "--model", "sim", "--grpc-port", str(port),
        "--api-keys", str(keys), "--max-queue", "1", "--result-timeout", "30",
    )  # fmt: skip
    try:
        yield process, port
    finally:
        stop(process)


@pytest.mark.slow
def test_keys_deadlines_and_a_full_queue(guarded: tuple[Child, int]) -> None:
    process, port = guarded
    client = connect(port, process)  # ServerLive needs no key: a probe
    bearer = {"authorization": f"Bearer {KEY}"}
    try:
        assert not client.is_server_ready()  # no worker
        for headers in ({}, {"x-api-key": "wrong-key-0123456789"}, {"authorization": "Basic x"}):
            with pytest.raises(InferenceServerException) as refused:
                client.get_model_metadata(MODEL, headers=headers)
            assert code(refused) == "UNAUTHENTICATED"
        for headers in (bearer, {"x-api-key": KEY}):
            assert client.get_model_metadata(MODEL, headers=headers, as_json=True)["name"] == MODEL

        # No worker: the request waits for its answer until the client's
        # deadline (1 s), not --result-timeout (30 s); the server says so itself.
        with pytest.raises(InferenceServerException) as late:
            client.infer(MODEL, [image_input(FILES[:1])], headers=bearer, client_timeout=1)
        assert code(late) == "DEADLINE_EXCEEDED"
        wait_until(
            lambda: "gRPC ModelInfer DEADLINE_EXCEEDED" in process.output(),
            timeout=15,
            what="the server to answer at the client's deadline",
        )
        # Its image is still queued (no worker took it): --max-queue 1 is full.
        with pytest.raises(InferenceServerException) as full:
            client.infer(MODEL, [image_input(FILES[:1])], headers=bearer, client_timeout=10)
        assert code(full) == "UNAVAILABLE"
        assert "queue is full" in full.value.message()
    finally:
        client.close()


@pytest.mark.slow
def test_a_key_over_its_quota_is_resource_exhausted(guarded: tuple[Child, int]) -> None:
    """The quota of serving/quotas.py holds on gRPC calls too, per image: a
    call with more images than are left is refused whole; once nothing is
    left, every call is refused before it is parsed."""
    process, port = guarded
    client = connect(port, process)
    limited = {"x-api-key": LIMITED}
    try:
        for _ in range(3):  # no image: nothing counted
            assert client.get_model_metadata(MODEL, headers=limited, as_json=True)["name"] == MODEL
        with pytest.raises(InferenceServerException) as over:
            client.infer(MODEL, [image_input([FILES[0]] * 3)], headers=limited)
        assert code(over) == "RESOURCE_EXHAUSTED"
        assert "3 images sent, 2 left now" in over.value.message()
        # Two images are within the burst: charged, then refused by the full queue.
        with pytest.raises(InferenceServerException) as full:
            client.infer(MODEL, [image_input([FILES[0]] * 2)], headers=limited)
        assert code(full) == "UNAVAILABLE"
        # tritonclient keeps the status, not the trailers: grpc itself reads them.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            metadata = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelMetadata",
                request_serializer=service_pb2.ModelMetadataRequest.SerializeToString,
                response_deserializer=service_pb2.ModelMetadataResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as raw:
                metadata(service_pb2.ModelMetadataRequest(name=MODEL), metadata=(
                    ("x-api-key", LIMITED),
                ), timeout=10)  # fmt: skip
        assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(raw.value.trailing_metadata())
        assert 3590 <= int(trailers["retry-after"]) <= 3600
        assert (trailers["ratelimit-limit"], trailers["ratelimit-remaining"]) == ("2", "0")
        assert "the API key 'grpc-client' is over its quota of 1 image an hour" in (
            raw.value.details()
        )
        # Another key is not held by this one's quota.
        assert client.get_model_metadata(MODEL, headers={"x-api-key": KEY}, as_json=True)
    finally:
        client.close()
    assert LIMITED not in process.output()


@pytest.mark.slow
def test_calls_past_grpc_max_calls_are_resource_exhausted(redis_server: RedisServer) -> None:
    """--grpc-max-calls 2, no worker: two calls wait for their answer until
    their deadline; the others, sent meanwhile, are refused at once."""
    settings = Settings(redis_url=redis_server.url, queue_name=f"grpc-{uuid.uuid4().hex[:8]}")
    port = free_port()
    process, _ = start_serving(
        settings,
        "--role", "web", "--model", "sim", "--grpc-port", str(port), "--grpc-max-calls", "2",
    )  # fmt: skip
    try:
        client = connect(port, process)
        deadline = 8.0

        def infer(_: int) -> str:
            try:
                client.infer(MODEL, [image_input(FILES[:1])], client_timeout=deadline)
            except InferenceServerException as exc:
                return str(exc.status()).removeprefix("StatusCode.")
            return "OK"

        with ThreadPoolExecutor(5) as pool:
            codes = sorted(pool.map(infer, range(5)))
        assert codes == ["DEADLINE_EXCEEDED"] * 2 + ["RESOURCE_EXHAUSTED"] * 3
        # Once the server ended those two (at their deadline, a moment after
        # the client gave up on them), calls are taken again.

        def live() -> bool:
            try:
                return bool(client.is_server_live())
            except InferenceServerException:
                return False

        wait_until(live, timeout=15, what="the two held calls to end")
        client.close()
    finally:
        stop(process)


def test_an_explanation_adds_the_heatmap_output(client: grpcclient.InferenceServerClient) -> None:
    """parameters.explain over gRPC: the core's occlusion, translated."""
    answer = client.infer(
        MODEL, [image_input(FILES[:1])], parameters={"explain": "occlusion", "explain_grid": 3}
    )
    heatmap = answer.as_numpy("heatmap")
    assert heatmap.shape == (1, 3, 3) and heatmap.dtype == np.float32
    assert np.all((heatmap >= 0) & (heatmap <= 1))
    np.testing.assert_allclose(answer.as_numpy("probabilities"), expected(decoded(FILES[:1])))
    with pytest.raises(InferenceServerException) as gradcam:
        client.infer(MODEL, [image_input(FILES[:1])], parameters={"explain": "gradcam"})
    assert code(gradcam) == "INVALID_ARGUMENT"
    assert "needs the keras engine" in gradcam.value.message()
