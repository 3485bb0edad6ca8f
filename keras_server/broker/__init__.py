"""Redis between the web tier and the workers: what both sides share.

    messages      Redis key names and the messages between web and worker, with their format
    failures      what each redis-py error means: unreachable, refused, or a bug
    request_queue the queue: push / wait, crash-safe claims, answers
    scripts       the queue's Lua scripts: claim, sweep, requeue
    liveness      heartbeats, reaping a dead worker's claims, sweeping a gone version's queue
    shards        one Redis as this process sees it: connections (or Sentinel), health, probe
    placement     several Redis instances: pick one per request, skip dead ones
    traffic       a model's traffic policy on every shard: newest copy wins, stale ones updated
    jobs          asynchronous jobs: record, items fed onto the queue, results, cancel
    pending_callbacks job callbacks not yet delivered: claimed with a lease, retried, cleared
    quotas        API keys' quotas: one atomic GCRA script, shared by every web server
    redis_server  a private redis-server when none is running
    response_store the response cache's Redis: get and set answers, never fill the queue's

Imports neither the web tier, an engine nor the worker.
"""
