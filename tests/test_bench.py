"""The benchmark harness's parts against real ones: Redis memory per queued
image, and the seed design served, driven and reported as `bench.run` does."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from conftest import IMAGES, apt_install, wait_until

from bench import engines, raw, redis_memory, report, serve
from bench.raw import sample_batch
from keras_server.broker.redis_server import RedisServer, free_port


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
    """wrk, installed from Debian's package when missing (as root), as the
    engine table's load generator."""
    return shutil.which("wrk") or apt_install("wrk", "/usr/bin/wrk", "--no-install-recommends")


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


def test_the_peers_table_gives_medians_ratios_and_targets(tmp_path: Path) -> None:
    """The peers harness's table and files, from made-up measurements (no peer
    server, wrk or model needed)."""
    from bench import cpu
    from bench.peers import run as peers
    from bench.peers.table import Measured, PeerResults

    def wrk(throughput: float, p50_ms: float) -> engines.WrkResult:
        return engines.WrkResult(32, 10.0, round(throughput * 10), 0, p50_ms / 1e3, 0.05, 0.1)

    results = PeerResults(
        command="python -m bench.peers --quick", mode="quick", batch_size=32, wait_ms=10,
        machine={"cpu": "Intel(R) Xeon(R) Platinum 8480+", "cpus": 2, "others_cpu_share": 0.3,
                 "cpu_flags": cpu.vector_flags(SAPPHIRE_RAPIDS)},
        model="resnet50", engine="openvino", precision="int8",
        raw=raw.RawResult("openvino int8", 32, 150.0, 0.2, 0.012, 0.015, 5, 30),
    )  # fmt: skip
    for round_, (ours, mosec, lit) in enumerate(((90, 100, 80), (88, 110, 78), (86, 102, 77)), 1):
        results.runs += [
            Measured(
                "keras-server",
                round_,
                wrk(1, 19.0 + round_),
                wrk(ours, 300),
                server_cpu_seconds=ours * 10 * 0.011,
            ),
            Measured(
                "mosec",
                round_,
                wrk(1, 24.0),
                wrk(mosec, 300),
                server_cpu_seconds=mosec * 10 * 0.013,
            ),
            Measured("litserve", round_, wrk(1, 20.0), wrk(lit, 300)),
        ]
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\nthe engine table\n")
    text = peers.write(results, tmp_path / "results", benchmarks)
    assert "Intel(R) Xeon(R) Platinum 8480+ (AVX-512, AMX; flags: amx_bf16" in text
    # Server CPU per image answered, median over rounds, beside wrk's own.
    assert (
        "| keras-server | 88.0 | 86.0 to 90.0 | 21.0 | 50.0 | 9.0 | 1.00x | 11.0 | 0.1 | 3 | 0 |"
        in text
    )
    assert (
        "| mosec | 102.0 | 100.0 to 110.0 | 24.0 | 50.0 | 12.0 | 0.86x | 13.0 | 0.1 | 3 | 0 |"
        in text
    )
    assert (
        "| litserve | 78.0 | 77.0 to 80.0 | 20.0 | 50.0 | 8.0 | 1.13x | n/a | 0.1 | 3 | 0 |" in text
    )
    assert "| images/s at 32 clients ≥ 1.25x mosec's | 0.86x | **no** |" in text
    assert "| p50 at 1 client ≤ engine batch 1 + 8 ms | +9.0 ms | **no** |" in text
    assert "| p50 at 1 client below litserve's | 21.0 vs 20.0 ms | **no** |" in text
    assert "| p50 at 1 client below mosec's | 21.0 vs 24.0 ms | yes |" in text
    assert "Busy machine" in text and "Quick mode" in text
    written = benchmarks.read_text()
    assert written.startswith("# Benchmarks\n\nthe engine table\n")
    assert report.get_section(written, "peers") == text.strip("\n")
    saved = json.loads((tmp_path / "results" / "peers.json").read_text())
    assert [r["system"] for r in saved["runs"][:3]] == ["keras-server", "mosec", "litserve"]
    assert saved["runs"][1]["many"]["throughput"] == pytest.approx(100.0)
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


def test_the_peers_command_line() -> None:
    from bench.peers import run as peers

    quick = peers.parse_args(["--quick", "--systems", "keras-server,mosec"])
    assert (quick.rounds, quick.seconds, quick.systems) == (2, 6.0, ["keras-server", "mosec"])
    full = peers.parse_args([])
    assert (full.rounds, full.seconds, full.precision) == (3, 20.0, "int8")
    assert (full.model, peers.parse_args(["--model", "mobilenet_v2"]).model) == (
        "resnet50", "mobilenet_v2",
    )  # fmt: skip
    assert full.systems == ["keras-server", "mosec", "litserve"]
    with pytest.raises(SystemExit):
        peers.parse_args(["--systems", "triton"])


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
