"""The docs say what the code has: the package docstrings and docs/code-map.md
list every module, docs/operations.md every metric, docs/settings.md is the
settings table as generated, settings.py's docstring names every module that
reads the environment, every relative link in the Markdown pages leads
somewhere, and the README's quickstart runs as written (its commands against
a real server, answers shaped as it shows them)."""

import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import output, start_serving, stop, system_tool
from flask.testing import FlaskClient

import keras_server
from keras_server import settings as settings_module
from keras_server.settings import Settings
from keras_server.web.app import create_app

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "keras_server"
DOCS = ROOT / "docs"
SUBPACKAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
MODULES = sorted(  # as paths below keras_server/, without .py
    p.relative_to(PACKAGE).with_suffix("").as_posix()
    for p in PACKAGE.rglob("*.py")
    if p.stem != "__init__"
)
# The pages a reader follows links through: the README, the docs, the benchmarks.
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]
# [text](target) and ![alt](target); a target may carry a "title".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _listed(docstring: str | None) -> list[str]:
    return sorted(re.findall(r"^    (\w+/?) ", docstring or "", re.MULTILINE))


def _section(text: str, heading: str) -> str:
    """The body of `heading` (a whole Markdown heading line) up to the next
    heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    body = text.split(f"\n{heading}\n", 1)[1]
    return re.split(rf"\n#{{1,{len(level)}}} ", body, maxsplit=1)[0]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces
    to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_the_package_docstrings_list_every_module() -> None:
    top = [m for m in MODULES if "/" not in m] + [f"{s}/" for s in SUBPACKAGES]
    assert _listed(keras_server.__doc__) == sorted(top)
    for sub in SUBPACKAGES:
        package = importlib.import_module(f"keras_server.{sub}")
        inside = [m.split("/", 1)[1] for m in MODULES if m.startswith(f"{sub}/")]
        assert _listed(package.__doc__) == sorted(inside), sub


def test_the_code_map_lists_every_module_in_its_process_section() -> None:
    code_map = (DOCS / "code-map.md").read_text()
    for module in MODULES:
        assert f"`keras_server/{module}.py`" in code_map, module
    for sub in SUBPACKAGES:
        section = _section(code_map, f"## `keras_server/{sub}/`")
        for module in MODULES:
            if module.startswith(f"{sub}/"):
                assert f"`keras_server/{module}.py`" in section, module


def test_the_operations_page_lists_every_metric(settings: Settings) -> None:
    client: FlaskClient = create_app(settings).test_client()
    text = client.get("/metrics").get_data(as_text=True)
    page = _section((DOCS / "operations.md").read_text(), "## Metrics")
    declared = re.findall(r"^# TYPE (keras_server_\w+) ", text, re.MULTILINE)
    # prometheus-client adds a <name>_created gauge beside each unlabelled counter
    # and histogram: a timestamp, not a metric of ours.
    names = [name for name in declared if not name.endswith("_created")]
    assert "keras_server_queued_requests_total" in names
    for name in names:
        assert re.search(rf"`{name}[`{{]", page), name
    # The metrics only a model's process has are listed too.
    for name in ("keras_server_engine_info", "keras_server_batch_size"):
        assert f"`{name}" in page, name


def test_the_settings_page_is_the_generated_table() -> None:
    """Regenerate with `python -m keras_server.settings --markdown > docs/settings.md`."""
    assert (DOCS / "settings.md").read_text() == settings_module.markdown()
    # An unset default is not "none", which --preprocessing takes as a value.
    assert "| `--preprocessing` | `KERAS_SERVER_PREPROCESSING` | unset |" in (
        settings_module.markdown()
    )


def test_settings_docstring_names_every_module_reading_the_environment() -> None:
    readers = [
        p.stem
        for p in PACKAGE.rglob("*.py")
        if "os.environ" in p.read_text() and p.stem != "settings"
    ]
    assert readers
    for module in readers:
        assert re.search(rf"\b{module}\b", settings_module.__doc__ or ""), module


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: Path) -> None:
    targets = LINK.findall(FENCE.sub("", page.read_text()))
    broken = []
    for target in targets:
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, broken


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_a_table_of_contents_lists_every_section_in_order(page: Path) -> None:
    """A page that opens with links to its own sections links to every one
    (its `##` headings), in the order they come."""
    text = FENCE.sub("", page.read_text())
    opening = text.split("\n## ", 1)[0]
    items = "\n".join(line for line in opening.splitlines() if line.startswith("- ["))
    listed = re.findall(r"\]\(#([^)]+)\)", items)
    if not listed:
        return
    assert listed == [_slug(h) for h in re.findall(r"^## (.+)$", text, re.MULTILINE)]


# Pages of features, and their sections that describe no feature one turns on.
FEATURE_PAGES = ("api.md", "operations.md", "engines.md", "models.md", "deployment.md")
NOT_FEATURES = {"Errors", "When things go wrong", "Running Redis safely", "The container test"}
THREE = ("- **Turn on:** ", "- **What it costs:** ", "- **How to see it works:** ")


@pytest.mark.parametrize("name", FEATURE_PAGES)
def test_every_feature_section_ends_with_how_to_turn_it_on_its_cost_and_its_sign(
    name: str,
) -> None:
    text = (DOCS / name).read_text()
    sections = re.split(r"\n## ", text)[1:]
    assert sections
    for section in sections:
        heading = section.split("\n", 1)[0]
        if heading in NOT_FEATURES:
            continue
        last = section.rstrip("\n").splitlines()[-3:]
        assert [line[: len(start)] for line, start in zip(last, THREE, strict=True)] == list(
            THREE
        ), heading
        cost = last[1]
        # A measured cost names its CPU; "not measured" says so instead.
        assert (
            "not measured" in cost
            or "nothing" in cost
            or "AMD EPYC" in cost
            or ("BENCHMARKS.md" in cost)
        ), heading


MACHINES = (
    "**AMD EPYC, AVX2 only**",
    "**AMD EPYC with AVX-512**",
    "**Intel Xeon with AMX**",
    "**Intel Xeon, AVX-512 without AMX**",
)


def test_every_benchmark_section_names_its_machine() -> None:
    """The CPU decides the engine's speed several times over: each section
    of measurements says which of the project's machines it ran on."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    other = text.split("\n## Other measurements\n", 1)[1]
    sections = re.split(r"\n### ", other)[1:]
    assert len(sections) > 20
    for section in sections:
        heading, body = section.split("\n", 1)
        (line,) = [line for line in body.splitlines() if line.startswith("Machine: ")]
        assert any(machine in line for machine in MACHINES), heading


def test_the_link_check_sees_links() -> None:
    """The check above would pass on pages whose links it failed to parse."""
    readme = (ROOT / "README.md").read_text()
    assert "docs/api.md" in LINK.findall(readme)
    assert _slug("## The `/v2` protocol: KServe's (REST)".lstrip("# ")) == (
        "the-v2-protocol-kserves-rest"
    )


# The README's quickstart, run as written: its console blocks' commands, the
# log line it says to wait for, and answers shaped like the ones it shows.
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LOCAL = "http://localhost:5000"


def _quickstart() -> list[tuple[str, str]]:
    """The README's quickstart code blocks, in order: (language, body)."""
    return FENCED.findall(_section((ROOT / "README.md").read_text(), "## Quickstart"))


def _session(body: str) -> list[tuple[str, list[str]]]:
    """A console block's commands (after `$ `), each with the lines it printed."""
    commands: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        else:
            commands[-1][1].append(line)
    return commands


def _shape(value: object) -> object:
    """What a JSON answer looks like, whatever its values: keys, list lengths
    and types."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value]
    return (
        "number"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else type(value).__name__
    )


def _line_shape(line: str) -> str:
    """A printed line with its numbers and words blanked: "1. ibex: 0.2934"
    is "N. W: N"."""
    return re.sub(r"[A-Za-z][\w-]*", "W", re.sub(r"\d+(?:\.\d+)?", "N", line.strip()))


def _output_shape(lines: list[str]) -> object:
    text = "\n".join(lines).strip()
    if text.startswith("{"):
        return _shape(json.loads(text))
    return [_line_shape(line) for line in lines if line.strip()]


def test_the_readme_quickstart_has_the_commands_a_newcomer_needs() -> None:
    """The test below runs what it finds: this says what it must find."""
    blocks = _quickstart()
    commands = [c for lang, body in blocks if lang == "console" for c, _ in _session(body)]
    assert commands[0] == 'make serve ARGS="--model sim"'
    assert "make serve" in commands
    assert any(c.startswith("curl -F image=@images/chelsea.png") for c in commands)
    request = ".venv/bin/python simple_request.py images/chelsea.png"
    assert any(c.startswith(request) for c in commands)
    assert any("listening on http://" in body for lang, body in blocks if lang == "text")
    # `make serve ARGS=...` is run_keras_server.py with those flags, as the test starts it.
    assert "serve: $(BIN)/.runtime\n\t$(BIN)/python run_keras_server.py $(ARGS)\n" in (
        (ROOT / "Makefile").read_text()
    )


@pytest.mark.slow
def test_the_readme_quickstart_runs_as_written(settings: Settings) -> None:
    """Each command of the quickstart against a real server started as its
    first `make serve ARGS="--model sim"` starts it (on a free port and the
    test's Redis: the only changes), each answer shaped as the README shows
    it, the log line it says to wait for, and the upload page."""
    blocks = _quickstart()
    (waited,) = {
        line.split(" [-] ", 1)[1]
        for lang, body in blocks
        if lang == "text"
        for line in body.splitlines()
        if "listening on http://" in line
    }
    server = None
    try:
        for lang, body in blocks:
            if lang != "console":
                continue
            for command, shown in _session(body):
                words = shlex.split(command, comments=True)
                if words[:2] == ["make", "serve"]:
                    if server is None:  # the first: the simulated model
                        args = shlex.split(words[2].removeprefix("ARGS="))
                        server, base = start_serving(settings, *args)
                    continue
                assert server is not None, f"{command}: run before any server"
                words = [w.replace(LOCAL, base) for w in words]
                if words[0] == ".venv/bin/python":
                    words[0] = sys.executable
                if words[1:2] == ["simple_request.py"] and "--url" not in words:
                    words += ["--url", base + "/predict"]
                if words[0] == "curl":
                    words[0] = system_tool("/usr/bin/curl")
                done = subprocess.run(
                    words, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
                )
                assert done.returncode == 0, f"{command}: {done.stderr}"
                printed = done.stdout.splitlines()
                assert _output_shape(printed) == _output_shape(shown), command
        assert server is not None
        port = base.rsplit(":", 1)[1]
        assert waited.replace(":5000/", f":{port}/") in output(server)
        page = requests.get(base + "/", timeout=10)
        assert page.status_code == 200
        assert page.headers["Content-Type"].startswith("text/html")
    finally:
        if server is not None:
            stop(server)
