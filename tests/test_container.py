"""The Dockerfile, built and run for real with podman: both targets, a worker
container of the full image serving a model baked in through WEIGHTS_URL, a
web container of the web image (granian, no TensorFlow) requiring an API
key, and a prediction through them. Then compose.yaml, brought up with
podman-compose (Redis, 2 web servers, 2 workers, nginx): predictions through
nginx, a worker container killed under traffic, every request still
answered, and the whole project torn down.

No container registry is reachable here, so the base image is a local one:
a Debian rootfs from `debootstrap`, loaded with `podman import` (built once,
then reused). Podman runs with the settings this machine needs: a
containers.conf with `default_ulimits = []`, `pids_limit = 0` and runc as the
OCI runtime (through CONTAINERS_CONF, so the system's own file is left
alone; podman-compose's podman reads it too), and `--network host`. The
programs (podman, runc, debootstrap, CNI's dnsname) are installed before the
tests by `make container-test` (tests/preflight.py --container). pip inside
the build trusts the CA bundle that pip's `cert` setting names here, mounted
into the build. compose.yaml's redis and
nginx images come from a registry too: the compose test puts in their place
one image of Debian's redis-server and nginx on the same base, through an
override file (its only change: the images), and its containers find each
other by name through CNI's dnsname plugin.

Slow (minutes on a fresh machine): runs only when `-m` names the `container`
marker, as `make container-test` does.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import preflight
import pytest
import requests
import yaml
from conftest import IMAGES, ROOT, system_tool, wait_until

from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.images import load_image

pytestmark = [pytest.mark.container, pytest.mark.slow]

BASE = "localhost/keras-server-base:bookworm"
IMAGE = "localhost/keras-server:test"
WEB_IMAGE = "localhost/keras-server-web:test"
# Run in a container: whether each engine's framework is installed there.
FRAMEWORKS = (
    "import importlib.util as u; "
    "print(*(bool(u.find_spec(m)) for m in ('tensorflow', 'keras', 'openvino', 'onnxruntime')))"
)
# runc for every podman command, podman-compose's included: crun refuses to
# start containers on hosts with hybrid cgroups ("cgroups in hybrid mode not
# supported, drop all controllers from cgroupv2"), runc runs them.
CONTAINERS_CONF = (
    '[containers]\ndefault_ulimits = []\npids_limit = 0\n\n[engine]\nruntime = "runc"\n'
)
KEY = "test-key-" + "k" * 24
CHELSEA = IMAGES / "chelsea.png"
# compose.yaml's redis and nginx, from Debian's packages (no registry here).
INFRA_IMAGE = "localhost/keras-server-test-infra:bookworm"
INFRA_CONTAINERFILE = """FROM {base}
RUN apt-get update -q \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \\
        redis-server redis-tools nginx \\
    && rm -rf /var/lib/apt/lists/*
"""


def pip_cert() -> str:
    """The CA bundle pip's `cert` setting names on this machine (pip's default
    bundle when nothing is set)."""
    found = subprocess.run(
        ["python3", "-m", "pip", "config", "get", "global.cert"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not found:
        found = os.environ.get("PIP_CERT", "")
    if not found:
        import certifi

        found = certifi.where()
    return found


class Podman:
    def __init__(self, conf: Path) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode:
            output = done.stdout[-3000:] + done.stderr[-3000:]
            pytest.fail(f"podman {' '.join(args)} failed:\n{output}")
        return done

    def run(self, name: str, *args: str) -> None:
        self("run", "--detach", "--name", name, "--network", "host", *args)

    def logs(self, name: str) -> str:
        done = self("logs", name, check=False)
        return done.stdout + done.stderr


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    for binary in preflight.CONTAINER_TOOLS:
        system_tool(binary)
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return Podman(conf)


@pytest.fixture(scope="module")
def base_image(podman: Podman) -> str:
    """A Debian bookworm with python3 and venv, as an image (made once)."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return BASE
    with tempfile.TemporaryDirectory(prefix="keras-rootfs-") as rootfs:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
             rootfs],
            capture_output=True,
            check=True,
            timeout=900,
        )  # fmt: skip
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "-", BASE],
            stdin=tar.stdout,
            env=podman.env,
            capture_output=True,
            check=True,
            timeout=600,
        )
        assert tar.wait() == 0
    return BASE


@pytest.fixture(scope="module")
def served_files(small_model_path: Path) -> Iterator[str]:
    """An HTTP server with the small model, for the build to fetch (WEIGHTS_URL)."""
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(small_model_path.parent)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def build(podman: Podman, base_image: str, tag: str, *options: str) -> str:
    cert = pip_cert()
    podman(
        "build",
        "--runtime", "runc",
        "--network", "host",
        "--format", "docker",  # OCI images drop HEALTHCHECK
        "--volume", f"{cert}:/etc/keras-build-ca.pem:ro",
        "--build-arg", "PIP_CERT=/etc/keras-build-ca.pem",
        "--build-arg", f"BASE_IMAGE={base_image}",
        *options,
        "--tag", tag,
        str(ROOT),
        timeout=1800,
    )  # fmt: skip
    return tag


@pytest.fixture(scope="module")
def image(podman: Podman, base_image: str, served_files: str, small_model_path: Path) -> str:
    """The default target: every role and engine."""
    weights = f"WEIGHTS_URL={served_files}/{small_model_path.name}"
    return build(podman, base_image, IMAGE, "--build-arg", weights)


@pytest.fixture(scope="module")
def images(podman: Podman, base_image: str, image: str) -> tuple[str, str]:
    """The full image and the web target's (the base install), built after it."""
    return image, build(podman, base_image, WEB_IMAGE, "--target", "web")


@pytest.fixture
def redis_for_containers() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


# A fresh machine installs podman, makes the base image and builds: minutes.
@pytest.mark.timeout(1800)
def test_image_serves_a_prediction_with_every_role(
    podman: Podman,
    images: tuple[str, str],
    redis_for_containers: RedisServer,
    small_classifier: object,
    tmp_path: Path,
) -> None:
    image, web_image = images
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# keys of the test\n{KEY}\n")
    keys.chmod(0o644)
    redis_url = redis_for_containers.url
    suffix = uuid.uuid4().hex[:8]
    worker, web = f"keras-test-worker-{suffix}", f"keras-test-web-{suffix}"
    port = free_port()
    try:
        podman.run(
            worker, image,
            "--role", "worker", "--model", "/models/small.keras",
            "--redis-url", redis_url, "--batch-size", "4",
        )  # fmt: skip
        podman.run(
            web,
            "--volume", f"{keys}:/run/keys/keys.txt:ro",
            # The port as a variable: the image's HEALTHCHECK reads it.
            "--env", f"KERAS_SERVER_PORT={port}",
            web_image,
            "--role", "web", "--web-workers", "1", "--redis-url", redis_url,
            "--api-keys", "/run/keys/keys.txt",
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            for name in (worker, web):
                state = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
                if state.stdout.strip() != "true":
                    pytest.fail(f"{name} stopped:\n{podman.logs(name)}")
            try:
                return requests.get(base + "/readyz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout=240, what="the containers to be ready")

        with CHELSEA.open("rb") as f:
            refused = requests.post(base + "/predict", files={"image": f}, timeout=30)
        assert refused.status_code == 401
        assert refused.json()["success"] is False
        with CHELSEA.open("rb") as f:
            answer = requests.post(
                base + "/predict",
                files={"image": f},
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=60,
            )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == {"name": "small", "version": "1"}

        # The model baked into the image answers what the same model file
        # answers here, on the same pixels.
        pixels = load_image(CHELSEA.read_bytes(), (224, 224), 50_000_000)
        scores = small_classifier.predict(pixels[np.newaxis])[0]  # type: ignore[attr-defined]
        top = np.argsort(scores)[::-1][:5]
        labels = small_classifier.labels  # type: ignore[attr-defined]
        assert [p["label"] for p in body["predictions"]] == [labels[i] for i in top]
        for prediction, index in zip(body["predictions"], top, strict=True):
            assert prediction["probability"] == pytest.approx(float(scores[index]), abs=1e-4)

        # Not root, and the image's HEALTHCHECK passes on the web container.
        assert podman("exec", web, "id", "-u").stdout.strip() == "10001"
        assert podman("healthcheck", "run", web, check=False).returncode == 0, podman.logs(web)
        assert KEY not in podman.logs(web)
        # The web image has no engine; the full one has them all.
        assert podman("exec", web, "python3", "-c", FRAMEWORKS).stdout.split() == ["False"] * 4
        assert podman("exec", worker, "python3", "-c", FRAMEWORKS).stdout.split() == ["True"] * 4
    finally:
        for name in (web, worker):
            podman("stop", "--time", "20", name, check=False)
            podman("rm", "--force", name, check=False)


@pytest.fixture(scope="module")
def infra_image(podman: Podman, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """redis-server, redis-cli and nginx on the base image (made once)."""
    if podman("image", "exists", INFRA_IMAGE, check=False).returncode == 0:
        return INFRA_IMAGE
    context = tmp_path_factory.mktemp("infra")
    (context / "Containerfile").write_text(INFRA_CONTAINERFILE.format(base=base_image))
    podman(
        "build", "--runtime", "runc", "--network", "host", "--format", "docker",
        "--tag", INFRA_IMAGE, str(context),
        timeout=900,
    )  # fmt: skip
    return INFRA_IMAGE


class Compose:
    """podman-compose on compose.yaml and an override, as project `name`."""

    def __init__(self, podman: Podman, override: Path, name: str, env: dict[str, str]) -> None:
        self.podman = podman
        self.name = name
        self.files = ["-f", str(ROOT / "compose.yaml"), "-f", str(override)]
        self.env = {**podman.env, **env}

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "podman_compose", "-p", self.name, *self.files, *args]
        return subprocess.run(
            command, env=self.env, cwd=ROOT, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def containers(self) -> dict[str, str]:
        """Each container of the project: its name and state ("running", "exited", ...)."""
        listed = self.podman(
            "ps", "--all", "--filter", f"label=io.podman.compose.project={self.name}",
            "--format", "json",
        )  # fmt: skip
        return {c["Names"][0]: c["State"] for c in json.loads(listed.stdout or "[]")}

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ({state}):\n{self.podman.logs(name)[-2000:]}"
            for name, state in self.containers().items()
        )


def wait_ready(compose: Compose, base: str, workers: int, timeout: float = 240) -> None:
    """Until /readyz through nginx counts `workers` workers; fails with every
    container's log if one stops or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stopped = {n: s for n, s in compose.containers().items() if s != "running"}
        if stopped:
            pytest.fail(f"stopped: {stopped}\n{compose.logs()}")
        try:
            answer = requests.get(base + "/readyz", timeout=2)
            if answer.status_code == 200 and answer.json()["workers"] == workers:
                return
        except requests.RequestException:  # not listening yet, or busy starting
            pass
        time.sleep(0.2)
    pytest.fail(f"not ready through nginx in {timeout} s:\n{compose.logs()}")


def predict(base: str) -> int:
    with CHELSEA.open("rb") as f:
        return requests.post(base + "/predict", files={"image": f}, timeout=60).status_code


def statuses_while(base: str, action: Callable[[], None], after: int = 20) -> list[int]:
    """Two clients send predictions, under nginx's rate limit (10 a second per
    client, bursts of 20), while `action` runs, and for `after` requests more;
    every status they got."""
    statuses: list[int] = []
    done = threading.Event()

    def send() -> None:
        while not done.is_set():
            statuses.append(predict(base))
            time.sleep(0.2)

    senders = [threading.Thread(target=send) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: len(statuses) >= 4, timeout=60, what="requests before")
        action()
        sent = len(statuses)
        wait_until(lambda: len(statuses) >= sent + after, timeout=120, what="requests after")
    finally:
        done.set()
        for sender in senders:
            sender.join(timeout=90)
    return statuses


@pytest.mark.timeout(1800)
def test_compose_serves_through_nginx_and_survives_a_killed_worker(
    podman: Podman, images: tuple[str, str], infra_image: str, tmp_path: Path
) -> None:
    image, web_image = images
    override = tmp_path / "compose.override.yaml"
    # Only the images change: ours as built above, and the stand-in for redis and nginx.
    services = {"redis": infra_image, "nginx": infra_image, "web": web_image, "worker": image}
    override.write_text(
        yaml.safe_dump({"services": {name: {"image": i} for name, i in services.items()}})
    )
    port = free_port()
    name = f"keras-test-{uuid.uuid4().hex[:8]}"
    compose = Compose(podman, override, name, {"NGINX_PORT": str(port)})
    base = f"http://127.0.0.1:{port}"
    try:
        up = compose("up", "--detach", "--no-build")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        # Redis, 2 web servers, 2 workers and nginx, each its own container.
        assert sorted(n.removeprefix(name + "_") for n in compose.containers()) == [
            "nginx_1", "redis_1", "web_1", "web_2", "worker_1", "worker_2",
        ]  # fmt: skip
        wait_ready(compose, base, workers=2)
        assert [predict(base) for _ in range(10)] == [200] * 10

        # Kill a worker while requests keep coming: each is answered, by the
        # other worker, or after the killed one's claims are requeued (its
        # heartbeat expires in 10 s, well inside --result-timeout's 30 s).
        statuses = statuses_while(base, lambda: podman("kill", f"{name}_worker_1"))
        assert statuses.count(200) == len(statuses), statuses
        assert requests.get(base + "/readyz", timeout=5).json()["ready"] is True
    finally:
        down = compose("down", "--timeout", "20")
        left = compose.containers()
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert left == {}, left
