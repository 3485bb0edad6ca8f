"""Server CPU per request, process by process, at 32 connections:
`python -m bench.process_cpu`.

Starts a private redis-server and `run_keras_server.py --role all` (as `make
serve` starts it) on the OpenVINO int8 graph of `--model`, saved with random
weights and converted into `--work-dir`'s conversion cache once (the files
`bench.peers` makes, so one run's cache serves the other), drives it with wrk
(`bench/multipart.lua`, the sample photos) at `--connections` for an uncounted
warm-up and then `--seconds`, and prints for each process of the server (the
model worker, the web processes, Redis) its CPU time (user + system) and its
minor page faults per answered request, beside wrk's own CPU, and the web
processes' resident memory after the load.

Where the throughput gap to the engine goes: with every core busy, images/s
is the cores over the CPU per request, so each process's share says what a
change would buy. `--root` starts another checkout's server (a `git worktree`
of an earlier commit) for a before/after on the same machine.

    python -m bench.process_cpu --model mobilenet_v2
    python -m bench.process_cpu --root /tmp/before -- --web-threads 8
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench import cpu, engines, serve
from bench.run import IMAGES, ROOT, cpu_seconds
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.catalog import BUILTINS

log = logging.getLogger("bench.process_cpu")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.process_cpu", description=__doc__)
    parser.add_argument("--model", default=engines.MODEL, choices=sorted(BUILTINS))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/peerswork"))
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to serve from")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("server_args", nargs="*", help="after --: flags for the server")
    return parser.parse_args(argv)


def counters(process: psutil.Process) -> tuple[float, int]:
    """(CPU seconds, minor page faults) of `process` so far: psutil reads no
    page faults, /proc/PID/stat has them (its 10th field)."""
    times = process.cpu_times()
    with open(f"/proc/{process.pid}/stat") as stat:
        minor_faults = int(stat.read().rsplit(")", 1)[1].split()[7])
    return times.user + times.system, minor_faults


def role(process: psutil.Process) -> str:
    """keras-server's processes by what they do; any other by its name."""
    try:
        command = " ".join(process.cmdline())
        name = process.name()
    except psutil.Error:
        return "gone"
    if "redis-server" in command:
        return "redis"
    if "keras_server.web.front" in command:
        return "web"
    if "keras_server.cli" in command:
        return "worker"
    if "run_keras_server.py" in command:
        return "launcher"
    return name


def server_processes(leader: int, extra: Sequence[int] = ()) -> list[psutil.Process]:
    """The processes of a server started in a session of its own (`leader`):
    the leader, its descendants (keras-server's children have sessions of
    their own), the processes of its session a child left behind when it
    exited (LitServe's workers, adopted by init), and the pids in `extra`
    (our Redis)."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(leader)
        for process in [root, *root.children(recursive=True)]:
            found[process.pid] = process
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if process.pid in extra or os.getsid(process.pid) == leader:
                found.setdefault(process.pid, process)
    return list(found.values())


@dataclass(frozen=True)
class Window:
    """What a server's processes (`per_process`: pid to role, CPU seconds and
    minor page faults) and the whole machine did over one measured run."""

    seconds: float  # wall time
    per_process: dict[int, tuple[str, float, int]]
    machine_busy: float  # CPU seconds the machine spent busy
    harness: float  # this process's own CPU seconds (wrk's are the client's)

    @property
    def server_cpu(self) -> float:
        return sum(cpu_s for _, cpu_s, _ in self.per_process.values())

    def others(self, client_cpu: float) -> float:
        """CPU seconds taken by neither the server, its client nor the harness."""
        return max(0.0, self.machine_busy - self.server_cpu - client_cpu - self.harness)


class Probe:
    """Counts `processes`' CPU and page faults from `start()` to `stop()`, or
    over a `with` block (then `window` holds the count)."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self.processes = processes
        self.window: Window | None = None
        self._before: dict[int, tuple[float, int]] = {}
        self._machine = self._harness = self._started = 0.0

    def __enter__(self) -> Probe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.window = self.stop()

    def start(self) -> None:
        self._before = self._counters()
        self._machine, _ = cpu_seconds()
        self._harness = _own_cpu()
        self._started = time.monotonic()

    def stop(self) -> Window:
        seconds = time.monotonic() - self._started
        machine, _ = cpu_seconds()
        after = self._counters()
        per_process = {
            p.pid: (role(p), after[p.pid][0] - self._before[p.pid][0],
                    after[p.pid][1] - self._before[p.pid][1])
            for p in self.processes if p.pid in after and p.pid in self._before
        }  # fmt: skip
        return Window(seconds, per_process, machine - self._machine, _own_cpu() - self._harness)

    def _counters(self) -> dict[int, tuple[float, int]]:
        found = {}
        for process in self.processes:
            try:
                found[process.pid] = counters(process)
            except (OSError, psutil.Error):
                continue  # it exited: what it used is lost with it
        return found


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(cpu.describe(cpu.model(), cpu.vector_flags()), f"{psutil.cpu_count()} CPUs")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    weights, calibration = engines.prepared(work, IMAGES, args.model)
    with RedisServer() as redis_server:
        port = free_port()
        url = f"http://127.0.0.1:{port}/predict"
        command = engines.server_command(
            engines.EngineRow("openvino", "int8"), weights=weights, calibration=calibration,
            cache=work / "conversion-cache", redis_url=redis_server.url, batch_size=32,
            port=port, model=args.model,
        )  # fmt: skip
        command = [sys.executable, *command[1:], *args.server_args]
        log_path = work / "process-cpu-server.log"
        with serve.ServerProcess("keras-server", command, url, log_path, group=True,
                                 cwd=args.root) as server:  # fmt: skip
            server.start(timeout=300)
            engines.answered(url, IMAGES[0])
            engines.run_wrk(url, IMAGES, args.connections, min(10.0, args.seconds))
            assert server.process is not None and redis_server.child.pid is not None
            processes = server_processes(server.process.pid, [redis_server.child.pid])
            with Probe(processes) as probe:
                result = engines.run_wrk(url, IMAGES, args.connections, args.seconds)
            assert probe.window is not None
            window = probe.window
            resident = sum(p.memory_info().rss for p in processes if role(p) == "web")
    requests = max(result.requests, 1)
    print(
        f"{args.model}, {args.connections} connections: {result.throughput:.1f} images/s, "
        f"p50 {result.p50 * 1000:.0f} ms, {result.errors} errors"
    )
    print(f"{'process':<10} {'pid':>7} {'CPU ms/request':>15} {'page faults/request':>20}")
    for pid, (name, cpu_s, faults) in sorted(window.per_process.items()):
        if cpu_s * 1000 / requests >= 0.005 or faults / requests >= 0.05:
            print(
                f"{name:<10} {pid:>7} {cpu_s * 1000 / requests:>15.2f} {faults / requests:>20.1f}"
            )
    print(f"{'server':<10} {'':>7} {window.server_cpu * 1000 / requests:>15.2f}")
    print(f"{'wrk':<10} {'':>7} {result.client_cpu_seconds * 1000 / requests:>15.2f}")
    others = window.others(result.client_cpu_seconds)
    print(f"{'others':<10} {'':>7} {others * 1000 / requests:>15.2f}   (the rest of the machine)")
    print(f"web processes' resident memory after the load: {resident / 2**20:.0f} MB")
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
