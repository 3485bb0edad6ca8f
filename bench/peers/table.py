"""The peers table: what BENCHMARKS.md's peers section and bench/results/peers.md say.

Nothing here measures; every number comes from the `PeerResults` of one run.
Each system is measured in several interleaved rounds; the table gives the
median of the rounds, and the range where there were several.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import cpu
from bench.engines import MODEL, WrkResult
from bench.raw import RawResult
from bench.report import BUSY_SHARE
from keras_server.catalog import BUILTINS

OURS = "keras-server"
PEERS = ("mosec", "litserve")
SYSTEMS = (OURS, *PEERS)
# Issue 23's targets for keras-server against the peers.
THROUGHPUT_BAR = 1.25  # images/s at 32 clients, over each peer's
ADDED_LATENCY_BAR = 0.008  # 1-client p50 over the engine's batch-1 forward pass, seconds


@dataclass(frozen=True)
class Measured:
    """One system in one round: wrk at 1 connection, then at 32."""

    system: str
    round: int
    one: WrkResult
    many: WrkResult
    start_seconds: float = math.nan
    # Over the measured 32-connection run (bench.process_cpu.Probe): the
    # system's processes' CPU, what other processes took, and its wall time.
    server_cpu_seconds: float = math.nan
    others_cpu_seconds: float = math.nan
    window_seconds: float = math.nan

    def per_image(self, seconds: float) -> float:
        """`seconds` (of CPU, over the 32-connection run) per image answered in it."""
        answered = self.many.requests - self.many.errors
        return seconds / answered if answered > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("one", "many"):
            data[key]["throughput"] = getattr(self, key).throughput
        return data


@dataclass
class PeerResults:
    command: str
    mode: str
    machine: dict[str, Any]
    model: str
    engine: str
    precision: str
    batch_size: int
    wait_ms: float
    raw: RawResult | None = None
    runs: list[Measured] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The section and file name: `peers` for ResNet50, `peers-MODEL` otherwise,
        so a run on one network leaves the others' tables be."""
        return "peers" if self.model == MODEL else f"peers-{self.model}"

    def of(self, system: str) -> list[Measured]:
        return [m for m in self.runs if m.system == system]

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "mode": self.mode,
            "machine": self.machine,
            "engine": self.engine,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "wait_ms": self.wait_ms,
            "raw": self.raw.as_dict() if self.raw else None,
            "runs": [m.as_dict() for m in self.runs],
            "failures": self.failures,
        }


@dataclass(frozen=True)
class Summary:
    """A system's medians over its rounds."""

    system: str
    rounds: int
    throughput: float  # images/s at 32 clients
    throughput_range: tuple[float, float]
    p50: float  # 1 client, seconds
    p99: float
    errors: int  # over every counted wrk run
    server_cpu: float  # seconds per image at 32 clients
    client_cpu: float  # wrk's, the same

    @classmethod
    def of(cls, system: str, runs: list[Measured]) -> Summary:
        many = [m.many.throughput for m in runs]
        return cls(
            system=system,
            rounds=len(runs),
            throughput=statistics.median(many),
            throughput_range=(min(many), max(many)),
            p50=statistics.median(m.one.p50 for m in runs),
            p99=statistics.median(m.one.p99 for m in runs),
            errors=sum(m.one.errors + m.many.errors for m in runs),
            server_cpu=statistics.median(m.per_image(m.server_cpu_seconds) for m in runs),
            client_cpu=statistics.median(m.per_image(m.many.client_cpu_seconds) for m in runs),
        )


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def summaries(results: PeerResults) -> dict[str, Summary]:
    return {s: Summary.of(s, results.of(s)) for s in SYSTEMS if results.of(s)}


def markdown(results: PeerResults) -> str:
    m = results.machine
    found = summaries(results)
    ours = found.get(OURS)
    flags = list(m.get("cpu_flags", []))
    lines = [
        f"**keras-server beside mosec and LitServe** ({results.mode} run, "
        f"{m.get('date', '?')}): {cpu.describe(str(m.get('cpu', '?')), flags)}, "
        f"{m.get('cpus', '?')} CPUs; {BUILTINS[results.model].constructor} with random "
        "weights, the same OpenVINO "
        f"{results.precision} graph from the conversion cache in all three; batches of up to "
        f"{results.batch_size}. Produced by",
        "",
        "```bash",
        results.command,
        "```",
        "",
    ]
    others = float(m.get("others_cpu_share", math.nan))
    if results.mode == "quick":
        lines += ["> **Quick mode**: short wrk runs; not numbers to quote.", ""]
    if others > BUSY_SHARE:
        lines += [
            f"> **Busy machine**: other processes used {others:.0%} of the CPU time during "
            "the run, so these numbers are noisy.",
            "",
        ]
    lines += [f"**FAILED**: {failure}" for failure in results.failures]
    if results.failures:
        lines.append("")
    raw = results.raw
    lines += [
        "| system | images/s, 32 clients | range over rounds | p50 ms, 1 client "
        "| p99 ms, 1 client | p50 - engine batch 1, ms | keras-server's images/s over it "
        "| server CPU ms per image, 32 clients | wrk's | rounds | failed requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in found.values():
        low, high = s.throughput_range
        ratio = f"{ours.throughput / s.throughput:.2f}x" if ours and s.throughput else "n/a"
        added = _ms(s.p50 - raw.single_p50) if raw else "n/a"
        lines.append(
            f"| {s.system} | {s.throughput:.1f} | {low:.1f} to {high:.1f} | {_ms(s.p50)} "
            f"| {_ms(s.p99)} | {added} | {ratio} | {_ms(s.server_cpu)} | {_ms(s.client_cpu)} "
            f"| {s.rounds} | {s.errors} |"
        )
    lines.append("")
    if raw:
        lines += [
            f"The engine alone (`{results.engine} {results.precision}` in the harness process, "
            f"preprocessing included): one image {_ms(raw.single_p50)} ms p50, "
            f"{raw.batch_throughput:.1f} images/s at batch {raw.batch_size}.",
            "",
        ]
    versions = m.get("versions", {})
    lines += [
        "How: each round starts each system in turn (keras-server `run_keras_server.py` "
        "`--role all` as `make serve` starts it, with a Redis the harness starts; mosec "
        f"{versions.get('mosec', '?')} with a decode process and a batching inference "
        "process; LitServe "
        f"{versions.get('litserve', '?')} with one uvicorn API server and one batching "
        f"inference worker; the peers wait at most {results.wait_ms:g} ms for a batch to "
        "fill, keras-server takes what is queued), and drives it with wrk and "
        "`bench/multipart.lua` posting the sample photos: an uncounted warm-up, then 1 "
        "connection, another warm-up, then 32 connections. Every system decodes with "
        "`keras_server.images.load_image`, runs the same compiled OpenVINO model "
        '(`load_predictor`, LATENCY hint) and answers `{"success", "predictions": top 5}`. '
        "The machine runs wrk too, which takes CPU from the servers alike. Server CPU: user "
        "+ system time of every process of the system (its session's; keras-server's Redis "
        "too) over the measured 32-connection run, per image answered "
        "(`bench.process_cpu.Probe`); with both cores busy, images/s is about the cores over "
        "it plus wrk's. The ratios depend "
        "on the CPU: AVX-512 and AMX speed up the engine, not the HTTP and decode work around "
        f"it. Raw data: `bench/results/{results.name}.json`.",
        "",
    ]
    lines += _targets(found, raw)
    return "\n".join(lines)


def _targets(found: dict[str, Summary], raw: RawResult | None) -> list[str]:
    ours = found.get(OURS)
    if ours is None:
        return []
    checks = []
    for peer in PEERS:
        other = found.get(peer)
        if other and other.throughput:
            got = ours.throughput / other.throughput
            what = f"images/s at 32 clients ≥ {THROUGHPUT_BAR}x {peer}'s"
            checks.append((what, f"{got:.2f}x", got >= THROUGHPUT_BAR))
    if raw:
        added = ours.p50 - raw.single_p50
        what = f"p50 at 1 client ≤ engine batch 1 + {ADDED_LATENCY_BAR * 1000:.0f} ms"
        checks.append((what, f"+{added * 1000:.1f} ms", added <= ADDED_LATENCY_BAR))
    for peer in PEERS:
        other = found.get(peer)
        if other:
            what = f"p50 at 1 client below {peer}'s"
            got = f"{_ms(ours.p50)} vs {_ms(other.p50)} ms"
            checks.append((what, got, ours.p50 < other.p50))
    if not checks:
        return []
    return [
        "| keras-server target | this run | met |",
        "|---|---:|---|",
        *(f"| {what} | {got} | {'yes' if ok else '**no**'} |" for what, got, ok in checks),
        "",
    ]
