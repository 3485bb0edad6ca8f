"""One Redis, as this process sees it (`Shard`): its connection pool (plain,
or through Sentinel), its health record and the probe that brings it back.
Every model's queue on that Redis shares it, in the web tier and in the
worker alike.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import redis
from redis import exceptions
from redis.backoff import ConstantBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from keras_server.broker.failures import Kind, kind_of, reason
from keras_server.settings import (
    CLUSTER_SCHEME,
    SENTINEL_SCHEME,
    parse_cluster_url,
    parse_sentinel_url,
)

log = logging.getLogger(__name__)

# How often a host marked down is pinged to see whether it is back.
PROBE_INTERVAL_S = 0.5

# A Redis Cluster client's retries of a command that met a connection error,
# a timeout or CLUSTERDOWN, each after CLUSTER_RETRY_S, with the topology
# read again first: enough to follow a failover that has just ended (the
# command's slot now on the promoted replica) without a 503; too few to hide
# a master that is still down, which the shard's health record and probe
# handle (the web tier answers 503 at once). MOVED and ASK are followed
# whatever this says.
CLUSTER_RETRIES = 2
CLUSTER_RETRY_S = 0.1

# What a Redis Cluster client raises that is not a redis.RedisError: no node
# reachable, or a slot no node serves (a master gone, no replica promoted
# yet). `Shard.watch` raises them as the redis.ConnectionError they are.
CLUSTER_UNREACHABLE = (exceptions.RedisClusterUnreachableError, exceptions.SlotNotCoveredError)


def connect(url: str, *, timeout: float) -> redis.Redis:
    """A client for `url` that gives up on a silent server after `timeout` s.

    A hung host (stopped process, network partition) keeps its connections
    open and never answers; without a read timeout each command would wait
    for it indefinitely. Blocking calls (BLPOP, BLMOVE) go through
    `Shard.block`, which reads their reply with a longer timeout. Nothing is retried
    behind our back: the web tier answers 503 at once while Redis is down,
    and the worker loop has its own backoff.

    `redis+sentinel://host:port[,host:port...]/MASTER[/DB]` asks those Redis
    Sentinels for the current master of MASTER, and again after a failover.

    `redis+cluster://host:port[,host:port...]` is a Redis Cluster, through
    redis-py's RedisCluster: the seed nodes tell it the others and which
    owns each slot; it follows MOVED and ASK itself, and reads the topology
    again after a connection error (see CLUSTER_RETRIES).
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }
    if url.startswith(SENTINEL_SCHEME):
        sentinels, master, db, password = parse_sentinel_url(url)
        sentinel = Sentinel(
            sentinels,
            sentinel_kwargs={"socket_connect_timeout": timeout, "socket_timeout": timeout},
            **options,
        )
        return sentinel.master_for(master, db=db, password=password)
    if url.startswith(CLUSTER_SCHEME):
        nodes, password = parse_cluster_url(url)
        options["retry"] = Retry(ConstantBackoff(CLUSTER_RETRY_S), CLUSTER_RETRIES)
        client: redis.Redis = RedisCluster(  # type: ignore[assignment]
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            password=password,
            **options,
        )
        return client
    return redis.Redis.from_url(url, **options)


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def label(url: str) -> str:
    """host:port/db of a Redis URL, without any password: safe for logs and metrics."""
    if url.startswith(SENTINEL_SCHEME):
        _, master, db, _ = parse_sentinel_url(url)
        return f"sentinel:{master}/{db}"
    if url.startswith(CLUSTER_SCHEME):
        (host, port), *_ = parse_cluster_url(url)[0]
        return f"cluster:{host}:{port}"
    kwargs = redis.connection.parse_url(url)
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class Shard:
    """One Redis, as this process sees it: one connection pool and one health
    record, shared by every model's queue on it, in the web tier and in the
    worker alike (`Shard.of`).

    A host that cannot be reached — refuses connections, or stays silent past
    `timeout` like a hung host — is marked down by whichever caller meets it
    first (`watch`, see failures.py): every queue on it is skipped without
    asking it anything, and one probe thread pings it until it answers.
    """

    _registry: dict[tuple[str, float], Shard] = {}  # noqa: RUF012 (the process's own)
    _registry_lock = threading.Lock()

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.name = label(url)
        self.timeout = timeout
        self.client = connect(url, timeout=timeout)
        self._lock = threading.Lock()
        self._down: str | None = None  # why, while marked down
        self._probing = False

    @classmethod
    def of(cls, url: str, timeout: float) -> Shard:
        """This process's Shard for `url`. One settings table per process
        means one --redis-timeout, so one Shard per URL."""
        with cls._registry_lock:
            found = cls._registry.get((url, timeout))
            if found is None:
                found = cls._registry[(url, timeout)] = cls(url, timeout)
            return found

    def is_down(self) -> bool:
        return self.down_reason() is not None

    def down_reason(self) -> str | None:
        """Why the host is marked down (what it failed with); None while up."""
        with self._lock:
            return self._down

    def mark_down(self, error: BaseException) -> None:
        """Skip this host until the probe hears from it again."""
        with self._lock:
            newly = self._down is None
            if newly:
                self._down = reason(error)
            start_probe, self._probing = not self._probing, True
        if newly:
            log.warning(
                "Redis shard %s failed (%s); skipping it until it answers", self.name, error
            )
        if start_probe:
            threading.Thread(target=self._probe, name="shard-probe", daemon=True).start()

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Mark the host down when what runs inside finds it unreachable; every
        error goes on to the caller."""
        try:
            try:
                yield
            except CLUSTER_UNREACHABLE as exc:
                raise redis.ConnectionError(f"Redis Cluster: {exc}") from exc
        except redis.RedisError as exc:
            if kind_of(exc) is Kind.UNREACHABLE:
                self.mark_down(exc)
            raise

    def block(self, *command: Any, seconds: float) -> Any:
        """Run a blocking command (BLPOP, BLMOVE) that Redis ends after
        `seconds`, reading its reply for `seconds` plus --redis-timeout: a nil
        reply that comes a little late is not a hung host. On a cluster it
        goes to the node that owns its first key's slot (every key of one
        command shares a hash tag: messages.Keys)."""
        if is_cluster(self.client):
            cluster: Any = self.client
            node = cluster.get_node_from_key(command[1])
            pool = cluster.get_redis_connection(node).connection_pool
        else:
            pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_command(*command)
            return connection.read_response(timeout=seconds + self.timeout)
        except BaseException:
            # Its reply may still come: this connection is never reused.
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def _ping(self) -> None:
        """Whether the host answers; a cluster's every master, after the
        topology is read again (a replica promoted since is a master now,
        and the dead one is no longer asked)."""
        if is_cluster(self.client):
            cluster: Any = self.client
            cluster.nodes_manager.initialize()
            cluster.ping(target_nodes=RedisCluster.PRIMARIES)
        else:
            self.client.ping()

    def _probe(self) -> None:
        """Ping the host every PROBE_INTERVAL_S until it answers."""
        event = threading.Event()
        while True:
            try:
                self._ping()
            except (redis.RedisError, exceptions.RedisClusterException):
                event.wait(PROBE_INTERVAL_S)
                continue
            with self._lock:
                self._down, self._probing = None, False
            log.info("Redis shard %s answers again", self.name)
            return
