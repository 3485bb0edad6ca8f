"""The engines behind one interface: conversion per engine and precision, the
conversion cache (hit, miss, corruption), the fidelity check and its refusal,
int8 on a trained model, what `--engine auto` picks, and the error exits."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import ROOT, output, png_bytes, start, start_serving, stop, wait_until
from PIL import Image

import keras_server
from examples.squares import squares, train
from keras_server import cpuinfo
from keras_server.broker.redis_server import free_port
from keras_server.catalog import CatalogError, ModelSpec, load_models_file, model_specs
from keras_server.engines import calibration, choice, opening, openvino_engine
from keras_server.engines.choice import EngineOptions, load_predictor
from keras_server.engines.conversion_cache import MANIFEST, ConversionCache, write_manifest
from keras_server.engines.predictor import EngineError, ModelLoadError
from keras_server.engines.preprocess import STEPS, batch_of, preprocessing
from keras_server.settings import Settings, SettingsError, load_settings

SQUARES_SIZE = (32, 32)


@pytest.fixture(scope="module")
def squares_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/squares.py's trained grey-scale CNN (32x32x1 -> dark/bright)."""
    return train(tmp_path_factory.mktemp("squares"))


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 PNG squares, bigger than the model's input, like user uploads."""
    directory = tmp_path_factory.mktemp("calibration")
    images, _ = squares(100, seed=5, size=48)
    for i, image in enumerate(images):
        Image.fromarray(image).save(directory / f"{i:03d}.png")
    return directory


@pytest.fixture(scope="module")
def module_cache(
    tmp_path_factory: pytest.TempPathFactory, squares_entries: dict[str, Path]
) -> Path:
    """A conversion cache the module's tests share, holding the squares
    model's OpenVINO fp32 and int8 entries from the start."""
    cache = tmp_path_factory.mktemp("cache")
    for entry in squares_entries.values():
        seed(cache, entry)
    return cache


@pytest.fixture(scope="module")
def squares_entries(
    squares_model: Path, calibration_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The squares model converted once for the module's cache tests, to
    OpenVINO fp32 and int8: each precision's entry. A test copies the one it
    starts from into a cache of its own (`seed`) rather than converting it
    again (a child process importing TensorFlow, seconds of CPU each)."""
    entries = {}
    for precision in ("fp32", "int8"):
        cache = tmp_path_factory.mktemp(f"squares-{precision}")
        load_predictor(squares_spec(squares_model, calibration_dir, precision), options(cache))
        (entries[precision],) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entries


def squares_spec(model: Path, calibration_dir: Path, precision: str) -> ModelSpec:
    """The squares model on OpenVINO at `precision` (int8: calibrated on `calibration_dir`)."""
    if precision == "int8":
        return spec_of(
            model, engine="openvino", precision="int8", calibration_dir=str(calibration_dir)
        )
    return spec_of(model, engine="openvino", precision=precision)


def seed(cache: Path, entry: Path) -> Path:
    """A copy of a converted `entry` in `cache`; the copy."""
    return Path(shutil.copytree(entry, cache / entry.name))


def spec_of(model: Path, **fields: object) -> ModelSpec:
    return ModelSpec(
        name="squares",
        source=str(model),
        labels=str(model.with_suffix(".txt")),
        preprocessing="scale",
        **fields,  # type: ignore[arg-type]
    ).validate()


def options(cache: Path | str, min_agreement: float = 0.95) -> EngineOptions:
    return EngineOptions(
        cache_dir=str(cache), min_agreement=min_agreement, max_image_pixels=50_000_000
    )


def held_out_squares(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Unseen squares at the model's input size, as the web tier sends them."""
    images, labels = squares(n, seed=123, size=SQUARES_SIZE[0])
    return images, labels


def keras_reference(model: Path) -> object:
    from keras_server.engines.keras_engine import load_classifier

    return load_classifier(spec_of(model))


def test_preprocessing_matches_keras_for_every_builtin_model() -> None:
    import importlib

    from keras_server.catalog import BUILTINS
    from keras_server.engines.preprocess import mode_of, preprocessing

    batch = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    for name, builtin in BUILTINS.items():
        module = importlib.import_module(f"keras.applications.{builtin.module}")
        expected = np.asarray(module.preprocess_input(batch.copy()))
        got = preprocessing(mode_of(ModelSpec(name=name, source=name)))(batch.copy())
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    ("mode", "channels"),
    [(mode, 3) for mode in STEPS] + [("tf", 1), ("scale", 1), ("none", 1)],
)
def test_openvino_preprocesses_inside_the_graph_as_numpy_does(mode: str, channels: int) -> None:
    """The compiled graph takes uint8 RGB and does batch_of's work itself."""
    import openvino as ov
    from openvino import opset13 as ops

    images = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    pixels = ops.parameter(ov.PartialShape([-1, 5, 4, channels]), ov.Type.f32)
    model = ov.Model([ops.multiply(pixels, ops.constant(np.float32(1.0)))], [pixels])
    compiled = openvino_engine.core().compile_model(
        openvino_engine.with_preprocessing(model, mode, channels), "CPU"
    )
    assert compiled.input(0).get_element_type() == ov.Type.u8
    expected = batch_of(images, channels, preprocessing(mode))
    np.testing.assert_allclose(compiled(images)[0], expected, rtol=1e-6, atol=1e-6)


# OpenVINO runs bf16 only where the CPU has AVX512_BF16 or AMX *and* its CPU
# plugin offers BF16 there (an AMD EPYC with avx512_bf16 was seen offering only
# FP32 and INT8, with OpenVINO 2026.4).
NEEDS_BF16 = pytest.mark.skipif(
    "BF16" not in openvino_engine.optimization_capabilities(),
    reason="this CPU's OpenVINO plugin offers no BF16 (needs AVX512_BF16 or AMX)",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "precision"),
    [
        ("onnx", "fp32"),
        ("openvino", "fp32"),
        pytest.param("openvino", "bf16", marks=NEEDS_BF16),
        ("openvino", "int8"),
    ],
)
def test_each_engine_and_precision_follows_keras_on_the_trained_model(
    squares_model: Path, calibration_dir: Path, module_cache: Path, engine: str, precision: str
) -> None:
    spec = spec_of(
        squares_model, engine=engine, precision=precision, calibration_dir=str(calibration_dir)
    )
    predictor = load_predictor(spec, options(module_cache))
    assert (predictor.engine, predictor.precision) == (engine, precision)
    assert predictor.input_shape == (32, 32, 3)
    assert list(predictor.labels) == ["dark", "bright"]
    assert predictor.fidelity is not None
    if precision == "fp32":
        assert predictor.fidelity.max_difference <= 1e-4
        assert predictor.fidelity.images == opening.CHECK_IMAGES + 20  # noise + held out
    else:
        assert predictor.fidelity.images == 20  # every fifth of 100 held out
        assert predictor.fidelity.agreement >= 0.95

    images, labels = held_out_squares()
    reference = keras_reference(squares_model).predict(images)  # type: ignore[attr-defined]
    got = predictor.predict(images)
    agreement = np.mean(np.argmax(got, axis=1) == np.argmax(reference, axis=1))
    if precision == "fp32":
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4)
    # The bar for int8 on a trained model: >= 99 % of held-out images.
    assert agreement >= 0.99, f"{engine} {precision}: {agreement:.3f}"
    assert np.mean(np.argmax(got, axis=1) == labels) >= 0.95, "and it is still right"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_two_openvino_streams_give_the_default_configurations_answers(
    squares_model: Path, calibration_dir: Path, module_cache: Path, precision: str
) -> None:
    """--openvino-streams 2 splits each batch over two infer requests (two
    CPU streams, THROUGHPUT hint): the answers of one stream, image by image,
    at batch sizes that split evenly, unevenly and not at all."""
    spec = spec_of(
        squares_model, engine="openvino", precision=precision, calibration_dir=str(calibration_dir)
    )
    default = load_predictor(spec, options(module_cache))
    streams = load_predictor(spec, dataclasses.replace(options(module_cache), openvino_streams=2))
    assert "2 streams a batch" in streams.description
    assert "streams" not in default.description
    # The loader gave a lone image the model compiled for every core.
    import openvino.properties.hint as hints

    group = streams._idle.get()  # type: ignore[attr-defined]
    streams._idle.put(group)  # type: ignore[attr-defined]
    hint = group.alone.get_compiled_model().get_property(hints.performance_mode)
    assert str(hint).endswith("LATENCY") and group.alone not in group.parts
    images, _ = held_out_squares(67)
    for n in (1, 2, 7, 32, 67):
        got, expected = streams.predict(images[:n]), default.predict(images[:n])
        assert got.shape == expected.shape == (n, 2)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def _scaling_model(directory: Path, factor: float = 2.0) -> Path:
    """An IR whose output is its input times `factor`: every image's answer
    is its own."""
    import openvino as ov
    from openvino import opset13 as ops

    pixels = ops.parameter(ov.PartialShape([-1, 5, 4, 3]), ov.Type.f32)
    model = ov.Model([ops.multiply(pixels, ops.constant(np.float32(factor)))], [pixels])
    path = directory / f"times-{factor:g}.xml"
    ov.save_model(model, str(path))
    return path


@pytest.mark.parametrize(("requests", "streams"), [(1, 1), (1, 2), (2, 2)])
def test_openvino_compiles_a_stream_per_part_of_a_batch(
    requests: int, streams: int, tmp_path: Path
) -> None:
    """Each batch's parts come back in order, whichever request ran them, with
    calls running at once (`requests` groups)."""
    import openvino.properties as props
    import openvino.properties.hint as hints

    compiled = openvino_engine.compile_model(
        _scaling_model(tmp_path), "fp32", "none", 3, requests=requests, streams=streams
    )
    hint = "LATENCY" if requests * streams == 1 else "THROUGHPUT"
    assert str(compiled.get_property(hints.performance_mode)).endswith(hint)
    # OpenVINO gives no more streams than the CPU has cores.
    assert compiled.get_property(props.num_streams) == min(requests * streams, os.cpu_count() or 1)
    classifier = openvino_engine.OpenVinoClassifier(
        compiled, labels=[str(i) for i in range(60)], description="x2", input_shape=(5, 4, 3),
        top_k=1, precision="fp32", requests=requests, streams=streams,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 128, (n, 5, 4, 3), dtype=np.uint8) for n in (1, 3, 2, 5) * 4]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(classifier.predict, batches))
    for batch, doubled in zip(batches, outputs, strict=True):
        np.testing.assert_array_equal(doubled, batch.astype(np.float32) * 2)


@pytest.mark.parametrize(("requests", "streams"), [(1, 2), (2, 1)])
def test_a_lone_image_runs_on_the_model_compiled_for_every_core(
    requests: int, streams: int, tmp_path: Path
) -> None:
    """With a batch split over streams, or parallel batches, a batch of one
    image goes to `single` (the LATENCY-compiled model) and every larger
    batch to the streams: here `single` triples where the streams' model
    doubles."""
    doubling, tripling = _scaling_model(tmp_path, 2.0), _scaling_model(tmp_path, 3.0)
    compiled = openvino_engine.compile_model(
        doubling, "fp32", "none", 3, requests=requests, streams=streams
    )
    classifier = openvino_engine.OpenVinoClassifier(
        compiled, labels=[str(i) for i in range(60)], description="x2", input_shape=(5, 4, 3),
        top_k=1, precision="fp32", requests=requests, streams=streams,
        single=openvino_engine.compile_model(tripling, "fp32", "none", 3),
    )  # fmt: skip
    rng = np.random.default_rng(1)
    for n, factor in ((1, 3), (2, 2), (5, 2), (1, 3)):
        batch = rng.integers(0, 64, (n, 5, 4, 3), dtype=np.uint8)
        np.testing.assert_array_equal(classifier.predict(batch), batch.astype(np.float32) * factor)


def test_auto_streams_are_one_per_core_with_amx_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """--openvino-streams 0: a stream per core on a CPU with AMX, with one
    batch at a time; 1 without AMX, on one core, or with parallel batches;
    a number given is kept."""
    monkeypatch.setattr(cpuinfo, "cores", lambda: 2)
    monkeypatch.setattr(cpuinfo, "flags", lambda: {"avx512f", "amx_int8"})
    assert openvino_engine.streams_for(0, 1) == 2
    assert openvino_engine.streams_for(0, 2) == 1
    assert openvino_engine.streams_for(3, 1) == 3
    monkeypatch.setattr(cpuinfo, "flags", lambda: {"avx512f"})
    assert openvino_engine.streams_for(0, 1) == 1
    monkeypatch.setattr(cpuinfo, "flags", lambda: {"amx_int8"})
    monkeypatch.setattr(cpuinfo, "cores", lambda: 1)
    assert openvino_engine.streams_for(0, 1) == 1


def test_the_openvino_streams_setting_is_bounded_and_reaches_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keras_server.worker.main import loader

    assert load_settings(["--openvino-streams", "2"], environ={}).openvino_streams == 2
    environ = {"KERAS_SERVER_OPENVINO_STREAMS": "3"}
    assert load_settings([], environ=environ).openvino_streams == 3
    assert load_settings([], environ={}).openvino_streams == 0  # auto: streams_for
    for bad in ("-1", "9", "two"):
        with pytest.raises(SettingsError, match="openvino-streams"):
            load_settings(["--openvino-streams", bad], environ={})
    seen: list[EngineOptions] = []
    monkeypatch.setattr(choice, "load_predictor", lambda spec, options: seen.append(options))
    settings = dataclasses.replace(Settings(), openvino_streams=2)
    specs = model_specs(settings)
    spec = specs.find(specs.default)
    assert spec is not None
    loader(settings, spec)()
    assert seen[0].openvino_streams == 2


@pytest.mark.slow
def test_a_second_load_is_a_cache_hit_and_needs_no_tensorflow(
    squares_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = spec_of(squares_model, engine="openvino")
    with caplog.at_level(logging.INFO, logger="keras_server.engines.choice"):
        load_predictor(spec, options(tmp_path))
    assert "conversion cache miss" in caplog.text
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert (entries[0] / MANIFEST).is_file()

    code = f"""
import sys, logging
logging.basicConfig(level=logging.INFO)
from keras_server.catalog import ModelSpec
from keras_server.engines.choice import EngineOptions, load_predictor
spec = ModelSpec(name="squares", source={str(squares_model)!r},
                 labels={str(squares_model.with_suffix(".txt"))!r}, preprocessing="scale",
                 engine="openvino", precision="fp32")
p = load_predictor(spec, EngineOptions({str(tmp_path)!r}, 0.95, 50_000_000))
assert p.fidelity.max_difference <= 1e-4, p.fidelity
heavy = sorted({{"tensorflow", "keras", "tf2onnx"}} & set(sys.modules))
sys.exit(f"imported {{heavy}}" if heavy else 0)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "conversion cache hit" in done.stderr
    assert "converted for" not in done.stderr


@pytest.mark.slow
def test_a_cold_start_converts_in_a_child_and_serves_without_tensorflow(
    squares_model: Path, tmp_path: Path
) -> None:
    """Issue 23 item 6: the serving process of a cold start holds only what its
    engine needs, and answers as Keras does."""
    images, _ = held_out_squares(64)
    np.save(tmp_path / "images.npy", images)
    cache = tmp_path / "cache"
    code = f"""
import sys, logging
import numpy as np
logging.basicConfig(level=logging.INFO, format="%(processName)s %(name)s %(message)s")
from keras_server.catalog import ModelSpec
from keras_server.engines.choice import EngineOptions, load_predictor
spec = ModelSpec(name="squares", source={str(squares_model)!r},
                 labels={str(squares_model.with_suffix(".txt"))!r}, preprocessing="scale",
                 engine="openvino", precision="fp32")
p = load_predictor(spec, EngineOptions({str(cache)!r}, 0.95, 50_000_000))
assert p.fidelity.max_difference <= 1e-4, p.fidelity
np.save({str(tmp_path / "got.npy")!r}, p.predict(np.load({str(tmp_path / "images.npy")!r})))
heavy = sorted({{"tensorflow", "keras", "tf2onnx"}} & set(sys.modules))
sys.exit(f"imported {{heavy}}" if heavy else 0)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "conversion cache miss" in done.stderr
    # The child's records come out through the parent's handlers, named as the child.
    assert "convert-squares keras_server.engines.conversion model 'squares' converted for" in (
        done.stderr
    )
    reference = keras_reference(squares_model).predict(images)  # type: ignore[attr-defined]
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), reference, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_conversion_that_dies_is_an_engine_error_and_auto_takes_keras(
    squares_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A converter killed (out of memory, a crash) stops an engine asked for by
    name with the reason; auto serves keras instead."""

    def load_and_kill_the_converter(spec: ModelSpec) -> object:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            loading = pool.submit(load_predictor, spec, options(tmp_path))
            (child,) = wait_until(lambda: converter_children() or None, what="the converter")
            os.kill(child, signal.SIGKILL)
            return loading.result(timeout=120)

    with pytest.raises(EngineError, match=r"process was killed by SIGKILL \(out of memory\?\)"):
        load_and_kill_the_converter(spec_of(squares_model, engine="openvino"))
    with caplog.at_level(logging.WARNING, logger="keras_server.engines.choice"):
        chosen = load_and_kill_the_converter(spec_of(squares_model, engine="auto"))
    assert chosen.engine == "keras"  # type: ignore[attr-defined]
    assert "killed by SIGKILL (out of memory?); use --engine keras); falling back" in caplog.text


def converter_children() -> list[int]:
    """This process's children started by multiprocessing's spawn (not its
    resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == os.getpid() and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "drop the manifest"])
def test_a_corrupt_entry_is_rebuilt_never_served(
    squares_model: Path,
    squares_entries: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    spec = spec_of(squares_model, engine="openvino")
    entry = seed(tmp_path, squares_entries["fp32"])
    weights = entry / "model.bin"
    data = bytearray(weights.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        (entry / MANIFEST).unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="keras_server"):
        predictor = load_predictor(spec, options(tmp_path))
    assert "is corrupt" in caplog.text
    assert "converted for openvino fp32" in caplog.text, "rebuilt, not served"
    assert predictor.fidelity is not None and predictor.fidelity.max_difference <= 1e-4
    assert ConversionCache(tmp_path).get(entry.name) is not None, "the rebuilt entry verifies"


@pytest.mark.slow
def test_a_new_input_is_a_new_entry(
    squares_model: Path, calibration_dir: Path, squares_entries: dict[str, Path], tmp_path: Path
) -> None:
    """Stale entries are never found: precision and preprocessing are in the key."""
    for precision, entry in squares_entries.items():
        seed(tmp_path, entry)
        load_predictor(squares_spec(squares_model, calibration_dir, precision), options(tmp_path))
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2, "two hits"
    other = ModelSpec(
        name="squares", source=str(squares_model), labels=str(squares_model.with_suffix(".txt")),
        preprocessing="none", engine="openvino",
    )  # fmt: skip
    load_predictor(other, options(tmp_path))
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 3


def _tamper_reference(entry: Path, change: str) -> None:
    """Rewrite the entry's Keras reference (and its manifest, so it verifies):
    the converted model now disagrees with what Keras said."""
    reference = entry / "reference.npz"
    with np.load(reference) as data:
        images, keras_out = data["images"], data["keras"].copy()
    if change == "shift":
        keras_out[0] += 1e-3
    else:
        keras_out = keras_out[:, ::-1].copy()  # every top-1 class swapped
    np.savez(reference, images=images, keras=keras_out)
    manifest = json.loads((entry / MANIFEST).read_text())
    write_manifest(entry, manifest["key"], manifest["inputs"], manifest["meta"])


@pytest.mark.slow
def test_fidelity_below_the_bar_is_refused(
    squares_model: Path,
    calibration_dir: Path,
    squares_entries: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fp32 = spec_of(squares_model, engine="openvino")
    _tamper_reference(seed(tmp_path, squares_entries["fp32"]), "shift")
    with pytest.raises(EngineError, match=r"differs from Keras by up to 0.001 \(allowed 0.0001\)"):
        load_predictor(fp32, options(tmp_path))
    # auto takes keras instead, and says why.
    with caplog.at_level(logging.INFO, logger="keras_server.engines.choice"):
        chosen = load_predictor(spec_of(squares_model, engine="auto"), options(tmp_path))
    assert chosen.engine == "keras"
    assert "falling back to keras" in caplog.text and "differs from Keras" in caplog.text

    int8 = squares_spec(squares_model, calibration_dir, "int8")
    _tamper_reference(seed(tmp_path, squares_entries["int8"]), "swap")
    with pytest.raises(EngineError, match=r"top-1 agreement .* is 0.0% .* --min-agreement 0.95"):
        load_predictor(int8, options(tmp_path))
    with pytest.raises(EngineError, match="--min-agreement"):
        load_predictor(
            spec_of(squares_model, precision="int8", calibration_dir=str(calibration_dir)),
            options(tmp_path),
        )  # auto never trades a lossy precision for keras
    assert load_predictor(int8, options(tmp_path, min_agreement=0.0)).precision == "int8"


@pytest.mark.slow
def test_auto_picks_openvino_fp32_on_a_cpu(squares_model: Path, module_cache: Path) -> None:
    predictor = load_predictor(spec_of(squares_model), options(module_cache))
    assert (predictor.engine, predictor.precision) == ("openvino", "fp32")
    assert "OpenVINO" in predictor.description


@pytest.mark.slow
def test_auto_picks_keras_when_tensorflow_sees_a_gpu(
    squares_model: Path, module_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(choice, "gpu_visible", lambda: True)
    assert load_predictor(spec_of(squares_model), options(module_cache)).engine == "keras"


@pytest.mark.slow
def test_openvino_that_cannot_compile_falls_back_under_auto_and_stops_by_name(
    squares_model: Path,
    module_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(path: Path, precision: str, mode: str, channels: int, **counts: int) -> None:
        raise EngineError("OpenVINO cannot compile the model for this CPU (simulated)")

    monkeypatch.setattr(openvino_engine, "compile_model", broken)
    with caplog.at_level(logging.WARNING, logger="keras_server.engines.choice"):
        assert load_predictor(spec_of(squares_model), options(module_cache)).engine == "keras"
    assert "cannot compile the model for this CPU (simulated)); falling back to keras" in (
        caplog.text
    )
    with pytest.raises(ModelLoadError, match="cannot compile"):
        load_predictor(spec_of(squares_model, engine="openvino"), options(module_cache))


@pytest.mark.slow
def test_openvino_missing(
    squares_model: Path, module_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setitem(sys.modules, "keras_server.engines.openvino_engine", None)
    monkeypatch.delattr(keras_server.engines, "openvino_engine")
    assert load_predictor(spec_of(squares_model), options(module_cache)).engine == "keras"
    with pytest.raises(ModelLoadError, match="--engine openvino: not installed"):
        load_predictor(spec_of(squares_model, engine="openvino"), options(module_cache))


def test_bf16_on_a_cpu_without_it_is_refused(
    squares_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The choice: exit 1 with the reason, never a silent fp32."""
    monkeypatch.setattr(openvino_engine, "optimization_capabilities", lambda: {"FP32", "INT8"})
    for engine in ("openvino", "auto"):
        with pytest.raises(ModelLoadError, match=r"this CPU cannot run BF16 .* --precision fp32"):
            load_predictor(
                spec_of(squares_model, engine=engine, precision="bf16"), options(tmp_path)
            )


def test_an_untested_openvino_on_amd_is_refused(
    squares_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpuinfo, "vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(openvino_engine, "version", lambda: "2025.3.0")
    with pytest.raises(ModelLoadError, match=r"2025\.3\.0 is not tested on AMD CPUs"):
        load_predictor(spec_of(squares_model, engine="openvino"), options(tmp_path))


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (None, "--precision int8 needs --calibration-dir DIR"),
        ("missing", "no such directory"),
        ("empty", "the directory holds no files"),
    ],
)
def test_int8_without_calibration_images_is_refused_before_loading(
    tmp_path: Path, contents: str | None, message: str
) -> None:
    directory = None
    if contents == "missing":
        directory = str(tmp_path / "nope")
    elif contents == "empty":
        directory = str(tmp_path)
    spec = ModelSpec(
        name="m", source=str(tmp_path / "never-loaded.keras"), engine="openvino",
        precision="int8", calibration_dir=directory,
    )  # fmt: skip
    with pytest.raises(ModelLoadError, match=message):
        load_predictor(spec, options(tmp_path / "cache"))


def test_an_unreadable_calibration_file_is_a_clear_refusal(tmp_path: Path) -> None:
    directory = tmp_path / "calibration"
    directory.mkdir()
    (directory / "a.png").write_bytes(b"\x89PNG")
    # A regular file whose read fails even for root (EIO at offset 0).
    (directory / "b.png").symlink_to("/proc/self/mem")
    files = calibration.files_of(str(directory))
    for read in (calibration.digest, lambda f: calibration.load(f, (8, 8), 10**6)):
        with pytest.raises(ModelLoadError, match=r"--calibration-dir .*: cannot read b.png"):
            read(files)


@pytest.mark.slow
def test_int8_with_no_readable_image_is_refused(squares_model: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    (junk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    spec = spec_of(squares_model, engine="openvino", precision="int8", calibration_dir=str(junk))
    with pytest.raises(ModelLoadError, match="none of its 2 files is a readable image"):
        load_predictor(spec, options(tmp_path / "cache"))


def test_engine_and_precision_knobs() -> None:
    defaults = load_settings([], environ={})
    assert (defaults.engine, defaults.precision) == ("auto", "fp32")
    assert defaults.cache_dir == "~/.cache/keras-server" and defaults.min_agreement == 0.95
    env = {"KERAS_SERVER_ENGINE": "onnx", "KERAS_SERVER_PRECISION": "int8"}
    assert load_settings(["--engine", "OpenVINO"], environ=env).engine == "openvino"
    with pytest.raises(SettingsError, match="--engine='tensorrt': must be one of auto, keras"):
        load_settings(["--engine", "tensorrt"], environ={})
    with pytest.raises(SettingsError, match="--precision='fp16': must be one of fp32, bf16, int8"):
        load_settings(["--precision", "fp16"], environ={})
    with pytest.raises(SettingsError, match=r"--min-agreement='1\.5': must be a number from 0"):
        load_settings(["--min-agreement", "1.5"], environ={})
    with pytest.raises(CatalogError, match="precision int8 runs only on the openvino engine"):
        model_specs(load_settings(["--engine", "keras", "--precision", "int8"], environ={}))
    (spec,), _ = model_specs(
        load_settings(["--precision", "bf16", "--calibration-dir", "/data/cal"], environ={})
    )
    assert (spec.engine, spec.precision, spec.calibration_dir) == ("auto", "bf16", "/data/cal")


def test_models_file_sets_engine_and_precision_per_model(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        '[models.a]\nmodel = "resnet50"\nengine = "openvino"\nprecision = "int8"\n'
        'calibration_dir = "cal"\n[models.b]\nmodel = "mobilenet_v2"\n'
    )
    specs, _ = load_models_file(models)
    assert (specs[0].engine, specs[0].precision) == ("openvino", "int8")
    assert specs[0].calibration_dir == str((tmp_path / "cal").resolve())
    assert (specs[1].engine, specs[1].precision) == (None, None)
    # A model that names none gets the flags'.
    settings = Settings(models_file=str(models), engine="keras")
    a, b = model_specs(settings)[0]
    assert (a.engine, b.engine, b.precision) == ("openvino", "keras", "fp32")
    models.write_text('[models.a]\nmodel = "resnet50"\nprecision = "fp16"\n')
    with pytest.raises(CatalogError, match="precision 'fp16' is not one of fp32, bf16, int8"):
        load_models_file(models)


@pytest.mark.slow
def test_int8_server_without_calibration_exits_1_before_listening(
    squares_model: Path, settings: Settings
) -> None:
    process = start(
        "--model", str(squares_model), "--labels", str(squares_model.with_suffix(".txt")),
        "--precision", "int8", "--redis-url", settings.redis_url, "--port", str(free_port()),
    )  # fmt: skip
    process.wait(timeout=120)
    log = output(process)
    assert process.returncode == 1, log
    assert "--precision int8 needs --calibration-dir DIR" in log
    assert "listening" not in log and "Traceback" not in log


@pytest.fixture
def int8_server(squares_model: Path, calibration_dir: Path, settings: Settings) -> Iterator[str]:
    process, base = start_serving(
        settings, "--model", str(squares_model), "--labels",
        str(squares_model.with_suffix(".txt")), "--preprocessing", "scale", "--engine", "openvino",
        "--precision", "int8", "--calibration-dir", str(calibration_dir), "--batch-size", "4",
        timeout=180,
    )  # fmt: skip
    yield base
    log = stop(process)
    assert process.returncode == 0, log
    assert "served by openvino int8" in log


def live_models(base: str) -> list[dict[str, object]] | None:
    models = requests.get(base + "/models", timeout=5).json()["models"]
    return models if all(m["live_workers"] for m in models) else None


@pytest.mark.slow
def test_int8_server_answers_and_shows_its_engine_and_fidelity(int8_server: str) -> None:
    base = int8_server
    images, labels = squares(12, seed=77, size=64)
    names = ["dark", "bright"]
    for image, label in zip(images, labels, strict=True):
        answer = requests.post(
            base + "/predict",
            files={"image": ("x.png", png_bytes(Image.fromarray(image)))},
            timeout=30,
        ).json()
        assert answer["predictions"][0]["label"] == names[label]
    (model,) = wait_until(lambda: live_models(base), what="a live worker")  # type: ignore[misc]
    assert (model["engine"], model["precision"]) == ("openvino", "int8")
    assert model["fidelity"]["images"] == 20
    assert model["fidelity"]["top1_agreement"] >= 0.95
    assert "OpenVINO" in model["description"] and "int8" in model["description"]
    metrics = requests.get(base + "/metrics", timeout=5).text
    labels_text = 'engine="openvino",model="squares",precision="int8"'
    assert f"keras_server_engine_info{{{labels_text}}} 1.0" in metrics
    assert f"keras_server_engine_top1_agreement{{{labels_text}}}" in metrics
    assert f"keras_server_engine_max_probability_difference{{{labels_text}}}" in metrics


@pytest.mark.slow
def test_resnet50_in_openvino_equals_keras(
    resnet_weights: Path, resnet_classifier: object, tmp_path: Path
) -> None:
    """The one ResNet50 conversion: fp32 matches Keras within 1e-4 on the photos."""
    from keras_server.images import load_image

    spec = ModelSpec(name="resnet50", source="resnet50", weights=str(resnet_weights))
    photos = np.stack(
        [
            load_image(p.read_bytes(), (224, 224), 50_000_000)
            for p in sorted(ROOT.glob("images/*.*g"))
        ]
    )
    predictor = load_predictor(dataclasses.replace(spec, engine="openvino"), options(tmp_path))
    expected = resnet_classifier.predict(photos)
    np.testing.assert_allclose(predictor.predict(photos), expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(predictor.predict(photos[:1]), expected[:1], rtol=0, atol=1e-4)
