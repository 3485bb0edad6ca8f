"""The peers table: what BENCHMARKS.md's peers section and bench/results/peers.md say.

Nothing here measures; every number comes from the `PeerResults` of one run.
Each system is measured in several interleaved rounds; the table gives the
median of the rounds, and the range where there were several. A run during
which the hypervisor stole more than `bench.limit.MAX_STOLEN` of the CPU time
is left out of the medians and named. Each row's fraction of the limit
(`bench.limit`) is the median over its rounds of its images/s over that
round's limit with the row's decode.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import cpu
from bench.engines import MODEL, WrkResult
from bench.limit import (
    DECODE_NAMES,
    LOAD_IMAGE,
    MAX_STOLEN,
    PILLOW,
    Limit,
    discarded,
    median,
)
from bench.raw import RawResult
from bench.report import BUSY_SHARE
from keras_server.catalog import BUILTINS

OURS = "keras-server"
PEERS = ("mosec", "litserve")
SYSTEMS = (OURS, *PEERS)
# Issue 23's targets for keras-server against the peers.
THROUGHPUT_BAR = 1.25  # images/s at 32 clients, over each peer's
# Issue 34's: keras-server's images/s at 32 clients over the limit, and its
# 1-client p50 over the engine's batch-1 forward pass plus the decode, seconds.
FRACTION_BAR = 0.9
ADDED_LATENCY_BAR = 0.003


@dataclass(frozen=True)
class Measured:
    """One system in one round: wrk at 1 connection, then at 32."""

    system: str
    round: int
    one: WrkResult
    many: WrkResult
    start_seconds: float = math.nan
    decode: str = LOAD_IMAGE  # bench.limit.DECODES: keras-server's is always load_image
    stolen: float = math.nan  # share of the CPU time stolen over both wrk levels
    # Over the measured 32-connection run (bench.process_cpu.Probe): the
    # system's processes' CPU, what other processes took, and its wall time.
    server_cpu_seconds: float = math.nan
    others_cpu_seconds: float = math.nan
    window_seconds: float = math.nan

    @property
    def label(self) -> str:
        """The table's name for the system and its decode."""
        if self.system == OURS:
            return self.system
        return f"{self.system} ({DECODE_NAMES.get(self.decode, self.decode)})"

    @property
    def discarded(self) -> bool:
        return discarded(self.stolen)

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
    limits: list[Limit] = field(default_factory=list)
    streams: int = 1  # --openvino-streams of keras-server and of the limit's engine
    peer_streams: int = 1  # the peers' (their users' default: one LATENCY stream)
    parallel_batches: int = 1  # --parallel-batches of keras-server and of the limit's engine

    @property
    def name(self) -> str:
        """The section and file name: `peers` for ResNet50, `peers-MODEL` otherwise,
        so a run on one network leaves the others' tables be."""
        return "peers" if self.model == MODEL else f"peers-{self.model}"

    def of(self, label: str) -> list[Measured]:
        """The counted runs of a table row (`Measured.label`)."""
        return [m for m in self.runs if m.label == label and not m.discarded]

    def labels(self) -> list[str]:
        """The table's rows in the order they first ran."""
        return list(dict.fromkeys(m.label for m in self.runs))

    def limit(self, round_: int, decode: str) -> float:
        """The limit with `decode` measured in `round_` (nan: none counted)."""
        for found in self.limits:
            if found.round == round_ and not found.discarded and decode in found.decode_cpu:
                return found.images_per_second(decode)
        return math.nan

    def counted_limits(self) -> list[Limit]:
        return [found for found in self.limits if not found.discarded]

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
            "streams": self.streams,
            "peer_streams": self.peer_streams,
            "parallel_batches": self.parallel_batches,
            "runs": [m.as_dict() for m in self.runs],
            "limits": [found.as_dict() for found in self.limits],
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
    decode: str = LOAD_IMAGE
    fraction: float = math.nan  # of the limit with its decode, median over rounds

    @classmethod
    def of(cls, label: str, runs: list[Measured], results: PeerResults | None = None) -> Summary:
        many = [m.many.throughput for m in runs]
        fractions = [
            m.many.throughput / results.limit(m.round, m.decode) if results else math.nan
            for m in runs
        ]
        return cls(
            system=label,
            decode=runs[0].decode,
            fraction=median(fractions),
            rounds=len(runs),
            throughput=statistics.median(many),
            throughput_range=(min(many), max(many)),
            p50=statistics.median(m.one.p50 for m in runs),
            p99=statistics.median(m.one.p99 for m in runs),
            errors=sum(m.one.errors + m.many.errors for m in runs),
            server_cpu=statistics.median(m.per_image(m.server_cpu_seconds) for m in runs),
            client_cpu=statistics.median(m.per_image(m.many.client_cpu_seconds) for m in runs),
        )


def _streams(streams: int, parallel_batches: int = 1) -> str:
    """How an engine was compiled, in words."""
    if parallel_batches > 1:
        return (
            f"with `--parallel-batches {parallel_batches}` ({parallel_batches} batches at once, "
            "a single-threaded stream each, THROUGHPUT hint; one-image batches LATENCY)"
        )
    if streams > 1:
        return f"with `--openvino-streams {streams}` (THROUGHPUT hint, one-image batches LATENCY)"
    return "with one stream (LATENCY hint)"


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def summaries(results: PeerResults) -> dict[str, Summary]:
    return {
        label: Summary.of(label, results.of(label), results)
        for label in results.labels()
        if results.of(label)
    }


def _fraction(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


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
    dropped = [m for m in results.runs if m.discarded]
    dropped_limits = [found for found in results.limits if found.discarded]
    if dropped or dropped_limits:
        named = [f"{m.label} round {m.round} ({m.stolen:.1%})" for m in dropped]
        named += [f"the limit of round {f.round} ({f.stolen:.1%})" for f in dropped_limits]
        lines += [
            f"**Discarded** (over {MAX_STOLEN:.0%} of the CPU time stolen by the host): "
            + ", ".join(named),
            "",
        ]
    raw = results.raw
    decode_cpu = median(f.decode_cpu.get(LOAD_IMAGE, math.nan) for f in results.counted_limits())
    lines += [
        "| system | images/s, 32 clients | range over rounds | fraction of the limit "
        "| keras-server's images/s over it | p50 ms, 1 client | p99 ms, 1 client "
        "| p50 - engine batch 1 - decode, ms | server CPU ms per image, 32 clients | wrk's "
        "| rounds | failed requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in found.values():
        low, high = s.throughput_range
        ratio = f"{ours.throughput / s.throughput:.2f}x" if ours and s.throughput else "n/a"
        added = _ms(s.p50 - raw.single_p50 - _or_zero(decode_cpu)) if raw else "n/a"
        lines.append(
            f"| {s.system} | {s.throughput:.1f} | {low:.1f} to {high:.1f} "
            f"| {_fraction(s.fraction)} | {ratio} | {_ms(s.p50)} | {_ms(s.p99)} | {added} "
            f"| {_ms(s.server_cpu)} | {_ms(s.client_cpu)} | {s.rounds} | {s.errors} |"
        )
    lines.append("")
    if raw:
        lines += [
            f"The engine alone (`{results.engine} {results.precision}` in the harness process, "
            f"preprocessing included): one image {_ms(raw.single_p50)} ms p50, "
            f"{raw.batch_throughput:.1f} images/s at batch {raw.batch_size}.",
            "",
        ]
    lines += _limit_lines(results)
    versions = m.get("versions", {})
    ours, theirs = (
        _streams(results.streams, results.parallel_batches),
        _streams(results.peer_streams),
    )
    peers = f", the peers {theirs} as their users would load it" if theirs != ours else ""
    streams = f"keras-server and the limit {ours}" + (peers or ", the peers too")
    lines += [
        "How: each round starts each system in turn (keras-server `run_keras_server.py` "
        "`--role all` as `make serve` starts it, with a Redis the harness starts; mosec "
        f"{versions.get('mosec', '?')} with a decode process and a batching inference "
        "process; LitServe "
        f"{versions.get('litserve', '?')} with one uvicorn API server and one batching "
        f"inference worker; the peers wait at most {results.wait_ms:g} ms for a batch to "
        "fill, keras-server takes what is queued), and drives it with wrk and "
        "`bench/multipart.lua` posting the sample photos: an uncounted warm-up, then 1 "
        "connection, another warm-up, then 32 connections. keras-server decodes with "
        f"`keras_server.images.load_image`; {_peer_decodes(results)}. All run the same "
        "compiled OpenVINO model "
        f"(`load_predictor`, {streams}) and answer "
        '`{"success", "predictions": top 5}`. '
        "The machine runs wrk too, which takes CPU from the servers alike. Server CPU: user "
        "+ system time of every process of the system (its session's; keras-server's Redis "
        "too) over the measured 32-connection run, per image answered "
        "(`bench.process_cpu.Probe`); with both cores busy, images/s is about the cores over "
        "it plus wrk's. The ratios depend "
        "on the CPU: AVX-512 and AMX speed up the engine, not the HTTP and decode work around "
        f"it. Raw data: `bench/results/{results.name}.json`.",
        "",
    ]
    lines += _targets(found, raw, decode_cpu)
    return "\n".join(lines)


def _peer_decodes(results: PeerResults) -> str:
    """How the peers decoded, in words."""
    found = {m.decode for m in results.runs if m.system != OURS}
    how = {
        PILLOW: "plain Pillow as its users would write it (open, convert to RGB, resize)",
        LOAD_IMAGE: "`load_image`",
    }
    ways = [how[d] for d in (PILLOW, LOAD_IMAGE) if d in found]
    if len(ways) == 2:
        return f"each peer runs twice a round, once decoding with {ways[0]} and once with {ways[1]}"
    return f"each peer decodes with {ways[0]}" if ways else "no peer ran"


def _or_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _limit_lines(results: PeerResults) -> list[str]:
    """The limit, round by round and its medians (bench.limit)."""
    if not results.limits:
        return []
    decodes = list(DECODE_NAMES)
    lines = [
        "**The limit**: the images/s this machine could serve if the server spent no CPU "
        "beyond the engine and the decode: the cores over the engine's CPU per image (the "
        "graph alone in the harness process, CPU time, at the batch sizes keras-server "
        "served in that round's 32-connection run, from its worker's log), the decode's "
        "(on the sample photos wrk posts, one thread) and wrk's (which shares the cores). "
        "Each system's fraction is of the limit with its own decode.",
        "",
        "| round | batch sizes served (mean) | engine CPU ms per image "
        + "".join(f"| {DECODE_NAMES[d]} CPU ms per image " for d in decodes)
        + "| wrk's CPU ms per image | cores "
        + "".join(f"| limit with {DECODE_NAMES[d]}, images/s " for d in decodes)
        + "| stolen |",
        "|---|---|---:" + "|---:" * len(decodes) + "|---:|---:" + "|---:" * len(decodes) + "|---:|",
    ]
    for found in results.limits:
        sizes = ", ".join(f"{n}x{size}" for size, n in sorted(found.batches.items(), reverse=True))
        if not found.served:
            sizes = f"none counted: {found.assumed_batch} assumed"
        mark = " (discarded)" if found.discarded else ""
        lines.append(
            f"| {found.round}{mark} | {sizes} ({found.mean_batch:.1f}) | {_ms(found.engine_cpu)} "
            + "".join(f"| {_ms(found.decode_cpu.get(d, math.nan))} " for d in decodes)
            + f"| {_ms(found.client_cpu)} | {found.cores} "
            + "".join(f"| {_rate(found, d)} " for d in decodes)
            + f"| {_share(found.stolen)} |"
        )
    counted = results.counted_limits()
    if counted:
        lines.append(
            f"| median | | {_ms(median(f.engine_cpu for f in counted))} "
            + "".join(f"| {_ms(median(f.decode_cpu.get(d, math.nan) for f in counted))} "
                      for d in decodes)
            + f"| {_ms(median(f.client_cpu for f in counted))} | {counted[0].cores} "
            + "".join(f"| {median(_limit(f, d) for f in counted):.1f} " for d in decodes)
            + "| |"
        )  # fmt: skip
    lines.append("")
    return lines


def _limit(found: Limit, decode: str) -> float:
    return found.images_per_second(decode) if decode in found.decode_cpu else math.nan


def _rate(found: Limit, decode: str) -> str:
    value = _limit(found, decode)
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def _share(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1%}"


def _targets(found: dict[str, Summary], raw: RawResult | None, decode: float) -> list[str]:
    ours = found.get(OURS)
    if ours is None:
        return []
    checks = []
    if not math.isnan(ours.fraction):
        what = f"images/s at 32 clients ≥ {FRACTION_BAR} of the limit"
        checks.append((what, f"{ours.fraction:.2f}", ours.fraction >= FRACTION_BAR))
    peers = [s for label, s in found.items() if label != OURS]
    for other in peers:
        if other.throughput:
            got = ours.throughput / other.throughput
            what = f"images/s at 32 clients ≥ {THROUGHPUT_BAR}x {other.system}'s"
            checks.append((what, f"{got:.2f}x", got >= THROUGHPUT_BAR))
    if raw and not math.isnan(decode):
        added = ours.p50 - raw.single_p50 - decode
        what = f"p50 at 1 client ≤ engine batch 1 + decode + {ADDED_LATENCY_BAR * 1000:.0f} ms"
        checks.append((what, f"+{added * 1000:.1f} ms", added <= ADDED_LATENCY_BAR))
    for other in peers:
        what = f"p50 at 1 client below {other.system}'s"
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
