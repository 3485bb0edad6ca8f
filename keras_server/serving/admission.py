"""Admission: how urgent a request is. Its priority level (1 the highest)
and how long it may wait for its answer (its deadline in the queue), read
from what each transport carries:

- HTTP (`/predict`, jobs): `X-Priority: N` (1 .. --priority-levels, 1 the
  default) and `X-Request-Timeout: SECONDS` (capped by --result-timeout,
  its default);
- v2 (REST and gRPC): Triton's `parameters.priority` and
  `parameters.timeout` (microseconds; 0 means the default for both, as in
  Triton).

A value out of range is BadInput naming the range. Every image of a request
waits at its level until its deadline; a request past its deadline is never
run (the worker skips it), and its client gets a timeout. Who the caller is
and its quota are serving/keys.py's and serving/quotas.py's.
TensorFlow-free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keras_server.serving.failures import BadInput
from keras_server.settings import Settings

PRIORITY_HEADER = "X-Priority"
TIMEOUT_HEADER = "X-Request-Timeout"
# Plain decimal seconds: float() would also take "nan", "1e9", "1_0".
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", re.ASCII)


@dataclass(frozen=True)
class Urgency:
    """A request's priority level (1 the highest) and how long it may wait
    for its answer, in seconds (at most --result-timeout)."""

    priority: int
    timeout: float

    @classmethod
    def default(cls, settings: Settings) -> Urgency:
        """Level 1: interactive clients never wait behind anything unless
        they opt down; batch work (the lowest level) is what opts down."""
        return cls(1, settings.result_timeout)

    @classmethod
    def lowest(cls, settings: Settings, timeout: float) -> Urgency:
        """Batch work: the lowest level (jobs)."""
        return cls(settings.priority_levels, timeout)

    def within(self, seconds: float | None) -> Urgency:
        """The same, waiting at most `seconds` (a gRPC client's deadline)."""
        if seconds is None or seconds >= self.timeout:
            return self
        return Urgency(self.priority, max(seconds, 0.0))

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], settings: Settings) -> Urgency:
        """`X-Priority` and `X-Request-Timeout`; BadInput naming the range."""
        urgency = cls.default(settings)
        priority, seconds = headers.get(PRIORITY_HEADER), headers.get(TIMEOUT_HEADER)
        if priority is not None:
            text = priority.strip()
            level = int(text) if text.isascii() and text.isdigit() else 0
            if not 1 <= level <= settings.priority_levels:
                raise BadInput(_priority_range(PRIORITY_HEADER, settings))
            urgency = cls(level, urgency.timeout)
        if seconds is not None:
            text = seconds.strip()
            value = float(text) if _SECONDS.fullmatch(text) else 0.0
            if not value > 0:
                raise BadInput(_timeout_range(TIMEOUT_HEADER, "seconds", settings))
            urgency = cls(urgency.priority, min(value, settings.result_timeout))
        return urgency

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], settings: Settings) -> Urgency:
        """v2's `parameters.priority` and `parameters.timeout` (microseconds),
        as Triton reads them: 0, or absent, is the default."""
        urgency = cls.default(settings)
        priority, micros = parameters.get("priority", 0), parameters.get("timeout", 0)
        if not _whole(priority) or not 0 <= priority <= settings.priority_levels:
            raise BadInput(
                _priority_range("parameters.priority", settings) + " (0: the default, 1)"
            )
        if not _whole(micros) or micros < 0:
            raise BadInput(_timeout_range("parameters.timeout", "microseconds", settings))
        timeout = min(micros / 1e6, settings.result_timeout) if micros else urgency.timeout
        return cls(priority or urgency.priority, timeout)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _priority_range(name: str, settings: Settings) -> str:
    return (
        f"{name} must be a whole number from 1 (the highest) to {settings.priority_levels} "
        "(--priority-levels)"
    )


def _timeout_range(name: str, unit: str, settings: Settings) -> str:
    return (
        f"{name} must be a number of {unit} greater than 0; more than "
        f"{settings.result_timeout:g} s (--result-timeout) is taken as that"
    )
