"""The CPU a benchmark ran on: its model name and the vector flags that shape
the ratios between engines, precisions and servers.

AVX-512 and AMX decide how fast OpenVINO runs bf16 and int8 (AMX's tile units
do both in hardware), so a table measured on one CPU says little about the
ratios on another: every benchmark prints these with its numbers.
"""

from __future__ import annotations

import platform

from keras_server import cpuinfo

# The flags the tables name: every AVX-512 and AMX extension the kernel lists.
VECTOR_PREFIXES = ("avx512", "amx")
AMX = "amx_tile"


def model(text: str | None = None) -> str:
    """e.g. 'Intel(R) Xeon(R) Platinum 8480+', or what platform knows; `text`:
    a /proc/cpuinfo's (default: this machine's)."""
    return cpuinfo.field("model name", text) or platform.processor() or platform.machine()


def vector_flags(text: str | None = None) -> list[str]:
    """The AVX-512 and AMX flags of the first CPU, sorted (empty: none)."""
    return sorted(f for f in cpuinfo.flags(text) if f.startswith(VECTOR_PREFIXES))


def has_amx(flags: list[str]) -> bool:
    return AMX in flags


def describe(name: str, flags: list[str]) -> str:
    """One line for logs and reports: the model and its AVX-512 / AMX flags."""
    amx = "AMX" if has_amx(flags) else "no AMX"
    avx512 = "AVX-512" if any(f.startswith("avx512") for f in flags) else "no AVX-512"
    listed = " ".join(flags) if flags else "none"
    return f"{name} ({avx512}, {amx}; flags: {listed})"
