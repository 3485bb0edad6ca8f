"""Job callbacks not yet delivered, in Redis, so that none is lost with a process.

The transaction that completes a job adds its id to `Keys.callbacks`, a
sorted set scored by when the callback is due (broker/jobs.py). Any worker
of the model on that Redis delivers it (keras_server/callbacks.py):

- `claim` takes the due ones in one script: each is leased (its score moved
  `lease` seconds ahead) and its try counted (`Keys.callback_tries`), so one
  worker at a time sends it, and if that worker dies mid-try the lease runs
  out and another tries again: at least once, a bounded number of times;
- `retry` makes it due again later (the sender's backoff);
- `done` forgets it: delivered, given up, or its job is gone.
"""

from __future__ import annotations

import redis

from keras_server.broker.messages import Keys

# KEYS: the pending set, the tries hash. ARGV: now, lease end, most to take.
# Returns {job id, tries, job id, tries, ...}, oldest due first.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  claimed[#claimed + 1] = id
  claimed[#claimed + 1] = redis.call('HINCRBY', KEYS[2], id, 1)
end
return claimed
"""


class PendingCallbacks:
    """The undelivered callbacks of one model's jobs on one Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._claim = client.register_script(_CLAIM)

    def claim(self, now: float, lease: float, limit: int) -> list[tuple[str, int]]:
        """Up to `limit` callbacks due at `now`, leased for `lease` seconds:
        (job id, how many tries this one makes)."""
        if limit <= 0:
            return []
        reply = self._claim(
            keys=[self.keys.callbacks, self.keys.callback_tries],
            args=[repr(now), repr(now + lease), limit],
        )
        return [(reply[i].decode(), int(reply[i + 1])) for i in range(0, len(reply), 2)]

    def retry(self, job_id: str, due: float) -> None:
        """Make it due again at `due` (still pending: XX never adds one back)."""
        self.client.zadd(self.keys.callbacks, {job_id: due}, xx=True)

    def done(self, job_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.keys.callbacks, job_id)
        pipe.hdel(self.keys.callback_tries, job_id)
        pipe.execute()
