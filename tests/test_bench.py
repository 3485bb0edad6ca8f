"""The benchmark harness's parts against real ones: Redis memory per queued
image, and the seed design served, driven and reported as `bench.run` does."""

import json
import sys
from pathlib import Path

import pytest
import redis
from conftest import IMAGES

from bench import redis_memory, report, serve
from bench.raw import sample_batch
from keras_server.redis_launcher import RedisServer, free_port


def test_a_queued_image_costs_at_most_160_kib(redis_client: redis.Redis) -> None:
    image = sample_batch([IMAGES / "chelsea.png"], 1)[0]
    ours = redis_memory.measure(redis_client, "ours", redis_memory.ours, image, count=20)
    assert ours.message_bytes < 150_528 + 200
    # The pixels fill jemalloc's 160 KiB size class; each list node adds 32 bytes.
    # Base64 (the format before) took the 224 KiB class.
    assert ours.memory_usage < redis_memory.TARGET_BYTES + 1024
    assert redis_client.dbsize() == 0, "the scratch list is removed"


@pytest.mark.slow
def test_the_seed_design_costs_four_times_more(redis_client: redis.Redis) -> None:
    image = sample_batch([IMAGES / "chelsea.png"], 1)[0]
    ours = redis_memory.measure(redis_client, "ours", redis_memory.ours, image, count=10)
    seed = redis_memory.measure(
        redis_client, "seed", redis_memory.seed(IMAGES / "chelsea.png"), image, count=10
    )
    assert seed.message_bytes > 800_000  # base64 of 224 x 224 x 3 float32
    assert seed.memory_usage > 4 * ours.memory_usage


@pytest.mark.slow
def test_seed_server_is_driven_and_reported(redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/predict"
    command = [sys.executable, "-m", "bench.seed_server", "--port", str(port)]
    command += ["--redis-url", redis_server.url, "--queue-name", "test-seed", "--batch-size", "4"]
    results = report.Results(
        command="python -m bench.run --test", mode="quick", batch_size=4, machine={"cpus": 2}
    )
    with serve.ServerProcess("seed", command, url, tmp_path / "seed.log") as server:
        server.start(timeout=120)
        images = [str(p) for p in sorted(IMAGES.glob("*.png"))]
        for concurrency in (1, 3):
            level = serve.drive(
                report.SEED, url, images,
                concurrency=concurrency, requests_count=6, max_seconds=60, warmup=2,
            )  # fmt: skip
            results.levels.append(level)
        log = server.log_tail()
    assert "* Batch size" in log
    assert [lv.ok for lv in results.levels] == [6, 6]
    assert all(lv.p50 <= lv.p99 for lv in results.levels)

    benchmarks = tmp_path / "BENCHMARKS.md"
    table = report.write(results, tmp_path / "results", benchmarks)
    assert f"| {report.SEED} | 3 | 6 |" in table
    assert (tmp_path / "results" / "benchmark.png").read_bytes().startswith(b"\x89PNG")
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert [lv["concurrency"] for lv in saved["levels"]] == [1, 3]
    text = benchmarks.read_text()
    assert "```bash\npython -m bench.run --test\n```" in text
    assert "Quick mode" in text
    assert "](results/benchmark.png)" in text


@pytest.mark.slow
def test_the_v2_benchmark_runs_and_reports(tmp_path: Path) -> None:
    """tritonclient.http.aio and aiohttp against a real server, every request answered."""
    from bench import v2

    argv = ["--requests", "4", "--rounds", "2", "--warmup", "1", "--concurrency", "1,2"]
    argv += ["--out", str(tmp_path)]
    assert v2.main(argv) == 0
    saved = json.loads((tmp_path / "v2.json").read_text())
    levels = [(lv["system"], lv["concurrency"], lv["ok"]) for lv in saved["levels"]]
    assert levels == [(s, n, 4) for n in (1, 2) for s in v2.SYSTEMS]
    text = (tmp_path / "v2.md").read_text()
    assert "| v2 BYTES | 2 | 4 | 0 |" in text
    assert "python -m bench.v2 --requests 4" in text
