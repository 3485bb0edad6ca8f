"""Every knob of the server, in one table: command line > environment > default.

The entry point calls `load_settings()` once and passes the frozen `Settings`
down; no other module reads `os.environ` or `sys.argv`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "KERAS_SERVER_"
ROLES = ("all", "web", "worker")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENGINES = ("keras", "onnx")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 5000
    redis_url: str = "redis://localhost:6379/0"
    # False when redis_url is the default: only then may we start a private
    # redis-server if nothing answers there (see redis_launcher).
    redis_url_given: bool = False
    weights: str = "imagenet"
    batch_size: int = 32
    engine: str = "keras"
    queue_name: str = "image_queue"
    result_timeout: float = 30.0
    max_upload_mb: float = 16.0
    max_image_pixels: int = 50_000_000
    role: str = "all"
    log_level: str = "INFO"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError("must be a whole number of at least 1")
    return value


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port between 0 and 65535")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number") from None
    if not 0 < value < float("inf"):
        raise ValueError("must be a number greater than 0")
    return value


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return text


def _choice(options: Sequence[str], upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.upper() if upper else text.lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


@dataclass(frozen=True)
class Knob:
    """One row of the settings table."""

    field: str
    parse: Callable[[str], Any]
    help: str
    metavar: str

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()


KNOBS: tuple[Knob, ...] = (
    Knob("host", _non_empty, "address the HTTP server binds", "ADDR"),
    Knob("port", _port, "port the HTTP server listens on", "PORT"),
    Knob(
        "redis_url",
        _redis_url,
        "Redis holding the queue; if not given and nothing answers at the "
        "default, --role all starts a private redis-server",
        "URL",
    ),
    Knob(
        "weights",
        _non_empty,
        "'imagenet' (downloaded by Keras), 'none' (random: demos and tests "
        "only), or a path to a .weights.h5 or .keras file",
        "WEIGHTS",
    ),
    Knob("batch_size", _positive_int, "most images in one forward pass", "N"),
    Knob(
        "engine",
        _choice(ENGINES),
        "what runs the forward pass: keras, or onnx (ONNX Runtime on the same "
        "model, exported at start-up and checked against Keras)",
        "ENGINE",
    ),
    Knob("queue_name", _non_empty, "Redis list the requests go through", "NAME"),
    Knob(
        "result_timeout",
        _positive_float,
        "seconds a request waits for its prediction before a 504",
        "SECONDS",
    ),
    Knob("max_upload_mb", _positive_float, "largest accepted request body", "MB"),
    Knob(
        "max_image_pixels",
        _positive_int,
        "largest accepted image (width x height) before a 413",
        "PIXELS",
    ),
    Knob("role", _choice(ROLES), "all: web + model thread; web or worker alone", "ROLE"),
    Knob("log_level", _choice(LOG_LEVELS, upper=True), "logging level", "LEVEL"),
)


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names it."""


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(Settings)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_keras_server.py",
        description="Serve a Keras image classifier over HTTP, batching through Redis.",
        epilog="Every option can also be set as an environment variable, e.g. "
        f"{ENV_PREFIX}BATCH_SIZE=16. The command line wins over the environment.",
    )
    defaults = _defaults()
    for knob in KNOBS:
        parser.add_argument(
            knob.flag,
            dest=knob.field,
            metavar=knob.metavar,
            default=None,
            help=f"{knob.help} (env {knob.env}; default: {defaults[knob.field]})",
        )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings from the command line, then the environment, then defaults.

    Raises SettingsError naming the flag or variable when a value is bad;
    argparse itself exits on unknown flags.
    """
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for knob in KNOBS:
        if args[knob.field] is not None:
            raw, source = args[knob.field], knob.flag
        elif knob.env in environ:
            raw, source = environ[knob.env], knob.env
        else:
            continue
        try:
            values[knob.field] = knob.parse(raw)
        except ValueError as exc:
            raise SettingsError(f"{source}={raw!r}: {exc}") from None
    values["redis_url_given"] = "redis_url" in values
    return Settings(**values)
