"""The package people install: `pip install .` with no extras is the web
tier's install, with no deep-learning framework, and it serves.

The slow tests install the package into a fresh virtual environment, with
pip from the wheels `make test-wheels` built before the tests (the package,
from a copy of what it is made of: pyproject.toml and keras_server/, as the
Dockerfile copies them; and its dependencies): no network while they run.
Then they run what was installed there: the `keras-server` command, `python -m
keras_server`, and a web server (granian) with a simulated worker, answering
a prediction, the page and the OpenAPI document (package data, all three).
Nothing runs from the repository there: the commands run in another directory,
so `python -m` cannot pick up the working tree.

Also: the Makefile reinstalls when pyproject.toml changes (fast).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import ENV, IMAGES, ROOT

from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.processes import Child
from run_cluster import http_answers

# What the engines need and the web tier must never install.
FRAMEWORKS = ("tensorflow", "keras", "openvino", "onnxruntime", "onnx", "tf2onnx", "torch")
# The repository's tools, not the package's.
TOOLS = ("requests", "pytest", "grpcio-tools")


# The installed package alone: no checkout on the path (a PYTHONPATH naming
# one would make pip take the checkout's metadata for an installed package).
INSTALLED_ENV = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}


def run(*command: str | Path, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=INSTALLED_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_python_m_keras_server_names_itself() -> None:
    """`python -m keras_server` runs the same command line, and its usage and
    errors name the program as it was run."""
    helped = run(sys.executable, "-m", "keras_server", "--help", cwd=ROOT)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: python -m keras_server "), helped.stdout[:200]
    assert "--role" in helped.stdout
    bad = run(sys.executable, "-m", "keras_server", "--batch-size", "0", cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.startswith("python -m keras_server: error: --batch-size="), bad.stderr
    unknown = run(sys.executable, "-m", "keras_server", "--no-such-flag", cwd=ROOT)
    assert unknown.returncode == 2
    assert "python -m keras_server: error: unrecognized arguments" in unknown.stderr


@pytest.mark.slow
def test_run_keras_server_py_still_names_itself() -> None:
    bad = run(sys.executable, "run_keras_server.py", "--batch-size", "0", cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.startswith("run_keras_server.py: error: --batch-size="), bad.stderr


@pytest.mark.parametrize("stamp", [".runtime", ".dev"])
def test_make_reinstalls_when_pyproject_changes(tmp_path: Path, stamp: str) -> None:
    """The Makefile's install stamps are out of date once pyproject.toml (the
    dependencies) is newer, as when a requirements file is."""
    for name in ("Makefile", "pyproject.toml", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, tmp_path)
    stamps = tmp_path / ".venv" / "bin"
    stamps.mkdir(parents=True)
    for name in (".runtime", ".dev"):
        (stamps / name).touch()
    target = f".venv/bin/{stamp}"
    assert run("make", "--question", target, cwd=tmp_path).returncode == 0
    os.utime(tmp_path / "pyproject.toml", (time.time() + 10, time.time() + 10))
    assert run("make", "--question", target, cwd=tmp_path).returncode == 1


# Built by `make test-wheels` (a step of `make test`), before pytest starts:
# the package, from a copy of what the Dockerfile copies, and its dependencies.
WHEELS = Path(os.environ.get("KERAS_SERVER_TEST_WHEELS", ROOT / "build" / "test-wheels"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install keras-server` (no extras) from the
    wheels `make test-wheels` built, never from the network; its directory.
    Not editable: the package data must be in the wheel."""
    built = WHEELS / ".done"
    sources = [ROOT / "pyproject.toml", *(ROOT / "keras_server").rglob("*.py")]
    if not built.exists() or built.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        pytest.fail(f"no wheels of this code in {WHEELS}: run `make test-wheels` (make test does)")
    work = tmp_path_factory.mktemp("packaging")
    venv = work / "venv"
    made = run(sys.executable, "-m", "venv", venv, cwd=work, timeout=120)
    assert made.returncode == 0, made.stderr
    done = run(
        venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-index", "--find-links", WHEELS, "keras-server",
        cwd=work,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory with no keras_server in it."""
    return tmp_path


@pytest.mark.slow
def test_the_base_install_has_no_framework_nor_tool(installed: Path, elsewhere: Path) -> None:
    names = ", ".join(repr(name) for name in (*FRAMEWORKS, *TOOLS))
    script = (
        "import importlib.metadata as m\n"
        f"for name in ({names}):\n"
        "    try:\n"
        "        m.distribution(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        continue\n"
        "    print('installed:', name)\n"
    )
    found = run(installed / "bin" / "python", "-c", script, cwd=elsewhere)
    assert found.returncode == 0, found.stderr
    assert found.stdout == ""


@pytest.mark.slow
def test_the_commands_run_and_name_themselves(installed: Path, elsewhere: Path) -> None:
    command = installed / "bin" / "keras-server"
    helped = run(command, "--help", cwd=elsewhere)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: keras-server "), helped.stdout[:200]
    bad = run(command, "--batch-size", "0", cwd=elsewhere)
    assert bad.returncode == 2
    assert bad.stderr.startswith("keras-server: error: --batch-size="), bad.stderr
    as_module = run(installed / "bin" / "python", "-m", "keras_server", "--help", cwd=elsewhere)
    assert as_module.returncode == 0, as_module.stderr
    assert as_module.stdout.startswith("usage: python -m keras_server "), as_module.stdout[:200]
    assert "--role" in as_module.stdout


@pytest.fixture
def redis_for_install() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.mark.slow
def test_the_base_install_serves_the_web_role(
    installed: Path, elsewhere: Path, redis_for_install: RedisServer
) -> None:
    """granian (--role web) and a simulated worker, both as installed: a
    prediction with ImageNet's labels, the upload page and /openapi.json."""
    command = str(installed / "bin" / "keras-server")
    port = free_port()
    common = ["--redis-url", redis_for_install.url, "--model", "sim"]
    worker = Child(
        "worker",
        [command, "--role", "worker", *common],
        cwd=elsewhere,
        env=INSTALLED_ENV,
        tied=True,  # SIGTERM if pytest dies: never an orphan
    )
    web = Child(
        "web",
        [command, "--role", "web", "--web-workers", "1", "--port", str(port), *common],
        cwd=elsewhere,
        env=INSTALLED_ENV,
        tied=True,
    )
    base = f"http://127.0.0.1:{port}"
    with worker, web:  # started here, stopped at the end
        web.wait_until(http_answers(base + "/readyz", success=True), 90, "ready")
        with (IMAGES / "chelsea.png").open("rb") as image:
            answer = requests.post(base + "/predict", files={"image": image}, timeout=30)
        assert answer.status_code == 200, answer.text + web.log_tail() + worker.log_tail()
        predictions = answer.json()["predictions"]
        assert predictions
        assert all(p["label"] and not p["label"].isdigit() for p in predictions)
        page = requests.get(base + "/", timeout=10)
        assert page.status_code == 200
        assert "<html" in page.text.lower()
        assert requests.get(base + "/assets/app.js", timeout=10).status_code == 200
        assert requests.get(base + "/openapi.json", timeout=10).json()["openapi"]
        assert "granian" in web.output().lower()
