"""A whole deployment on one machine, on free loopback ports: several Redis
shards, gunicorn web servers, model workers, and nginx round-robin in front.

    python run_cluster.py [--redis 2] [--web 2] [--workers 2] [--port 8080]
                          [--rate-limit RATE [--rate-burst N]] [-- SERVER FLAGS]

Everything after `--` goes to every web server and worker, e.g.
`-- --model sim --sim-batch-ms 200` or `-- --weights none`. Each part is
printed as it comes up; Ctrl-C (or SIGTERM) tears it all down, in reverse.
Used by the tests and the scale-out benchmark too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import requests

from .redis_launcher import RedisServer, free_port
from .settings import Settings, SettingsError, load_settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = ROOT / "deploy" / "nginx.conf.template"
SERVER = ROOT / "run_keras_server.py"
RATE = re.compile(r"^[1-9][0-9]*r/[sm]$")  # nginx's limit_req_zone rate


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


@dataclass
class Part:
    """One process of the cluster, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int
    log_file: IO[bytes] = field(repr=False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


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
    ) -> None:
        self.counts = (redis_count, web_count, worker_count)
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
        return ",".join(server.url for server in self.redis)

    def start(self, timeout: float = 180) -> Cluster:
        redis_count, web_count, worker_count = self.counts
        try:
            for i in range(redis_count):
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
        log_path = self.dir / f"{name}.log"
        log_file = log_path.open("wb")
        command = [
            sys.executable, str(SERVER), *self.server_args, *args,
            "--redis-url", self.redis_urls,
        ]  # fmt: skip
        if "--role" in args and args[args.index("--role") + 1] == "web":
            command += ["--port", str(port)]
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Its own process group: Ctrl-C reaches only us, and we stop the
            # parts in order; kill() takes gunicorn's workers along.
            start_new_session=True,
        )
        return Part(name, process, log_path, port, log_file)

    def kill(self, part: Part) -> None:
        """SIGKILL a part with all its processes, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(part.process.pid, signal.SIGKILL)
        part.process.wait()

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
        log_path = self.dir / "nginx.log"
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        self.nginx = Part("nginx", process, log_path, self.port, log_file)

    def wait_ready(self, workers: int, timeout: float) -> None:
        """Until every web server answers, every worker beats on every shard,
        and then nginx answers.

        The web servers are polled directly and nginx only once they are up:
        a request nginx fails on a starting web server would take it out of
        the upstream for fail_timeout, and with a rate limit, polling through
        nginx would use the clients' allowance up."""
        expected = workers * len(self.redis)
        deadline = time.monotonic() + timeout
        webs_ready = False
        while time.monotonic() < deadline:
            for part in [*self.workers, *self.webs, *([self.nginx] if self.nginx else [])]:
                if not part.alive():
                    raise ClusterError(f"{part.name} exited:\n{part.log_tail()}")
            with contextlib.suppress(requests.RequestException, ValueError):
                if not webs_ready:
                    bodies = [
                        requests.get(f"http://127.0.0.1:{web.port}/readyz", timeout=2).json()
                        for web in self.webs
                    ]
                    webs_ready = all(body.get("workers") == expected for body in bodies)
                if webs_ready:
                    status = requests.get(self.url + "/healthz", timeout=2).status_code
                    if status < 500:  # 200, or 429 under a rate limit
                        return
            time.sleep(0.2)
        raise ClusterError(f"not ready after {timeout:g} s; logs in {self.dir}")

    def stop(self, keep_logs: bool = False) -> None:
        """Everything down, in reverse: nginx, web servers, workers, Redis.
        The logs go too, unless `keep_logs`."""
        parts = [*([self.nginx] if self.nginx else []), *self.webs, *self.workers]
        for part in parts:
            if part.alive():
                part.process.send_signal(signal.SIGTERM)
        for part in parts:
            try:
                part.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                part.process.kill()
                part.process.wait()
            part.log_file.close()
        for server in self.redis:
            server.close()
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
    parser.add_argument("--web", type=int, default=2, help="gunicorn web servers (default 2)")
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
    if args.rate_burst < 0:
        parser.error("--rate-burst must be 0 or more")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    try:
        cluster = Cluster(
            args.redis,
            args.web,
            args.workers,
            server_args=server_args,
            port=args.port,
            rate_limit=args.rate_limit,
            rate_burst=args.rate_burst,
        )
    except SettingsError as exc:
        parser.error(str(exc))
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
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
