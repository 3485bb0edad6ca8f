"""--parallel-batches: a worker runs that many batches at once (a claim loop
each, sharing the model), and OpenVINO is compiled for that many requests."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import CHELSEA, post_images, wait_until

from keras_server.broker.redis_server import RedisServer
from keras_server.catalog import model_specs
from keras_server.engines import openvino_engine
from keras_server.engines import predictor as predictor_module
from keras_server.engines.predictor import parallel_batches_for
from keras_server.engines.simulated import SimulatedModel
from keras_server.settings import Settings, SettingsError, load_settings
from keras_server.web.app import create_app
from keras_server.worker.loop import FairLock, serve
from keras_server.worker.main import make_workers


def test_the_setting_is_bounded() -> None:
    assert load_settings(["--parallel-batches", "2"], environ={}).parallel_batches == 2
    assert load_settings([], environ={}).parallel_batches == 0  # chosen for the engine
    for bad in ("-1", "9", "two"):
        with pytest.raises(SettingsError, match="parallel-batches"):
            load_settings(["--parallel-batches", bad], environ={})


@pytest.mark.parametrize(
    ("flags", "engine", "expected"),
    [
        ("amx_int8 amx_tile avx512f", "openvino", 2),  # one per core
        ("amx_int8 amx_tile avx512f", "keras", 1),  # measured for OpenVINO only
        ("avx2 avx512f avx512_vnni", "openvino", 1),  # without AMX it did not pay
    ],
)
def test_the_default_is_one_batch_per_core_for_openvino_with_amx(
    flags: str, engine: str, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predictor_module.cpuinfo, "read", lambda: f"flags\t\t: {flags}\n")
    monkeypatch.setattr(predictor_module.cpuinfo, "cores", lambda: 2)
    assert parallel_batches_for(0, engine) == expected
    assert parallel_batches_for(3, engine) == 3  # asked for: as asked
    # The worker runs as many claim loops as the engine was compiled for.
    settings = Settings(redis_url="redis://127.0.0.1:1", redis_url_given=True)

    class Engine(SimulatedModel):
        pass

    model = Engine(0, 0)
    model.engine = engine  # type: ignore[misc]
    assert len(make_workers(settings, model)) == expected


def test_fair_lock_admits_its_holders_at_once_in_arrival_order() -> None:
    lock = FairLock(2)
    inside: list[str] = []
    release = threading.Event()

    def take(name: str) -> None:
        with lock:
            inside.append(name)
            release.wait(10)

    threads = [threading.Thread(target=take, args=(n,)) for n in ("a", "b", "c")]
    for thread in threads:
        thread.start()
        wait_until(lambda t=thread: lock.asked >= threads.index(t) + 1, timeout=5, what="queued")
    wait_until(lambda: len(inside) == 2, timeout=5, what="two holders")
    assert inside == ["a", "b"], "the third waits while two hold a turn"
    release.set()
    for thread in threads:
        thread.join(5)
    assert inside == ["a", "b", "c"]
    assert lock.asked == 0


class Together(SimulatedModel):
    """Answers a batch only once `parties` batches are inside predict at once
    (a barrier): with fewer running together it fails the batch."""

    def __init__(self, parties: int) -> None:
        super().__init__(0, 0)
        self.barrier = threading.Barrier(parties, timeout=10)

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.barrier.wait()
        return super().predict(images)


def test_two_claim_loops_run_two_batches_at_once(redis_server: RedisServer) -> None:
    settings = Settings(
        redis_url=redis_server.url,
        redis_url_given=True,
        queue_name="parallel",
        batch_size=1,
        parallel_batches=2,
    )
    workers = make_workers(settings, Together(2))
    assert len(workers) == 2
    assert len({w.id for w in workers}) == 2, "each loop claims under its own id"
    stop = threading.Event()
    serving = threading.Thread(target=serve, args=(workers, stop), daemon=True)
    serving.start()
    client = create_app(settings).test_client()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post_images(client, CHELSEA), range(4)))
    finally:
        stop.set()
        serving.join(10)
    assert [a.status_code for a in answers] == [200] * 4, [a.get_json() for a in answers]
    assert not serving.is_alive()


def _scaling_model(directory: Path) -> Path:
    import openvino as ov
    from openvino import opset13 as ops

    pixels = ops.parameter(ov.PartialShape([-1, 5, 4, 3]), ov.Type.f32)
    model = ov.Model([ops.multiply(pixels, ops.constant(np.float32(2.0)))], [pixels])
    path = directory / "model.xml"
    ov.save_model(model, str(path))
    return path


@pytest.mark.parametrize("requests", [1, 2])
def test_openvino_compiles_for_its_requests(requests: int, tmp_path: Path) -> None:
    import openvino.properties.hint as hints

    compiled = openvino_engine.compile_model(
        _scaling_model(tmp_path), "fp32", "none", 3, requests=requests
    )
    expected = "THROUGHPUT" if requests > 1 else "LATENCY"
    assert str(compiled.get_property(hints.performance_mode)).endswith(expected)
    classifier = openvino_engine.OpenVinoClassifier(
        compiled,
        labels=[str(i) for i in range(60)],
        description="x2",
        input_shape=(5, 4, 3),
        top_k=1,
        precision="fp32",
        requests=requests,
    )
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 128, (n, 5, 4, 3), dtype=np.uint8) for n in (1, 3, 2, 4) * 4]
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(classifier.predict, batches))
    for batch, output in zip(batches, outputs, strict=True):
        np.testing.assert_array_equal(output, batch.astype(np.float32) * 2)


def test_the_settings_reach_the_engine_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from keras_server.engines import choice
    from keras_server.worker.main import loader

    seen: list[choice.EngineOptions] = []
    monkeypatch.setattr(choice, "load_predictor", lambda spec, options: seen.append(options))
    settings = dataclasses.replace(Settings(), parallel_batches=3)
    spec = model_specs(settings).find(model_specs(settings).default)
    assert spec is not None
    loader(settings, spec)()
    assert seen[0].parallel_batches == 3
