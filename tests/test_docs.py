"""The docs say what the code has: the package docstrings and docs/code-map.md
list every module, docs/operations.md every metric, docs/settings.md is the
settings table as generated, settings.py's docstring names every module that
reads the environment, and every relative link in the Markdown pages leads
somewhere."""

import importlib
import re
from pathlib import Path

import pytest
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


def test_the_link_check_sees_links() -> None:
    """The check above would pass on pages whose links it failed to parse."""
    readme = (ROOT / "README.md").read_text()
    assert "docs/api.md" in LINK.findall(readme)
    assert _slug("## The `/v2` protocol: KServe's (REST)".lstrip("# ")) == (
        "the-v2-protocol-kserves-rest"
    )
