"""The operations routes: `/healthz` (liveness), `/readyz` (readiness) and
`/metrics` (Prometheus), with the queue and job backlog gauges read from the
process's one survey of the workers (serving/workers.py): a probe or a scrape never makes
Redis calls of its own, however often it comes. TensorFlow-free.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from keras_server import metrics
from keras_server.serving.models import Deployment
from keras_server.web import state

blueprint = Blueprint("probes", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers. Nothing else is checked."""
    return jsonify(status="ok")


@blueprint.get("/readyz")
def readyz() -> Response | tuple[Response, int]:
    """Ready when, for every model, a worker beats on every reachable shard.

    A shard that is down does not make the server unready while another
    serves (/predict skips it too), but it is reported.
    """
    deployment = state().pipeline.deployment
    survey = deployment.survey()
    down = {f"Redis at {s.shard} is unreachable: {s.error}" for s in survey if not s.reachable}
    missing = deployment.unready(survey)
    if missing:
        return jsonify(ready=False, reason="; ".join([*sorted(down), *missing])), 503
    loops = survey.live_workers()  # one heartbeat per claim loop, per shard
    body: dict[str, Any] = {
        "ready": True,
        "workers": len({(w.host, w.pid) for w in loops}),  # processes
        "claim_loops": len(loops),
        "models": sorted({w.description for w in loops}),
    }
    if down:
        body["unreachable"] = sorted(down)
    return jsonify(body)


@blueprint.get("/metrics")
def metrics_endpoint() -> Response:
    body, content_type = metrics.exposition(RedisCollector(state().pipeline.deployment))
    return Response(body, content_type=content_type)


class RedisCollector(Collector):
    """Queue depth, job backlog and worker heartbeats of every model on every
    shard, from the process's survey."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("keras_server_redis_up", "1 if the shard answered", labels=["shard"])
        labels = ["model", "shard"]
        depth = GaugeMetricFamily(
            "keras_server_queue_depth",
            "Requests waiting in the queue, by priority level (1 the highest)",
            labels=[*labels, "level"],
        )
        backlog = GaugeMetricFamily(
            "keras_server_job_backlog",
            "Job images staged and not yet fed onto the queue (those fed are in "
            "keras_server_queue_depth's lowest level)",
            labels=labels,
        )
        live = GaugeMetricFamily(
            "keras_server_workers_live", "Workers with a current heartbeat", labels=labels
        )
        age = GaugeMetricFamily(
            "keras_server_worker_heartbeat_age_seconds",
            "Seconds since each live worker's last heartbeat",
            labels=[*labels, "worker"],
        )
        now = time.time()
        reachable: dict[str, int] = {}
        # A model's queue partitions (--queue-partitions) on one shard are
        # summed into that shard's series.
        depths: dict[tuple[str, str, str], int] = {}
        lives: dict[tuple[str, str], int] = {}
        backlogs: dict[tuple[str, str], int] = {}
        for shard_state in self.deployment.survey():
            # A shard is up if it answered for any model.
            shard = shard_state.shard
            reachable[shard] = max(reachable.get(shard, 0), int(shard_state.reachable))
            if not shard_state.reachable:
                continue
            where = (shard_state.model_name, shard)
            for level, waiting in enumerate(shard_state.depths, start=1):
                depths[(*where, str(level))] = depths.get((*where, str(level)), 0) + waiting
            lives[where] = lives.get(where, 0) + len(shard_state.workers)
            backlogs[where] = backlogs.get(where, 0) + shard_state.job_backlog
            for worker_id, info in shard_state.workers.items():
                age.add_metric([*where, worker_id], max(0.0, now - info.at))
        for family, counts in ((depth, depths), (live, lives), (backlog, backlogs)):
            for series, count in counts.items():
                family.add_metric(list(series), count)
        for shard, answered in reachable.items():
            up.add_metric([shard], answered)
        yield from (up, depth, backlog, live, age)
