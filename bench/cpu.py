"""The CPU a benchmark ran on: its model name and the vector flags that shape
the ratios between engines, precisions and servers.

AVX-512 and AMX decide how fast OpenVINO runs bf16 and int8 (AMX's tile units
do both in hardware), so a table measured on one CPU says little about the
ratios on another: every benchmark prints these with its numbers.
"""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The flags the tables name: every AVX-512 and AMX extension the kernel lists.
VECTOR_PREFIXES = ("avx512", "amx")
AMX = "amx_tile"


def _first(field: str, cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        if line.split(":", 1)[0].strip() == field:
            return line.split(":", 1)[1].strip()
    return ""


def _cpuinfo() -> str:
    try:
        return CPUINFO.read_text()
    except OSError:
        return ""


def model(cpuinfo: str | None = None) -> str:
    """e.g. 'Intel(R) Xeon(R) Platinum 8480+', or what platform knows."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    return _first("model name", text) or platform.processor() or platform.machine()


def vector_flags(cpuinfo: str | None = None) -> list[str]:
    """The AVX-512 and AMX flags of the first CPU, sorted (empty: none)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = _first("flags", text).split()
    return sorted(f for f in flags if f.startswith(VECTOR_PREFIXES))


def has_amx(flags: list[str]) -> bool:
    return AMX in flags


def describe(name: str, flags: list[str]) -> str:
    """One line for logs and reports: the model and its AVX-512 / AMX flags."""
    amx = "AMX" if has_amx(flags) else "no AMX"
    avx512 = "AVX-512" if any(f.startswith("avx512") for f in flags) else "no AVX-512"
    listed = " ".join(flags) if flags else "none"
    return f"{name} ({avx512}, {amx}; flags: {listed})"
