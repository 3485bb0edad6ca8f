"""The shared response cache (`--response-cache-ttl`, serving/cache.py):
a real Redis, real web servers (`--role web`, granian) and in-process workers
running the simulated model (deterministic answers, derived from the pixels).

Off by default; a hit answers the same body as the miss before it, without
queueing, for `/predict` (one image and several) and v2 (files and pixels);
a new version never reads an older one's entries and mixed versions skip
the lookup; entries expire after the model's TTL; a cache Redis that stops,
refuses writes or fills up never fails a request, and is counted.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from conftest import CHELSEA, COFFEE, ROCKET, post_images, start_web, stop, wait_until
from prometheus_client import REGISTRY

from keras_server.broker import messages
from keras_server.broker.redis_server import RedisServer
from keras_server.broker.request_queue import RequestQueue
from keras_server.broker.response_store import ResponseStore
from keras_server.catalog import CatalogError, model_specs
from keras_server.engines.simulated import SimulatedModel
from keras_server.serving import cache as response_cache
from keras_server.serving.workers import REFRESH_S
from keras_server.settings import Settings
from keras_server.web.app import create_app
from keras_server.worker.loop import Worker


class Counting(SimulatedModel):
    """The simulated model, counting the images it is asked about."""

    def __init__(self) -> None:
        super().__init__(batch_ms=0, image_ms=0)
        self.images = 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.images += len(images)
        return super().predict(images)


@contextmanager
def worker(settings: Settings, version: str = "1") -> Iterator[Counting]:
    """A worker of model "sim" at `version` on `settings`' queue, beating
    until the block ends; then it leaves (its heartbeat is deleted)."""
    model = Counting()
    queue = RequestQueue.open(settings.redis_url, messages.Keys(settings.queue_name), timeout=1)
    loop = Worker(queue, model, 8, result_ttl=20, name="sim", version=version)
    stop_event = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop_event,), daemon=True)
    thread.start()
    wait_until(
        lambda: any(i is not None and i.version == version for i in queue.workers().values()),
        what=f"worker {version}'s heartbeat",
    )
    try:
        yield model
    finally:
        stop_event.set()
        thread.join(10)


def predict(base: str, *files: bytes) -> requests.Response:
    return requests.post(
        f"{base}/predict",
        files=[("image", (f"{i}.png", f)) for i, f in enumerate(files)],
        timeout=30,
    )


def infer(base: str, files: list[bytes], classification: int = 0) -> requests.Response:
    output: dict[str, object] = {"name": "probabilities"}
    if classification:
        output["parameters"] = {"classification": classification}
    body = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(files)],
                "data": [base64.b64encode(f).decode() for f in files],
            }
        ],
        "outputs": [output],
    }
    return requests.post(f"{base}/v2/models/sim/infer", json=body, timeout=30)


def metric(base: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}(?:_total)?\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def cache_keys(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter(match="*:cache:*"))


@pytest.fixture
def sim(settings: Settings) -> Settings:
    return Settings(**{**settings.__dict__, "model": "sim"})


@pytest.mark.slow
def test_off_by_default(sim: Settings, redis_client: redis.Redis) -> None:
    process, base = start_web(sim, "--model", "sim", "--web-workers", "1")
    try:
        with worker(sim) as model:
            for _ in range(2):
                answer = predict(base, CHELSEA)
                assert answer.status_code == 200, answer.text
                assert "X-Cache" not in answer.headers
            assert model.images == 2  # both were queued
        assert cache_keys(redis_client) == []
        assert metric(base, "keras_server_response_cache_misses") == 0
    finally:
        stop(process)


@pytest.mark.slow
def test_a_hit_answers_the_same_body_without_queueing(
    sim: Settings, redis_client: redis.Redis
) -> None:
    process, base = start_web(
        sim, "--model", "sim", "--web-workers", "1", "--response-cache-ttl", "60"
    )
    try:
        with worker(sim) as model:
            miss = predict(base, CHELSEA)
            assert (miss.status_code, miss.headers["X-Cache"]) == (200, "miss"), miss.text
            hit = predict(base, CHELSEA)
            assert (hit.status_code, hit.headers["X-Cache"]) == (200, "hit")
            assert hit.content == miss.content
            assert model.images == 1
            assert miss.json()["model"] == {"name": "sim", "version": "1"}

            # Several images: each on its own; the cached one is not queued again.
            partial = predict(base, CHELSEA, COFFEE)
            assert partial.headers["X-Cache"] == "partial"
            assert model.images == 2
            both = predict(base, CHELSEA, COFFEE)
            assert both.headers["X-Cache"] == "hit"
            assert both.content == partial.content
            assert partial.json()["results"][0]["predictions"] == hit.json()["predictions"]

            # v2: its own form, so a /predict entry is no v2 hit.
            first = infer(base, [CHELSEA, ROCKET])
            assert (first.status_code, first.headers["X-Cache"]) == (200, "miss"), first.text
            again = infer(base, [CHELSEA, ROCKET])
            assert again.headers["X-Cache"] == "hit"
            assert again.content == first.content
            assert model.images == 4
            # The classification output is another form: a miss, then a hit.
            ranked = infer(base, [CHELSEA], classification=3)
            assert ranked.headers["X-Cache"] == "miss"
            assert infer(base, [CHELSEA], classification=3).content == ranked.content

            # v2 pixels: hashed as they come.
            pixels = np.random.default_rng(1).integers(0, 256, (1, 224, 224, 3), np.uint8)
            body = {
                "inputs": [
                    {"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                     "data": pixels.ravel().tolist()}
                ]
            }  # fmt: skip
            url = f"{base}/v2/models/sim/infer"
            cold = requests.post(url, json=body, timeout=30)
            warm = requests.post(url, json=body, timeout=30)
            assert (cold.headers["X-Cache"], warm.headers["X-Cache"]) == ("miss", "hit")
            assert warm.content == cold.content
            images = model.images

        assert images == 6
        assert metric(base, "keras_server_response_cache_hits", model="sim") == 8
        assert metric(base, "keras_server_response_cache_misses", model="sim") == 6
        stored = sum(len(redis_client.get(k) or b"") for k in cache_keys(redis_client))
        assert len(cache_keys(redis_client)) == 6
        assert metric(base, "keras_server_response_cache_stored_bytes", model="sim") == stored
        # The key names the model, the version, the form and the upload's hash.
        digest = response_cache.digest(CHELSEA)
        assert redis_client.exists(f"{{{sim.queue_name}}}:cache:sim:1:top5:{digest}")
        assert redis_client.exists(f"{{{sim.queue_name}}}:cache:sim:1:p0:{digest}")
    finally:
        stop(process)


@pytest.mark.slow
def test_a_new_version_never_reads_an_older_versions_entries(
    sim: Settings, redis_client: redis.Redis
) -> None:
    process, base = start_web(
        sim, "--model", "sim", "--web-workers", "1", "--response-cache-ttl", "60"
    )
    try:
        with worker(sim, "1"):
            first = predict(base, CHELSEA)
            assert first.json()["model"]["version"] == "1"
            assert predict(base, CHELSEA).headers["X-Cache"] == "hit"
            # Mixed versions (a rolling upgrade): any worker may answer, so no lookup.
            with worker(sim, "2"):
                time.sleep(REFRESH_S + 0.2)  # the web's view is renewed
                mixed = [predict(base, CHELSEA) for _ in range(4)]
                assert {a.headers["X-Cache"] for a in mixed} == {"miss"}
                skipped = metric(
                    base, "keras_server_response_cache_skipped", operation="lookup",
                    reason="versions",
                )  # fmt: skip
                assert skipped == 4
        # Version 1 has left; only 2 is live.
        with worker(sim, "2") as model:
            time.sleep(REFRESH_S + 0.2)  # as above: the view is renewed
            newer = predict(base, CHELSEA)
            assert newer.headers["X-Cache"] in ("miss", "hit")
            assert newer.json()["model"]["version"] == "2"
            assert predict(base, CHELSEA).json()["model"]["version"] == "2"
            # A 2 answer is stored under 2; 1's entry is still there, never read.
            digest = response_cache.digest(CHELSEA)
            assert redis_client.exists(f"{{{sim.queue_name}}}:cache:sim:1:top5:{digest}")
            assert redis_client.exists(f"{{{sim.queue_name}}}:cache:sim:2:top5:{digest}")
            before = model.images
            assert predict(base, CHELSEA).headers["X-Cache"] == "hit"
            assert model.images == before
    finally:
        stop(process)


@pytest.mark.slow
def test_requests_are_served_when_the_cache_redis_stops(sim: Settings) -> None:
    cache_redis = RedisServer().start()
    try:
        process, base = start_web(
            sim, "--model", "sim", "--web-workers", "1", "--response-cache-ttl", "60",
            "--response-cache-url", cache_redis.url,
        )  # fmt: skip
        try:
            with worker(sim) as model:
                assert predict(base, CHELSEA).headers["X-Cache"] == "miss"
                assert predict(base, CHELSEA).headers["X-Cache"] == "hit"
                cache_redis.stop()
                served = [predict(base, CHELSEA) for _ in range(3)]
                assert [a.status_code for a in served] == [200] * 3
                assert {a.headers["X-Cache"] for a in served} == {"miss"}
                assert model.images == 4
            skipped = sum(
                metric(base, "keras_server_response_cache_skipped", reason=why)
                for why in ("unreachable", "down")
            )
            # Each of the 3 requests skipped its lookup and its write (once
            # the host is marked down, without asking it).
            assert skipped == 6
            assert metric(base, "keras_server_response_cache_skipped", reason="unreachable") >= 1
        finally:
            stop(process)
    finally:
        cache_redis.close()


# -- in-process: the TTL, per model, and a cache that refuses or is full -----


def app_for(settings: Settings, tmp_path: Path, ttl: str, cache_url: str = "") -> object:
    """A test client of the app serving "sim" with `ttl` from the models file,
    and "other" (no TTL of its own: the flag's, 60 s)."""
    models = tmp_path / "models.toml"
    models.write_text(
        f'default = "sim"\n[models.sim]\nmodel = "sim"\nresponse_cache_ttl = {ttl}\n'
        '[models.other]\nmodel = "sim"\n'
    )
    changed = {
        **settings.__dict__,
        "models_file": str(models),
        "response_cache_ttl": 60.0,
        "response_cache_url": cache_url,
    }
    return create_app(Settings(**changed)).test_client()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_total", {"model": "sim", **labels}) or 0.0


def test_entries_expire_after_the_models_ttl(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    client = app_for(settings, tmp_path, ttl="1.5")
    with worker(settings):
        assert post_images(client, ROCKET).headers["X-Cache"] == "miss"
        (key,) = cache_keys(redis_client)
        assert 0 < redis_client.pttl(key) <= 1500
        assert post_images(client, ROCKET).headers["X-Cache"] == "hit"
        wait_until(lambda: not redis_client.exists(key), what="the entry to expire")
        assert post_images(client, ROCKET).headers["X-Cache"] == "miss"


def test_a_models_ttl_overrides_the_flags(settings: Settings, tmp_path: Path) -> None:
    app_for(settings, tmp_path, ttl="0")
    models = tmp_path / "models.toml"
    specs, _ = model_specs(Settings(models_file=str(models), response_cache_ttl=60))
    assert {s.name: s.response_cache_ttl for s in specs} == {"sim": 0, "other": 60}
    models.write_text('[models.sim]\nmodel = "sim"\nresponse_cache_ttl = "soon"\n')
    with pytest.raises(CatalogError, match="response_cache_ttl must be a number"):
        model_specs(Settings(models_file=str(models)))


def test_a_model_with_ttl_0_is_not_cached(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    client = app_for(settings, tmp_path, ttl="0")
    with worker(settings):
        assert "X-Cache" not in post_images(client, ROCKET).headers
    assert cache_keys(redis_client) == []


def test_a_refusing_or_full_cache_is_skipped_and_counted(
    settings: Settings, tmp_path: Path
) -> None:
    with RedisServer() as cache_redis:
        cache = redis.Redis.from_url(cache_redis.url)
        client = app_for(settings, tmp_path, ttl="60", cache_url=cache_redis.url)
        with worker(settings):
            # A replica refuses writes (READONLY): served, not stored.
            cache.replicaof("127.0.0.1", 1)
            before = sample("keras_server_response_cache_skipped", operation="store",
                            reason="refused")  # fmt: skip
            answer = post_images(client, COFFEE)
            assert (answer.status_code, answer.headers["X-Cache"]) == (200, "miss")
            assert sample("keras_server_response_cache_skipped", operation="store",
                          reason="refused") == before + 1  # fmt: skip
            cache.replicaof("NO", "ONE")
            # Nearly full under noeviction (the queue's policy): no more writes.
            used = int(cache.info("memory")["used_memory"])
            cache.config_set("maxmemory", str(used + 64 * 1024))
            time.sleep(1.1)  # the store reads the Redis's memory once a second
            before = sample("keras_server_response_cache_skipped", operation="store",
                            reason="full")  # fmt: skip
            answer = post_images(client, CHELSEA)
            assert (answer.status_code, answer.headers["X-Cache"]) == (200, "miss")
            assert sample("keras_server_response_cache_skipped", operation="store",
                          reason="full") == before + 1  # fmt: skip
            assert cache.dbsize() == 0
            # Under allkeys-lru, Redis makes room itself (evicting what it
            # likes, perhaps this very entry): writes go.
            cache.config_set("maxmemory-policy", "allkeys-lru")
            time.sleep(1.1)  # as above: the store reads the memory once a second
            stored = sample("keras_server_response_cache_stored_bytes")
            assert post_images(client, CHELSEA).headers["X-Cache"] == "miss"
            assert sample("keras_server_response_cache_stored_bytes") > stored
            assert sample("keras_server_response_cache_skipped", operation="store",
                          reason="full") == before + 1  # fmt: skip
        cache.close()


def test_an_answer_is_stored_under_the_version_it_names() -> None:
    unique = str(uuid.uuid4())
    assert json.loads(messages.success_result([], "m", unique))["model"]["version"] == unique
    assert response_cache.answered_version(messages.success_result([], "m", unique)) == unique
    assert response_cache.answered_version(messages.error_result("no")) is None
    vector = messages.probabilities_result(np.ones(3, np.float32), [], "m", "7")
    assert response_cache.answered_version(vector) == "7"


def test_cached_answers_conform_to_the_openapi_description(settings: Settings) -> None:
    from openapi_core import OpenAPI
    from test_openapi import SPEC, conforms, upload

    openapi = OpenAPI.from_dict({**SPEC, "servers": [{"url": "http://localhost/"}]})
    cached = Settings(**{**settings.__dict__, "model": "sim", "response_cache_ttl": 60.0})
    client = create_app(cached).test_client()
    with worker(settings):
        for expected in ("miss", "hit"):
            done = upload(client, CHELSEA)
            conforms(openapi, done, 200)
            assert done.response.headers["X-Cache"] == expected
            done = upload(client, COFFEE, path="/models/sim/predict")
            conforms(openapi, done, 200)
            assert done.response.headers["X-Cache"] == expected


def test_the_benchmarks_uploads_are_new_bytes_with_the_samples_pixels() -> None:
    from bench.response_cache import unique_uploads
    from keras_server.images import load_image

    uploads = unique_uploads(CHELSEA, 3, start=7)
    assert len(set(uploads)) == 3 and CHELSEA not in uploads
    expected = load_image(CHELSEA, (224, 224), 50_000_000)
    for upload in uploads:
        assert np.array_equal(load_image(upload, (224, 224), 50_000_000), expected)


def test_the_flags_are_checked() -> None:
    from keras_server.settings import SettingsError, load_settings

    assert load_settings([], {}).response_cache_ttl == 0  # off by default
    flags = ["--response-cache-ttl", "30", "--response-cache-url", "redis://c:6379/1"]
    on = load_settings(flags, {})
    assert (on.response_cache_ttl, on.response_cache_url) == (30, "redis://c:6379/1")
    for flags, reason in [
        (["--response-cache-ttl", "-1"], "0 or more"),
        (["--response-cache-url", "redis://a/0,redis://b/0"], "one Redis URL"),
        (["--response-cache-url", "http://a/"], "must start with"),
    ]:
        with pytest.raises(SettingsError, match=reason):
            load_settings(flags, {})


def test_a_cache_that_may_not_read_info_still_writes(redis_server: RedisServer) -> None:
    """The ACL docs/operations.md suggests refuses INFO (@dangerous): the
    store writes without its headroom check, and asks INFO only once."""
    admin = redis.Redis.from_url(redis_server.url)
    user = f"cache-{uuid.uuid4().hex[:6]}"
    admin.acl_setuser(user, enabled=True, passwords=["+secret"], keys=["*"],
                      commands=["+@all", "-@dangerous"])  # fmt: skip
    try:
        url = redis_server.url.replace("redis://", f"redis://{user}:secret@")
        store = ResponseStore.open(url, timeout=1.0)
        store.put_many({f"{user}:a": b"1"}, 60)
        assert store._info_refused
        store.put_many({f"{user}:b": b"2", f"{user}:c": b"3"}, 60)
        assert store.get_many([f"{user}:a", f"{user}:b", f"{user}:x"]) == [b"1", b"2", None]
    finally:
        admin.acl_deluser(user)
        admin.close()
