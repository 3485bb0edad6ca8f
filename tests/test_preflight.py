"""tests/preflight.py, the Makefile's check of the system programs the tests
drive: it runs before lint and pytest, and a user who cannot install stops at
once with the apt-get line to run; the tests themselves install nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import preflight
import pytest
from conftest import ROOT

ABSENT = {"/nonexistent/keras-server-tool": "keras-server-no-such-package"}


def test_a_user_without_root_gets_the_apt_get_line_and_a_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(preflight, "TEST_TOOLS", {**preflight.TEST_TOOLS, **ABSENT})
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 1000)
    installs: list[object] = []
    monkeypatch.setattr(preflight, "install", installs.append)
    assert preflight.main([]) == 1
    assert installs == []
    err = capsys.readouterr().err
    assert "/nonexistent/keras-server-tool" in err
    (line,) = [line.strip() for line in err.splitlines() if "apt-get install" in line]
    assert line.startswith("sudo apt-get install -y -q --no-install-recommends ")
    assert line.endswith(" keras-server-no-such-package")


def test_the_troubleshooting_page_shows_what_it_prints(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/troubleshooting.md quotes the message of a machine with none of
    the programs, word for word."""
    monkeypatch.setattr(preflight, "found", lambda binary: None)
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 1000)
    assert preflight.main([]) == 1
    printed = capsys.readouterr().err.split("\n\n")
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    assert "\n\n".join(printed[:2]) + "\n```" in page


def test_nothing_missing_is_a_quiet_success(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    present = {shutil.which("sh") or "/bin/sh": "dash"}
    monkeypatch.setattr(preflight, "CONTAINER_TOOLS", present)
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 1000)
    assert preflight.main(["--container"]) == 0
    assert capsys.readouterr() == ("", "")


def test_each_package_is_named_once() -> None:
    """prometheus brings both prometheus and promtool: one package to install."""
    tools = {"/nonexistent/a": "prometheus", "/nonexistent/b": "prometheus", **ABSENT}
    assert preflight.missing(tools) == ["prometheus", "keras-server-no-such-package"]


def test_a_missing_program_fails_its_test_with_the_line_to_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(preflight, "TEST_TOOLS", {**preflight.TEST_TOOLS, **ABSENT})
    with pytest.raises(LookupError, match=r"apt-get install .* keras-server-no-such-package"):
        preflight.require("/nonexistent/keras-server-tool")


@pytest.mark.parametrize(("target", "option"), [("test", ""), ("container-test", " --container")])
def test_make_checks_the_programs_before_lint_and_pytest(
    tmp_path: Path, target: str, option: str
) -> None:
    for name in ("Makefile", "pyproject.toml", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, tmp_path)
    planned = subprocess.run(
        # No "Entering directory" lines (under `make test` this is a sub-make):
        # their path, in pytest's tmp_path, would match the pattern below.
        ["make", "--dry-run", "--no-print-directory", target],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    first = next(i for i, line in enumerate(planned) if "preflight.py" in line)
    assert planned[first].endswith(f"tests/preflight.py{option}")
    later = [i for i, line in enumerate(planned) if re.search(r"pytest|ruff|pip install", line)]
    assert later
    assert min(later) > first


def test_no_test_installs_from_the_network() -> None:
    """Only the preflight runs apt-get on this machine (the container test's
    image build runs it inside the image)."""
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name in ("preflight.py", "test_preflight.py"):
            continue
        calls = re.findall(r"\[\"apt-get\"|\"apt-get\",|apt_install\(", path.read_text())
        assert not calls, path.name
