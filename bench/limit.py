"""The limit: the images per second this machine could serve if the server
spent no CPU beyond the engine and the decode.

    limit = cores / (engine + decode + client)

with each term in CPU seconds per image:

- engine: the graph alone (`engine_cpu`: `Predictor.predict` in this
  process, its CPU time, not its wall time) at the batch sizes the server
  actually served (`served_batches`, from the worker's log over the measured
  run), weighted by the images each size carried;
- decode: `load_image` (or the peers' plain Pillow) on the sample photos the
  load client posts (`decode_cpu`), one thread;
- client: the load client's (wrk's) CPU per image. It runs on the same cores:
  at the limit's rate it takes `limit * client` cores, so this is
  `(cores - wrk's cores) / (engine + decode)` with wrk's cores counted at the
  rate the limit names, not at whatever rate a slower server let it run.

Every measurement also reads how much CPU time the hypervisor stole
(`Ticks`: /proc/stat's steal column); one where more than `MAX_STOLEN` was
stolen is discarded, since the neighbours then decided its numbers.
"""

from __future__ import annotations

import io
import math
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keras_server.engines.predictor import Predictor

STAT = Path("/proc/stat")
# Past this share of the machine's CPU time stolen, a run is discarded.
MAX_STOLEN = 0.02
# What the worker logs for each forward pass (keras_server/worker/loop.py).
_BATCH_LINE = re.compile(r"keras_server\.worker\.loop \[[^\]]*\] batch of (\d+) in ")
# The decodes measured: as the peers' users would write it, and keras-server's.
PILLOW = "pillow"
LOAD_IMAGE = "load_image"
DECODES = (PILLOW, LOAD_IMAGE)
DECODE_NAMES = {PILLOW: "plain Pillow", LOAD_IMAGE: "load_image"}
# Images timed at each batch size, at least (a batch of 1 runs this many times).
ENGINE_IMAGES = 32
ENGINE_RUNS = 3


@dataclass(frozen=True)
class Ticks:
    """The machine's CPU time so far, in clock ticks (all CPUs): all of it, and
    the part the hypervisor stole."""

    total: int
    steal: int

    @classmethod
    def parse(cls, stat: str) -> Ticks:
        """From /proc/stat's first line: user nice system idle iowait irq
        softirq steal (guest and guest_nice are inside user and nice already)."""
        line = stat.split("\n", 1)[0].split()
        if not line or line[0] != "cpu":
            raise ValueError(f"not /proc/stat's cpu line: {line[:1]}")
        values = [int(v) for v in line[1:9]]
        values += [0] * (8 - len(values))  # older kernels: no steal column
        return cls(total=sum(values), steal=values[7])

    @classmethod
    def read(cls) -> Ticks:
        try:
            return cls.parse(STAT.read_text())
        except OSError:
            return cls(0, 0)  # no /proc: nothing known stolen


def stolen_share(before: Ticks, after: Ticks) -> float:
    """The share of the machine's CPU time stolen between two readings (nan:
    no time passed, or no /proc)."""
    total = after.total - before.total
    return (after.steal - before.steal) / total if total > 0 else math.nan


def discarded(stolen: float) -> bool:
    return stolen > MAX_STOLEN  # nan (unknown) is kept


class Stolen:
    """The share stolen over a `with` block (`share`)."""

    def __init__(self) -> None:
        self.share = math.nan
        self._before = Ticks(0, 0)

    def __enter__(self) -> Stolen:
        self._before = Ticks.read()
        return self

    def __exit__(self, *exc: object) -> None:
        self.share = stolen_share(self._before, Ticks.read())


def served_batches(log_text: str) -> Counter[int]:
    """Batch size -> forward passes of that size, from the worker's log lines."""
    return Counter(int(m.group(1)) for m in _BATCH_LINE.finditer(log_text))


def per_image(cpu_per_batch: Mapping[int, float], served: Mapping[int, int]) -> float:
    """The engine's CPU seconds per image over the batches `served` (size ->
    passes), given each size's CPU seconds per pass."""
    images = sum(size * passes for size, passes in served.items())
    if images == 0:
        return math.nan
    return sum(cpu_per_batch[size] * passes for size, passes in served.items()) / images


def limit(cores: float, engine: float, decode: float, client: float) -> float:
    """Images per second with `cores` spent on the engine, the decode and the
    client alone (each in CPU seconds per image); see the module's docstring."""
    spent = engine + decode + (0.0 if math.isnan(client) else client)
    return cores / spent if spent > 0 else math.nan


def median(values: Iterable[float]) -> float:
    """The median of the known values (nan where none is)."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


def _cpu() -> float:
    """This process's CPU seconds so far, every thread (OpenVINO's included)."""
    return time.process_time()


def engine_cpu(predictor: Predictor, batch: np.ndarray, sizes: Iterable[int]) -> dict[int, float]:
    """CPU seconds per forward pass at each of `sizes` (images cycled from
    `batch`), the median of a few passes after an untimed one."""
    found = {}
    for size in sorted(set(sizes)):
        images = np.stack([batch[i % len(batch)] for i in range(size)])
        predictor.predict(images)  # a first pass at a size still allocates
        passes = []
        for _ in range(max(ENGINE_RUNS, -(-ENGINE_IMAGES // size))):
            started = _cpu()
            predictor.predict(images)
            passes.append(_cpu() - started)
        found[size] = statistics.median(passes)
    return found


def decode_cpu(decode: Callable[[bytes], object], samples: Sequence[bytes], passes: int) -> float:
    """CPU seconds per image of `decode` over `samples`, the median of `passes`
    passes over them all, after an untimed one."""
    for data in samples:
        decode(data)
    per_pass = []
    for _ in range(passes):
        started = _cpu()
        for data in samples:
            decode(data)
        per_pass.append((_cpu() - started) / len(samples))
    return statistics.median(per_pass)


def plain_pillow(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """An upload decoded as a peer's user would write it: open, RGB, resize to
    `size` (w, h) with Pillow's default filter (bicubic), no draft, no EXIF."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB").resize(size))


@dataclass
class Limit:
    """One round's measurement of the limit."""

    round: int
    cores: int
    # keras-server's measured 32-connection run: batch size -> passes (empty:
    # none was counted; the engine is then timed at `assumed_batch`).
    served: dict[int, int]
    engine_cpu_per_batch: dict[int, float]  # batch size -> CPU seconds a pass
    decode_cpu: dict[str, float]  # decode -> CPU seconds per image
    client_cpu: float  # wrk's CPU seconds per image, over this round's runs
    stolen: float = math.nan
    assumed_batch: int = 0
    seconds: float = math.nan  # wall time the measurement took
    notes: list[str] = field(default_factory=list)

    @property
    def batches(self) -> dict[int, int]:
        return self.served or {self.assumed_batch: 1}

    @property
    def engine_cpu(self) -> float:
        """The engine's CPU seconds per image at the batch sizes served."""
        return per_image(self.engine_cpu_per_batch, self.batches)

    @property
    def mean_batch(self) -> float:
        passes = sum(self.batches.values())
        return sum(s * n for s, n in self.batches.items()) / passes if passes else math.nan

    def images_per_second(self, decode: str) -> float:
        return limit(self.cores, self.engine_cpu, self.decode_cpu[decode], self.client_cpu)

    @property
    def discarded(self) -> bool:
        return discarded(self.stolen)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["engine_cpu"] = self.engine_cpu
        data["limits"] = {d: self.images_per_second(d) for d in self.decode_cpu}
        return data
