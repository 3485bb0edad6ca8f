"""One view of the live workers per process: every model's queue on every
Redis shard (reachable, depth at each priority level, live workers, the jobs'
backlog), read at most every REFRESH_S by one thread at a time.

Everything that asks "who serves what" reads this view: routing (the live
versions, serving/traffic.py), the input size uploads are resized to, model
discovery (--models-from workers), the response cache's versions, /readyz,
/models, the v2 readiness and metadata calls and the queue and job metrics. So they
all agree, and no request, probe or scrape surveys the shards on its own:
a flood of probes costs Redis one survey per REFRESH_S per process.

While one thread reads Redis, the others answer from the last survey (only
the very first waits for one). A caller about to refuse a request for want
of a worker asks for a `fresh` survey, at most every FRESH_MIN_S, so a
worker that has just started is not turned away by a survey taken just
before it beat. TensorFlow-free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from keras_server.broker.messages import WorkerInfo

if TYPE_CHECKING:
    from keras_server.serving.models import ServedModel

log = logging.getLogger(__name__)

# How long a survey is trusted: a worker's arrival or departure, or a change
# of queue depth, shows within this.
REFRESH_S = 0.5
# The least time between two surveys forced by a refusal.
FRESH_MIN_S = 0.1


@dataclass(frozen=True)
class ShardState:
    """One model's queue on one shard, as read at one moment."""

    model_name: str
    shard: str  # host:port/db, no password
    reachable: bool
    depths: tuple[int, ...] = ()  # requests waiting at each priority level, 1 first
    workers: dict[str, WorkerInfo] = field(default_factory=dict)  # live ones, by id
    job_backlog: int = 0  # job images staged, not yet fed onto the queue (JobStore.backlog)
    error: str = ""  # why it was unreachable

    @property
    def depth(self) -> int:
        """Requests waiting at every level."""
        return sum(self.depths)


@dataclass(frozen=True)
class Survey:
    """Every model's queue on every shard."""

    states: tuple[ShardState, ...]
    at: float = 0.0  # monotonic

    def __iter__(self) -> Iterator[ShardState]:
        return iter(self.states)

    def of(self, model_name: str) -> list[ShardState]:
        return [s for s in self.states if s.model_name == model_name]

    def live_workers(self, model_name: str | None = None) -> list[WorkerInfo]:
        """Live workers of the model named `model_name` (default: of every
        model) over the reachable shards."""
        states = self.states if model_name is None else self.of(model_name)
        return [info for s in states for info in s.workers.values()]


class WorkerView:
    """The survey of one process, shared by all its threads.

    `models` gives the models to survey now (learned ones come and go);
    `before` runs first on each refresh (model discovery)."""

    def __init__(
        self,
        models: Callable[[], Iterable[ServedModel]],
        before: Callable[[], None] | None = None,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self._models = models
        self._before = before
        self.refresh_s = refresh_s
        self._survey: Survey | None = None
        self._reading = threading.Lock()

    def survey(self, fresh: bool = False, now: float | None = None) -> Survey:
        """The last survey, read again when it is older than REFRESH_S (or,
        `fresh`, than FRESH_MIN_S) by whichever thread comes first."""
        now = time.monotonic() if now is None else now
        current = self._survey
        limit = FRESH_MIN_S if fresh else self.refresh_s
        if current is not None and now - current.at < limit:
            return current
        # One reader at a time; the others answer from the last survey.
        if current is not None and not self._reading.acquire(blocking=False):
            return current
        if current is None:
            self._reading.acquire()
        try:
            current = self._survey
            if current is None or now - current.at >= limit:
                current = self._read(now)
                self._survey = current
            return current
        finally:
            self._reading.release()

    def live_workers(self, model_name: str, fresh: bool = False) -> list[WorkerInfo]:
        return self.survey(fresh).live_workers(model_name)

    def _read(self, now: float) -> Survey:
        if self._before is not None:
            self._before()
        states = tuple(s for model in self._models() for s in model.survey())
        return Survey(states, now)
