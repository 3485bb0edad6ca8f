"""Turn one harness run into a Markdown table, a PNG plot and BENCHMARKS.md.

Nothing here measures; every number comes from the `Results` of the run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engines import EngineRow
from .raw import RawResult
from .redis_memory import TARGET_BYTES, MemoryResult
from .serve import Level

log = logging.getLogger(__name__)

SEED = "seed (blog post)"
# Above this share of the machine's CPU time taken by other processes during a
# run, BENCHMARKS.md says the numbers are noisy.
BUSY_SHARE = 0.05


def system_name(engine: str) -> str:
    return f"keras-server ({engine})"


@dataclass
class Results:
    command: str
    mode: str
    batch_size: int
    machine: dict[str, Any]
    raw: list[RawResult] = field(default_factory=list)
    memory: list[MemoryResult] = field(default_factory=list)
    levels: list[Level] = field(default_factory=list)
    # system -> engine whose raw numbers it is compared with
    baselines: dict[str, str] = field(default_factory=dict)
    start_seconds: dict[str, float] = field(default_factory=dict)
    # systems that did not start or died, with the reason
    failures: list[str] = field(default_factory=list)
    # the engine x precision table (bench/engines.py)
    engines: list[EngineRow] = field(default_factory=list)

    def raw_of(self, system: str) -> RawResult | None:
        engine = self.baselines.get(system)
        return next((r for r in self.raw if r.engine == engine), None)

    def systems(self) -> list[str]:
        return list(dict.fromkeys(level.system for level in self.levels))

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "mode": self.mode,
            "batch_size": self.batch_size,
            "machine": self.machine,
            "raw": [r.as_dict() for r in self.raw],
            "memory": [m.as_dict() for m in self.memory],
            "levels": [level.as_dict() for level in self.levels],
            "baselines": self.baselines,
            "start_seconds": self.start_seconds,
            "failures": self.failures,
            "engines": [row.as_dict() for row in self.engines],
        }


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def markdown(results: Results) -> str:
    b = results.batch_size
    lines: list[str] = [f"**FAILED**: {failure}" for failure in results.failures]
    if lines:
        lines.append("")
    lines += engine_table(results)
    if results.raw:
        lines += [
            f"**The forward pass alone** (in process, `predict` as the worker calls it, "
            f"preprocessing included, batch {b}):",
            "",
            f"| engine | img/s at batch {b} | one image p50 ms | one image p99 ms | ready after |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in results.raw:
            setup = "n/a" if r.setup_seconds is None else f"{r.setup_seconds:.1f} s"
            lines.append(
                f"| {r.engine} | {r.batch_throughput:.1f} | {_ms(r.single_p50)} "
                f"| {_ms(r.single_p99)} | {setup} |"
            )
        lines.append("")
        if len(results.raw) > 1:
            base = results.raw[0]
            for r in results.raw[1:]:
                lines.append(
                    f"{r.engine} vs {base.engine}: "
                    f"{r.batch_throughput / base.batch_throughput:.2f}x the throughput at "
                    f"batch {b}, {r.single_p50 / base.single_p50:.2f}x the one-image latency."
                )
            lines.append("")
    if results.levels:
        lines += [
            f"**Served** over HTTP (`--batch-size {b}`, one process, the load generator on "
            "the same machine; warm-up requests not counted):",
            "",
            "| system | clients | requests | req/s | served / raw | p50 ms | p95 ms | p99 ms "
            "| failed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for level in results.levels:
            raw = results.raw_of(level.system)
            ratio = f"{level.throughput / raw.batch_throughput:.2f}" if raw else "n/a"
            lines.append(
                f"| {level.system} | {level.concurrency} | {level.requests} "
                f"| {level.throughput:.2f} | {ratio} | {_ms(level.p50)} | {_ms(level.p95)} "
                f"| {_ms(level.p99)} | {level.errors} |"
            )
        lines += [
            "",
            f"served / raw: served req/s over the raw img/s at batch {b}. req/s counts the "
            "answers that came while every client still had work (as wrk does), not the "
            "drain at the end, when fewer and fewer requests are in flight.",
            "",
        ]
        lines += _added_latency(results)
    if results.memory:
        lines += [
            "**Redis memory per queued image** (`MEMORY USAGE` of a list of "
            f"{results.memory[0].count}, and the `INFO memory` change; target for ours: "
            f"≤ {_kib(TARGET_BYTES)}):",
            "",
            "| format | message | MEMORY USAGE / image | used_memory change / image | vs 160 KiB |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in results.memory:
            lines.append(
                f"| {m.format} | {m.message_bytes:,} B "
                f"| {_kib(m.memory_usage)} ({m.memory_usage:,.0f} B) "
                f"| {_kib(m.used_memory_delta)} | {m.memory_usage / TARGET_BYTES - 1:+.2%} |"
            )
        lines.append("")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _share(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"


def _x(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def engine_table(results: Results) -> list[str]:
    """The engine x precision table, and the issue's targets checked against it."""
    rows = [r for r in results.engines if r.raw and r.one and r.many]
    failed = [r for r in results.engines if r not in rows]
    if not results.engines:
        return []
    b = results.batch_size
    keras = next((r for r in rows if r.engine == "keras"), None)
    lines = [
        "**Engines and precisions** (ResNet50, random weights saved to a file; served by "
        f"`--role all`, `--batch-size {b}`; load from wrk, a C client; the raw numbers are the "
        "same predictor in the harness process):",
        "",
        f"| engine | precision | raw 1 image ms | raw img/s at batch {b} | served p50 ms, 1 "
        "client | served req/s, 32 clients | served / raw | vs keras served | p50 - raw ms "
        "| cold start s | warm start s | top-1 agreement | max prob. diff | wrk CPU, 32 clients "
        "| other processes' CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        assert r.raw and r.one and r.many
        ratio = _ratio(r.many.throughput, r.raw.batch_throughput)
        base = keras.many.throughput if keras and keras.many else 0.0
        speed_up = _ratio(r.many.throughput, base)
        fidelity = r.fidelity or {}
        agreement = fidelity.get("top1_agreement")
        difference = fidelity.get("max_probability_difference")
        lines.append(
            f"| {r.engine} | {r.precision} | {_ms(r.raw.single_p50)} "
            f"| {r.raw.batch_throughput:.1f} | {_ms(r.one.p50)} | {r.many.throughput:.1f} "
            f"| {ratio:.2f} | {_x(speed_up)} | {_ms(r.one.p50 - r.raw.single_p50)} "
            f"| {r.cold_start:.1f} | {r.warm_start:.1f} "
            f"| {'keras itself' if agreement is None else f'{agreement:.0%}'} "
            f"| {'' if difference is None else f'{difference:.2g}'} "
            f"| {r.many.client_cpu_share:.0%} of a core | {_share(r.others_cpu_share)} |"
        )
    lines += [f"**FAILED**: {r.name}: {r.failure or 'not measured'}" for r in failed]
    lines += [
        "",
        "Served req/s counts wrk's successful answers over its run (after an uncounted "
        "warm-up); served / raw divides it by the raw img/s at the batch size. Cold start: "
        "launch to the port answering with an empty conversion cache (export, conversion, "
        "int8 calibration, the fidelity check and the warm-up); warm start: the same with the "
        "cache filled. Top-1 agreement and the largest probability difference against Keras "
        "fp32 are what the server measured at start-up on its held-out images (with random "
        "weights they say little: an untrained network has no typical activation range, so "
        "int8 calibrates poorly; the servers ran with `--min-agreement 0`). Server CPU ms per "
        "request is measured by the web-tier work (issue 10, item 6), not in this table. "
        "Other processes' CPU: the share of the machine's CPU time taken by processes other "
        "than the harness and its children while the row was measured (a shared machine "
        "makes the numbers noisy).",
        "",
    ]
    lines += _targets(rows, keras)
    return lines


def _targets(rows: list[EngineRow], keras: EngineRow | None) -> list[str]:
    """Issue 10's targets, each met or not, from this run."""
    checks = []
    by_name = {r.name: r for r in rows}
    for name, bar in (("openvino bf16", 2.0), ("openvino int8", 2.8)):
        r = by_name.get(name)
        if r and r.many and keras and keras.many:
            got = _ratio(r.many.throughput, keras.many.throughput)
            what = f"{name} served at 32 clients ≥ {bar}x keras"
            checks.append((what, f"{got:.2f}x", got >= bar))
    for r in rows:
        assert r.raw and r.one and r.many
        bar = 0.80 if r.precision == "int8" else 0.85
        got = _ratio(r.many.throughput, r.raw.batch_throughput)
        checks.append((f"{r.name}: served / raw ≥ {bar}", f"{got:.2f}", got >= bar))
        added = (r.one.p50 - r.raw.single_p50) * 1000
        checks.append((f"{r.name}: p50 at 1 client ≤ raw + 10 ms", f"+{added:.0f} ms", added <= 10))
        if r.engine == "openvino":
            checks.append(
                (f"{r.name}: warm start ≤ 15 s", f"{r.warm_start:.1f} s", r.warm_start <= 15)
            )
    if not checks:
        return []
    return [
        "| target | this run | met |",
        "|---|---:|---|",
        *(f"| {what} | {got} | {'yes' if ok else '**no**'} |" for what, got, ok in checks),
        "",
    ]


def _added_latency(results: Results) -> list[str]:
    rows = []
    for system in results.systems():
        raw = results.raw_of(system)
        one = next(
            (lv for lv in results.levels if lv.system == system and lv.concurrency == 1), None
        )
        if raw and one:
            rows.append(
                f"| {system} | {_ms(one.p50)} | {_ms(raw.single_p50)} "
                f"| {_ms(one.p50 - raw.single_p50)} |"
            )
    if not rows:
        return []
    return [
        "**Latency added by serving**, at 1 client: served p50 minus the raw one-image "
        "forward pass (p50) of the same engine:",
        "",
        "| system | served p50 ms | raw one image ms | added ms |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # A raw engine's lines take the colour of that engine served.
    names = results.systems()
    names += [system_name(r.engine) for r in results.raw if system_name(r.engine) not in names]
    colours = {name: cycle[i % len(cycle)] for i, name in enumerate(names)}
    for system in results.systems():
        colour = colours[system]
        levels = [lv for lv in results.levels if lv.system == system]
        x = [lv.concurrency for lv in levels]
        left.plot(x, [lv.throughput for lv in levels], "o-", color=colour, label=system)
        right.plot(x, [lv.p50 * 1000 for lv in levels], "o-", color=colour, label=f"{system} p50")
        right.plot(x, [lv.p99 * 1000 for lv in levels], "s--", color=colour, label=f"{system} p99")
    for raw in results.raw:
        colour = colours[system_name(raw.engine)]
        left.axhline(
            raw.batch_throughput,
            color=colour,
            linestyle=":",
            label=f"raw {raw.engine}, batch {raw.batch_size}",
        )
        right.axhline(
            raw.single_p50 * 1000, color=colour, linestyle=":", label=f"raw {raw.engine}, 1 image"
        )
    concurrencies = sorted({lv.concurrency for lv in results.levels})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        if concurrencies:
            ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrent clients")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("successful requests / s")
    left.set_ylim(bottom=0)
    left.set_title("Throughput")
    right.set_yscale("log")
    right.set_ylabel("latency, ms (log)")
    right.set_title("Latency p50 (solid) and p99 (dashed)")
    left.legend(fontsize=8)
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"ResNet50 (random weights), batch {results.batch_size}, "
        f"{results.machine.get('cpus', '?')} CPUs — {results.mode} run"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def benchmarks_md(results: Results, table: str, image: str | None) -> str:
    m = results.machine
    notes = []
    if results.mode == "quick":
        notes.append(
            "> **Quick mode**: few requests per level, for smoke tests. Run the full command "
            "on a quiet machine before quoting these numbers."
        )
    others = float(m.get("others_cpu_share", 0.0))
    if others > BUSY_SHARE:
        notes.append(
            f"> **Busy machine**: other processes used {others:.0%} of the CPU time during "
            "the run, so the numbers are noisy and the raw and served ones may not be "
            "comparable."
        )
    warnings = "\n" + "\n>\n".join(notes) + "\n" if notes else ""
    return f"""# Benchmarks

Produced by one run of

```bash
{results.command}
```

on {m.get("date", "?")}: {m.get("cpu", "?")}, {m.get("cpus", "?")} CPUs,
Python {m.get("python", "?")}, TensorFlow {m.get("tensorflow", "?")}, Keras {m.get("keras", "?")},
ONNX Runtime {m.get("onnxruntime", "?")}, OpenVINO {m.get("openvino", "?")},
Redis {m.get("redis", "?")}. The run took
{m.get("seconds", "?")} s; processes other than the harness and its children used
{float(m.get("others_cpu_share", float("nan"))):.0%} of the CPU time meanwhile (load average
{m.get("load_before", "?")} before, {m.get("load_after", "?")} after).
ResNet50 with random weights (`--weights none`, or saved to a file for the engine table;
the forward pass costs the same as with ImageNet weights).
{warnings}
{f"![throughput and latency against concurrency]({image})" if image else ""}

{table}
How it is measured (`bench/`): the raw numbers time the worker's own `predict` in the
harness process; the served numbers start `run_keras_server.py` (and the seed design,
`bench/seed_server.py`) as a subprocess on a Redis the harness starts, and drive it with
`stress_test.py`'s clients from the same machine, so the clients take CPU from the server
as they would in any one-machine test. Each level sends warm-up requests first and counts
only what follows; a level stops after its request count or its time cap, whichever comes
first. The engine table (`bench/engines.py`) drives each server with wrk instead, a C
client whose own CPU time is reported. Raw data: `bench/results/results.json`.
"""


# BENCHMARKS.md is the one home of the project's measurements, and some come from
# other harnesses (bench/v2.py, bench/scaleout.py, bench/decode_memory.py,
# bench/webcpu.py) or by hand: everything from this line on is theirs, and a
# rewrite of the page keeps it.
KEPT = "<!-- Below: measured outside bench.run. `make bench` keeps it as it is. -->"


def _kept(benchmarks: Path) -> str:
    """The hand-kept end of the page now there, from KEPT on, or nothing."""
    text = benchmarks.read_text() if benchmarks.is_file() else ""
    return "\n" + text[text.index(KEPT) :] if KEPT in text else ""


def write(results: Results, out: Path, benchmarks: Path | None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results.as_dict(), indent=2) + "\n")
    png = out / "benchmark.png"
    plotted = bool(results.levels or results.raw)  # the engine table alone has no curves
    if plotted:
        plot(results, png)
    if benchmarks is not None:
        image = png.resolve().relative_to(benchmarks.resolve().parent).as_posix()
        page = benchmarks_md(results, table, image if plotted else None)
        benchmarks.write_text(page + _kept(benchmarks))
    log.info("wrote %s, %s and %s", out / "results.md", png, benchmarks or "no BENCHMARKS.md")
    return table
