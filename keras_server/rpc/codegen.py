"""Regenerate the protocol's Python code from `grpc_predict_v2.proto`:

    python -m keras_server.rpc.codegen          # rewrite the generated files
    python -m keras_server.rpc.codegen --check  # exit 1 if they differ from a fresh run

The generated modules (`grpc_predict_v2_pb2.py`, its `.pyi` and
`grpc_predict_v2_pb2_grpc.py`) are checked in, so an install needs no code
generator; they are made by the grpcio-tools release pinned in the `dev`
extra (pyproject.toml), and `tests/test_grpc.py` checks that a fresh run
gives the same bytes. Only this module imports grpcio-tools, and only when run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("keras_server/rpc/grpc_predict_v2.proto")  # relative to ROOT: the import path
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")


def generate(out: Path) -> dict[str, bytes]:
    """Run protoc (grpcio-tools) into `out`; the generated files by name."""
    from grpc_tools import protoc

    # The proto is named by its path from the repository root, so the
    # generated service module imports the messages as
    # `keras_server.rpc.grpc_predict_v2_pb2`.
    includes = resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{includes}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(ROOT / PROTO),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    folder = out / PROTO.parent
    return {name: (folder / name).read_bytes() for name in GENERATED}


def stale() -> list[str]:
    """The checked-in generated files that a fresh run would change."""
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
    here = ROOT / PROTO.parent
    return [
        name
        for name, data in fresh.items()
        if not (here / name).exists() or (here / name).read_bytes() != data
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_server.rpc.codegen")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        changed = stale()
        for name in changed:
            print(f"{PROTO.parent / name} differs from a fresh run", file=sys.stderr)
        return 1 if changed else 0
    with tempfile.TemporaryDirectory() as scratch:
        for name, data in generate(Path(scratch)).items():
            (ROOT / PROTO.parent / name).write_bytes(data)
            print(f"wrote {PROTO.parent / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
