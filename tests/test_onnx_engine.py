"""`--engine onnx`: the same model in ONNX Runtime gives Keras's predictions,
and the real server serves with it."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import IMAGES, start_serving, stop

from keras_server.catalog import ModelSpec
from keras_server.engines.choice import EngineOptions, load_predictor
from keras_server.engines.keras_engine import Classifier, load_classifier
from keras_server.images import load_image
from keras_server.settings import Settings

RESNET50_INPUT = (224, 224)  # (width, height) the web tier resizes to for ResNet50

pytestmark = pytest.mark.slow

SAMPLES = sorted(IMAGES.glob("*.png")) + sorted(IMAGES.glob("*.jpg"))


def sample_batch() -> np.ndarray:
    """The sample photos as the web tier sends them, plus noise to make 6."""
    photos = [load_image(p.read_bytes(), RESNET50_INPUT, 50_000_000) for p in SAMPLES]
    noise = np.random.default_rng(1).integers(0, 256, (6 - len(photos), 224, 224, 3), np.uint8)
    return np.concatenate([np.stack(photos), noise])


def test_onnx_predictions_equal_keras_on_the_same_weights(
    resnet_weights: Path, resnet_classifier: Classifier, tmp_path: Path
) -> None:
    spec = ModelSpec(name="resnet50", source="resnet50", weights=str(resnet_weights))
    keras_engine = resnet_classifier
    onnx_engine = load_predictor(
        dataclasses.replace(spec, engine="onnx"), EngineOptions(str(tmp_path), 0.95, 50_000_000)
    )
    assert isinstance(keras_engine, Classifier)
    assert "ONNX Runtime" in onnx_engine.description
    assert onnx_engine.input_shape == keras_engine.input_shape
    assert onnx_engine.labels == keras_engine.labels
    images = sample_batch()
    expected = keras_engine.predict(images)
    np.testing.assert_allclose(onnx_engine.predict(images), expected, rtol=0, atol=1e-4)
    # One image at a time too: the batch dimension is dynamic in the export.
    np.testing.assert_allclose(onnx_engine.predict(images[:1]), expected[:1], rtol=0, atol=1e-4)


def test_server_serves_with_the_onnx_engine(small_model_path: Path, settings: Settings) -> None:
    process, base = start_serving(
        settings, "--engine", "onnx", "--weights", str(small_model_path), "--batch-size", "4",
        timeout=180,
    )  # fmt: skip
    url = base + "/predict"
    try:
        data = (IMAGES / "coffee.png").read_bytes()
        response = requests.post(url, files={"image": ("coffee.png", data)}, timeout=60)
    finally:
        log = stop(process)
    assert process.returncode == 0, log
    assert "served by onnx fp32" in log
    assert "onnx fp32 against Keras fp32 on 8 images" in log
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    # What Keras gives for the same model loaded the way the server loads it.
    reference = load_classifier(
        ModelSpec(name="resnet50", source="resnet50", weights=str(small_model_path))
    )
    image = load_image(data, RESNET50_INPUT, 50_000_000)
    expected = reference.predict(image[None])[0]
    index = {label: i for i, label in enumerate(reference.labels)}
    assert len(served) == 5
    for p in served:
        assert p["probability"] == pytest.approx(expected[index[p["label"]]], abs=1e-4)
    probabilities = [p["probability"] for p in served]
    assert probabilities == sorted(probabilities, reverse=True)
