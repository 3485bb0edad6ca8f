"""The system programs the tests need, checked before pytest starts (the
Makefile runs this first in `make test` and `make container-test`).

The tests drive real programs: chromium (the upload page), nginx (clusters),
prometheus and promtool (the alert rules), wrk (the benchmarks' load); the
container tests also podman, runc, debootstrap and CNI's dnsname plugin. None
of them is a Python package, so pip cannot bring them. Here, before any test
runs:

- everything present: nothing to do;
- something missing, as root on a machine with apt-get (CI's fresh machine):
  installed with apt-get (apt-get update first only when the install fails
  on stale package lists);
- something missing otherwise: the exact `apt-get install` line to run is
  printed, and the command exits with status 1 at once, before the tests.

The tests themselves never install anything: a missing program fails its
test naming the line to run (`require` below).

Standard library only: it runs before the virtual environment is made.

    python tests/preflight.py               # what `make test` needs
    python tests/preflight.py --container   # what `make container-test` needs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Debian's package for each program, by the path the tests run it from (a
# program found on PATH counts too). One table for the Makefile and the tests.
TEST_TOOLS: dict[str, str] = {
    "/usr/bin/chromium": "chromium",
    "/usr/sbin/nginx": "nginx-light",
    "/usr/bin/prometheus": "prometheus",
    "/usr/bin/promtool": "prometheus",
    "/usr/bin/wrk": "wrk",
    # The README's quickstart runs its curl commands (tests/test_docs.py).
    "/usr/bin/curl": "curl",
}
CONTAINER_TOOLS: dict[str, str] = {
    "/usr/bin/podman": "podman",
    "/usr/sbin/runc": "runc",
    "/usr/sbin/debootstrap": "debootstrap",
    # Names for containers on a podman network (compose's service names).
    "/usr/lib/cni/dnsname": "golang-github-containernetworking-plugin-dnsname",
}
APT_OPTIONS = ("-y", "-q", "--no-install-recommends")


def found(binary: str) -> str | None:
    """Where `binary` (a path) is: that path, or the same name on PATH."""
    if Path(binary).is_file():
        return binary
    return shutil.which(Path(binary).name)


def missing(tools: dict[str, str]) -> list[str]:
    """The Debian packages to install for the programs of `tools` not found,
    each once, in table order."""
    return list(dict.fromkeys(package for binary, package in tools.items() if not found(binary)))


def install_line(packages: list[str]) -> str:
    return "sudo apt-get install " + " ".join((*APT_OPTIONS, *packages))


def require(binary: str) -> str:
    """`binary` (a key of the tables above) as the tests run it; raises
    LookupError naming the install line when it is missing."""
    path = found(binary)
    if path is None:
        package = {**TEST_TOOLS, **CONTAINER_TOOLS}[binary]
        raise LookupError(
            f"{binary} is missing: {install_line([package])} "
            "(as root, `make test` installs what the tests need before they start)"
        )
    return path


def apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args], env=env, capture_output=True, text=True, timeout=1800, check=False
    )


def install(packages: list[str]) -> str | None:
    """apt-get install `packages`; None when done, else apt-get's complaint."""
    done = apt_get("install", *APT_OPTIONS, *packages)
    if done.returncode:
        apt_get("update", "-q")
        done = apt_get("install", *APT_OPTIONS, *packages)
    return done.stderr[-2000:] if done.returncode else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--container", action="store_true", help="what `make container-test` needs instead"
    )
    tools = CONTAINER_TOOLS if parser.parse_args(argv).container else TEST_TOOLS
    packages = missing(tools)
    if not packages:
        return 0
    can_install = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if can_install:
        print(f"preflight: installing {' '.join(packages)} with apt-get", flush=True)
        failed = install(packages)
        if failed is None and not missing(tools):
            return 0
        print(f"preflight: apt-get could not install them:\n{failed or ''}", file=sys.stderr)
    names = ", ".join(binary for binary in tools if not found(binary))
    print(
        f"preflight: the tests need {names}, missing here. Install them, then run again:\n\n"
        f"    {install_line(packages)}\n\n"
        "(As root, `make test` and `make container-test` install them. Without apt-get, "
        "install the same programs from your system's packages.)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
