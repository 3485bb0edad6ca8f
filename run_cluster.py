"""A whole deployment on one machine, on free loopback ports: several Redis
shards, web servers (granian), model workers, and nginx round-robin in front.
Not part of the server package: it runs the server's entry point
(run_keras_server.py) and nginx with deploy/nginx.conf.template.

    python run_cluster.py [--redis 2 | --redis-cluster 3] [--web 2] [--workers 2] [--port 8080]
                          [--rate-limit RATE [--rate-burst N]] [-- SERVER FLAGS]

`--redis-cluster N` runs a Redis Cluster instead of the shards: N masters
and N replicas (broker/redis_server.LocalCluster), one redis+cluster:// URL,
and `--queue-partitions N` for every server unless given after `--`.
Everything after `--` goes to every web server and worker, e.g.
`-- --model sim --sim-batch-ms 200` or `-- --weights none`. Each part is
printed as it comes up; Ctrl-C (or SIGTERM) tears it all down, in reverse.
Used by the tests and the scale-out benchmark too.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import requests

from keras_server.broker.redis_server import LocalCluster, RedisServer, free_port
from keras_server.catalog import model_specs
from keras_server.processes import Child, ChildFailed, stop_on_signals, wait_for
from keras_server.serving.models import Deployment
from keras_server.settings import Settings, SettingsError, load_settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
NGINX_TEMPLATE = ROOT / "deploy" / "nginx.conf.template"
SERVER = ROOT / "run_keras_server.py"
RATE = re.compile(r"^[1-9][0-9]*r/[sm]$")  # nginx's limit_req_zone rate


def http_answers(
    url: str, timeout: float = 2.0, *, success: bool = False, accept: Sequence[int] = ()
) -> Callable[[], bool]:
    """A readiness check: any HTTP answer from `url` (a 405 too) means it
    listens; with `success`, only a 2xx answer, or one in `accept`, counts (a
    proxy answers 502 while nothing listens behind it)."""

    def check() -> bool:
        try:
            answer = requests.get(url, timeout=timeout)
        except requests.RequestException:
            return False
        return answer.ok or answer.status_code in accept or not success

    return check


class ClusterError(RuntimeError):
    """A part of the cluster could not start; the message says which and why."""


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None


def render_nginx_conf(
    prefix: Path,
    listen_port: int,
    web_ports: Sequence[int],
    settings: Settings,
    *,
    rate_limit: str = "",
    burst: int = 0,
) -> str:
    """The template filled in. `rate_limit`, in nginx's words ("10r/s",
    "30r/m"), limits each client address, allowing bursts of `burst` more;
    empty: no limit."""
    upstreams = "\n".join(
        f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;" for port in web_ports
    )
    values = {
        "@PREFIX@": str(prefix),
        "@LISTEN@": f"127.0.0.1:{listen_port}",
        "@UPSTREAMS@": upstreams,
        "@MAX_BODY_MB@": f"{settings.max_upload_mb:g}",
        "@PROXY_TIMEOUT_S@": str(int(settings.result_timeout) + 10),
        "@RATE_LIMIT_ZONE@": "",
        "@RATE_LIMIT@": "",
    }
    if rate_limit:
        values["@RATE_LIMIT_ZONE@"] = (
            f"    limit_req_zone $binary_remote_addr zone=per_client:10m rate={rate_limit};"
        )
        extra = f" burst={burst} nodelay" if burst else ""  # nginx refuses burst=0
        values["@RATE_LIMIT@"] = f"            limit_req zone=per_client{extra};"
    text = NGINX_TEMPLATE.read_text()
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


class Part(Child):
    """One process of the cluster, with its log file and the port it serves."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path, port: int) -> None:
        # Its own process group: Ctrl-C reaches only us, and we stop the parts
        # in order; kill() takes granian's processes along.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        super().__init__(name, command, log_path, cwd=ROOT, env=env, new_session=True)
        self.port = port


class Cluster:
    def __init__(
        self,
        redis_count: int = 2,
        web_count: int = 2,
        worker_count: int = 2,
        *,
        server_args: Sequence[str] = (),
        port: int = 0,
        say: Callable[[str], None] = print,
        rate_limit: str = "",
        rate_burst: int = 0,
        redis_cluster: int = 0,
    ) -> None:
        """`redis_cluster`: masters of a Redis Cluster to run instead of
        `redis_count` shards (0: shards)."""
        self.counts = (redis_count, web_count, worker_count)
        self.redis_cluster = redis_cluster
        self.local_cluster: LocalCluster | None = None
        if redis_cluster and "--queue-partitions" not in server_args:
            server_args = [*server_args, "--queue-partitions", str(redis_cluster)]
        if rate_limit and not RATE.match(rate_limit):
            raise SettingsError(f"rate limit {rate_limit!r}: expected e.g. 10r/s or 30r/m")
        self.rate_limit = rate_limit
        self.rate_burst = rate_burst
        self.server_args = list(server_args)
        self.settings = load_settings(self.server_args, environ={})
        self.port = port or free_port()
        self.say = say
        self.dir = Path(tempfile.mkdtemp(prefix="keras-cluster-"))
        self.redis: list[RedisServer] = []
        self.workers: list[Part] = []
        self.webs: list[Part] = []
        self.nginx: Part | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_urls(self) -> str:
        if self.local_cluster is not None:
            return self.local_cluster.url
        return ",".join(server.url for server in self.redis)

    def start(self, timeout: float = 180) -> Cluster:
        redis_count, web_count, worker_count = self.counts
        try:
            if self.redis_cluster:
                self.local_cluster = LocalCluster(self.redis_cluster)
                self.local_cluster.start()
                self.say(f"redis cluster {self.local_cluster.url}")
            for i in range(0 if self.redis_cluster else redis_count):
                self.redis.append(RedisServer().start())
                self.say(f"redis {i}   {self.redis[-1].url}")
            for i in range(worker_count):
                self.add_worker()
                self.say(f"worker {i}  metrics http://127.0.0.1:{self.workers[-1].port}/metrics")
            for i in range(web_count):
                web = self._spawn(f"web-{i}", "--role", "web", "--web-workers", "1")
                self.webs.append(web)
                self.say(f"web {i}     http://127.0.0.1:{web.port}")
            self._start_nginx()
            self.say(f"nginx     {self.url}  (round robin over {web_count} web servers)")
            self.wait_ready(worker_count, timeout)
        except BaseException:
            self.stop(keep_logs=True)
            raise
        self.say(f"ready: curl -X POST -F image=@images/chelsea.png {self.url}/predict")
        return self

    def add_worker(self) -> Part:
        metrics_port = free_port()
        part = self._spawn(
            f"worker-{len(self.workers)}",
            "--role", "worker",
            "--metrics-port", str(metrics_port),
            port=metrics_port,
        )  # fmt: skip
        self.workers.append(part)
        return part

    def _spawn(self, name: str, *args: str, port: int | None = None) -> Part:
        port = port or free_port()
        command = [
            sys.executable, str(SERVER), *self.server_args, *args,
            "--redis-url", self.redis_urls,
        ]  # fmt: skip
        if "--role" in args and args[args.index("--role") + 1] == "web":
            command += ["--port", str(port)]
        return Part(name, command, self.dir / f"{name}.log", port).start()

    def kill(self, part: Part) -> None:
        """SIGKILL a part with all its processes, as a crash would."""
        part.kill()

    def _start_nginx(self) -> None:
        binary = find_nginx()
        if binary is None:
            raise ClusterError("nginx not found: apt-get install nginx-light")
        prefix = self.dir / "nginx"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(
            render_nginx_conf(
                prefix,
                self.port,
                [w.port for w in self.webs],
                self.settings,
                rate_limit=self.rate_limit,
                burst=self.rate_burst,
            )
        )
        command = [binary, "-p", str(prefix), "-c", str(conf)]
        self.nginx = Part("nginx", command, self.dir / "nginx.log", self.port).start()

    def wait_ready(self, workers: int, timeout: float) -> None:
        """Until every web server and nginx answer and, for every model the
        workers serve (`--serve`), each of the `workers` beats on every shard:
        read from Redis with the survey /readyz uses, per model and shard
        (/readyz adds them all up)."""
        settings = dataclasses.replace(self.settings, redis_url=self.redis_urls)
        models = model_specs(settings)
        served = {spec.name for spec in models.serving(settings.serve)}
        deployment = Deployment.from_settings(settings, models)
        # Each web server directly, then nginx in front of them, once they
        # are up: a request nginx fails on a starting web server would take it
        # out of the upstream for fail_timeout. Under a rate limit nginx may
        # answer 429: it answers, so it is up.
        answering = [
            *(
                http_answers(f"http://127.0.0.1:{web.port}/healthz", success=True)
                for web in self.webs
            ),
            http_answers(f"{self.url}/healthz", success=True, accept=(429,)),
        ]
        parts = [*self.workers, *self.webs, *([self.nginx] if self.nginx else [])]

        def ready() -> bool:
            states = [s for s in deployment.survey() if s.model_name in served]
            beating = all(s.reachable and len(s.workers) >= workers for s in states)
            return beating and all(check() for check in answering)

        try:
            wait_for(
                ready,
                timeout,
                "every worker beating on every shard, every web server and nginx answering",
                parts,
            )
        except ChildFailed as exc:
            raise ClusterError(f"{exc}\n(logs in {self.dir})") from None

    def stop(self, keep_logs: bool = False) -> None:
        """Everything down, in reverse: nginx, web servers, workers, Redis.
        The logs go too, unless `keep_logs`."""
        parts = [*([self.nginx] if self.nginx else []), *self.webs, *self.workers]
        for part in parts:
            part.terminate()  # all at once; then each gets up to 40 s
        for part in parts:
            part.stop(timeout=40)
        for server in self.redis:
            server.close()
        if self.local_cluster is not None:
            self.local_cluster.stop()
            self.local_cluster = None
        self.nginx, self.webs, self.workers, self.redis = None, [], [], []
        if not keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="run_cluster.py",
        description="Run Redis shards, web servers, workers and nginx on this machine.",
        epilog="Flags after -- go to every web server and worker (see run_keras_server.py --help).",
    )
    parser.add_argument("--redis", type=int, default=2, help="Redis shards (default 2)")
    parser.add_argument(
        "--redis-cluster",
        type=int,
        default=0,
        metavar="N",
        help="a Redis Cluster of N masters and N replicas instead of shards (N >= 3), "
        "each model's queue on N partitions",
    )
    parser.add_argument("--web", type=int, default=2, help="web servers, --role web (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="model workers (default 2)")
    parser.add_argument("--port", type=int, default=8080, help="nginx port (default 8080)")
    parser.add_argument(
        "--rate-limit",
        default="",
        metavar="RATE",
        help="nginx: most requests per client address, e.g. 10r/s or 600r/m; beyond it "
        "nginx answers 429 (default: no limit)",
    )
    parser.add_argument(
        "--rate-burst", type=int, default=20, help="with --rate-limit: burst allowed (default 20)"
    )
    args = parser.parse_args(own)
    if min(args.redis, args.web, args.workers) < 1:
        parser.error("each count must be at least 1")
    if args.redis_cluster and args.redis_cluster < 3:
        parser.error("--redis-cluster needs 3 masters at least")
    if args.rate_burst < 0:
        parser.error("--rate-burst must be 0 or more")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cluster = Cluster(
            args.redis,
            args.web,
            args.workers,
            server_args=server_args,
            port=args.port,
            rate_limit=args.rate_limit,
            rate_burst=args.rate_burst,
            redis_cluster=args.redis_cluster,
        )
    except SettingsError as exc:
        parser.error(str(exc))
    stopped = stop_on_signals("stopping the cluster")
    try:
        with cluster:
            print(f"logs in {cluster.dir} (removed at exit); Ctrl-C stops all", flush=True)
            stopped.wait()
            print("stopping...", flush=True)
    except ClusterError as exc:
        print(f"run_cluster.py: {exc}", file=sys.stderr)
        return 1
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
