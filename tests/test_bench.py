"""The benchmark harness's parts against real ones: Redis memory per queued
image, and the seed design served, driven and reported as `bench.run` does."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import redis
from conftest import IMAGES, system_tool, wait_until

from bench import engines, raw, redis_memory, report, serve
from bench.raw import sample_batch
from keras_server.broker.redis_server import RedisServer, free_port
from keras_server.engines import openvino_engine
from keras_server.engines.predictor import parallel_batches_for


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

    # The measurements other harnesses add below report.KEPT survive a rewrite.
    kept = f"{report.KEPT}\n\n## Scale-out\n\n| workers | req/s |\n"
    benchmarks.write_text(text + "\n" + kept)
    report.write(results, tmp_path / "results", benchmarks)
    again = benchmarks.read_text()
    assert again.endswith(kept) and again.count(report.KEPT) == 1
    assert again.startswith(text)


@pytest.mark.slow
def test_the_v2_benchmark_runs_and_reports(tmp_path: Path) -> None:
    """tritonclient.http.aio, tritonclient.grpc.aio and aiohttp against a real
    server, every request answered."""
    from bench import v2

    argv = ["--requests", "4", "--rounds", "2", "--warmup", "1", "--concurrency", "1,2"]
    argv += ["--out", str(tmp_path)]
    assert v2.main(argv) == 0
    saved = json.loads((tmp_path / "v2.json").read_text())
    levels = [(lv["system"], lv["concurrency"], lv["ok"]) for lv in saved["levels"]]
    assert levels == [(s, n, 4) for n in (1, 2) for s in v2.SYSTEMS]
    text = (tmp_path / "v2.md").read_text()
    assert "| v2 BYTES | 2 | 4 | 0 |" in text
    assert "| gRPC UINT8 | 2 | 4 | 0 |" in text
    assert "python -m bench.v2 --requests 4" in text


@pytest.fixture(scope="module")
def wrk() -> str:
    """wrk (Debian's package, installed before the tests by `make test`), as
    the engine table's load generator."""
    return system_tool("/usr/bin/wrk")


@pytest.mark.slow
def test_wrk_drives_a_server_and_the_engine_table_is_reported(
    wrk: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/predict"
    command = [sys.executable, "run_keras_server.py", "--model", "sim", "--port", str(port)]
    command += ["--redis-url", redis_server.url, "--queue-name", "test-wrk", "--batch-size", "4"]
    command += ["--sim-batch-ms", "5", "--sim-image-ms", "1"]
    images = sorted(IMAGES.glob("*.png"))
    with serve.ServerProcess("sim", command, url, tmp_path / "sim.log") as server:
        server.start(timeout=120)
        one = engines.run_wrk(url, images, 1, 2)
        many = engines.run_wrk(url, images, 4, 2)
        log = server.log_tail(100_000)
    assert one.errors == 0 and many.errors == 0
    assert one.requests > 5 and many.requests > 5
    assert 0 < one.p50 <= one.p99
    assert many.client_cpu_seconds > 0
    assert log.count("batch of") > 5, "the server answered them"

    row = engines.EngineRow("openvino", "int8", cold_start=60.0, warm_start=5.0)
    row.one, row.many = one, many
    row.raw = raw.RawResult("openvino int8", 4, 100.0, 0.04, 0.010, 0.012, 3, 10)
    row.fidelity = {"images": 12, "top1_agreement": 0.75, "max_probability_difference": 0.5}
    keras_row = engines.EngineRow("keras", "fp32", cold_start=9.0, warm_start=9.0)
    keras_row.one, keras_row.many, keras_row.raw = one, many, row.raw
    results = report.Results(command="x", mode="quick", batch_size=4, machine={"cpus": 2})
    results.engines = [keras_row, row, engines.EngineRow("openvino", "bf16", failure="no bf16")]
    table = report.markdown(results)
    assert "| openvino | int8 | 10 | 100.0 |" in table
    assert "| 60.0 | 5.0 | 75% | 0.5 |" in table
    assert "of a core | n/a |" in table, "other processes: not measured here"
    assert "**FAILED**: openvino bf16: no bf16" in table
    assert "| openvino int8 served at 32 clients ≥ 2.8x keras | 1.00x | **no** |" in table
    assert "| openvino int8: warm start ≤ 15 s | 5.0 s | yes |" in table
    saved = results.as_dict()["engines"][1]
    assert saved["many"]["throughput"] == pytest.approx(many.throughput)


SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_vnni
"""
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 fma
"""


def test_the_cpu_model_and_its_avx512_and_amx_flags_are_read_from_cpuinfo() -> None:
    from bench import cpu

    flags = cpu.vector_flags(SAPPHIRE_RAPIDS)
    assert flags == [
        "amx_bf16",
        "amx_int8",
        "amx_tile",
        "avx512_bf16",
        "avx512_vnni",
        "avx512bw",
        "avx512f",
    ]
    assert cpu.has_amx(flags)
    assert cpu.model(SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Platinum 8480+"
    assert "(AVX-512, AMX; flags: amx_bf16" in cpu.describe(cpu.model(SAPPHIRE_RAPIDS), flags)
    assert cpu.vector_flags(EPYC) == []
    assert cpu.describe("AMD EPYC", []) == "AMD EPYC (no AVX-512, no AMX; flags: none)"


def _engine_rows() -> list[engines.EngineRow]:
    wrk = engines.WrkResult(1, 10.0, 200, 0, 0.02, 0.03, 0.1)
    rows = []
    for engine, precision in engines.SYSTEMS:
        row = engines.EngineRow(engine, precision, cold_start=30.0, warm_start=2.0)
        row.one, row.many = wrk, wrk
        row.raw = raw.RawResult(f"{engine} {precision}", 32, 50.0, 0.6, 0.015, 0.02, 3, 10)
        rows.append(row)
    return rows


def test_the_engine_table_has_an_amx_column_when_the_cpu_has_amx() -> None:
    from bench import cpu

    amx = report.Results(
        command="x", mode="quick", batch_size=32,
        machine={"cpus": 2, "cpu_flags": cpu.vector_flags(SAPPHIRE_RAPIDS)},
    )  # fmt: skip
    amx.engines = _engine_rows()
    table = report.markdown(amx)
    assert "| other processes' CPU | AMX |" in table
    rows = {
        " ".join(cell.strip() for cell in line.split("|")[1:3]): line
        for line in table.splitlines()
        if "of a core" in line
    }
    assert rows["openvino int8"].endswith("| amx_int8 |")
    assert rows["openvino bf16"].endswith("| amx_bf16 |")
    assert rows["keras fp32"].endswith("| none (fp32) |")
    assert "This CPU has AMX (amx_bf16 amx_int8 amx_tile)" in table

    plain = report.Results(
        command="x", mode="quick", batch_size=32,
        machine={"cpus": 2, "cpu_flags": cpu.vector_flags(EPYC)},
    )  # fmt: skip
    plain.engines = _engine_rows()
    table = report.markdown(plain)
    assert "AMX" not in table
    header = next(line for line in table.splitlines() if line.startswith("| engine |"))
    rule = table.splitlines()[table.splitlines().index(header) + 1]
    assert header.count("|") == rule.count("|")


def test_benchmarks_md_names_the_cpu_flags_and_keeps_the_peers_section(tmp_path: Path) -> None:
    from bench import cpu

    benchmarks = tmp_path / "BENCHMARKS.md"
    peers = "**Peers**\n\n| system | img/s |\n|---|---:|\n| mosec | 1.0 |"
    benchmarks.write_text(report.replace_section("# Old\n\ntext\n", "peers", peers))
    assert report.get_section(benchmarks.read_text(), "peers") == peers
    results = report.Results(
        command="python -m bench.run", mode="full", batch_size=4,
        machine={"cpus": 2, "cpu": "Intel(R) Xeon(R) Platinum 8480+",
                 "cpu_flags": cpu.vector_flags(SAPPHIRE_RAPIDS)},
    )  # fmt: skip
    report.write(results, tmp_path / "results", benchmarks)
    text = benchmarks.read_text()
    assert "Intel(R) Xeon(R) Platinum 8480+ (AVX-512, AMX; flags: amx_bf16" in text
    assert "# Old" not in text, "bench.run rewrote the rest"
    assert report.get_section(text, "peers") == peers
    again = report.replace_section(text, "peers", "new table")
    assert report.get_section(again, "peers") == "new table"
    assert again.count("peers: begin") == 1


def test_the_peers_table_gives_medians_ratios_fractions_and_targets(tmp_path: Path) -> None:
    """The peers harness's table and files, from made-up measurements (no peer
    server, wrk or model needed): medians over the counted rounds, a run and a
    limit with too much CPU time stolen left out and named, each row's
    fraction of its round's limit with its own decode."""
    from bench import cpu
    from bench.limit import Limit
    from bench.peers import run as peers
    from bench.peers.table import Measured, PeerResults

    def wrk(throughput: float, p50_ms: float) -> engines.WrkResult:
        return engines.WrkResult(32, 10.0, round(throughput * 10), 0, p50_ms / 1e3, 0.05, 0.1)

    results = PeerResults(
        command="python -m bench.peers --quick", mode="quick", batch_size=32, wait_ms=10,
        machine={"cpu": "Intel(R) Xeon(R) Platinum 8480+", "cpus": 2, "others_cpu_share": 0.3,
                 "cpu_flags": cpu.vector_flags(SAPPHIRE_RAPIDS)},
        model="resnet50", engine="openvino", precision="int8",
        raw=raw.RawResult("openvino int8", 32, 150.0, 0.2, 0.010, 0.015, 5, 30),
    )  # fmt: skip
    for round_, (ours, mosec, lit) in enumerate(((90, 100, 80), (88, 110, 78), (86, 102, 77)), 1):
        results.runs += [
            Measured(
                "keras-server", round_, wrk(1, 19.0 + round_), wrk(ours, 300),
                server_cpu_seconds=ours * 10 * 0.011, stolen=0.001,
            ),
            Measured(
                "mosec", round_, wrk(1, 24.0), wrk(mosec, 300), decode="pillow",
                server_cpu_seconds=mosec * 10 * 0.013,
            ),
            # LitServe's third round lost 2.5 % of the CPU time to the host.
            Measured(
                "litserve", round_, wrk(1, 20.0), wrk(lit, 300), decode="pillow",
                stolen=0.025 if round_ == 3 else 0.0,
            ),
        ]  # fmt: skip
        # 2 cores over 10 + 6 + 2 ms (load_image) or 10 + 8 + 2 ms (plain
        # Pillow) a image: 111.1 and 100 images/s; round 2's limit is discarded.
        results.limits.append(
            Limit(
                round=round_, cores=2, served={32: 10, 16: 2},
                engine_cpu_per_batch={32: 0.32, 16: 0.16},
                decode_cpu={"load_image": 0.006, "pillow": 0.008}, client_cpu=0.002,
                stolen=0.03 if round_ == 2 else 0.0,
            )
        )  # fmt: skip
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\nthe engine table\n")
    text = peers.write(results, tmp_path / "results", benchmarks)
    assert "Intel(R) Xeon(R) Platinum 8480+ (AVX-512, AMX; flags: amx_bf16" in text
    # Server CPU per image answered, median over rounds, beside wrk's own; the
    # fraction from rounds 1 and 3 (90 and 86 over 111.1).
    assert (
        "| keras-server | 88.0 | 86.0 to 90.0 | 0.79 | 1.00x | 21.0 | 50.0 | 5.0 | 11.0 | 0.1 "
        "| 3 | 0 |" in text
    )
    assert (
        "| mosec (plain Pillow) | 102.0 | 100.0 to 110.0 | 1.01 | 0.86x | 24.0 | 50.0 | 8.0 | 13.0 "
        "| 0.1 | 3 | 0 |" in text
    )
    assert (
        "| litserve (plain Pillow) | 79.0 | 78.0 to 80.0 | 0.80 | 1.11x | 20.0 | 50.0 | 4.0 | n/a "
        "| 0.1 | 2 | 0 |" in text
    )
    assert (
        "**Discarded** (over 2% of the CPU time stolen by the host): litserve (plain Pillow) "
        in (text)
    )
    assert "round 3 (2.5%), the limit of round 2 (3.0%)" in text
    assert "| 1 | 10x32, 2x16 (29.3) | 10.0 | 8.0 | 6.0 | 2.0 | 2 | 100.0 | 111.1 | 0.0% |" in text
    assert "| 2 (discarded) |" in text
    assert "| median | | 10.0 | 8.0 | 6.0 | 2.0 | 2 | 100.0 | 111.1 | |" in text
    assert "| images/s at 32 clients ≥ 0.9 of the limit | 0.79 | **no** |" in text
    assert "| images/s at 32 clients ≥ 1.25x mosec (plain Pillow)'s | 0.86x | **no** |" in text
    assert "| p50 at 1 client ≤ engine batch 1 + decode + 3 ms | +5.0 ms | **no** |" in text
    assert "| p50 at 1 client below litserve (plain Pillow)'s | 21.0 vs 20.0 ms | **no** |" in text
    assert "| p50 at 1 client below mosec (plain Pillow)'s | 21.0 vs 24.0 ms | yes |" in text
    assert "Busy machine" in text and "Quick mode" in text
    assert "each peer decodes with plain Pillow as its users would write it" in text
    written = benchmarks.read_text()
    assert written.startswith("# Benchmarks\n\nthe engine table\n")
    assert report.get_section(written, "peers") == text.strip("\n")
    saved = json.loads((tmp_path / "results" / "peers.json").read_text())
    assert [r["system"] for r in saved["runs"][:3]] == ["keras-server", "mosec", "litserve"]
    assert saved["runs"][1]["many"]["throughput"] == pytest.approx(100.0)
    assert saved["limits"][0]["limits"]["load_image"] == pytest.approx(2 / 0.018)
    assert saved["limits"][0]["engine_cpu"] == pytest.approx(0.01)
    # A second run rewrites the section in place.
    peers.write(results, tmp_path / "results", benchmarks)
    assert benchmarks.read_text() == written
    # Another network has its own section and files, beside ResNet50's.
    results.model = "mobilenet_v2"
    small = peers.write(results, tmp_path / "results", benchmarks)
    assert "MobileNetV2 with random weights" in small
    assert report.get_section(benchmarks.read_text(), "peers") == text.strip("\n")
    assert report.get_section(benchmarks.read_text(), "peers-mobilenet_v2") == small.strip("\n")
    assert (tmp_path / "results" / "peers-mobilenet_v2.json").exists()


def test_the_headline_tables_time_the_default_engine() -> None:
    """bench.run's raw and served tables include openvino, what --engine
    auto serves on a CPU, beside keras and onnx."""
    from bench import run

    full = run.parse_args([])
    assert full.engines == ["keras", "onnx", "openvino"]
    assert full.serve_engines == full.engines
    assert run.parse_args(["--engines", "openvino"]).engines == ["openvino"]
    with pytest.raises(SystemExit):
        run.parse_args(["--engines", "tensorrt"])


def test_bench_run_refuses_an_out_folder_its_page_cannot_link(tmp_path: Path) -> None:
    """Refused before the run, not after it when BENCHMARKS.md links the plot."""
    from bench import run

    with pytest.raises(SystemExit):
        run.parse_args(["--out", str(tmp_path)])
    assert run.parse_args(["--out", str(tmp_path), "--benchmarks-md", "-"]).out == tmp_path
    page = tmp_path / "page.md"
    assert run.parse_args(["--out", str(tmp_path / "r"), "--benchmarks-md", str(page)])


def test_steal_is_read_from_proc_stat_and_decides_what_is_discarded() -> None:
    from bench import limit

    before = limit.Ticks.parse("cpu  100 5 50 800 10 1 2 30 7 0\ncpu0 1 2 3\n")
    after = limit.Ticks.parse("cpu  150 5 70 900 10 1 2 62 7 0\n")
    # 998 ticks then 1,200 (guest is inside user already): 32 of the 202 stolen.
    assert (before.total, before.steal, after.total) == (998, 30, 1200)
    assert limit.stolen_share(before, after) == pytest.approx(32 / 202)
    assert limit.Ticks.parse("cpu  10 0 10 80\n").steal == 0, "a kernel without the column"
    assert math.isnan(limit.stolen_share(after, after))
    assert limit.discarded(0.021) and not limit.discarded(0.02)
    assert not limit.discarded(math.nan), "unknown is kept"
    with pytest.raises(ValueError, match="not /proc/stat's cpu line"):
        limit.Ticks.parse("intr 1 2 3\n")
    real = limit.Ticks.read()
    assert real.total > 0 and 0 <= real.steal <= real.total
    with limit.Stolen() as stolen:
        sum(range(100_000))
    assert math.isnan(stolen.share) or 0 <= stolen.share <= 1


def test_the_limit_weighs_each_batch_size_by_its_images_and_keeps_wrk_out() -> None:
    from bench import limit

    # 10 passes of 32 at 0.32 s and 2 of 16 at 0.24 s: (3.2 + 0.48) / 352 images.
    per_image = limit.per_image({32: 0.32, 16: 0.24, 8: 9.9}, {32: 10, 16: 2})
    assert per_image == pytest.approx(3.68 / 352)
    assert math.isnan(limit.per_image({}, {}))
    # 2 cores over 10 + 6 ms: 125 images/s; wrk's 4 ms per image at that rate
    # takes 0.4 of a core, leaving 1.6 cores: 100 images/s.
    assert limit.limit(2, 0.010, 0.006, math.nan) == pytest.approx(125)
    rate = limit.limit(2, 0.010, 0.006, 0.004)
    assert rate == pytest.approx(100)
    assert rate == pytest.approx((2 - rate * 0.004) / 0.016)
    assert limit.median([3.0, math.nan, 1.0, 2.0]) == 2.0
    assert math.isnan(limit.median([math.nan]))
    found = limit.Limit(
        round=1, cores=2, served={}, engine_cpu_per_batch={32: 0.32},
        decode_cpu={"load_image": 0.006}, client_cpu=0.004, assumed_batch=32,
    )  # fmt: skip
    assert (found.engine_cpu, found.mean_batch) == (pytest.approx(0.01), 32)
    assert found.images_per_second("load_image") == pytest.approx(100)


def test_the_served_batch_sizes_are_read_from_the_workers_own_log(
    redis_server: RedisServer,
) -> None:
    """The limit's batch sizes come from the lines a real worker logs, in the
    server's log format."""
    import io
    import logging
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from conftest import CHELSEA, post_images

    from bench import limit
    from keras_server import logs
    from keras_server.engines.simulated import SimulatedModel
    from keras_server.settings import Settings
    from keras_server.web.app import create_app
    from keras_server.worker.loop import serve as serve_workers
    from keras_server.worker.main import make_workers

    settings = Settings(
        redis_url=redis_server.url, redis_url_given=True, queue_name="limit-log", batch_size=4
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RequestIdFilter())
    handler.setFormatter(logging.Formatter(logs.FORMAT))
    worker_log = logging.getLogger("keras_server.worker.loop")
    worker_log.addHandler(handler)
    old_level = worker_log.level
    worker_log.setLevel(logging.INFO)
    stop = threading.Event()
    serving = threading.Thread(
        target=serve_workers, args=(make_workers(settings, SimulatedModel(20, 0)), stop)
    )
    serving.start()
    try:
        client = create_app(settings).test_client()
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: post_images(client, CHELSEA), range(6)))
    finally:
        stop.set()
        serving.join(10)
        worker_log.removeHandler(handler)
        worker_log.setLevel(old_level)
    assert [a.status_code for a in answers] == [200] * 6
    served = limit.served_batches(stream.getvalue() + "batch of 99 in 1 ms: not the worker\n")
    assert sum(size * n for size, n in served.items()) == 6, stream.getvalue()
    assert max(served) <= 4


def test_the_decode_and_the_graph_are_timed_in_cpu_seconds() -> None:
    from bench import limit
    from keras_server.engines.simulated import SimulatedModel

    samples = [p.read_bytes() for p in sorted(IMAGES.glob("*.*g"))]
    pillow = limit.decode_cpu(lambda data: limit.plain_pillow(data, (224, 224)), samples, 2)
    assert 0 < pillow < 1
    assert limit.plain_pillow(samples[0], (224, 224)).shape == (224, 224, 3)
    # The simulated model sleeps: wall time, next to no CPU time.
    model = SimulatedModel(50, 0)
    batch = np.zeros((4, *model.input_shape), dtype=np.uint8)
    per_batch = limit.engine_cpu(model, batch, [4, 1, 4])
    assert sorted(per_batch) == [1, 4]
    assert all(0 <= cpu < 0.04 for cpu in per_batch.values()), per_batch


def test_the_streams_benchmark_times_cpu_and_wall_and_tables_the_medians() -> None:
    """bench.streams's timing and table, on the simulated model (it sleeps:
    wall time passes, next to no CPU time is spent)."""
    from bench import streams
    from keras_server.engines.simulated import SimulatedModel

    model = SimulatedModel(20, 0)
    batch = np.zeros((4, *model.input_shape), dtype=np.uint8)
    cpu_s, rate = streams.timed(model, batch, 0.05)
    assert 0 <= cpu_s < 0.004 and 0 < rate <= 4 / 0.02
    args = streams.parse_args(["--streams", "1", "2", "--batch-sizes", "1", "8", "--rounds", "2"])
    rows = [
        {"round": r, "streams": s, "batch": b, "cpu_ms_per_image": cpu, "images_per_s": rate}
        for r, s, b, cpu, rate in [
            (1, 1, 1, 10.0, 90.0), (2, 1, 1, 12.0, 80.0), (1, 2, 1, 11.0, 60.0),
            (2, 2, 1, 13.0, 50.0), (1, 1, 8, 9.0, 100.0), (1, 2, 8, 7.0, 120.0),
        ]
    ]  # fmt: skip
    text = streams.markdown(rows, args)
    assert "medians of 2 rounds (of 2;" in text
    assert "| 1 | 11.00 | 85.0 | 12.00 | 55.0 |" in text
    assert "| 8 | 9.00 | 100.0 | 7.00 | 120.0 |" in text
    with pytest.raises(SystemExit):
        streams.parse_args(["--streams", "0"])


def test_the_peers_command_line() -> None:
    from bench.peers import graph
    from bench.peers import run as peers

    quick = peers.parse_args(["--quick", "--systems", "keras-server,mosec"])
    assert (quick.rounds, quick.seconds, quick.systems) == (2, 6.0, ["keras-server", "mosec"])
    full = peers.parse_args([])
    assert (full.rounds, full.seconds, full.precision) == (3, 20.0, "int8")
    assert (full.model, peers.parse_args(["--model", "mobilenet_v2"]).model) == (
        "resnet50", "mobilenet_v2",
    )  # fmt: skip
    assert full.systems == ["keras-server", "mosec", "litserve"]
    # The server's defaults: resolved once, for every system alike.
    batches = parallel_batches_for(0, "openvino")
    auto = openvino_engine.streams_for(0, parallel_batches=batches)
    assert (full.peer_decodes, full.streams, full.parallel_batches) == (
        ["pillow", "load_image"], auto, batches,
    )  # fmt: skip
    # The peers load the graph as their users would: one LATENCY stream.
    assert full.peer_streams == 1
    chosen = peers.parse_args(["--peer-decodes", "pillow", "--streams", "2"])
    assert (chosen.peer_decodes, chosen.streams) == (["pillow"], 2)
    assert peers.run_order(full.systems, full.peer_decodes) == [
        ("keras-server", "load_image"), ("mosec", "pillow"), ("litserve", "pillow"),
        ("mosec", "load_image"), ("litserve", "load_image"),
    ]  # fmt: skip
    config = graph.PeerConfig(
        "resnet50", "w.h5", "calibration", "cache", "openvino", "int8", 32, 10, streams=2,
        parallel_batches=3,
    )  # fmt: skip
    ours = peers.start_command("keras-server", config, "r", 1)
    assert ours[ours.index("--openvino-streams") + 1] == "2"
    assert ours[ours.index("--parallel-batches") + 1] == "3"
    peer = peers.start_command("mosec", config, "r", 1)
    assert "BENCH_PEER_STREAMS=1" in peer and "BENCH_PEER_PEER_STREAMS=1" in peer
    assert "BENCH_PEER_PARALLEL_BATCHES=1" in peer
    bad_args = (
        ["--systems", "triton"], ["--peer-decodes", "cv2"], ["--streams", "-1"],
        ["--parallel-batches", "-1"],
    )  # fmt: skip
    for bad in (*bad_args, ["--peer-streams", "-1"]):
        with pytest.raises(SystemExit):
            peers.parse_args(bad)


def test_the_peers_decode_as_their_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """BENCH_PEER_DECODE picks plain Pillow (the default) or load_image; a
    file Pillow cannot read is an ImageError, which each peer answers 400."""
    import dataclasses

    from bench.limit import plain_pillow
    from bench.peers import graph
    from keras_server.images import ImageError, load_image

    config = graph.PeerConfig(
        "resnet50", "w.h5", "calibration", "cache", "openvino", "int8", 32, 10,
        decode="load_image", streams=2,
    )  # fmt: skip
    for name, value in config.to_env().items():
        monkeypatch.setenv(name, value)
    assert graph.PeerConfig.from_env() == config
    photo = (IMAGES / "rocket.jpg").read_bytes()
    np.testing.assert_array_equal(
        graph.decode(photo, config), load_image(photo, (224, 224), graph.MAX_IMAGE_PIXELS)
    )
    pillow = dataclasses.replace(config, decode="pillow")
    np.testing.assert_array_equal(graph.decode(photo, pillow), plain_pillow(photo, (224, 224)))
    for which in (config, pillow):
        with pytest.raises(ImageError):
            graph.decode(b"not an image", which)


def test_the_mosec_decode_stage_reads_the_upload_wrk_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mosec hands its first stage the bare body: the boundary comes from it;
    it decodes to the size of the network the harness names (InceptionV3's
    299x299 here)."""
    pytest.importorskip("mosec", reason="mosec is installed by python -m bench.peers")
    from mosec import ValidationError

    from bench.peers.graph import PeerConfig
    from bench.peers.mosec_server import Decode, image_field

    config = PeerConfig("inception_v3", "w.h5", "calibration", "cache", "openvino", "int8", 32, 10)
    for name, value in config.to_env().items():
        monkeypatch.setenv(name, value)

    photo = (IMAGES / "rocket.jpg").read_bytes()
    boundary = b"keras-server-bench-boundary"  # bench/multipart.lua's
    body = b"--" + boundary + b"\r\n"
    body += b'Content-Disposition: form-data; name="image"; filename="rocket.jpg"\r\n'
    body += b"Content-Type: application/octet-stream\r\n\r\n" + photo + b"\r\n--"
    body += boundary + b"--\r\n"
    assert image_field(body) == photo
    assert Decode().forward(image_field(body)).shape == (299, 299, 3)
    with pytest.raises(ValidationError):
        image_field(b'{"image": "not multipart"}')
    with pytest.raises(ValidationError):
        Decode().forward(b"not an image")


def test_a_grouped_server_leaves_no_process_behind(tmp_path: Path) -> None:
    """LitServe's workers outlive its SIGTERM: with `group`, whatever the
    server started is gone once it stopped."""
    port = free_port()
    pid_file = tmp_path / "left.pid"
    script = f"sleep 600 & echo $! > {pid_file}; exec {sys.executable} -m http.server {port}"
    url = f"http://127.0.0.1:{port}/"
    server = serve.ServerProcess(
        "left", ["bash", "-c", script], url, tmp_path / "s.log", group=True
    )
    with server:
        server.start(timeout=60)
        left = int(pid_file.read_text())
        assert os.getpgid(left) == server.child.pid, "in the server's own process group"
    deadline = time.monotonic() + 10
    while Path(f"/proc/{left}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the killed sleep is reaped by init
    assert not Path(f"/proc/{left}").exists(), "the server's own child outlived it"


@pytest.mark.slow
def test_the_job_latency_benchmark_runs_a_job_beside_a_client(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bench.job_latency against a real server: a job alone, then one client
    idle and during a job, a row per think time."""
    from bench import job_latency

    argv = ["--requests", "3", "--job-images", "100", "--alone-images", "10"]
    assert job_latency.main([*argv, "--think-ms", "0,20"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| client think (ms) | idle p50 (ms)")
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| 0", "| 20"]
    for row in rows[1:]:
        assert "x |" in row  # the ratio


def test_the_cpu_probe_counts_a_servers_processes_orphans_included() -> None:
    """bench.process_cpu: a server in a session of its own whose busy child
    outlives it (as LitServe's workers do) still has that child's CPU counted."""
    from bench import process_cpu

    spin = "import time; end = time.monotonic() + 20\nwhile time.monotonic() < end: pass"
    leave_behind = (
        "import subprocess, sys; "
        f"subprocess.Popen([sys.executable, '-c', {spin!r}], start_new_session=False)"
    )
    leader = subprocess.Popen([sys.executable, "-c", leave_behind], start_new_session=True)
    leader.wait(10)  # gone: its spinning child is init's now
    processes = []
    try:
        processes = wait_until(lambda: process_cpu.server_processes(leader.pid), 5)
        assert all(p.pid != leader.pid for p in processes)
        with process_cpu.Probe(processes) as probe:
            time.sleep(0.5)  # the window measured: long enough for the spinner to be scheduled
        assert probe.window is not None
        # Counted at all (however little a busy machine gave it): it is init's child now.
        assert probe.window.server_cpu > 0
        assert probe.window.others(client_cpu=0.0) >= 0.0
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        psutil.wait_procs(processes, timeout=5)  # gone before the test ends


@pytest.mark.slow
def test_the_explain_benchmark_measures_engine_time_and_level2_latency(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bench.explain against a real server (the simulated model): both tables."""
    from bench import explain

    argv = ["--grid", "2", "--repeats", "1", "--clients", "1", "--explainers", "1"]
    assert explain.main([*argv, "--seconds", "1", "--settle", "0.3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| engine | images per explanation")
    assert rows[1].startswith("| sim fp32 | 5 | 16 |")
    assert rows[1].endswith("| n/a |")
    assert rows[2].startswith("| level-2 p50 alone (ms)")
    assert "x |" in rows[3] and "errors" not in rows[3]
