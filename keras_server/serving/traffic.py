"""Which version of a model answers a request, and the queue it waits on.

Each version has its own queue (messages.Keys.for_version), claimed only by
that version's workers. A request that names a version (`/models/{name}/
versions/{v}/predict`, v2's `/versions/{v}/infer`, gRPC's `model_version`)
is pinned: it goes onto that version's queue, carries the version in its
header (a worker of another version refuses it), and is a 503 "no live
worker" while that version has none. An unversioned request follows the
model's traffic policy, kept in Redis (`Keys.traffic`, JSON, written by the
admin API on every shard and read as the newest copy, broker/traffic.py;
absent: `latest`):

- `latest`: the highest version with live workers (versions compare as
  numbers where they are numbers: "10" > "9");
- weights by version, `{"weights": {"1": 90, "2": 10}}`: a version drawn at
  random in proportion, among the weighted versions with live workers
  (none live: `latest`).

The answer names the version that served it, as it always did. A web server
reads the live workers' versions and the policy at most every ROUTING_TTL_S
per model and process, so a change of policy, or a version's first or last
worker, takes effect for requests begun within a second. The live versions
come from the process's one survey of the workers (serving/workers.py).
With no live worker at all, an unversioned request goes onto the model's own
queue: every version's workers claim it (after their own), so it waits for
whichever starts first; so does one routed to a version whose workers'
queue names no version (`WorkerInfo.versioned` false). TensorFlow-free.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keras_server.broker import traffic
from keras_server.broker.messages import WorkerInfo, no_live_version
from keras_server.broker.placement import ShardSet
from keras_server.catalog import VERSION
from keras_server.serving.failures import Unavailable, no_live_worker

log = logging.getLogger(__name__)

# How long a process trusts what it read of a model's live versions and
# policy: a change takes effect for requests begun this much later.
ROUTING_TTL_S = 0.5

LATEST = "latest"


class PolicyError(ValueError):
    """A traffic policy we cannot use; the message says why."""


@dataclass(frozen=True)
class Policy:
    """A model's traffic policy: `latest` (weights None) or weights by version."""

    weights: Mapping[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.weights is None:
            return {"policy": LATEST}
        return {"policy": "weights", "weights": dict(self.weights)}

    def encode(self) -> bytes:
        return json.dumps(self.as_dict()).encode()

    @classmethod
    def decode(cls, raw: bytes | str | None) -> Policy:
        """The stored policy; `latest` for none, or for one we cannot read
        (logged): a bad value never stops a model's traffic."""
        if raw is None:
            return cls()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or body.get("policy", "weights") == LATEST:
                return cls()
            return cls.from_weights(body.get("weights"))
        except (ValueError, PolicyError) as exc:
            log.warning("unreadable traffic policy %r (%s): routing to the latest", raw, exc)
            return cls()

    @classmethod
    def from_weights(cls, weights: object) -> Policy:
        """Weights by version, checked: an object of version -> number >= 0,
        summing to more than 0."""
        if not isinstance(weights, dict) or not weights:
            raise PolicyError("weights must be an object of version -> weight, not empty")
        checked = {}
        for version, weight in weights.items():
            if not isinstance(version, str) or not VERSION.match(version):
                raise PolicyError(f"version {version!r}: use 1-64 letters, digits, '.', '_' or '-'")
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise PolicyError(f"version {version!r}: the weight must be a number")
            if not 0 <= weight < float("inf"):
                raise PolicyError(f"version {version!r}: the weight must be 0 or more")
            checked[version] = float(weight)
        if not sum(checked.values()) > 0:
            raise PolicyError("the weights must have a positive sum")
        return cls(checked)


def version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key: dotted parts compared as numbers where they are ("10" > "9")."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in version.split("."))


def latest(versions: set[str] | frozenset[str]) -> str:
    return max(versions, key=version_order)


@dataclass(frozen=True)
class View:
    """What a web process knows of one model's routing, read at one moment."""

    live: Mapping[str, bool]  # version -> whether all its workers claim its own queue
    policy: Policy
    at: float = 0.0  # monotonic
    workers: int = 0  # the model's live workers, with a version or without


@dataclass(frozen=True)
class Route:
    """Where a request goes: the version it is for (None: whichever claims
    it) and the queues it is pushed onto, one per shard."""

    version: str | None
    shards: ShardSet
    pinned: bool = False
    own_queue: bool = False  # its version's own queue: only that version answers

    @property
    def answered_by(self) -> str | None:
        """The version that will answer, when it is certain."""
        return self.version if self.own_queue else None


@dataclass
class Router:
    """One model's routing, for all the threads of one web process."""

    model_name: str
    shards: ShardSet
    # The model's live workers (`fresh`: surveyed just now), from the
    # process's WorkerView.
    live_workers: Callable[[bool], list[WorkerInfo]]
    rng: random.Random = field(default_factory=random.Random)
    # With no live worker at all: queue on the model's own queue and wait
    # for one (a configured model), or answer 503 at once (a learned one,
    # serving/models.py, whose workers have left).
    wait_for_workers: bool = True
    _view: View | None = field(default=None, repr=False)
    _by_version: dict[str, ShardSet] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def shards_for(self, version: str) -> ShardSet:
        """Version `version`'s queue on every shard (made once, on the same
        connections as the model's)."""
        with self._lock:
            found = self._by_version.get(version)
            if found is None:
                found = ShardSet([q.of_version(version) for q in self.shards.queues])
                self._by_version[version] = found
            return found

    def view(self, now: float | None = None) -> View:
        """The live versions and the policy, read from Redis at most every
        ROUTING_TTL_S."""
        now = time.monotonic() if now is None else now
        with self._lock:
            view = self._view
        if view is not None and now - view.at < ROUTING_TTL_S:
            return view
        return self.read(now)

    def read(self, now: float, fresh: bool = False) -> View:
        """The live workers' versions (from the process's survey) and the
        policy (the newest copy among the shards: broker/traffic.py), kept
        as the view of `now`."""
        live: dict[str, bool] = {}
        workers = self.live_workers(fresh)
        for info in workers:
            if info.version:
                live[info.version] = live.get(info.version, True) and info.versioned
        view = View(live, Policy.decode(traffic.read(self.shards)), now, len(workers))
        with self._lock:
            self._view = view
        return view

    def forget(self) -> None:
        """Read Redis again for the next request (the admin API, after a change)."""
        with self._lock:
            self._view = None

    def route(self, pinned: str | None = None) -> Route:
        """Where a request for `pinned` (None: any version) goes; a 503 "no
        live worker" for a pinned version with none."""
        view = self.view()
        if (pinned and pinned not in view.live) or not view.workers:
            # Read again before refusing: a view cached just before a worker
            # came must not turn away its first requests. (Not while the
            # workers name no version: that read cost a Redis round trip
            # per request.)
            view = self.read(time.monotonic(), fresh=True)
        if pinned:
            if pinned not in view.live:
                raise Unavailable(no_live_version(pinned, self.model_name))
            if not view.live[pinned]:
                # Its workers' queue names no version: they claim the model's
                # alone (a worker of another version that claims it there
                # refuses it, by its header).
                return Route(pinned, self.shards, pinned=True)
            return Route(pinned, self.shards_for(pinned), pinned=True, own_queue=True)
        if not view.live:
            if not view.workers and not self.wait_for_workers:
                raise no_live_worker(self.model_name)
            return Route(None, self.shards)
        version = self.choose(view)
        if not view.live[version]:
            # Workers whose queue names no version claim the model's only.
            return Route(version, self.shards)
        return Route(version, self.shards_for(version), own_queue=True)

    def choose(self, view: View) -> str:
        """The version an unversioned request is for, by the policy."""
        weights = view.policy.weights
        if weights:
            candidates = [(v, w) for v, w in weights.items() if v in view.live and w > 0]
            if candidates:
                versions, chances = zip(*candidates, strict=True)
                return self.rng.choices(versions, chances)[0]
        return latest(frozenset(view.live))


def store_policy(router: Router, policy: Policy) -> list[str]:
    """Write `policy` on every shard that is up (broker/traffic.py: a shard
    that misses it is brought up to date when it is next read), and forget
    this process's cached view; returns the shards written. Other web
    processes read it within ROUTING_TTL_S."""
    written = traffic.write(router.shards, policy.as_dict())
    router.forget()
    return written
