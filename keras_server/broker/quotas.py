"""API keys' quotas, kept in Redis so every web process of every web server
shares them: one Lua script, run atomically by Redis, decides each request.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept
as one timestamp): a quota of `rate` images per `period` seconds with a
`burst` lets `burst` images through at once, then one every
`period / rate` seconds (the emission interval). Redis stores a single value
per key name, its *theoretical arrival time* (TAT, in microseconds): the
moment the bucket would be full again. A request of `cost` images at `now`
is allowed when `TAT + cost * interval - burst * interval <= now`, and moves
TAT to `max(TAT, now) + cost * interval`; the key expires when TAT is
reached, so a key name at rest holds nothing in Redis. `check` asks whether
one image would pass without counting it: a key with nothing left is refused
before its upload is read.

The clock is Redis's (TIME), not a web server's, so servers with skewed
clocks still share one quota; the tests pass their own `now` to check the
arithmetic. Only Redis 6.2 commands. Errors are redis-py's, for the caller
to classify (failures.py): the serving core lets a request through unmetered
when the quota cannot be read (serving/quotas.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from keras_server.broker.messages import Keys
from keras_server.broker.shards import Shard

MICROS = 1_000_000

# KEYS: the key name's state. ARGV: emission interval (µs), burst, now (µs,
# or '' for Redis's own clock), cost (images), '1' to only check (nothing
# counted). Returns {allowed (1/0), remaining, µs until a retry may pass
# (0 when allowed), µs until the bucket is full again}.
# TIME before a write needs effects replication (the default since Redis 5;
# asked for explicitly, as 6.2 still takes the call).
_GCRA = """
redis.replicate_commands()
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now == nil then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local cost = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local room = now - (tat - burst * interval)
local left = math.floor(room / interval)
local new_tat = tat + cost * interval
if room < cost * interval then
  return {0, math.max(0, left), new_tat - burst * interval - now, tat - now}
end
if ARGV[5] == '1' then
  return {1, left, 0, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
  math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, left - cost, 0, new_tat - now}
"""


@dataclass(frozen=True)
class Quota:
    """`rate` images every `period` seconds, up to `burst` at once."""

    rate: int
    period: float  # seconds
    burst: int

    @property
    def interval_us(self) -> int:
        """Microseconds between two images at the sustained rate."""
        return max(1, round(self.period * MICROS / self.rate))


@dataclass(frozen=True)
class Decision:
    """One request's answer from the script, in the units of the HTTP headers."""

    allowed: bool
    limit: int  # the burst: most images at once
    remaining: int  # images that may follow at once
    retry_after_s: float  # until a refused request may pass; 0 when allowed
    reset_s: float  # until the quota is whole again

    @property
    def headers(self) -> dict[str, str]:
        """RateLimit-Limit / -Remaining / -Reset (draft-ietf-httpapi-
        ratelimit-headers), and Retry-After for a refusal; whole seconds,
        rounded up so a client that waits that long is not refused again."""
        found = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
        }
        if not self.allowed:
            found["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return found


class NotAsked(redis.ConnectionError):
    """The quota's Redis is marked down: it was not asked (an unreachable
    failure, as failures.py classifies it)."""


class Quotas:
    """Every API key's quota, on one Redis (`shard`: the first of --redis-url)."""

    def __init__(self, shard: Shard, keys: Keys) -> None:
        self.shard = shard
        self.keys = keys
        self._gcra = shard.client.register_script(_GCRA)

    @classmethod
    def open(cls, url: str, keys: Keys, *, timeout: float) -> Quotas:
        """On this process's Shard for `url`: its connections and health
        record are the queue's."""
        return cls(Shard.of(url, timeout), keys)

    def take(
        self, key_name: str, quota: Quota, cost: int = 1, now_us: int | None = None
    ) -> Decision:
        """Count `cost` images of `key_name` against `quota`, all or none;
        `now_us` (tests only) replaces Redis's clock. Raises redis.RedisError,
        NotAsked while the shard is marked down."""
        return self._run(key_name, quota, cost, now_us, check=False)

    def check(self, key_name: str, quota: Quota, now_us: int | None = None) -> Decision:
        """Whether one more image of `key_name` would pass, counting nothing."""
        return self._run(key_name, quota, 1, now_us, check=True)

    def _run(
        self, key_name: str, quota: Quota, cost: int, now_us: int | None, check: bool
    ) -> Decision:
        if self.shard.is_down():
            raise NotAsked(f"Redis at {self.shard.name} is marked down")
        args = [
            quota.interval_us, quota.burst, "" if now_us is None else now_us, cost,
            "1" if check else "0",
        ]  # fmt: skip
        with self.shard.watch():
            allowed, remaining, retry_us, reset_us = self._gcra(
                keys=[self.keys.quota(key_name)], args=args
            )
        return Decision(
            allowed=bool(allowed),
            limit=quota.burst,
            remaining=int(remaining),
            retry_after_s=int(retry_us) / MICROS,
            reset_s=int(reset_us) / MICROS,
        )
