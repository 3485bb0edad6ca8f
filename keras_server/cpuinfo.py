"""The CPU this process runs on, as /proc/cpuinfo describes its first core.

The engines pick defaults from it (OpenVINO's parallel batches and streams on
a CPU with AMX, the AMD check), and every benchmark prints the model and
flags it ran on.
"""

from __future__ import annotations

import os
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def read() -> str:
    """/proc/cpuinfo's text, or '' where there is none (not Linux)."""
    try:
        return CPUINFO.read_text()
    except OSError:
        return ""


def field(name: str, text: str | None = None) -> str:
    """The first core's `name` field ('model name', 'flags', 'vendor_id') in
    `text` (default: this machine's /proc/cpuinfo), or '' if absent."""
    for line in (read() if text is None else text).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def flags(text: str | None = None) -> set[str]:
    """The CPU's feature flags (avx2, avx512f, amx_int8, ...)."""
    return set(field("flags", text).split())


def has_amx() -> bool:
    """Whether the CPU has AMX for int8 (amx_int8), which OpenVINO's defaults
    follow."""
    return "amx_int8" in flags()


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def vendor() -> str:
    """AuthenticAMD, GenuineIntel, or '' if unknown."""
    return field("vendor_id")
