"""What tracing costs: CPU per request with tracing off, on, and before it
existed, side by side in one run.

Each variant runs in a fresh child process, in turn, for --rounds rounds:

- before: the code of another tree (`--base`, e.g. `git archive` of the commit
  before tracing) with this tree's venv;
- off: this tree, no OTEL_* variable;
- on: this tree, sending every span over OTLP/HTTP to a receiver this
  process runs (it only counts what it gets);
- on-10%: the same, with one trace in ten sampled
  (OTEL_TRACES_SAMPLER=parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1).

The child builds the web app (`create_app`) and sends --requests uploads of a
small PNG through Flask's test client, one at a time, against a private
redis-server and a `--role worker --model sim` process that sleeps 0 ms. Web
CPU is the child's process time over those requests (the request thread,
Flask, decode, queueing, waiting, and, when on, the batch processor's thread
and its export, flushed before the clock stops); worker CPU is the worker
process's user + system time over the same requests. What granian does
before the app is the same in every variant and is not in the figure.
CPU time, not wall time: fine on a busy machine, though a loaded one still
makes every figure noisier; the median of the rounds is reported.

    python -m bench.tracing --base /tmp/keras-server-base --requests 300 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("before", "off", "on", "on-10%")
# The variables each variant adds (the receiver's endpoint is added to "on*").
SAMPLED_10 = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}


def child(redis_url: str, requests: int) -> dict[str, float]:
    """In the child: the per-request CPU of the web app and of the worker."""
    import psutil
    from PIL import Image

    from keras_server.settings import Settings
    from keras_server.web.app import create_app

    settings = Settings(
        redis_url=redis_url,
        redis_url_given=True,
        model="sim",
        queue_name=f"bench-{os.getpid()}",
        log_level="WARNING",
    )
    tracing = None
    try:
        from keras_server import tracing  # absent before tracing existed

        tracing.configure(settings, "web")
    except ImportError:
        pass
    worker = subprocess.Popen(
        [
            sys.executable, "run_keras_server.py", "--role", "worker", "--model", "sim",
            "--sim-batch-ms", "0", "--sim-image-ms", "0", "--log-level", "WARNING",
            "--redis-url", redis_url, "--queue-name", settings.queue_name,
        ],
        cwd=os.environ["BENCH_TREE"],
    )  # fmt: skip
    try:
        client = create_app(settings).test_client()
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 60)).save(buffer, "PNG")
        png = buffer.getvalue()

        def post() -> int:
            data = {"image": (io.BytesIO(png), "x.png")}
            return client.post(
                "/predict", data=data, content_type="multipart/form-data"
            ).status_code

        deadline = time.monotonic() + 120
        while post() != 200:  # until the worker's heartbeat is in
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("the worker did not start")
            time.sleep(0.2)
        for _ in range(50):  # warm-up
            post()
        handle = psutil.Process(worker.pid)
        worker_before = sum(handle.cpu_times()[:2])
        started = time.process_time()
        for _ in range(requests):
            assert post() == 200
        if tracing is not None:
            tracing.shutdown()  # the spans' export is part of the cost
        web = time.process_time() - started
        worker_cpu = sum(handle.cpu_times()[:2]) - worker_before
    finally:
        worker.terminate()
        worker.wait(30)
    # The worker's own spans go out at its exit; its figure counts their
    # making, not their export (a batch processor's thread sends them).
    return {"web_ms": web / requests * 1000, "worker_ms": worker_cpu / requests * 1000}


def helpers_off_us(calls: int = 100_000) -> float:
    """Microseconds per request of the calls a request makes into tracing
    while it is off (the web tier's four and the worker's, per image), alone
    in a loop: what "off" adds, too little for the variants above to show."""
    from keras_server import tracing

    assert not tracing.enabled()
    attributes = {tracing.MODEL: "m", tracing.IMAGES: 1}

    def request() -> None:
        with tracing.span("decode"):
            pass
        with tracing.span("enqueue", attributes, producer=True) as span:
            tracing.traceparent()
            span.set_attribute(tracing.SHARD, "s")
        with tracing.span("wait", {**attributes, tracing.SHARD: "s"}) as span:
            span.set_attribute(tracing.ANSWERED, 1)
        tracing.enabled()
        tracing.enabled()
        with tracing.batch_span([], None), tracing.span("forward", {tracing.BATCH_SIZE: 1}):
            pass
        with tracing.span("answer"):
            pass

    started = time.process_time()
    for _ in range(calls):
        request()
    return (time.process_time() - started) / calls * 1e6


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP endpoint that counts the export requests it gets."""

    posts = 0

    def __init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def run_variant(variant: str, base: Path, redis_url: str, endpoint: str, requests: int) -> Any:
    tree = base if variant == "before" else ROOT
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(PYTHONPATH=str(tree), BENCH_TREE=str(tree))
    if variant.startswith("on"):
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    if variant == "on-10%":
        env.update(SAMPLED_10)
    done = subprocess.run(
        [sys.executable, str(Path(__file__)), "--child", redis_url, str(requests)],
        cwd=tree, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{variant}: the child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        print(json.dumps(child(args[1], int(args[2]))))
        return 0
    from bench import cpu
    from keras_server.broker.redis_server import RedisServer

    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="the tree before tracing")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"which to run, in this order each round (default: {','.join(VARIANTS)})",
    )
    options = parser.parse_args(args)
    print("CPU:", cpu.describe(cpu.model(), cpu.vector_flags()))
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    variants = [v for v in options.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        parser.error(f"--variants: choose among {', '.join(VARIANTS)}")
    figures: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with RedisServer() as redis_server:
        for round_ in range(options.rounds):
            for variant in variants:
                result = run_variant(
                    variant, options.base, redis_server.url, endpoint, options.requests
                )
                figures[variant].append(result)
                print(f"round {round_ + 1} {variant:6s} web {result['web_ms']:.3f} ms/request, "
                      f"worker {result['worker_ms']:.3f} ms/request", flush=True)  # fmt: skip
    receiver.shutdown()
    print(f"\nmedian of {options.rounds} rounds of {options.requests} requests "
          f"(exports received: {receiver.posts})")  # fmt: skip
    print(f"{'variant':8s} {'web ms/request':>15s} {'worker ms/request':>18s}")
    summary = {}
    for variant in variants:
        web = statistics.median(r["web_ms"] for r in figures[variant])
        worker = statistics.median(r["worker_ms"] for r in figures[variant])
        summary[variant] = {"web_ms": round(web, 3), "worker_ms": round(worker, 3)}
        print(f"{variant:8s} {web:15.3f} {worker:18.3f}")
    helpers = helpers_off_us()
    print(f"\nthe tracing calls of one request alone, tracing off: {helpers:.2f} us")
    if options.json:
        options.json.write_text(
            json.dumps(
                {"rounds": figures, "median": summary, "helpers_off_us": round(helpers, 2)},
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
