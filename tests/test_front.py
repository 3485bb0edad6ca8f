"""The HTTP front (web/front.py, granian) and the per-request costs around it:
slow clients, and the decode CPU counter."""

from __future__ import annotations

from conftest import CHELSEA
from prometheus_client import REGISTRY

from keras_server.settings import Settings
from keras_server.web.dispatch import FLUSH_CPU_S, Decoder

DECODE_CPU = "keras_server_decode_cpu_seconds_total"


def decode_cpu() -> float:
    return REGISTRY.get_sample_value(DECODE_CPU) or 0.0


def test_decode_cpu_is_counted_in_batches_and_all_of_it(settings: Settings) -> None:
    """One decode does not write the counter (a lock and a file write in
    multiprocess mode, per image); the CPU is added up and written once it
    reaches FLUSH_CPU_S, none of it lost."""
    decode = Decoder(settings)
    before = decode_cpu()
    decode(CHELSEA, (224, 224))
    assert decode_cpu() == before
    for _ in range(2000):
        if decode_cpu() != before:
            break
        decode(CHELSEA, (224, 224))
    assert decode_cpu() - before >= FLUSH_CPU_S
