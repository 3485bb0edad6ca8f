"""The package docstring, the README's code map and metrics list, and
settings.py's docstring say what the code has."""

import importlib
import re
from pathlib import Path

from flask.testing import FlaskClient

import keras_server
from keras_server import settings as settings_module
from keras_server.settings import Settings
from keras_server.web.app import create_app

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "keras_server"
README = (ROOT / "README.md").read_text()
SUBPACKAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
MODULES = sorted(  # as paths below keras_server/, without .py
    p.relative_to(PACKAGE).with_suffix("").as_posix()
    for p in PACKAGE.rglob("*.py")
    if p.stem != "__init__"
)


def _listed(docstring: str | None) -> list[str]:
    return sorted(re.findall(r"^    (\w+/?) ", docstring or "", re.MULTILINE))


def test_the_package_docstrings_list_every_module() -> None:
    top = [m for m in MODULES if "/" not in m] + [f"{s}/" for s in SUBPACKAGES]
    assert _listed(keras_server.__doc__) == sorted(top)
    for sub in SUBPACKAGES:
        package = importlib.import_module(f"keras_server.{sub}")
        inside = [m.split("/", 1)[1] for m in MODULES if m.startswith(f"{sub}/")]
        assert _listed(package.__doc__) == sorted(inside), sub


def test_the_readme_code_map_lists_every_module() -> None:
    code_map = README.split("## Code map", 1)[1].split("\n## ", 1)[0]
    for module in MODULES:
        assert f"`keras_server/{module}.py`" in code_map, module


def test_the_readme_lists_every_metric(settings: Settings) -> None:
    client: FlaskClient = create_app(settings).test_client()
    text = client.get("/metrics").get_data(as_text=True)
    row = next(line for line in README.splitlines() if line.startswith("| `GET /metrics`"))
    declared = re.findall(r"^# TYPE (keras_server_\w+) ", text, re.MULTILINE)
    # prometheus-client adds a <name>_created gauge beside each unlabelled counter
    # and histogram: a timestamp, not a metric of ours.
    names = [name for name in declared if not name.endswith("_created")]
    assert "keras_server_queued_requests_total" in names
    for name in names:
        assert re.search(rf"`{name}[`{{]", row), name


def test_settings_docstring_names_every_module_reading_the_environment() -> None:
    readers = [
        p.stem
        for p in PACKAGE.rglob("*.py")
        if "os.environ" in p.read_text() and p.stem != "settings"
    ]
    assert readers
    for module in readers:
        assert re.search(rf"\b{module}\b", settings_module.__doc__ or ""), module
