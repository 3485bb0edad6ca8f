"""Redis with a password, an ACL user and TLS; nothing from Redis is ever
unpickled or evaluated."""

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from conftest import CHELSEA, WorkerThread, make_worker, post_images

from keras_server.broker import messages
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.broker.request_queue import RequestQueue
from keras_server.engines.simulated import SimulatedModel
from keras_server.settings import Settings
from keras_server.web.app import create_app


def served_ok(url: str, queue_name: str = "image_queue") -> int:
    """Status of one /predict through `url`, with a worker on the same URL."""
    settings = Settings(
        redis_url=url, redis_url_given=True, queue_name=queue_name, result_timeout=10
    )
    client = create_app(settings).test_client()
    with WorkerThread(make_worker(settings, SimulatedModel(1, 0))):
        response = post_images(client, CHELSEA)
    return response.status_code


def test_password_in_the_url() -> None:
    port = free_port()
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    with RedisServer(port=port, extra_args=["--requirepass", "s3cret"], url=url):
        assert served_ok(url) == 200
        wrong = f"redis://:nope@127.0.0.1:{port}/0"
        settings = Settings(redis_url=wrong, redis_url_given=True)
        client = create_app(settings).test_client()
        response = post_images(client, CHELSEA)
        assert response.status_code == 503
        assert client.get("/readyz").status_code == 503


def test_acl_user_limited_to_the_queue_keys(redis_server: RedisServer) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser(
        "keras",
        enabled=True,
        passwords=["+app-pass"],
        keys=["{kq*"],  # the queue name in braces: its hash tag (messages.Keys)
        commands=["+@all", "-@dangerous"],
    )
    try:
        url = redis_server.url.replace("redis://", "redis://keras:app-pass@")
        assert served_ok(url, queue_name="kq") == 200
        limited = redis.Redis.from_url(url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.get("someone-elses-key")
    finally:
        admin.acl_deluser("keras")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return directory


def test_tls(certificate: Path) -> None:
    port = free_port()
    cert, key = certificate / "cert.pem", certificate / "key.pem"
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    tls = [
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
    ]  # fmt: skip
    with RedisServer(port=port, extra_args=tls, url=url):
        assert served_ok(url) == 200
        plain = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        with pytest.raises(redis.RedisError):
            plain.ping()


class Exploit:
    """Unpickling this would create a file; nothing may ever unpickle it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_queue_entries_are_never_unpickled_or_evaluated(
    settings: Settings, queue: RequestQueue, tmp_path: Path
) -> None:
    target = tmp_path / "pwned"
    queue.push(pickle.dumps(Exploit(target)))
    raw = messages.encode_request(
        messages.ImageRequest.create(messages.np.zeros((2, 2, 3), "uint8"), 9)
    )
    header, _, pixels = raw.partition(b"\n")
    message = json.loads(header)
    message.update(id="evil", shape="__import__('os').system('touch " + str(target) + "')")
    queue.push(json.dumps(message).encode() + b"\n" + pixels)
    worker = make_worker(settings, SimulatedModel(1, 0))
    assert worker.run_once(wait=1) == 2
    assert not target.exists()
    answer = RequestQueue.open(settings.redis_url, queue.keys, timeout=1)
    assert messages.decode_result(answer.wait_result("evil", 1)) == {
        "success": False,
        "error": "the request was malformed",
    }
